"""Fine-grained pruning of a streamed model (--max-gpu-memory / --max-cpu-memory): one layer at a
time, the same bytes as in memory, never more than one decoder layer's weights materialised."""

import json
import operator

import pytest
import torch

from moecompress.arch import moe_view
from moecompress.checkpoint import load_model
from moecompress.finegrained.api import finegrained_prune
from moecompress.finegrained.heapr import heapr_scores
from moecompress.prune import prune_checkpoint
from moecompress.testing import SAMPLE_TEXT, invoke_cli, tiny_checkpoint, tiny_model, tokens

CASES = [("heapr", {"ratio": 0.5}), ("heapr", {"ratio": 0.5, "heapr_global": True}),
         ("moe-pruner", {"sparsity": 0.5}), ("wanda", {"nm": "2:4"}), ("magnitude", {"sparsity": 0.3}),
         ("stun", {"ratio": 0.25, "sparsity": 0.5})]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _source(tmp_path, family="qwen3_moe", dtype=torch.bfloat16):
    """A tiny checkpoint stored in ``dtype`` (bf16: computed in float32, written back cast) and a text."""
    src = tmp_path / "src"
    tiny_checkpoint(src, family)
    if dtype != torch.float32:
        tiny_model(family).to(dtype).save_pretrained(src)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    return src, str(tmp_path / "calib.txt")


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "moecompress.json"}


@pytest.mark.parametrize("method,opts", CASES, ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o in CASES])
def test_streamed_fine_grained_prune_writes_the_same_bytes(tmp_path, method, opts):
    src, calib = _source(tmp_path)
    kw = dict(method=method, calib=calib, n=4, seq_len=32, batch_size=2, dtype="float32", progress=False, **opts)
    mem = prune_checkpoint(src, tmp_path / "mem", **kw)
    streamed = prune_checkpoint(src, tmp_path / "s", max_cpu_memory="40KB", **kw)  # every layer on disk
    assert _files(tmp_path / "mem") == _files(tmp_path / "s")
    assert streamed.kept == mem.kept
    record = json.loads((tmp_path / "s" / "moecompress.json").read_text())
    assert record["parameters"]["max_cpu_memory"] == "40KB" and record["kind"] in ("neurons", "weights")
    assert not (tmp_path / "s" / ".moecompress-work").exists()
    if method == "heapr" and not opts.get("heapr_global"):  # determinism of the streamed run itself
        prune_checkpoint(src, tmp_path / "s2", max_cpu_memory="40KB", **kw)
        assert _files(tmp_path / "s2") == _files(tmp_path / "s")


@pytest.mark.parametrize("family,method,opts", [("deepseek_v2", "heapr", {"ratio": 0.5}),  # shared expert shrinks too
                                                ("mixtral", "wanda", {"sparsity": 0.5}),
                                                ("qwen3_moe", "moe-pruner", {"sparsity": 0.5})])
def test_partly_resident_streamed_model_gives_the_same_bytes(tmp_path, family, method, opts):
    """A cap that keeps some layers in memory and offloads the rest to disk (float32 source)."""
    src, calib = _source(tmp_path, family, torch.float32)
    kw = dict(method=method, calib=calib, n=4, seq_len=32, batch_size=2, progress=False, **opts)
    prune_checkpoint(src, tmp_path / "mem", **kw)
    cap = str(int(0.9 * sum(f.stat().st_size for f in src.glob("*.safetensors"))))
    placed = {k: v for k, v in load_model(src, dtype="float32", max_cpu_memory=cap).hf_device_map.items() if "layers." in k}
    assert set(placed.values()) == {"cpu", "disk"}, placed  # some decoder layers in memory, the others on disk
    prune_checkpoint(src, tmp_path / "s", max_cpu_memory=cap, **kw)
    assert _files(tmp_path / "mem") == _files(tmp_path / "s")


def test_cli_prune_streams_fine_grained_methods(tmp_path):
    src, calib = _source(tmp_path)
    common = ["prune", src, "--calib", calib, "-n", 4, "--seq-len", 32, "--method", "heapr", "--ratio", 0.25]
    assert invoke_cli(*common, "-o", tmp_path / "mem").exit_code == 0
    r = invoke_cli(*common, "-o", tmp_path / "s", "--max-cpu-memory", "40KB")
    assert r.exit_code == 0, r.output
    for name in ("model.safetensors", "config.json"):  # the card and recipe.yaml record the cap
        assert (tmp_path / "mem" / name).read_bytes() == (tmp_path / "s" / name).read_bytes(), name


def _decoder_layers(model):
    return operator.attrgetter(moe_view(model).spec.layers_path)(model)


@pytest.mark.parametrize("method,opts", [("heapr", {"ratio": 0.5}), ("stun-unstructured",
                                                                    {"sparsity": 0.5, "stun_expert_ratio": 0.25})])
def test_streamed_pruning_holds_one_layer_and_stays_offloaded(tmp_path, method, opts):
    """The caps hold: at any forward of a decoder layer (calibration, HEAPr's layer-wise
    backward, the edited layers' re-runs) no other decoder layer has a weight materialised;
    after pruning every weight is still offloaded (the edited layers on disk in the given
    folder); the pruned streamed model computes what the pruned in-memory model computes."""
    src, _ = _source(tmp_path, dtype=torch.float32)
    x = tokens(batch=4, seq=16)
    ref = load_model(src, dtype="float32")
    want = finegrained_prune(ref, x, method, batch_size=2, progress=False, **opts)
    model = load_model(src, dtype="float32", max_cpu_memory="40KB", offload_folder=tmp_path / "off")
    layers = _decoder_layers(model)
    worst = []

    def materialised(i):
        return any(p.device.type != "meta" for p in layers[i].parameters())

    def check(mod, args, i):
        worst.append(sum(materialised(j) for j in range(len(layers)) if j != i))

    hooks = [layer.register_forward_pre_hook(lambda mod, args, i=i: check(mod, args, i)) for i, layer in enumerate(layers)]
    got = finegrained_prune(model, x, method, batch_size=2, progress=False, offload_folder=tmp_path / "edited", **opts)
    for h in hooks:
        h.remove()
    assert worst and max(worst) == 0
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing left in memory
    assert sorted(p.name for p in (tmp_path / "edited").iterdir()) == \
        sorted(f"edited-layer-{i}.safetensors" for i in moe_view(model).moe_layer_indices)
    assert json.dumps(got, sort_keys=True, default=str) == json.dumps(want, sort_keys=True, default=str)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)


def test_layerwise_heapr_gradients_equal_the_whole_model_backward(family):
    """HEAPr's layer-by-layer backward (what a streamed model runs) gives bit-identical scores."""
    model = tiny_model(family)
    x = tokens(batch=3, seq=16)
    whole = heapr_scores(model, x, batch_size=2, progress=False)
    layered = heapr_scores(model, x, batch_size=2, progress=False, layer_by_layer=True)
    assert whole.keys() == layered.keys()
    for i in whole:
        assert torch.equal(whole[i], layered[i]), i


def test_head_gradient_a_few_sequences_at_a_time_equals_the_whole_batch(monkeypatch):
    """Under a small GPU cap the LM head's gradient is taken a sequence at a time (the loss is
    a sum over tokens): the same scores, up to float32 rounding of the batched matmuls."""
    from moecompress.finegrained import _layerwise

    model = tiny_model("qwen3_moe")
    x = tokens(batch=4, seq=16)
    whole = heapr_scores(model, x, batch_size=4, progress=False, layer_by_layer=True)
    monkeypatch.setattr(_layerwise, "HEAD_BUDGET", 1)  # one sequence per head pass
    split = heapr_scores(model, x, batch_size=4, progress=False, layer_by_layer=True)
    for i in whole:
        torch.testing.assert_close(split[i], whole[i], rtol=1e-5, atol=1e-12)


def test_bench_script_runs_at_a_tiny_size(tmp_path):
    """bench/finegrained_stream.py (the GPU measurement) at a tiny shape on the CPU."""
    import importlib.util
    from pathlib import Path

    from moecompress.testing import char_tokenizer

    char_tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    path = Path(__file__).resolve().parents[1] / "bench" / "finegrained_stream.py"
    spec = importlib.util.spec_from_file_location("finegrained_stream", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--shape", "tiny-olmoe", "--layers", "2", "--device", "cpu", "--tokenizer-from", str(tmp_path / "tok"),
                      "--calib", str(tmp_path / "calib.txt"), "-n", "4", "--seq-len", "32", "--methods", "heapr,moe-pruner",
                      "--work", str(tmp_path / "work"), "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text()) == res
    for name in ("heapr", "moe-pruner"):
        assert res["methods"][name]["same_output"] == {"identical_bytes": True}
    assert res["methods"]["heapr"]["streamed"]["intermediate_size_after"] == 96
    assert res["methods"]["moe-pruner"]["streamed"]["expert_weight_sparsity"] == pytest.approx(0.5)
