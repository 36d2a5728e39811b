"""Checkpoint surgery (prune by rewriting shards) equals pruning in memory, for every family."""

import json
import threading

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moecompress.arch import moe_view
from moecompress.checkpoint import load_model, parse_memory
from moecompress.surgery import ModelReplacements, PublishedReplacements, SurgeryAlongside, prune_checkpoint_files
from moecompress.testing import saved_tensors, tiny_model, tokens


def _keep(view, n, seed=0):
    return {layer.layer_idx: sorted(torch.randperm(layer.num_experts, generator=torch.Generator().manual_seed(seed + layer.layer_idx))[:n].tolist())
            for layer in view}


def test_surgery_equals_in_memory_pruning(family, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "src")
    view = moe_view(model)
    keep = _keep(view, 4)
    view.keep_experts(keep)
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
    (tmp_path / "out").mkdir()
    prune_checkpoint_files(tmp_path / "src", tmp_path / "out", keep)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, ref, atol=1e-6, rtol=0)
    # Same tensors (names and values) as save_pretrained of the in-memory pruned model.
    model.save_pretrained(tmp_path / "ref")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as a, safe_open(tmp_path / "ref" / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_surgery_sharded_and_deterministic(tmp_path):
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    keep = _keep(moe_view(model), 3)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        prune_checkpoint_files(tmp_path / "src", tmp_path / name, keep)
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    for shard in shards:
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert reloaded.config.num_local_experts == 3


def _split_layer_zero(folder, model_type, fmt=None):
    """A tiny checkpoint whose layer 0 stores its experts in two shards (experts 0-3 with what
    comes before, the rest with the rest of the layer), as real checkpoints of per-expert keys do
    where a shard boundary falls inside a layer. ``fmt``: a published quantized format
    (``testing.quantized_checkpoint``; an FP8 weight's scale goes with it)."""
    import re

    from safetensors.torch import load_file, save_file

    from moecompress.testing import quantized_checkpoint

    if fmt is None:
        model = tiny_model(model_type)
        model.save_pretrained(folder)
    else:
        model = quantized_checkpoint(folder, model_type, fmt)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()

    def shard_of(key):
        m = re.search(r"layers\.(\d+)\.", key)
        if m is None:
            return 0 if "embed" in key else 2
        e = re.search(r"experts\.(\d+)\.", key)
        if int(m.group(1)) == 0:
            return 0 if e is not None and int(e.group(1)) < 4 else 1
        return 2

    weight_map = {}
    for i in range(3):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        part = {k: t for k, t in tensors.items() if shard_of(k) == i}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model


def test_kept_experts_from_another_shard_keep_the_layout_of_the_count(tmp_path):
    """A kept place keeps its shard: kept position j is written where the input stores expert j
    and holds the kept expert's tensor, read from whichever shard stores it. So the layout is
    the same whether the surgery is planned from the kept sets or from their count (a re-fit
    beside the surgery publishes the replacements and kept sets), and the values are those of
    the model pruned in memory."""
    model = _split_layer_zero(tmp_path / "src", "mixtral")
    view = moe_view(model)
    # layer 0: places 2 and 3 (the first shard's) hold experts 5 and 6 (stored in the second)
    keep = {li: ([1, 2, 5, 6, 7] if li == 0 else [0, 1, 2, 3, 4]) for li in view.moe_layer_indices}
    (tmp_path / "kept").mkdir()
    prune_checkpoint_files(tmp_path / "src", tmp_path / "kept", keep)
    ref = tiny_model("mixtral")
    moe_view(ref).keep_experts(keep)
    ref.save_pretrained(tmp_path / "ref")
    ref_tensors, got = saved_tensors(tmp_path / "ref"), saved_tensors(tmp_path / "kept")
    assert got.keys() == ref_tensors.keys()
    for k, t in got.items():
        assert torch.equal(t, ref_tensors[k]), k

    # with replacements published by a re-fit (here: the kept experts' own weights), planned from
    # the kept sets (a re-fit after the selection) and from their count (as each layer is chosen)
    groups = {li: {j: {"experts"} for j in range(5)} for li in view.moe_layer_indices}
    for name, plan in (("refit_after", keep), ("refit_as_chosen", 5)):
        published = PublishedReplacements(groups, keep)
        for layer in moe_view(ref):
            published.publish(layer)
        (tmp_path / name).mkdir()
        prune_checkpoint_files(tmp_path / "src", tmp_path / name, plan, replace=published)
    for name in ("model.safetensors.index.json", *[f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]):
        after, as_chosen = (tmp_path / "refit_after" / name).read_bytes(), (tmp_path / "refit_as_chosen" / name).read_bytes()
        assert after == as_chosen, name
    assert saved_tensors(tmp_path / "refit_after").keys() == got.keys()
    index = json.loads((tmp_path / "kept" / "model.safetensors.index.json").read_text())["weight_map"]
    first = [k for k, f in index.items() if f.endswith("00001-of-00003.safetensors") and ".experts." in k]
    assert sorted({k.split(".experts.")[1].split(".")[0] for k in first}) == ["0", "1", "2", "3"]  # places 0-3


def test_kept_fp8_experts_from_another_shard_keep_their_stored_bytes_and_scales(tmp_path):
    """The same across shards for an FP8 checkpoint of per-expert keys: each kept place holds the
    kept expert's stored FP8 bytes and its block scales, read from the shard that stores them."""
    from moecompress.testing import quantized_checkpoint

    quantized_checkpoint(tmp_path / "whole", "mixtral", "fp8")
    _split_layer_zero(tmp_path / "split", "mixtral", "fp8")
    layers = json.loads((tmp_path / "whole" / "config.json").read_text())["num_hidden_layers"]
    keep = {li: ([1, 2, 5, 6, 7] if li == 0 else [0, 3, 4, 6, 7]) for li in range(layers)}
    for name in ("whole", "split"):
        (tmp_path / f"{name}-out").mkdir()
        prune_checkpoint_files(tmp_path / name, tmp_path / f"{name}-out", keep)
    got, ref = saved_tensors(tmp_path / "split-out"), saved_tensors(tmp_path / "whole-out")
    assert got.keys() == ref.keys()
    for k in got:
        assert torch.equal(got[k].view(torch.uint8), ref[k].view(torch.uint8)), k
    stored = saved_tensors(tmp_path / "whole")
    key = "model.layers.0.block_sparse_moe.experts.{}.w1.weight{}"
    for j, e in ((1, 2), (3, 6)):  # place 3 is in the first shard, input expert 6 in the second
        for suffix in ("", "_scale_inv"):
            assert torch.equal(got[key.format(j, suffix)].view(torch.uint8), stored[key.format(e, suffix)].view(torch.uint8))


def test_streamed_load_equals_in_memory(tmp_path):
    """A model loaded under a small CPU cap (rest offloaded to disk) computes the same logits."""
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "src")
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
    streamed = load_model(tmp_path / "src", dtype="float32", max_cpu_memory="40KB", offload_folder=tmp_path / "off")
    assert any(p.device.type == "meta" for p in streamed.parameters())  # really offloaded
    with torch.no_grad():
        torch.testing.assert_close(streamed(x).logits, ref, atol=1e-5, rtol=0)


def test_cpu_weights_are_aligned_in_memory_and_streamed(tmp_path):
    """CPU matmuls round differently at different operand alignments: both load paths hand out
    64-byte-aligned weights (without this, a 62M-parameter merge differed in 22 of 231 tensors,
    by up to 7e-6, between streamed and in-memory runs; with it, none)."""
    from moecompress.onload import onloaded

    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "src")
    in_memory = load_model(tmp_path / "src", dtype="float32")
    assert all(p.data_ptr() % 64 == 0 for p in in_memory.parameters())
    streamed = load_model(tmp_path / "src", dtype="float32", max_cpu_memory="40KB", offload_folder=tmp_path / "off")
    for layer in moe_view(streamed):
        with onloaded(layer.block):
            assert all(p.data_ptr() % 64 == 0 for p in layer.block.parameters())


def test_parse_memory():
    assert parse_memory("4GiB") == 4 * 2**30 and parse_memory("512MiB") == 512 * 2**20 and parse_memory("8GB") == 8 * 10**9


def test_gpu_cap_below_one_layer_is_refused_before_loading(tmp_path, monkeypatch):
    """accelerate places every weight on the CPU (and the run computes there) when the GPU's
    weights budget cannot hold one decoder layer: load_model refuses such a cap, naming the
    smallest one that works, before any weight is read."""
    from moecompress.checkpoint import largest_layer_bytes
    from moecompress.errors import MoECompressError

    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "src")
    sizes = [sum(p.numel() for p in layer.parameters()) * 4 for layer in model.model.layers]
    assert largest_layer_bytes(model.config, torch.float32) == max(sizes)
    assert largest_layer_bytes(model.config, torch.bfloat16) == max(sizes) // 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(MoECompressError, match=r"too small: one decoder layer .* give at least") as e:
        load_model(tmp_path / "src", dtype="float32", max_gpu_memory="20KB", gpu_working_bytes=1000)
    assert "this stage" in str(e.value)


def test_gpu_cap_without_room_for_the_embeddings_is_refused(tmp_path, monkeypatch):
    """accelerate places modules in order from the input embeddings, beside the room it keeps
    for one decoder layer: a cap whose weights' share holds the layer but not the embeddings
    too would leave every weight on the CPU, which then becomes the execution device (the
    Qwen3-30B-A3B shape under 4 GiB computed on the CPU). Refused, naming the embeddings; and a
    model that computes on the CPU anyway is refused after loading."""
    from moecompress.checkpoint import (ACTIVATION_SHARE, _require_gpu_execution, first_module_bytes,
                                        largest_layer_bytes)
    from moecompress.errors import MoECompressError

    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "src")
    cfg = model.config
    first = first_module_bytes(cfg, torch.float32)
    assert first == model.get_input_embeddings().weight.numel() * 4 * (2 if cfg.tie_word_embeddings else 1)
    layer = largest_layer_bytes(cfg, torch.float32)
    assert 1.15 * layer < 1.1 * layer + first  # the cap below holds the layer but not the embeddings too
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    just_the_layer = int(1.15 * layer / (1 - ACTIVATION_SHARE))  # one layer x 1.1 fits, the embeddings do not
    with pytest.raises(MoECompressError, match=r"the input embeddings .* give at least"):
        load_model(tmp_path / "src", dtype="float32", max_gpu_memory=str(just_the_layer))
    with pytest.raises(MoECompressError, match="compute on the CPU"):
        _require_gpu_execution(model, {"offload_folder": str(tmp_path / "none")}, own_folder=False)


def test_cpu_cap_above_the_machines_memory_is_refused(tmp_path, monkeypatch):
    """A --max-cpu-memory above the machine's memory would let accelerate keep more weights in
    memory than there is (the system kills the run, no message): refused before loading."""
    from collections import namedtuple

    import psutil

    from moecompress.errors import MoECompressError

    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "src")
    memory = namedtuple("memory", "total available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(8 * 2**30, 6 * 2**30))
    with pytest.raises(MoECompressError, match=r"more than this machine's memory \(8.0 GiB\); give at most 6GiB"):
        load_model(tmp_path / "src", dtype="float32", max_cpu_memory="64GiB")
    assert load_model(tmp_path / "src", dtype="float32", max_cpu_memory="40KB") is not None  # below: streamed


def test_gpu_cap_above_the_gpus_memory_is_refused(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from moecompress.errors import MoECompressError

    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "src")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=16 * 2**30))
    with pytest.raises(MoECompressError, match=r"more than the GPU's memory \(16.0 GiB\); give at most 16GiB"):
        load_model(tmp_path / "src", dtype="float32", max_gpu_memory="80GiB")


def test_streamed_batch_fills_the_caps_activation_share(monkeypatch):
    """A prune streamed onto a GPU takes as many sequences per batch as 30% of the cap holds at
    the widest decoder layer's active width (attention, top-k of E routed experts, shared) x 6
    bytes per token; without a GPU, or for other stages, the batch stays 8."""
    from moecompress.checkpoint import ACTIVATION_SHARE, activation_bytes_per_token, streamed_batch_size
    from moecompress.options import PruneOptions

    model = tiny_model("qwen2_moe")  # shared experts beside the routed ones
    cfg = model.config
    widths = []
    for dec in model.model.layers:
        mlp = dec.mlp
        routed = sum(p.numel() for p in mlp.experts.parameters()) * cfg.num_experts_per_tok / cfg.num_experts
        rest = sum(p.numel() for p in dec.parameters()) - sum(p.numel() for p in mlp.experts.parameters())
        widths.append((rest + routed) / cfg.hidden_size)
    assert activation_bytes_per_token(cfg) == int(max(widths) * 6)
    per_seq = activation_bytes_per_token(cfg) * 32
    assert streamed_batch_size(cfg, "1MB", 32, 1000) == int(1e6 * ACTIVATION_SHARE) // per_seq
    assert streamed_batch_size(cfg, "1KB", 32, 1000) == 1  # never below one sequence
    assert streamed_batch_size(cfg, "1GB", 32, 6) == 6  # never above the sequences there are
    opts = PruneOptions(max_gpu_memory="1MB", n=1000, seq_len=32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert opts.resolved_batch_size(None, True, cfg) == 8  # streamed on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert opts.resolved_batch_size(None, True, cfg) == streamed_batch_size(cfg, "1MB", 32, 1000)
    assert opts.resolved_batch_size(None, True) == 8  # a stage that does not pass its config
    assert PruneOptions(max_gpu_memory="1GB", n=1000, seq_len=32).resolved_batch_size(None, True, cfg) == 512
    assert PruneOptions(max_gpu_memory="1MB", batch_size=3).resolved_batch_size(None, True, cfg) == 3


def test_streamed_prune_reserves_its_larger_step_on_the_gpu(tmp_path, monkeypatch):
    """What a streamed expert prune asks load_model to keep free besides the weights: the larger
    of NAEE's cached Gram matrices and working tensors (when NAEE selects) and the repair's
    accumulators and solve beside the pruned block it builds at its layer (keep / E of one).
    NAEE's share is reserved without a repair too; frequency without a repair reserves nothing."""
    import moecompress.checkpoint as ckpt
    from moecompress.prune import prune_checkpoint
    from moecompress.prune.naee import working_bytes as naee_bytes
    from moecompress.repair import working_bytes
    from moecompress.testing import SAMPLE_TEXT, tiny_checkpoint

    model = tiny_checkpoint(tmp_path / "src", "qwen3_moe")
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    view = moe_view(model)
    layer = view[0]
    keep = layer.num_experts // 2  # above the top-k: auto runs NAEE
    assert keep > layer.top_k
    block = max(sum(p.numel() for p in x.block.parameters()) for x in view) * 4  # float32 checkpoint
    naee = naee_bytes(layer.num_experts, layer.hidden_size)
    repair = block * keep // layer.num_experts + working_bytes(view, keep, "refit")
    asked = []

    class Stop(Exception):
        pass

    def fake_load(*args, **kwargs):
        asked.append(kwargs["gpu_working_bytes"])
        raise Stop

    monkeypatch.setattr(ckpt, "load_model", fake_load)
    for method, repair_mode, want in (("auto", "refit", max(naee, repair)), ("naee", "none", naee),
                                      ("frequency", "refit", repair), ("frequency", "none", 0)):
        with pytest.raises(Stop):
            prune_checkpoint(tmp_path / "src", tmp_path / f"out-{method}-{repair_mode}", keep=keep, method=method,
                             repair=repair_mode, calib=str(tmp_path / "calib.txt"), n=2, seq_len=16,
                             max_cpu_memory="1GB", progress=False)
        assert asked[-1] == want, (method, repair_mode)
        assert not (tmp_path / f"out-{method}-{repair_mode}").exists()


def test_repair_working_bytes_count_the_float64_solve():
    """The repair's GPU working set: float32 accumulators of all kept experts, plus one float64
    solve (system, factor, inverse: 3 n^2; right-hand sides and product: 2 n H) of n unknowns:
    every kept expert's at once in the joint fit, one expert's in the per-expert fit, which also
    holds one block of experts' transient features (``refit.block_working_bytes``)."""
    from moecompress.refit import BLOCK_WORK_ELEMENTS, JOINT_MAX_FEATURES
    from moecompress.repair import working_bytes

    view = moe_view(tiny_model("qwen3_moe"))
    layer = view[0]
    inter, hidden = layer.intermediate_size, layer.hidden_size
    keep = 2
    assert keep * inter <= JOINT_MAX_FEATURES
    n = keep * inter
    assert working_bytes(view, keep, "refit") == 4 * (n * n + n * hidden) + 8 * (3 * n * n + 2 * n * hidden)
    big = moe_view(tiny_model("qwen3_moe", moe_intermediate_size=JOINT_MAX_FEATURES))
    inter = JOINT_MAX_FEATURES  # one expert alone exceeds the joint fit: per expert
    block = BLOCK_WORK_ELEMENTS // (hidden + inter) * (2 * hidden + 6 * inter + 8 * inter + 8 * hidden)
    assert working_bytes(big, keep, "refit") == (4 * keep * inter * (inter + hidden) + 8 * (3 * inter**2 + 2 * inter * hidden)
                                                 + block)
    assert working_bytes(view, keep, "none") == 0


def test_stats_on_streamed_model_equal_in_memory(tmp_path):
    """Observers read expert weights of offloaded layers: statistics equal the in-memory run."""
    from moecompress.stats import collect_stats

    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "src")
    x = tokens(batch=3, seq=16)
    ref = collect_stats(model, x, batch_size=2, progress=False)
    streamed = load_model(tmp_path / "src", dtype="float32", max_cpu_memory="30KB", offload_folder=tmp_path / "off")
    got = collect_stats(streamed, x, batch_size=2, progress=False)
    assert ref.tensors.keys() == got.tensors.keys()
    for k in ref.tensors:
        torch.testing.assert_close(got.tensors[k], ref.tensors[k], atol=1e-5, rtol=1e-5, msg=k)


@pytest.mark.parametrize("method", ["frequency", "naee", "naee-beam", "stun"])
def test_prune_cli_streamed_equals_in_memory(method, tmp_path):
    """`prune --max-cpu-memory` (streamed, disk offload) writes the same checkpoint bytes, also
    with NAEE, whose candidate routers are copies of offloaded routers (exhaustive, and the beam
    with its incremental rounds), and STUN, which reads the router and expert weights of each
    (onloaded) layer."""
    from typer.testing import CliRunner

    from moecompress.cli import app
    from moecompress.testing import SAMPLE_TEXT, tiny_checkpoint

    tiny_checkpoint(tmp_path / "src", "qwen3_moe")
    (tmp_path / "t.txt").write_text(SAMPLE_TEXT)
    beam = ["--naee-max-combinations", "1"] if method == "naee-beam" else []  # C(8, 4) = 70 sets: beam
    common = ["prune", str(tmp_path / "src"), "--keep", "4", "--method", method.removesuffix("-beam"), "--calib",
              str(tmp_path / "t.txt"), "-n", "4", "--seq-len", "32", "--dtype", "float32", *beam]
    runner = CliRunner()
    assert runner.invoke(app, [*common, "-o", str(tmp_path / "mem")]).exit_code == 0
    res = runner.invoke(app, [*common, "-o", str(tmp_path / "streamed"), "--max-cpu-memory", "40KB"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "mem" / "model.safetensors").read_bytes() == (tmp_path / "streamed" / "model.safetensors").read_bytes()
    if beam:  # the rounds went by the incremental rule in both
        for run in ("mem", "streamed"):
            layers = json.loads((tmp_path / run / "moecompress.json").read_text())["info"]["layers"]
            assert {v["incremental"] for v in layers.values()} == {"none"}, run


def _assert_same_tensors(folder_a, folder_b):
    with safe_open(folder_a / "model.safetensors", "pt") as a, safe_open(folder_b / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            ta, tb = a.get_tensor(k), b.get_tensor(k)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), k


def _replace_some(view, seed=0):
    """New random weights for kept experts 0 and 2 and a new router row (and per-expert router
    tensors) for expert 1 of every MoE layer, written into the model; returns them as parts."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda t: torch.randn(t.shape, generator=g).to(t.dtype)  # noqa: E731
    groups = {layer.layer_idx: {0: {"experts"}, 1: {"router"}, 2: {"experts", "router"}} for layer in view}
    with torch.no_grad():
        for layer in view:
            for j, g_ in groups[layer.layer_idx].items():
                if "experts" in g_:
                    layer.set_expert(j, rnd(layer.gate_proj[j]), rnd(layer.up_proj[j]), rnd(layer.down_proj[j]))
                    for b in layer.expert_biases:
                        if b is not None:
                            b[j].copy_(rnd(b[j]))
                if "router" in g_:
                    layer.router_weight[j].copy_(rnd(layer.router_weight[j]))
                    for t in layer.router_expert_tensors.values():
                        t.data[..., j] = rnd(t.data[..., j])
    return ModelReplacements(view, groups)


def test_surgery_with_replacements_equals_in_memory_edit(family, tmp_path):
    """Pruning plus new weights for some kept experts (expert weights, router rows, or both)
    writes exactly the tensors save_pretrained writes for the same edit made in memory."""
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "src")
    view = moe_view(model)
    keep = _keep(view, 4)
    view.keep_experts(keep)
    replace = _replace_some(view)
    plain = {li: replace.get(li) for li in view.moe_layer_indices}  # a plain dict works too
    (tmp_path / "out").mkdir()
    prune_checkpoint_files(tmp_path / "src", tmp_path / "out", keep, replace=plain)
    model.save_pretrained(tmp_path / "ref")
    _assert_same_tensors(tmp_path / "out", tmp_path / "ref")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, atol=1e-6, rtol=0)


def test_surgery_replacements_take_the_stored_dtype_and_shards(tmp_path):
    """float32 replacements of a bfloat16 sharded checkpoint are cast like model.to(bfloat16)."""
    model = tiny_model("mixtral", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    view = moe_view(model)
    keep = _keep(view, 3)
    view.keep_experts(keep)
    model.float()  # compute in float32, as merging does, then store in the checkpoint's dtype
    replace = _replace_some(moe_view(model), seed=3)
    (tmp_path / "out").mkdir()
    prune_checkpoint_files(tmp_path / "src", tmp_path / "out", keep, replace=replace)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "ref", max_shard_size="100KB")
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "ref").state_dict()
    assert got.keys() == want.keys()
    for k in got:
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]), k


def test_surgery_refuses_incomplete_or_misplaced_replacements(tmp_path):
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "src")
    view = moe_view(model)
    keep = _keep(view, 4)
    layer = view[0]
    good = {"gate": layer.gate_proj[0].detach(), "up": layer.up_proj[0].detach(), "down": layer.down_proj[0].detach()}
    li = layer.layer_idx
    for replace, msg in (({li: {0: {"gate": good["gate"]}}}, "all of"),
                         ({li: {0: {**good, "bias": good["gate"]}}}, "unknown replacement"),
                         ({li: {4: good}}, "keeps 4"),
                         ({li: {0: {**good, "down": good["gate"]}}}, "shape")):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        with pytest.raises(ValueError, match=msg):
            prune_checkpoint_files(tmp_path / "src", out, keep, replace=replace)


def _published_surgery(src, out, keep, published):
    out.mkdir()
    return SurgeryAlongside(lambda: prune_checkpoint_files(src, out, keep, replace=published), published)


def test_surgery_beside_the_worker_starts_first_and_writes_the_same_bytes(tmp_path):
    """Run beside the work that makes the replacements (a layer published at a time, the rest by
    ``publish_rest``), the surgery writes before the first layer is published, waits for each,
    and writes the bytes the surgery after the work writes."""
    model = tiny_model("mixtral", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    view = moe_view(model)
    keep = _keep(view, 3)
    view.keep_experts(keep)
    replace = _replace_some(view, seed=5)
    (tmp_path / "after").mkdir()
    prune_checkpoint_files(tmp_path / "src", tmp_path / "after", keep, replace=replace)
    asked = threading.Event()

    class Watched(PublishedReplacements):
        def get(self, layer_idx, default=None):
            asked.set()
            return super().get(layer_idx, default)

    published = Watched(replace.groups)
    with _published_surgery(tmp_path / "src", tmp_path / "beside", keep, published) as job:
        assert asked.wait(60)  # it reached a replaced layer before anything was published ...
        assert list((tmp_path / "beside").glob("*.safetensors"))  # ... having written what it could
        published.publish(view[0])
        published.publish_rest(view)  # the layers the worker did not publish: from the model as it is
    assert not job.thread.is_alive()
    files = sorted(p.name for p in (tmp_path / "after").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "beside").iterdir()) and len(files) > 3
    for name in files:
        assert (tmp_path / "after" / name).read_bytes() == (tmp_path / "beside" / name).read_bytes(), name


def test_surgery_beside_the_worker_stops_with_it_and_reports_its_own_error(tmp_path):
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "src")
    view = moe_view(model)
    keep = _keep(view, 4)
    view.keep_experts(keep)
    groups = {layer.layer_idx: {0: {"experts"}} for layer in view}
    published = PublishedReplacements(groups)
    with pytest.raises(KeyboardInterrupt):  # the worker stops: the surgery is cancelled, its thread ends
        with _published_surgery(tmp_path / "src", tmp_path / "a", keep, published) as job:
            raise KeyboardInterrupt
    assert not job.thread.is_alive()

    class Broken(PublishedReplacements):
        def get(self, layer_idx, default=None):
            raise OSError("No space left on device")

    broken = Broken(groups)
    with pytest.raises(OSError, match="No space left"):  # the surgery fails: the worker's next publish raises it
        with _published_surgery(tmp_path / "src", tmp_path / "b", keep, broken) as job:
            job.thread.join(60)
            broken.publish(view[0])
            pytest.fail("publish should have raised the surgery's error")
    with pytest.raises(OSError, match="No space left"):  # ... and so does leaving, if no publish came
        with _published_surgery(tmp_path / "src", tmp_path / "c", keep, Broken(groups)) as job:
            job.thread.join(60)


def test_prune_with_repair_writes_beside_the_refit_what_it_writes_after_it(calib_ckpt, tmp_path, monkeypatch):
    """prune_checkpoint's re-fit and surgery side by side write the bytes of the re-fit, then the
    surgery (sharded input; in memory and streamed)."""
    import moecompress.surgery as surgery
    from moecompress.prune import prune_checkpoint
    from moecompress.testing import tiny_checkpoint

    src = tmp_path / "src"
    model = tiny_checkpoint(src, "qwen3_moe")
    (src / "model.safetensors").unlink()
    model.save_pretrained(src, max_shard_size="60KB")
    kw = dict(keep=4, method="frequency", calib=str(calib_ckpt / "calib.txt"), n=4, seq_len=32, progress=False)
    prune_checkpoint(src, tmp_path / "beside", **kw)
    prune_checkpoint(src, tmp_path / "beside_streamed", max_cpu_memory="40KB", **kw)

    class After(surgery.SurgeryAlongside):  # the surgery once the re-fit is done, in this thread
        def __enter__(self):
            return self

        def __exit__(self, exc_type, *exc):
            if exc_type is None:
                self.write()

    monkeypatch.setattr(surgery, "SurgeryAlongside", After)
    prune_checkpoint(src, tmp_path / "after", **kw)
    shards = sorted(p.name for p in (tmp_path / "after").glob("*.safetensors"))
    assert len(shards) > 2
    for name in shards:
        assert (tmp_path / "after" / name).read_bytes() == (tmp_path / "beside" / name).read_bytes(), name
    record = json.loads((tmp_path / "beside" / "moecompress.json").read_text())
    assert record["parameters"]["repair"] == "refit" and record["writer"] == "shard surgery"
    a, s = saved_tensors(tmp_path / "beside"), saved_tensors(tmp_path / "beside_streamed")
    for k in a:
        torch.testing.assert_close(s[k], a[k], rtol=1e-2, atol=1e-3)  # streamed: rounding of equal sums


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_pruned_size_is_known_before_any_work(family, tmp_path):
    """The surgery's output size depends on the kept count only: from the shard headers, it is
    the tensor bytes the surgery writes (the files add only their headers)."""
    from moecompress.arch import meta_view
    from moecompress.checkpoint import load_config
    from moecompress.surgery import pruned_tensor_bytes
    from moecompress.testing import tiny_checkpoint

    src, out = tmp_path / "src", tmp_path / "out"
    tiny_checkpoint(src, family)
    out.mkdir()
    layers = meta_view(load_config(src)).moe_layer_indices
    prune_checkpoint_files(src, out, {li: [0, 2, 3, 5] for li in layers})
    written = 0
    for f in out.glob("*.safetensors"):
        with safe_open(f, framework="pt") as g:
            written += sum(g.get_tensor(k).numel() * g.get_tensor(k).element_size() for k in g.keys())
    assert pruned_tensor_bytes(src, 4) == written


@pytest.mark.parametrize("stage", ["prune", "merge"])
def test_prune_is_refused_when_the_output_cannot_fit(stage, tmp_path, monkeypatch):
    """A disk too small for the pruned (merged) checkpoint is found before the model loads, not
    at the end of the run: one line, nothing written."""
    import shutil
    from collections import namedtuple

    import moecompress.checkpoint as ckpt
    from moecompress.errors import MoECompressError
    from moecompress.prune import prune_checkpoint
    from moecompress.testing import tiny_checkpoint

    src = tmp_path / "src"
    tiny_checkpoint(src, "qwen3_moe")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, 1 << 20))
    monkeypatch.setattr(ckpt, "load_model", lambda *a, **k: pytest.fail("loaded before the space check"))
    with pytest.raises(MoECompressError, match=r"the (pruned|merged) checkpoint needs about .* GB free"):
        if stage == "prune":
            prune_checkpoint(src, tmp_path / "out", keep=4, method="random", progress=False)
        else:
            from moecompress.merge import merge_checkpoint

            merge_checkpoint(src, tmp_path / "out", keep=4, progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]
