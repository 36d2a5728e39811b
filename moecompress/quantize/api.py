"""Library entry points of quantization.

* :func:`quantize_model` — quantize a loaded model's experts in place (their weights become the
  dequantized values) and return what a writer needs: widths, scales and zero points.
* :func:`quantize_checkpoint` — load, calibrate, quantize, write a ``compressed-tensors`` or
  ``fake`` checkpoint with a ``moecompress.json`` record. Options: :class:`QuantizeOptions`.

Schedule: with an allocation (granularity ``layer``/``expert``), a first pass measures every
expert's output loss at every candidate width on the original model's activations (MC-MoE's
pre-loading allocation) and solves the integer program; then the experts are quantized layer by
layer (``capture.LayerCursor``), GPTQ seeing the activations of the already-quantized layers
before it (layer-wise sequential, as GPTQ and llm-compressor do).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from ..arch import MoEModel, moe_view
from ..capture import LayerCursor
from ..errors import MoECompressError
from ..onload import onloaded
from . import allocate
from .experts import PARTS, ExpertTraffic, output_loss, quantize_experts
from .grid import QParams, dequantized, dtype_bits, matrix_bits, rtn, weight_args
from ..options import QuantizeOptions, library_function, validate


def _recorded(opts: QuantizeOptions) -> dict:
    """The resolved options as recorded (the quantizer that really ran: FP8 rounds to nearest)."""
    return {**opts.recorded(), "quantizer": opts.effective_quantizer}


@dataclass
class QuantizeResult:
    options: dict
    widths: dict[int, list]  # MoE layer -> width of each expert (int bits or "fp8")
    how: dict[int, list[str]]  # MoE layer -> quantizer that produced each expert
    expert_shapes: dict[str, tuple[int, int]]  # canonical part -> [out, in]
    scale_bits: int
    store_dtype: torch.dtype = torch.float32  # what scales are stored in (the checkpoint's dtype)
    qparams: dict[int, dict[int, dict[str, QParams]]] = field(default_factory=dict, repr=False)
    non_expert: dict[str, dict] = field(default_factory=dict, repr=False)  # module name -> {"qparams", "width"}
    losses: dict[int, list[list[float]]] = field(default_factory=dict)  # layer -> [expert][candidate] eps
    budget_bits: float | None = None
    notes: list[str] = field(default_factory=list)  # what was changed from the request, one line each
    seconds: float = 0.0

    def expert_bits(self, layer: int, e: int) -> float:
        o = self.options
        return sum(matrix_bits(self.expert_shapes[p], self.widths[layer][e], o["group_size"], o["symmetric"],
                               self.scale_bits) for p in PARTS)

    @property
    def expert_weights(self) -> int:
        per = sum(a * b for a, b in self.expert_shapes.values())
        return per * sum(len(w) for w in self.widths.values())

    @property
    def total_bits(self) -> float:
        return sum(self.expert_bits(li, e) for li, ws in self.widths.items() for e in range(len(ws)))

    @property
    def average_bits(self) -> float:
        """Stored bits per expert weight: weights, scales and zero points."""
        return self.total_bits / self.expert_weights

    @property
    def average_width(self) -> float:
        ws = [8 if w == "fp8" else w for v in self.widths.values() for w in v]
        return float(np.mean(ws))

    @property
    def fallbacks(self) -> list[dict]:
        return [{"layer": li, "expert": e, "reason": h} for li, hs in self.how.items() for e, h in enumerate(hs)
                if h.startswith("rtn (")]

    def layer_widths(self) -> dict[int, object]:
        """Width per MoE layer where all its experts share one, else "mixed"."""
        return {li: ws[0] if len(set(ws)) == 1 else "mixed" for li, ws in self.widths.items()}

    def to_dict(self, *, with_time: bool = True) -> dict:
        d = {"options": self.options, "average_bits": round(self.average_bits, 6),
             "average_width": round(self.average_width, 6), "expert_weights": self.expert_weights,
             "expert_bytes": int(round(self.total_bits / 8)), "budget_bits": self.budget_bits,
             "scale_bits": self.scale_bits,
             "layer_widths": {str(k): v for k, v in self.layer_widths().items()},
             "fallbacks": self.fallbacks, "non_expert_modules": len(self.non_expert), "notes": self.notes}
        if self.options["granularity"] == "expert":
            d["expert_widths"] = {str(k): v for k, v in self.widths.items()}
        if with_time:
            d["seconds"] = round(self.seconds, 3)
        return d


def _store_dtype(model) -> torch.dtype:
    from ..checkpoint import stored_dtype

    return stored_dtype(model.config) or next(model.parameters()).dtype


@torch.no_grad()
def quantize_model(model, tokens: torch.Tensor | None = None, *, options: QuantizeOptions | None = None,
                   progress: bool = False, store_dtype: torch.dtype | None = None, **kwargs) -> QuantizeResult:
    """Quantize ``model``'s routed experts in place (dequantized values in the model's dtype) and,
    with ``non_expert_bits`` < 16, its other linear layers (round to nearest). ``tokens`` [N, S]
    are the calibration sequences (needed by gptq and by allocations). Options: the fields of
    :class:`~moecompress.options.QuantizeOptions` as keywords, or ``options=``; the calibration
    source and loading options are the checkpoint entry point's and are not used here.
    ``store_dtype``: the dtype the scales will be stored in (default: the dtype the model's config
    records; a model loaded in another dtype than its checkpoint's must be told the checkpoint's)."""
    start = time.perf_counter()
    opts = options if options is not None else validate(QuantizeOptions, kwargs)
    view = moe_view(model)
    from ..onload import is_streamed

    if is_streamed(model):
        # The experts are edited in place; accelerate's offload would drop edits of an offloaded
        # layer, so the written checkpoint could mix quantized scales with unquantized weights.
        raise MoECompressError("quantize does not stream yet: drop --max-gpu-memory / --max-cpu-memory (the model "
                               "must fit in memory; only the writing goes shard by shard)")
    if opts.needs_calibration and tokens is None:
        raise MoECompressError(f"quantizer '{opts.effective_quantizer}' with granularity '{opts.granularity}' needs "
                               "calibration tokens; pass --calib FILE")
    store = store_dtype or _store_dtype(model)
    first = view.layers[0]
    shapes = {"gate": tuple(first.gate_proj.shape[1:]), "up": tuple(first.up_proj.shape[1:]),
              "down": tuple(first.down_proj.shape[1:])}
    group_size, note = resolve_group_size(shapes, opts.group_size)
    if note:
        opts = opts.model_copy(update={"group_size": group_size})
    batch_size = opts.resolved_batch_size(None, False) if opts.batch_size is None else opts.batch_size
    opts_run = _Run(opts, batch_size, progress)
    result = QuantizeResult(options=_recorded(opts), widths={}, how={}, expert_shapes=shapes,
                            scale_bits=dtype_bits(store), store_dtype=store, notes=[note] if note else [])
    if opts.granularity == "uniform":
        result.widths = {layer.layer_idx: [opts.uniform_width()] * layer.num_experts for layer in view}
    else:
        _allocate(model, view, tokens, opts_run, result, store)
    _quantize_experts(model, view, tokens, opts_run, result, store)
    if opts.non_expert_bits < 16:
        _quantize_non_experts(model, view, opts, result, store)
    result.seconds = time.perf_counter() - start
    return result


class _Run:
    """The options of one run plus what the run resolved (batch size, progress, quantizer)."""

    def __init__(self, opts: QuantizeOptions, batch_size: int, progress: bool):
        self.opts, self.batch_size, self.progress = opts, batch_size, progress
        self.quantizer = opts.effective_quantizer

    def __getattr__(self, name):
        return getattr(self.opts, name)


def resolve_group_size(shapes: dict, group_size: int) -> tuple[int, str | None]:
    """The group size that the experts take, and a one-line note when it is not ``group_size``.

    A group must divide every expert matrix's input size; narrow experts (an intermediate size
    under the default 128, e.g. Qwen3-MoE-style fine-grained experts) would refuse the default.
    The largest power of two <= ``group_size`` that divides all of them is used instead, but not
    below 32 (the smallest group the serving MoE kernels take; below a request under 32), else
    one scale per output channel (0)."""
    widths = sorted({inp for _, inp in shapes.values()})
    if not group_size or all(w % group_size == 0 for w in widths):
        return group_size, None
    floor = min(32, group_size)
    g = 1 << (group_size.bit_length() - 1)  # largest power of two <= group_size
    while g >= floor and any(w % g for w in widths):
        g //= 2
    g = g if g >= floor else 0
    narrow = min(w for w in widths if w % group_size)
    return g, (f"--group-size {group_size} does not divide the experts' input size {narrow}; using "
               f"{g if g else 'one scale per output channel (0)'}")


def _min_tokens(opts: QuantizeOptions, layer) -> int:
    # GPTQModel's rule: a module that saw too few calibration tokens is rounded to nearest
    # instead; "too few" here defaults to fewer tokens than the widest input (a rank-deficient
    # Hessian that the dampening alone would decide).
    return opts.min_tokens or max(layer.hidden_size, layer.intermediate_size)


def _quantize_kw(opts: QuantizeOptions, layer, store) -> dict:
    return dict(quantizer=opts.quantizer, group_size=opts.group_size, symmetric=opts.symmetric, store_dtype=store,
                damp=opts.damp, min_tokens=_min_tokens(opts, layer))


def _allocate(model, view: MoEModel, tokens, opts: QuantizeOptions, result: QuantizeResult, store) -> None:
    """MC-MoE's losses for every expert and candidate width on the original model, then the
    integer program (or the frequency / random baselines). The loss of a width is measured with
    round-to-nearest weights, as the authors' ``order_quant`` does, whatever quantizer then
    writes the model (GPTQ would triple the allocation's cost for a ranking RTN already gives)."""
    cands = opts.candidates
    cursor = LayerCursor(model, tokens, batch_size=opts.batch_size, view=view)
    per_batch = -(-opts.loss_tokens // len(cursor.hidden))  # the loss sample spans every batch
    size_of = lambda b: sum(matrix_bits(result.expert_shapes[p], b, opts.group_size, opts.symmetric,  # noqa: E731
                                        result.scale_bits) for p in PARTS)
    sizes = np.array([size_of(b) for b in cands])
    target = size_of(opts.bits)
    per_layer: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for layer in view:
        li = layer.layer_idx
        traffic = ExpertTraffic(layer, hessians=False, sample_tokens=opts.loss_tokens, sample_per_batch=per_batch,
                                seed=opts.seed * 1_000_003 + li)
        cursor.advance(li, [traffic], progress=opts.progress, description=f"quantize: allocation, layer {li}")
        eps = np.zeros((layer.num_experts, len(cands)))
        if opts.allocation != "random":
            with onloaded(layer.block):
                for j, b in enumerate(cands):
                    qs = quantize_experts(layer, dict.fromkeys(range(layer.num_experts), b), traffic,
                                          **{**_quantize_kw(opts, layer, store), "quantizer": "rtn"})
                    for e, q in qs.items():
                        eps[e, j] = output_loss(layer, e, traffic, q.weights)
        per_layer[li] = (eps, traffic.freq.numpy(), traffic.weight.numpy())
        result.losses[li] = eps.tolist()
    layers = [layer.layer_idx for layer in view]
    E = {layer.layer_idx: layer.num_experts for layer in view}
    if opts.granularity == "expert":
        for li in layers:
            eps, freq, weight = per_layer[li]
            size = np.tile(sizes, (E[li], 1))
            budget = target * E[li]
            if opts.allocation == "random":
                choice = allocate.random_allocation(size, budget, opts.seed * 7919 + li)
            else:
                choice = allocate.solve(allocate.allocation_cost(opts.allocation, eps, freq, weight, opts.alpha,
                                                                 opts.beta), size, budget)
            result.widths[li] = [cands[j] for j in choice]
        result.budget_bits = float(target * sum(E.values()))
        return
    # layer granularity: one width per layer, one budget for the model
    cost = np.stack([allocate.allocation_cost(opts.allocation, *per_layer[li], opts.alpha, opts.beta).sum(0)
                     if opts.allocation != "random" else np.zeros(len(cands)) for li in layers])
    size = np.stack([sizes * E[li] for li in layers])
    budget = float(sum(target * E[li] for li in layers))
    choice = (allocate.random_allocation(size, budget, opts.seed * 7919) if opts.allocation == "random"
              else allocate.solve(cost, size, budget))
    result.widths = {li: [cands[j]] * E[li] for li, j in zip(layers, choice)}
    result.budget_bits = budget


def _quantize_experts(model, view: MoEModel, tokens, opts: QuantizeOptions, result: QuantizeResult, store) -> None:
    gptq = opts.quantizer == "gptq" and any(w != "fp8" for ws in result.widths.values() for w in ws)
    cursor = LayerCursor(model, tokens, batch_size=opts.batch_size, view=view) if gptq else None
    for layer in view:
        li = layer.layer_idx
        traffic = None
        if cursor is not None:
            traffic = ExpertTraffic(layer, hessians=True, all_experts=opts.calibrate_all_experts)
            ctx = cursor.editing(li, [traffic], progress=opts.progress, description=f"quantize: GPTQ, layer {li}")
        else:
            ctx = _null()
        with ctx:
            with onloaded(layer.block):
                result.qparams[li], result.how[li] = {}, []
                qs = quantize_experts(layer, dict(enumerate(result.widths[li])), traffic,
                                      **_quantize_kw(opts, layer, store))
                for e, q in qs.items():
                    dt = layer.gate_proj.dtype
                    layer.set_expert(e, *(q.weights[p].to(dt) for p in PARTS))
                    result.qparams[li][e] = q.qparams
                    result.how[li].append(q.how)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def non_expert_linears(model, view: MoEModel) -> dict[str, torch.nn.Linear]:
    """Linear layers quantized by ``non_expert_bits``: every ``nn.Linear`` of the decoder layers
    except the routers (and the LM head, the embeddings: kept in 16 bits, as every W4A16 recipe)."""
    import operator

    routers = {id(layer.router) for layer in view}
    gates = {id(layer.shared_expert_gate) for layer in view if layer.shared_expert_gate is not None}
    prefix = view.spec.layers_path
    layers = operator.attrgetter(prefix)(model)
    out = {}
    for name, mod in layers.named_modules():
        if isinstance(mod, torch.nn.Linear) and id(mod) not in routers | gates:
            out[f"{prefix}.{name}"] = mod
    return out


def _quantize_non_experts(model, view: MoEModel, opts: QuantizeOptions, result: QuantizeResult, store) -> None:
    for name, mod in non_expert_linears(model, view).items():
        with onloaded(mod):
            w = mod.weight
            gs = opts.group_size if opts.group_size and w.shape[1] % opts.group_size == 0 else 0
            args = weight_args(opts.non_expert_bits, gs, opts.symmetric)
            deq, q = rtn(w, args, store)
            w.copy_(deq.to(w.dtype))
        result.non_expert[name] = {"qparams": q, "width": opts.non_expert_bits, "group_size": gs}


@library_function(QuantizeOptions)
def quantize_checkpoint(model: str | os.PathLike, output: str | os.PathLike, *, opts: QuantizeOptions,
                        progress: bool = True) -> QuantizeResult:
    """Quantize the checkpoint ``model`` into the folder ``output`` (options:
    :class:`~moecompress.options.QuantizeOptions`).

    ``compressed-tensors`` output is written by rewriting the input's shards one at a time
    (``formats.write_compressed_tensors``); ``fake`` output by the pruning surgery with every
    expert replaced (or ``save_pretrained`` when non-expert layers were quantized too). The
    record says what was done and what loads it. The output is checked before it is renamed
    into place."""
    from ..calibration import load_calibration
    from ..checkpoint import compute_dtype, copy_tokenizer, load_model, output_folder, save_model, write_record
    from ..source import open_source

    start = time.perf_counter()
    source = open_source(model)
    if opts.format == "compressed-tensors" and not source.shards:
        raise MoECompressError(f"compressed-tensors output rewrites the input's safetensors shards; '{model}' has none "
                               "locally (download it first)")
    if getattr(source.config, "quantization_config", None):
        raise MoECompressError(f"'{model}' is already quantized ({_quant_method(source.config)}); quantize the "
                               "original checkpoint")
    dtype = compute_dtype(opts.dtype, opts.device, streamed=opts.streamed)
    batch_size = opts.resolved_batch_size(opts.device, opts.streamed)
    with output_folder(output, overwrite=opts.overwrite, source=source, check=True) as folder:
        lm = load_model(source, dtype=dtype, device=opts.device, max_gpu_memory=opts.max_gpu_memory,
                        max_cpu_memory=opts.max_cpu_memory)
        view = moe_view(lm)
        if opts.format == "compressed-tensors":
            from .formats import expert_keys

            expert_keys(lm, view)  # refuse fused-checkpoint families before any work
        tokens = None
        if opts.needs_calibration:
            tokens = load_calibration(source.tokenizer(), opts.calib, **opts.calibration())
        result = quantize_model(lm, tokens, options=opts.model_copy(update={"batch_size": batch_size}),
                                progress=progress, store_dtype=source.stored_dtype)
        record = {"stage": "quantize", "method": opts.effective_quantizer, "seed": opts.seed,
                  "parameters": result.options, **result.to_dict(with_time=False)}
        if opts.granularity != "uniform":  # an allocation chose the widths: a picture of where they went
            from ..plotting import BIT_MAP
            from .bitmap import plot_bit_map

            plot_bit_map(result.widths, folder / BIT_MAP,
                         title=f"{opts.granularity} widths ({opts.allocation}), {result.average_bits:.3f} bits per "
                               "expert weight with scales")
            record["bit_map"] = BIT_MAP
        if opts.format == "compressed-tensors":
            from .formats import write_compressed_tensors

            qc = write_compressed_tensors(source.folder, folder, lm, view, result)
            record.update(writer="compressed-tensors shard rewrite", loads_in=_loads_in(result),
                          config_groups=len(qc["config_groups"]))
            copy_tokenizer(source, folder)
            write_record(folder, record, source)
        elif not result.non_expert and source.shards:
            from ..surgery import ModelReplacements, prune_checkpoint_files

            keep = {layer.layer_idx: list(range(layer.num_experts)) for layer in view}
            groups = {li: {j: {"experts"} for j in k} for li, k in keep.items()}
            prune_checkpoint_files(source.folder, folder, keep, replace=ModelReplacements(view, groups))
            record["writer"] = "shard surgery (dequantized experts)"
            copy_tokenizer(source, folder)
            write_record(folder, record, source)
        else:
            if source.stored_dtype is not None and lm.dtype != source.stored_dtype:
                lm.to(source.stored_dtype)
            record["writer"] = "save_pretrained"
            save_model(lm, folder, source=source, record=record)
        _add_card(folder)
    result.seconds = time.perf_counter() - start
    return result


def _quant_method(config) -> str:
    q = config.quantization_config
    return (q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)) or "unknown method"


def _loads_in(result: QuantizeResult) -> dict:
    """Which engines load the written checkpoint correctly (from their sources, Nov 2026)."""
    widths = {w for ws in result.widths.values() for w in ws}
    tf = "yes"
    if len(widths) > 1:
        tf = ("no: transformers 5.x dequantizes every layer's experts with one config group (get_experts_scheme), "
              "so layers of other widths load wrong; use vLLM or --format fake")
    elif not result.options["symmetric"] and widths != {"fp8"}:
        tf = ("no: transformers 5.x's fused-expert dequantizer reads no zero point (asymmetric experts fail to "
              "load); use --symmetric, vLLM or --format fake")
    vllm = "yes" if widths <= {4, 8, "fp8"} else f"no: vLLM's MoE kernels take 4 and 8 bits, got {sorted(map(str, widths))}"
    return {"transformers": tf, "vllm": vllm}


def _add_card(folder) -> None:
    """The model card (average bits and bytes are in its summary); best effort like upload's."""
    import contextlib

    from ..card import write_card

    with contextlib.suppress(Exception):
        write_card(folder)
