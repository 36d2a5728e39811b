"""Layer-ahead loading (moecompress/layerload.py): the same weights as from_pretrained, the same
output bytes as a whole load, and its errors as one line before the layer is used."""

import json
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moecompress import layerload
from moecompress.errors import MoECompressError
from moecompress.prune import prune_checkpoint
from moecompress.testing import TINY_CONFIGS, invoke_cli, saved_tensors, tiny_checkpoint


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(layerload, "ON_CPU", True)


@pytest.fixture
def slow_layers(monkeypatch):
    """Each layer takes 50 ms to load: work that reads a layer before it is loaded would see
    transformers' initialisation, not the checkpoint (and the outputs would differ)."""
    from transformers import core_model_loading

    real = core_model_loading.convert_and_load_state_dict_in_model

    def slow(*a, **kw):
        time.sleep(0.05)
        return real(*a, **kw)

    monkeypatch.setattr(core_model_loading, "convert_and_load_state_dict_in_model", slow)


def _load(folder, dtype=torch.float32):
    model = layerload.load(folder, folder, dtype=dtype, device="cpu", check_values=True)
    assert model is not None and layerload.loading(model)
    layerload.finish(model)
    assert not layerload.loading(model)
    return model


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_layers_loaded_ahead_equal_from_pretrained(model_type, tmp_path, on_cpu):
    """Every family's published layout (per-expert tensors fused on load by transformers' own
    conversions): every parameter and buffer, and the logits, bitwise as from_pretrained."""
    tiny_checkpoint(tmp_path, model_type)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    model = _load(tmp_path)
    a, b = ref.state_dict(), model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ref_buffers = dict(ref.named_buffers())
    for name, buf in model.named_buffers():
        assert torch.equal(buf, ref_buffers[name]), name
    ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ref(ids).logits, model(ids).logits)


def test_tied_embeddings_and_bf16(tmp_path, on_cpu):
    tiny_checkpoint(tmp_path, "qwen3_moe", tie_word_embeddings=True)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    model = _load(tmp_path, torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]) and v.dtype == torch.bfloat16, k


def test_forward_waits_for_each_layer(tmp_path, on_cpu, slow_layers):
    tiny_checkpoint(tmp_path, "olmoe")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    model = layerload.load(tmp_path, tmp_path, dtype=torch.float32, device="cpu", check_values=True)
    ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    assert layerload.loading(model)  # still loading: the forward waits layer by layer
    assert torch.equal(ref(ids).logits, model(ids).logits)
    layerload.finish(model)


def test_default_prune_writes_the_same_bytes_with_layers_loading(calib_ckpt, tmp_path, monkeypatch, slow_layers):
    """The default (NAEE, then the re-fit) starts on layer 0 while the others load: the same
    kept experts and bytes as after a whole load."""
    src, calib = calib_ckpt / "tiny", str(calib_ckpt / "calib.txt")
    kw = dict(ratio=0.5, calib=calib, n=4, seq_len=32, progress=False)
    whole = prune_checkpoint(src, tmp_path / "whole", **kw)
    monkeypatch.setattr(layerload, "ON_CPU", True)
    loads = []
    real_load = layerload.load
    monkeypatch.setattr(layerload, "load", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    ahead = prune_checkpoint(src, tmp_path / "ahead", **kw)
    assert loads == [1]  # the layer-ahead load was taken
    assert ahead.kept == whole.kept and ahead.method == whole.method == "auto"
    a, b = saved_tensors(tmp_path / "whole"), saved_tensors(tmp_path / "ahead")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    record = json.loads((tmp_path / "ahead" / "moecompress.json").read_text())
    assert record["info"]["repair"]["mode"] == "refit"


def _damage(folder, key_part: str, value=float("nan"), drop: bool = False) -> str:
    (path,) = folder.glob("*.safetensors")
    tensors = load_file(path)
    key = sorted(k for k in tensors if key_part in k)[0]
    if drop:
        del tensors[key]
    else:
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[3] = value
    save_file(tensors, path, metadata={"format": "pt"})
    return key


def test_nonfinite_layer_is_refused_before_it_runs(tmp_path, on_cpu):
    tiny_checkpoint(tmp_path / "src", "qwen3_moe")
    _damage(tmp_path / "src", "layers.2.mlp.experts.1.up_proj")
    model = layerload.load(tmp_path / "src", tmp_path / "src", dtype=torch.float32, device="cpu", check_values=True)
    with pytest.raises(MoECompressError, match=r"input weight 'model\.layers\.2\.mlp\.experts\.gate_up_proj' holds NaN"):
        model(torch.tensor([[5, 6, 7]]))
    with pytest.raises(MoECompressError, match="holds NaN or Inf"):
        layerload.finish(model)


def test_missing_layer_tensor_is_one_line_from_the_cli(tmp_path, on_cpu):
    tiny_checkpoint(tmp_path / "src", "qwen3_moe")
    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    _damage(tmp_path / "src", "layers.1.self_attn.o_proj", drop=True)
    res = invoke_cli("prune", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "--ratio", "0.5",
                     "--calib", str(tmp_path / "calib.txt"), "-n", "4", "--seq-len", "32")
    assert res.exit_code == 2, res.output
    assert "model.layers.1.self_attn.o_proj.weight' is missing" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


def test_a_tensor_transformers_does_not_load_is_still_checked(tmp_path, on_cpu):
    tiny_checkpoint(tmp_path / "src", "qwen3_moe")
    (path,) = (tmp_path / "src").glob("*.safetensors")
    tensors = load_file(path)
    tensors["model.layers.1.mlp.not_a_weight_of_the_model"] = torch.tensor([1.0, float("inf")])
    save_file(tensors, path, metadata={"format": "pt"})
    model = layerload.load(tmp_path / "src", tmp_path / "src", dtype=torch.float32, device="cpu", check_values=True)
    with pytest.raises(MoECompressError, match="'model.layers.1.mlp.not_a_weight_of_the_model' holds NaN or Inf"):
        layerload.finish(model)


def test_the_file_scan_is_taken_over(tmp_path, monkeypatch):
    """The layer-ahead load checks every value itself: the running file scan is stopped, and once
    the load has passed, the input counts as checked (no second scan before the output commits)."""
    from moecompress import integrity

    tiny_checkpoint(tmp_path, "olmoe")
    scans = []

    def slow_scan(folder, headers=None, device=None, stop=None):
        scans.append(stop)
        stop.wait(10)
        raise InterruptedError("input scan stopped")

    monkeypatch.setattr(integrity, "first_nonfinite", slow_scan)
    integrity.require_sound_input(tmp_path, wait=False)
    deadline = time.monotonic() + 10
    while not scans and time.monotonic() < deadline:  # the scan's thread has started
        time.sleep(0.01)
    done = integrity.take_over_scan(tmp_path)
    assert len(scans) == 1 and scans[0].is_set()  # stopped
    done()
    integrity.require_sound_input(tmp_path)  # passes without starting a scan
    assert len(scans) == 1


def test_a_checkpoint_named_otherwise_is_loaded_whole(tmp_path, on_cpu):
    """Layer tensors stored under another prefix than the model's own path: not split by layer."""
    tiny_checkpoint(tmp_path, "qwen3_moe")
    (path,) = tmp_path.glob("*.safetensors")
    tensors = load_file(path)
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, path, metadata={"format": "pt"})
    assert layerload.load(tmp_path, tmp_path, dtype=torch.float32, device="cpu", check_values=True) is None


def test_layers_past_the_model_are_not_loaded_but_checked(tmp_path, on_cpu):
    """A multi-token-prediction layer (stored past num_hidden_layers, not loaded by transformers)
    is not read before the model is built; its values are still checked."""
    from moecompress.testing import with_mtp_layer

    tiny_checkpoint(tmp_path / "src", "deepseek_v3")
    with_mtp_layer(tmp_path / "src")
    model = _load(tmp_path / "src")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    _damage(tmp_path / "src", "layers.3.")  # the MTP layer (the model has 3)
    model = layerload.load(tmp_path / "src", tmp_path / "src", dtype=torch.float32, device="cpu", check_values=True)
    with pytest.raises(MoECompressError, match=r"'model\.layers\.3\..*' holds NaN or Inf"):
        layerload.finish(model)


def test_tensor_spans_are_the_stored_bytes(tmp_path):
    """The read-ahead reads each tensor's bytes where integrity.tensor_spans says they are."""
    from moecompress.integrity import tensor_spans

    tiny_checkpoint(tmp_path, "olmoe")
    (path,) = tmp_path.glob("*.safetensors")
    raw = path.read_bytes()
    for key, t in load_file(path).items():
        start, end = tensor_spans(path)[key]
        assert raw[start:end] == t.contiguous().view(torch.uint8).numpy().tobytes(), key


def test_overlapping_quiet_loads_give_the_users_verbosity_back():
    """The loader threads quiet transformers beside the main thread: entries that overlap (the
    first leaving before the second) leave the user's verbosity and progress bars as they were."""
    from transformers.utils import logging as hf_logging

    from moecompress.layerload import _quiet_transformers

    before, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_info()
    try:
        first, second = _quiet_transformers(), _quiet_transformers()
        first.__enter__()
        second.__enter__()
        assert hf_logging.get_verbosity() == hf_logging.ERROR
        first.__exit__(None, None, None)
        assert hf_logging.get_verbosity() == hf_logging.ERROR  # the second is still loading
        second.__exit__(None, None, None)
        assert hf_logging.get_verbosity() == hf_logging.INFO
        assert hf_logging.is_progress_bar_enabled() == bars
    finally:
        hf_logging.set_verbosity(before)
