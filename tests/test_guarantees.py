"""README "Errors and guarantees": bad inputs over every command, each answered by one line,
the right exit code, no traceback, nothing left behind and the inputs unchanged (hashed)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from moecompress.testing import SAMPLE_TEXT, invoke_cli, tiny_checkpoint

MARKER_CODE = '''
import os
open(os.environ["MOECOMPRESS_MARKER"], "w").write("imported")
from transformers import PretrainedConfig


class MarkerConfig(PretrainedConfig):
    model_type = "markermoe"
'''


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One folder with every input the matrix needs (built once)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    tiny_checkpoint(root / "par" / "tiny", "qwen3_moe")
    tiny = root / "par" / "tiny"
    (root / "calib.txt").write_text(SAMPLE_TEXT)
    (root / "garbage.bin").write_bytes(bytes(range(256)) * 40)
    (root / "garbage.txt").write_bytes(os.urandom(4000))
    (root / "control.txt").write_text("\x01\x02\x03\x04\x05\x06\x07\x0e\x0f" * 200 + "some text")
    (root / "empty.txt").write_text("")
    (root / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    (root / "recipe-bad.yaml").write_text("model: [unclosed\n")
    (root / "recipe-type.yaml").write_text(f"model: {root / 'par' / 'tiny'}\noutput: {root / 'o'}\n"
                                           "stages:\n  - prune: {keep: ten, method: random}\n")
    (root / "recipe-counts.yaml").write_text(f"model: {root / 'par' / 'tiny'}\noutput: {root / 'o'}\n"
                                             f"calibration: {{calib: {root / 'calib.txt'}}}\nstages:\n"
                                             "  - prune: {keep: 4, method: frequency}\n  - merge: {keep: 6}\n")
    (root / "notstats.safetensors").write_bytes(b"\x00" * 64)
    (root / "notours").mkdir()
    (root / "notours" / "precious.txt").write_text("keep me")
    (root / "a file").write_text("x")
    # damaged copies of the checkpoint
    shutil.copytree(tiny, root / "trunc")
    w = root / "trunc" / "model.safetensors"
    os.truncate(w, w.stat().st_size // 2)
    shutil.copytree(tiny, root / "nan")
    t = load_file(root / "nan" / "model.safetensors")
    key = sorted(t)[3]
    t[key].view(-1)[0] = float("nan")
    save_file(t, root / "nan" / "model.safetensors", metadata={"format": "pt"})
    (root / "nan-key").write_text(key)
    from moecompress.testing import tiny_model

    tiny_model("qwen3_moe").save_pretrained(root / "sharded", max_shard_size="40KB")
    shards = sorted((root / "sharded").glob("*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    shutil.copytree(tiny, root / "badjson")
    (root / "badjson" / "config.json").write_text("{not json")
    # valid JSON that transformers' config class refuses (its fields are validated)
    shutil.copytree(tiny, root / "badfield")
    cfg = json.loads((root / "badfield" / "config.json").read_text())
    (root / "badfield" / "config.json").write_text(json.dumps({**cfg, "hidden_size": "wide"}))
    shutil.copytree(tiny, root / "notok")  # no tokenizer files: transformers builds one without a vocabulary
    for f in (root / "notok").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    shutil.copytree(tiny, root / "badlayers")
    (root / "badlayers" / "config.json").write_text(json.dumps({**cfg, "layer_types": ["no_attention"]}))
    # a checkpoint whose config needs its own code; importing it writes a marker file
    rc = root / "remote"
    rc.mkdir()
    (rc / "config.json").write_text(json.dumps({"model_type": "markermoe", "auto_map": {
        "AutoConfig": "configuration_marker.MarkerConfig", "AutoModelForCausalLM": "configuration_marker.MarkerConfig"}}))
    (rc / "configuration_marker.py").write_text(MARKER_CODE)
    (root / "odd[bold]dir").mkdir()
    # a compressed-tensors checkpoint (int4 experts, packed): stages that write new weights refuse it
    from moecompress.quantize import quantize_checkpoint

    quantize_checkpoint(tiny, root / "int4", scheme="w4a16", quantizer="rtn", progress=False)
    return root


def _cases():
    """(id, argv with {root} placeholders, expected exit code, text the error line must hold)."""
    T = "{root}/par/tiny"
    P = ("--keep", "6", "--method", "frequency", "--calib", "{root}/calib.txt", "-n", "4", "--seq-len", "32")
    M = ("--keep", "4", "--calib", "{root}/calib.txt", "-n", "4", "--seq-len", "32")
    S = ("--calib", "{root}/calib.txt", "-n", "4", "--seq-len", "32")
    return [
        # --- model -------------------------------------------------------------------------
        ("prune-missing-model", ["prune", "{root}/nope", "-o", "{root}/o", *P], 2, "not found"),
        ("prune-model-is-file", ["prune", "{root}/calib.txt", "-o", "{root}/o", *P], 2, "is a file"),
        ("prune-no-config", ["prune", "{root}/notours", "-o", "{root}/o", *P], 2, "no config.json"),
        ("prune-bad-config-json", ["prune", "{root}/badjson", "-o", "{root}/o", *P], 2, "badjson"),
        ("prune-no-tokenizer", ["prune", "{root}/notok", "-o", "{root}/o", *P], 2, "no usable tokenizer"),
        ("eval-no-tokenizer", ["eval", "{root}/notok", "--ppl", "{root}/calib.txt", "--device", "cpu"], 2,
         "no tokenizer"),
        ("merge-compressed-tensors", ["merge", "{root}/int4", "-o", "{root}/o", *M], 2, "before quantization"),
        ("prune-wanda-compressed-tensors", ["prune", "{root}/int4", "-o", "{root}/o", "--method", "wanda",
                                            "--sparsity", "0.5", *S], 2, "compressed-tensors"),
        ("distill-compressed-tensors", ["distill", "{root}/int4", "-o", "{root}/o", "--teacher", T, "--data",
                                        "{root}/calib.txt", "--steps", "1", "--seq-len", "32"], 2, "before quantization"),
        ("prune-config-bad-field", ["prune", "{root}/badfield", "-o", "{root}/o", *P], 2, "not valid for its model type"),
        ("info-config-bad-field", ["info", "{root}/badfield"], 2, "hidden_size"),
        ("check-config-bad-layers", ["check", "{root}/badlayers"], 2, "layer_types"),
        ("prune-truncated-shard", ["prune", "{root}/trunc", "-o", "{root}/o", *P], 2, "model.safetensors' is truncated"),
        ("eval-truncated-shard", ["eval", "{root}/trunc", "--ppl", "{root}/calib.txt", "--device", "cpu"], 2,
         "is truncated"),
        ("merge-truncated-shard", ["merge", "{root}/trunc", "-o", "{root}/o", *M], 2, "is truncated"),
        ("info-truncated-shard", ["info", "{root}/trunc"], 2, "is truncated"),
        ("info-missing-shard", ["info", "{root}/sharded"], 2, "is missing"),
        ("prune-missing-shard", ["prune", "{root}/sharded", "-o", "{root}/o", "--keep", "6", "--method", "random"], 2,
         "is missing"),
        ("prune-nan-weights", ["prune", "{root}/nan", "-o", "{root}/o", *P], 2, "--allow-nonfinite"),
        ("eval-nan-weights", ["eval", "{root}/nan", "--ppl", "{root}/calib.txt", "--device", "cpu"], 2, "NaN or Inf"),
        ("stats-nan-weights", ["stats", "{root}/nan", "-o", "{root}/s.safetensors", *S], 2, "NaN or Inf"),
        # --- options -----------------------------------------------------------------------
        ("prune-keep-0", ["prune", T, "-o", "{root}/o", "--keep", "0", "--method", "random"], 2, "keep"),
        ("prune-keep-too-many", ["prune", T, "-o", "{root}/o", "--keep", "99", "--method", "random"], 2, "keep"),
        ("prune-ratio-1.5", ["prune", T, "-o", "{root}/o", "--ratio", "1.5", "--method", "random"], 2, "ratio"),
        ("prune-unknown-method", ["prune", T, "-o", "{root}/o", "--keep", "6", "--method", "nosuch"], 2, "nosuch"),
        ("prune-bad-dtype", ["prune", T, "-o", "{root}/o", "--keep", "6", "--method", "random", "--dtype", "f7"], 2,
         "dtype"),
        ("prune-cuda-no-gpu", ["prune", T, "-o", "{root}/o", "--keep", "6", "--method", "random", "--device", "cuda"],
         2, "--device cpu"),
        ("merge-cuda-no-gpu", ["merge", T, "-o", "{root}/o", *M, "--device", "cuda"], 2, "--device cpu"),
        ("bench-cuda-no-gpu", ["bench", T, "--device", "cuda", "--prompt-len", "4", "--gen-len", "2"], 2,
         "--device cpu"),
        ("bench-gen-len-0", ["bench", T, "--gen-len", "0"], 2, "--gen-len"),
        ("merge-keep-0", ["merge", T, "-o", "{root}/o", "--keep", "0", "--calib", "{root}/calib.txt"], 2, "keep"),
        ("stats-segment-len-0", ["stats", T, "-o", "{root}/s.safetensors", *S, "--segment-len", "0"], 2,
         "--segment-len"),
        ("eval-nothing", ["eval", T], 2, "nothing to evaluate"),
        ("eval-missing-ppl", ["eval", T, "--ppl", "{root}/nope.txt", "--device", "cpu"], 2, "nope.txt"),
        ("eval-seq-len-0", ["eval", T, "--ppl", "{root}/calib.txt", "--seq-len", "0", "--device", "cpu"], 2,
         "seq-len"),
        # --- calibration -------------------------------------------------------------------
        ("prune-calib-binary-bin", ["prune", T, "-o", "{root}/o", *P[:4], "--calib", "{root}/garbage.bin"], 2,
         "garbage.bin"),
        ("prune-calib-binary-txt", ["prune", T, "-o", "{root}/o", *P[:4], "--calib", "{root}/garbage.txt"], 2,
         "not UTF-8"),
        ("stats-calib-control-chars", ["stats", T, "-o", "{root}/s.safetensors", "--calib", "{root}/control.txt"], 2,
         "non-printable"),
        ("merge-calib-missing", ["merge", T, "-o", "{root}/o", "--keep", "4", "--calib", "{root}/nope.txt"], 2,
         "not found"),
        ("merge-calib-folder", ["merge", T, "-o", "{root}/o", "--keep", "4", "--calib", "{root}/notours"], 2,
         "folder"),
        ("prune-calib-empty", ["prune", T, "-o", "{root}/o", *P[:4], "--calib", "{root}/empty.txt"], 2, "no text"),
        ("prune-calib-bad-jsonl", ["prune", T, "-o", "{root}/o", *P[:4], "--calib", "{root}/bad.jsonl"], 2,
         "not valid JSON"),
        # --- outputs -----------------------------------------------------------------------
        ("prune-out-contains-input", ["prune", T, "-o", "{root}/par", "--overwrite", *P], 2, "contains the input"),
        ("prune-out-is-input", ["prune", T, "-o", T, "--overwrite", *P], 2, "inside the input"),
        ("prune-out-inside-input", ["prune", T, "-o", T + "/sub", *P], 2, "inside the input"),
        ("prune-out-symlink-to-parent", ["prune", T, "-o", "{root}/link-to-par", "--overwrite", *P], 2,
         "contains the input"),
        ("prune-overwrite-foreign-folder", ["prune", T, "-o", "{root}/notours", "--overwrite", *P], 2,
         "not a moecompress output"),
        ("prune-out-exists", ["prune", T, "-o", "{root}/notours", *P], 2, "--overwrite"),
        ("prune-out-is-file", ["prune", T, "-o", "{root}/a file", "--overwrite", *P], 2, "is a file"),
        ("stats-out-inside-input", ["stats", T, "-o", T + "/s.safetensors", *S], 2, "inside the input"),
        ("stats-out-wrong-suffix", ["stats", T, "-o", "{root}/s.txt", *S], 2, ".safetensors"),
        # --- recipes -----------------------------------------------------------------------
        ("run-missing-recipe", ["run", "{root}/nope.yaml"], 2, "nope.yaml"),
        ("run-recipe-not-yaml", ["run", "{root}/recipe-bad.yaml"], 2, "recipe-bad.yaml"),
        ("run-recipe-wrong-type", ["run", "{root}/recipe-type.yaml"], 2, "keep"),
        # a later stage asks for more experts than the earlier ones leave: refused before they run
        ("run-recipe-counts", ["run", "{root}/recipe-counts.yaml"], 2, "after stage 1 (prune) leaves 4 experts"),
        # --- stats files -------------------------------------------------------------------
        ("stats-show-missing", ["stats", "show", "{root}/nope.safetensors"], 2, "not found"),
        ("stats-show-garbage", ["stats", "show", "{root}/notstats.safetensors"], 2, "notstats"),
        ("prune-stats-garbage", ["prune", T, "-o", "{root}/o", "--keep", "6", "--method", "frequency", "--stats",
                                 "{root}/notstats.safetensors"], 2, "notstats"),
        # --- eval / upload -----------------------------------------------------------------
        ("eval-base-missing", ["eval", T, "--base", "{root}/nope", "--ppl", "{root}/calib.txt", "--device", "cpu"], 2,
         "not found"),
        ("upload-missing-folder", ["upload", "{root}/nope", "me/x", "--dry-run"], 2, "not found"),
        ("upload-bad-repo-id", ["upload", T, "not a repo id", "--dry-run"], 2, "repository id"),
        ("upload-no-token", ["upload", T, "me/x"], 2, "token"),
        # --- remote code (stdin answers "y": must not be asked, must not run) -------------------
        ("info-remote-code", ["info", "{root}/remote"], 2, "--trust-remote-code"),
        ("prune-remote-code", ["prune", "{root}/remote", "-o", "{root}/o", "--keep", "2", "--method", "random"], 2,
         "--trust-remote-code"),
        ("eval-remote-code", ["eval", "{root}/remote", "--ppl", "{root}/calib.txt", "--device", "cpu"], 2,
         "--trust-remote-code"),
        ("stats-remote-code", ["stats", "{root}/remote", "-o", "{root}/s.safetensors", *S], 2, "--trust-remote-code"),
        # --- the error printer -------------------------------------------------------------
        ("markup-in-path", ["info", "{root}/odd[bold]dir/[red]x"], 2, "[bold]dir/[red]x"),
    ]


CASES = _cases()


def test_matrix_is_large_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
    # the README's "Errors and guarantees" states the matrix's true size
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"a matrix of {len(CASES)} bad inputs" in " ".join(readme.split())


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, case, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from moecompress.cli import app

    name, argv, code, needle = case
    monkeypatch.setenv("MOECOMPRESS_MARKER", str(tmp_path / "marker"))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    link = world / "link-to-par"
    if not link.exists():
        link.symlink_to(world / "par")
    before = tree(world)
    args = [a.replace("{root}", str(world)) for a in argv]
    res = CliRunner().invoke(app, args, input="y\n")
    out = res.output
    assert res.exit_code == code, f"{name}: exit {res.exit_code}\n{out}\n{res.exception!r}"
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert needle.replace("{root}", str(world)) in errors[0], errors[0]
    assert "Traceback" not in out and "Do you wish to run the custom code" not in out
    assert tree(world) == before  # nothing left behind, every input unchanged
    assert not (tmp_path / "marker").exists()  # nothing imported from the checkpoint


def test_remote_code_runs_only_with_the_flag(world, tmp_path):
    """With --trust-remote-code the folder's module is imported (the marker appears), proving
    that the flag reaches transformers; without it (the matrix above) nothing is imported."""
    import subprocess
    import sys

    env = {**os.environ, "MOECOMPRESS_MARKER": str(tmp_path / "marker"), "HF_MODULES_CACHE": str(tmp_path / "m"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "moecompress.cli", "info", str(world / "remote"), "--trust-remote-code"],
                       capture_output=True, text=True, env=env, input="n\n", timeout=300)
    assert (tmp_path / "marker").read_text() == "imported"
    assert r.returncode == 2 and "Traceback" not in r.stderr  # imported, then refused: not an MoE family


def test_overwrite_replaces_a_previous_output_only(world, tmp_path):
    common = ("--keep", "6", "--method", "random")
    out = tmp_path / "o"
    assert invoke_cli("prune", world / "par" / "tiny", "-o", out, *common).exit_code == 0
    (out / "extra.txt").write_text("old")
    r = invoke_cli("prune", world / "par" / "tiny", "-o", out, "--overwrite", *common)
    assert r.exit_code == 0, r.output
    assert not (out / "extra.txt").exists() and (out / "moecompress.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert invoke_cli("prune", world / "par" / "tiny", "-o", empty, "--overwrite", *common).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "o"]  # no temporary folder left


def test_allow_nonfinite_proceeds(world, tmp_path):
    r = invoke_cli("prune", world / "nan", "-o", tmp_path / "o", "--keep", "6", "--method", "random",
                   "--allow-nonfinite")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "moecompress.json").is_file()


def test_upload_dry_run_never_writes_into_the_folder(world, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    before = tree(world / "par" / "tiny")
    r = invoke_cli("upload", world / "par" / "tiny", "me/x", "--dry-run", "--json", "-")
    assert r.exit_code == 0, r.output
    card = Path(json.loads(r.output)["card"])
    assert card.read_text().startswith("---") and world not in card.parents
    assert tree(world / "par" / "tiny") == before
    shutil.rmtree(card.parent)
