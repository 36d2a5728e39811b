"""`moecompress check` and the check every writing stage runs on its output."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moecompress.check import check_checkpoint
from moecompress.errors import MoECompressError
from moecompress.testing import invoke_cli


def test_every_family_passes_check(family, tiny_ckpt):
    folder, _ = tiny_ckpt(family)
    report = check_checkpoint(folder)
    assert report.ok, report.problems
    assert report.tensors == len(load_file(folder / "model.safetensors"))


def _tamper(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


EXPERT = "model.layers.1.mlp.experts.3.gate_proj.weight"  # qwen3_moe: layer 0 is dense


@pytest.mark.parametrize("edit, first", [
    (lambda t: t.pop(EXPERT), f"{EXPERT}: missing"),
    (lambda t: t.__setitem__(EXPERT, t[EXPERT][:-1].clone()), f"{EXPERT}: shape [15, 32], the config implies [16, 32]"),
    (lambda t: t[EXPERT].__setitem__((2, 5), float("nan")), f"{EXPERT}: NaN or Inf"),
    (lambda t: t[EXPERT].__setitem__((0, 0), float("inf")), f"{EXPERT}: NaN or Inf"),
    (lambda t: t.__setitem__(EXPERT, t[EXPERT].half()), f"{EXPERT}: dtype F16"),
    (lambda t: t.__setitem__("model.layers.1.mlp.experts.8.gate_proj.weight", t[EXPERT].clone()),
     "model.layers.1.mlp.experts.8.gate_proj.weight: not implied by the config (expert 8 but num_local_experts = 8)"),
])
def test_tampered_checkpoint_fails_with_the_first_bad_tensor(tiny_ckpt, edit, first):
    folder, _ = tiny_ckpt("qwen3_moe")
    _tamper(folder, edit)
    report = check_checkpoint(folder)
    assert report.problems and report.problems[0].startswith(first), report.problems
    r = invoke_cli("check", folder)
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and first in lines[0], r.output


def test_config_fields_must_agree(tiny_ckpt):
    folder, _ = tiny_ckpt("deepseek_v3")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "n_group": 3}))
    assert check_checkpoint(folder).problems[0] == "config: n_group = 3 does not divide n_routed_experts = 8"
    (folder / "config.json").write_text(json.dumps({**cfg, "num_experts_per_tok": 6}))
    assert check_checkpoint(folder).problems[0] == "config: top-k 6 exceeds the 4 experts of 1 of 2 groups"


def test_index_must_be_consistent(tmp_path):
    from moecompress.testing import tiny_model

    folder = tmp_path / "sharded"
    tiny_model("qwen3_moe", dtype=torch.bfloat16).save_pretrained(folder, max_shard_size="20KB")
    assert check_checkpoint(folder).ok
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = sorted(index["weight_map"])[0]
    wrong = next(s for s in sorted(set(index["weight_map"].values())) if s != index["weight_map"][key])
    index["weight_map"][key] = wrong
    index_path.write_text(json.dumps(index))
    assert check_checkpoint(folder).problems[0] == f"{key}: the index maps it to {wrong}, which does not hold it"


def test_check_passes_and_reports_in_one_line(tiny_ckpt):
    folder, _ = tiny_ckpt("mixtral")
    r = invoke_cli("check", folder)
    assert r.exit_code == 0 and r.output.startswith("ok: 96 tensors"), r.output
    r = invoke_cli("check", folder, "--json", "-")
    assert r.exit_code == 0 and json.loads(r.output)["ok"] is True


def test_a_stage_whose_output_fails_the_check_writes_nothing(tiny_ckpt, tmp_path, monkeypatch):
    """A writer bug (here: surgery drops a tensor) is caught before the output appears."""
    from moecompress import surgery
    from moecompress.prune import prune_checkpoint

    folder, _ = tiny_ckpt("qwen3_moe")
    real = surgery.aligned_order

    def lossy(entries):  # the shard is planned, and written, without one tensor
        return real([e for e in entries if e.name != "model.layers.2.mlp.experts.1.down_proj.weight"])

    monkeypatch.setattr(surgery, "aligned_order", lossy)
    with pytest.raises(MoECompressError, match=r"^check failed: model.layers.2.mlp.experts.1.down_proj.weight: "
                                                r"missing .*the output was removed"):
        prune_checkpoint(folder, tmp_path / "out", keep=4, method="random")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("fmt, family, drop, first", [
    ("fp8", "qwen3_moe", "model.layers.1.mlp.experts.2.up_proj.weight_scale_inv",
     "model.layers.1.mlp.experts.2.up_proj.weight: dtype F8_E4M3, expected bfloat16"),  # no scales: not FP8-stored
    ("mxfp4", "gpt_oss", "model.layers.1.mlp.experts.down_proj_scales",
     "model.layers.1.mlp.experts.down_proj: MXFP4 needs both _blocks and _scales, found only _blocks"),
])
def test_quantized_checkpoint_missing_its_scales_fails(tmp_path, fmt, family, drop, first):
    from moecompress.testing import quantized_checkpoint

    quantized_checkpoint(tmp_path, family, fmt, **({"intermediate_size": 32} if fmt == "mxfp4" else {}))
    assert check_checkpoint(tmp_path).ok
    _tamper(tmp_path, lambda t: t.pop(drop))
    assert check_checkpoint(tmp_path).problems[0] == first


def test_fp8_scale_without_its_weight_fails(tmp_path):
    from moecompress.testing import quantized_checkpoint

    quantized_checkpoint(tmp_path, "qwen3_moe", "fp8")
    _tamper(tmp_path, lambda t: t.pop("model.layers.2.mlp.experts.5.down_proj.weight"))
    assert check_checkpoint(tmp_path).problems[0] == ("model.layers.2.mlp.experts.5.down_proj.weight: missing, "
                                                      "only its weight_scale_inv is stored")


def test_float32_correction_bias_of_a_bf16_deepseek_v3_passes(tmp_path):
    """DeepSeek-V3's published checkpoint stores e_score_correction_bias in F32 beside bf16
    weights (transformers keeps it in float32); the check accepts that, and only that."""
    from moecompress.testing import tiny_model

    tiny_model("deepseek_v3", dtype=torch.bfloat16).save_pretrained(tmp_path)
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    _tamper(tmp_path, lambda t: t.__setitem__(bias, t[bias].float()))
    assert check_checkpoint(tmp_path).ok, check_checkpoint(tmp_path).problems
    weight = "model.layers.1.mlp.experts.0.gate_proj.weight"
    _tamper(tmp_path, lambda t: t.__setitem__(weight, t[weight].float()))
    assert check_checkpoint(tmp_path).problems[0].startswith(f"{weight}: dtype F32")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_the_fast_nonfinite_scan_equals_isfinite(dtype):
    """has_nonfinite (one aminmax pass) == ~isfinite(t).all(), for NaN (any payload, either
    sign) and +-Inf at every kind of position (first, last, vector tails), 1-D and 2-D."""
    from moecompress.integrity import has_nonfinite

    g = torch.Generator().manual_seed(0)
    bad = [float("nan"), -float("nan"), float("inf"), -float("inf")]
    for n in (1, 2, 15, 16, 17, 31, 33, 64, 65, 129, 1000):
        clean = torch.randn(n, generator=g).to(dtype)
        assert has_nonfinite(clean) is False and has_nonfinite(clean.view(1, n).expand(3, n).contiguous()) is False
        for pos in {0, n // 2, n - 1, min(n - 1, 16)}:
            for v in bad:
                t = clean.clone()
                t[pos] = v
                assert has_nonfinite(t) is True and has_nonfinite(t.view(1, n).expand(2, n).contiguous()) is True
    if dtype in (torch.bfloat16, torch.float16):  # every NaN / Inf bit pattern of the exponent field
        exp = 0x7F80 if dtype == torch.bfloat16 else 0x7C00
        for bits in range(exp, 0x8000, 3):
            for sign in (0, -0x8000):
                t = torch.randn(40, generator=g).to(dtype)
                t.view(torch.int16)[17] = bits + sign
                assert has_nonfinite(t) == bool((~torch.isfinite(t)).any()) == True  # noqa: E712



def test_surgery_outputs_scanned_while_written_are_not_read_again(tmp_path, monkeypatch):
    """Shard surgery scans each output shard's tensors in memory and notes the file: the output
    check then skips it (no second read) while the file is unchanged; a changed file, or one
    written with NaN, is read and reported as before."""
    from safetensors.torch import load_file, save_file

    from moecompress.integrity import first_nonfinite, first_nonfinite_tensor, note_finite_file

    assert first_nonfinite_tensor({"b": torch.ones(3), "a": torch.tensor([1.0, float("inf")]),
                                   "i": torch.arange(3)}) == "a"
    assert first_nonfinite_tensor({"q": torch.full((4,), 448.0).to(torch.float8_e4m3fn)}) is None
    assert first_nonfinite_tensor({"q": torch.tensor([float("nan")]).to(torch.float8_e4m3fn)}) == "q"
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4, 4)}, path)
    note_finite_file(path)
    reads = []
    import safetensors

    original = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: reads.append(a[0]) or original(*a, **k))
    assert first_nonfinite(tmp_path) is None and reads == []  # noted: not read
    t = load_file(path)
    t["w"][1, 2] = float("nan")
    save_file(t, path)  # changed since it was noted: read again, the NaN found
    assert first_nonfinite(tmp_path) == "w" and len(reads) == 1


def test_prune_output_check_reads_no_shard_surgery_wrote(calib_ckpt, tmp_path, monkeypatch):
    import safetensors

    from moecompress.prune import prune_checkpoint

    original, reads = safetensors.safe_open, []
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: reads.append(str(a[0])) or original(*a, **k))
    prune_checkpoint(calib_ckpt / "tiny", tmp_path / "o", keep=4, method="frequency", progress=False)
    scanned = [r for r in reads if ".o.tmp" in r]
    assert (tmp_path / "o" / "model.safetensors").exists() and scanned == [], scanned


def test_input_scan_runs_while_the_model_loads_and_refuses_before_use(tmp_path, monkeypatch):
    """Opening an input checks its shards and starts the NaN/Inf scan in the background;
    load_model waits for the verdict before returning, so a damaged input is refused with the
    same one line, after the load and before any weight is used."""
    import threading

    from safetensors.torch import load_file, save_file

    from moecompress import integrity
    from moecompress.checkpoint import load_model
    from moecompress.errors import MoECompressError
    from moecompress.source import open_source
    from moecompress.testing import tiny_checkpoint

    folder = tmp_path / "nan"
    tiny_checkpoint(folder)
    t = load_file(folder / "model.safetensors")
    key = sorted(k for k in t if "experts" in k)[0]
    t[key].view(-1)[3] = float("inf")
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})
    started, release, threads = threading.Event(), threading.Event(), []
    scan = integrity.first_nonfinite

    def held_scan(*a, **k):  # the scan waits until the test lets it go: it must not run in the caller
        threads.append(threading.current_thread().name)
        started.set()
        release.wait(10)
        return scan(*a, **k)

    monkeypatch.setattr(integrity, "first_nonfinite", held_scan)
    open_source(folder)  # returns while the scan is held: it runs in its own thread
    assert started.wait(10) and threads[0] != threading.current_thread().name
    release.set()
    with pytest.raises(MoECompressError, match=f"input weight '{key}' holds NaN or Inf"):
        load_model(folder)
    assert len(threads) == 1  # one scan served both the opening and the load
