"""The options of every stage, one model each, built from the shared groups."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import field_validator, model_validator

from .base import Options, option
from .distill import DistillOptions
from .groups import (DEFAULT_SEQ_LEN, CalibrationOptions, LoadingOptions, MtpOptions, OutputOptions, RepairOptions,
                     StreamingOptions)

_METHOD = "Method options"
_FINE = "Fine-grained pruning (inside experts)"


class StatsOptions(CalibrationOptions, LoadingOptions, StreamingOptions, OutputOptions):
    segment_len: int = option(16, "Window (tokens) of the SRP / SCH routing-locality metrics.", ge=1)


class PruneOptions(CalibrationOptions, LoadingOptions, StreamingOptions, MtpOptions, RepairOptions, OutputOptions):
    keep: Optional[int] = option(None, "Experts kept in every MoE layer (whole-expert methods).", ge=1)
    ratio: Optional[float] = option(None, "Fraction removed, in (0, 1): of the experts, or for heapr of each "
                                    "expert's neurons.", gt=0, lt=1)
    method: str = option("auto", "Pruning method (`moecompress ls methods`; docs/benchmarks.md compares them; auto = "
                         "naee when the kept count exceeds the routed top-k, else frequency).",
                         flags=("--method", "-m"))
    stats: Optional[Path] = option(None, "Routing statistics from `moecompress stats` (reused instead of "
                                   "recomputing them).")
    protect_super_experts: bool = option(False, "Never remove super-expert candidates (needs calibration or --stats).")
    naee_tokens: Optional[int] = option(None, "naee: calibration tokens used for the reconstruction error.",
                                        panel=_METHOD, ge=1)
    naee_beam: Optional[int] = option(None, "naee: beam width of the search when exhaustive is too large.",
                                      panel=_METHOD, ge=1)
    naee_max_combinations: Optional[int] = option(None, "naee: exhaustive search up to this many kept sets per "
                                                  "layer, beam search beyond.", panel=_METHOD, ge=1)
    stun_coactivation_weight: Optional[float] = option(None, "stun: weight of co-activation in the behaviour "
                                                       "distance (0 = router weights only).", panel=_METHOD, ge=0)
    sparsity: Optional[float] = option(None, "moe-pruner/wanda/magnitude: fraction of each expert matrix's weights "
                                       "zeroed; stun: total over expert weights (experts removed + zeros).",
                                       panel=_FINE, gt=0, lt=1)
    nm: Optional[str] = option(None, "N:M semi-structured pattern instead of --sparsity, e.g. 2:4.", panel=_FINE)
    stun_expert_ratio: Optional[float] = option(None, "stun with --sparsity/--nm: fraction of experts removed "
                                                "before the unstructured stage.", panel=_FINE, gt=0, lt=1)
    stun_unstructured: Literal["wanda", "moe-pruner", "magnitude"] = option(
        "wanda", "stun: second-stage method.", panel=_FINE)
    heapr_global: bool = option(False, "heapr: rank atoms globally and only ZERO them (no size saving).", panel=_FINE)
    repair: Optional[Literal["none", "refit", "refit+router", "refit+tune"]] = option(
        None, "Whole-expert methods: after removal, re-fit the kept experts to the original layers on the "
        "calibration text: refit (down projections, closed form), refit+router (router rows first), refit+tune "
        "(then the kept experts and router tuned by backpropagation, layer by layer: better, slower), none. "
        "Default: refit when the calibration text is read (auto, naee, or --calib given), else none.")
    repair_n: Optional[int] = option(None, "Calibration sequences the repair fits on: the -n sequences continued "
                                     "with the same seed (default 256, or all the text has; never fewer than -n).",
                                     ge=1)
    repair_ridge: Optional[float] = option(None, "Ridge of the down-projection re-fit (default 0.1 joint, 0.01 per "
                                           "expert; relative to the mean feature energy).", ge=0)
    router_ridge: Optional[float] = option(None, "Ridge of the router re-fit (default 1.0, relative).", ge=0)

    def experts_after(self, num_experts: int) -> int | None:
        from ..prune.api import resolve_keep
        from ..prune.registry import effective_method, registry

        method = effective_method(self.method, self.sparsity, self.nm)
        if registry()[method].kind == "experts":
            return resolve_keep(num_experts, self.keep, self.ratio)
        if method == "stun-unstructured":  # whole experts first, then weights inside the rest
            from ..finegrained.stun import kept_count

            ratio = self.stun_expert_ratio if self.stun_expert_ratio is not None else self.ratio
            return kept_count(num_experts, ratio) if ratio is not None else None
        return num_experts  # inside the experts: their count stays

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from ..prune.registry import method_names

        if v not in method_names():
            raise ValueError(f"unknown pruning method '{v}'; use one of: {', '.join(method_names())}")
        return v

    @field_validator("nm")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        from ..finegrained.unstructured import parse_nm

        from .groups import _checked
        return _checked(parse_nm, v)


class MergeOptions(CalibrationOptions, LoadingOptions, StreamingOptions, MtpOptions, RepairOptions, OutputOptions):
    keep: int = option(..., "Experts per MoE layer after merging.", ge=1)
    method: Literal["m-smoe", "hc-smoe", "average"] = option("m-smoe", "Merging method.")
    stats: Optional[Path] = option(None, "Take the routing frequencies from a `moecompress stats` file instead of "
                                   "counting them on the calibration text.")
    linkage: Literal["average", "single", "complete", "ward"] = option("average", "hc-smoe/average clustering linkage.")
    distance: Literal["euclidean", "cosine"] = option("euclidean", "hc-smoe/average clustering distance.")
    router: Literal["dominant", "weighted"] = option("dominant", "Router row of a merged expert: dominant (its most "
                                                     "frequent member's row) or weighted (members' rows averaged).")
    refit: bool = option(True, "Least-squares re-fit of the merged experts' down projections to the original layer "
                         "outputs (a second calibration pass).")
    ridge: float = option(0.01, "Ridge strength of the re-fit (relative to the mean feature energy).", ge=0)
    repair: Optional[Literal["none", "refit", "refit+router", "refit+tune"]] = option(
        None, "Instead of --refit: the repair of `prune --repair` (layer by layer, joint down-projection fit; "
        "refit+router re-fits the router rows too).")

    def experts_after(self, num_experts: int) -> int:
        from ..prune.api import resolve_keep  # the same bounds and message as prune --keep

        return resolve_keep(num_experts, keep=self.keep)


class EvalOptions(LoadingOptions):
    base: Optional[str] = option(None, "Base model: adds KL(base||model), top-1 agreement and the base's numbers side "
                                 "by side (in a recipe, true = the recipe's model).")
    ppl: list[Path] = option([], "UTF-8 text file for perplexity (repeat for several).")
    tasks: list[str] = option([], "lm-eval tasks, comma-separated or repeated, e.g. moecompress_python_mc,hellaswag "
                              "(needs the 'eval' extra).")
    include_path: list[Path] = option([], "Folder of extra lm-eval task YAMLs (repeatable); the shipped "
                                      "moecompress/tasks is always included.")
    limit: Optional[float] = option(None, "At most this many examples per task (a fraction if < 1).", gt=0)
    num_fewshot: Optional[int] = option(None, "Few-shot examples per task.", ge=0)
    seq_len: int = option(DEFAULT_SEQ_LEN, "Perplexity window length in tokens.", ge=2)
    stride: Optional[int] = option(None, "Window advance (default: --seq-len, non-overlapping windows).", ge=1)
    max_tokens: int = option(20_000, "Score the first N tokens of each file (0 = the whole file).", ge=0)
    batch_size: int = option(1, "Windows / lm-eval requests per forward pass.", ge=1)
    tokenizer: Optional[str] = option(None, "Tokenizer folder or Hub id (default: the model's, else the base's).")
    json_out: Optional[Path] = option(None, "Write the results as JSON here ('-' = stdout).", flags=("--json",),
                                      library=False, recipe=False)
    markdown: Optional[Path] = option(None, "Write the table as markdown here.", library=False, recipe=False)

    @field_validator("tasks", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            v = [v]
        return [t.strip() for item in v for t in str(item).split(",") if t.strip()]

    @model_validator(mode="after")
    def _something(self):
        if not self.ppl and not self.tasks:
            raise ValueError("nothing to evaluate; pass --ppl FILE and/or --tasks T1,T2")
        return self


class UploadOptions(Options):
    repo_id: str = option(..., "Hub repository, e.g. my-user/Qwen3-30B-A3B-pruned.", argument=True)
    private: bool = option(False, "Create the repository as private.")
    dry_run: bool = option(False, "Write the model card into a staging folder and list the files; send nothing.")
    card_in_place: bool = option(False, "Write the model card as DIR/README.md (default: DIR is never written to; "
                                 "the card goes into a staging folder of links to DIR's files).")
    token: Optional[str] = option(None, "Hub token (default: HF_TOKEN or `hf auth login`).", recipe=False)
    base_model: Optional[str] = option(None, "Hub id for the card's base_model (default: the recorded source when it "
                                       "is a Hub id).")
    endpoint: Optional[str] = option(None, "Hub URL (default: HF_ENDPOINT or https://huggingface.co).")
    commit_message: Optional[str] = option(None, "Commit message of the upload.")
    json_out: Optional[Path] = option(None, "Also write the result as JSON here ('-' = stdout).", flags=("--json",),
                                      library=False, recipe=False)


_QUANT = "Quantization"
_ALLOC = "Mixed precision (MC-MoE)"
_GPTQ = "GPTQ"
SCHEMES = {"w4a16": 4, "w8a16": 8, "fp8": "fp8"}


class QuantizeOptions(CalibrationOptions, LoadingOptions, StreamingOptions, OutputOptions):
    bits: Optional[float] = option(None, "Target average expert weight width (layer / expert granularity): the budget is "
                                   "the honest size of every expert at this width, scales and zero points included. "
                                   "Uniform: the width itself (default: the scheme's, else 4).", ge=1, le=8, panel=_QUANT)
    granularity: Literal["uniform", "layer", "expert"] = option(
        "uniform", "uniform: one width; layer: one width per MoE layer (what compressed-tensors engines serve); "
        "expert: one width per expert (MC-MoE as published; --format fake only).", panel=_QUANT)
    quantizer: Literal["gptq", "rtn"] = option("gptq", "gptq (calibrated, layer by layer) or rtn (round to nearest, "
                                               "no calibration).", panel=_QUANT)
    group_size: int = option(128, "Input columns per scale (0 = one scale per output channel).", ge=0, panel=_QUANT)
    symmetric: bool = option(True, "Symmetric grid (no zero point) or asymmetric.", flags=("--symmetric/--asymmetric",),
                             panel=_QUANT)
    format: Literal["compressed-tensors", "fake"] = option(
        "compressed-tensors", "compressed-tensors: packed int / FP8 checkpoint that transformers and vLLM load; fake: "
        "dequantized weights in the checkpoint dtype plus the bit map (research allocations).", panel=_QUANT)
    scheme: Optional[Literal["w4a16", "w8a16", "fp8"]] = option(
        None, "compressed-tensors scheme of a uniform run: w4a16, w8a16, fp8 (per channel, no calibration).",
        panel=_QUANT)
    non_expert_bits: int = option(16, "Attention, shared-expert and dense MLP weights: 16 (untouched), 8 or 4 "
                                  "(round to nearest).", panel=_QUANT)
    candidates: Union[list[int], str] = option([2, 3, 4, 8], "Widths the allocation chooses from, comma-separated.",
                                               panel=_ALLOC)
    allocation: Literal["mc-moe", "mc-moe-paper", "frequency", "random"] = option(
        "mc-moe", "mc-moe: MC-MoE's integer program over each expert's squared output error on its routed, "
        "routing-weighted tokens; mc-moe-paper: the published objective (frequency^alpha x weight^beta x output "
        "loss); frequency: the paper's frequency-only ablation; random: seeded baseline with the same budget.",
        panel=_ALLOC)
    alpha: float = option(1.0, "mc-moe-paper's exponent of the activation frequency.", ge=0, panel=_ALLOC)
    beta: float = option(1.5, "mc-moe-paper's exponent of the activation weight.", ge=0, panel=_ALLOC)
    loss_tokens: int = option(8192, "Calibration tokens per layer on which MC-MoE's output loss is measured.", ge=1,
                              panel=_ALLOC)
    damp: float = option(0.01, "GPTQ dampening (fraction of the mean Hessian diagonal).", gt=0, panel=_GPTQ)
    calibrate_all_experts: bool = option(False, "GPTQ: every calibration token into every expert's Hessian (only "
                                         "routed outputs propagate).", panel=_GPTQ)
    min_tokens: int = option(0, "GPTQ: experts routed fewer tokens are rounded to nearest (0 = the widest input size, "
                             "so that the Hessian can have full rank).", ge=0, panel=_GPTQ)

    @field_validator("candidates", mode="before")
    @classmethod
    def _candidates(cls, v):
        bad = ValueError("candidate widths must be integers from 1 to 8, comma-separated, e.g. 2,3,4,8")
        parts = [x.strip() for x in v.strip().strip("[]").split(",")] if isinstance(v, str) else list(v)
        try:  # every item a width: "2,x" or "2;4" is refused, not read as 2
            items = [int(x) for x in parts]
        except (TypeError, ValueError):
            raise bad from None
        if not items or any(not 1 <= b <= 8 for b in items):
            raise bad
        return sorted(set(items))

    @field_validator("non_expert_bits")
    @classmethod
    def _non_expert(cls, v: int) -> int:
        if v not in (16, 8, 4):
            raise ValueError("must be 16 (untouched), 8 or 4")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.granularity == "expert" and self.format != "fake":
            raise ValueError("--granularity expert needs --format fake: no serving engine runs different widths "
                             "inside one MoE layer (vLLM reads expert 0's scheme, transformers one group for all)")
        if self.scheme is not None and self.granularity != "uniform":
            raise ValueError("--scheme sets one width for all experts; drop it for --granularity layer/expert")
        if self.granularity != "uniform":
            if self.bits is None:
                raise ValueError(f"--granularity {self.granularity} needs --bits (the target average width)")
            if not self.candidates[0] <= self.bits <= self.candidates[-1]:
                raise ValueError(f"--bits {self.bits:g} is outside the candidate widths {self.candidates}")
        elif self.bits is not None:
            if self.bits != int(self.bits):
                raise ValueError("uniform quantization needs a whole --bits width (fractional averages need "
                                 "--granularity layer or expert)")
            if self.scheme is not None and SCHEMES[self.scheme] != int(self.bits):
                raise ValueError(f"--bits {self.bits:g} contradicts --scheme {self.scheme}")
        return self

    def uniform_width(self):
        """The single width of a uniform run: the scheme's, else ``bits``, else 4."""
        if self.scheme is not None:
            return SCHEMES[self.scheme]
        return int(self.bits) if self.bits is not None else 4

    @property
    def effective_quantizer(self) -> str:
        """FP8 per channel needs no calibration: round to nearest whatever ``quantizer`` says."""
        return "rtn" if self.scheme == "fp8" else self.quantizer

    @property
    def needs_calibration(self) -> bool:
        return self.effective_quantizer == "gptq" or self.granularity != "uniform"


# stage name -> options model; the recipe runner, `moecompress ls` and the tests read this.
STAGE_OPTIONS: dict[str, type[Options]] = {
    "stats": StatsOptions, "prune": PruneOptions, "merge": MergeOptions, "quantize": QuantizeOptions,
    "distill": DistillOptions, "eval": EvalOptions, "upload": UploadOptions,
}
