"""`moecompress run`: YAML recipes chain stages; malformed recipes fail before any work; the
resolved recipe is written with the output and reproduces it; `--resume` continues a killed run."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moecompress.cli import app
from moecompress.errors import MoECompressError
from moecompress.options import STAGE_OPTIONS, recipe_fields
from moecompress.recipe import load_recipe, run_recipe
from moecompress.testing import SAMPLE_TEXT, tiny_checkpoint

runner = CliRunner()
RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def _write(tmp_path, recipe: dict, name="recipe.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return p


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def setup(tmp_path):
    tiny_checkpoint(tmp_path / "src", "qwen3_moe")
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT)
    return tmp_path


def _two_stages(t):
    return {"model": str(t / "src"), "output": str(t / "out"), "seed": 3, "dtype": "float32",
            "calibration": {"calib": str(t / "text.txt"), "n": 4, "seq_len": 32},
            "stages": [{"prune": {"method": "frequency", "keep": 6}},
                       {"merge": {"keep": 4, "batch_size": 2}},
                       {"eval": {"ppl": [str(t / "text.txt")], "base": True, "seq_len": 32, "max_tokens": 200,
                                 "device": "cpu"}}]}


def test_recipe_chains_stages_and_records_the_resolved_recipe(setup, monkeypatch):
    from moecompress.commands._common import console

    monkeypatch.setattr(console, "width", 400)  # table titles with long paths on one line
    t = setup
    summary = run_recipe(_write(t, _two_stages(t)))
    assert AutoModelForCausalLM.from_pretrained(t / "out").config.num_experts == 4
    record = json.loads((t / "out" / "moecompress.json").read_text())
    resolved = yaml.safe_load((t / "out" / "recipe.yaml").read_text())
    assert record["recipe"] == resolved and resolved["model"] == str(t / "src")
    merge = resolved["stages"][1]["merge"]
    assert merge["seed"] == 3 and merge["n"] == 4 and merge["dtype"] == "float32" and merge["keep"] == 4
    assert set(merge) == set(recipe_fields(STAGE_OPTIONS["merge"]))  # every option, resolved
    assert resolved["stages"][2]["eval"]["base"] == str(t / "src")
    assert len(record["history"]) == 1 and record["history"][0]["stage"] == "prune"  # chain kept
    assert record["source"] == f"{t / 'src'} after stage 1 (prune)"  # no temporary path in the record
    # the evaluation names the model it evaluated, not the stage folder that was deleted
    assert json.loads((t / "out" / "eval.json").read_text())["model"] == f"{t / 'src'} after stage 2 (merge)"
    for text in [json.dumps(summary), *(f.read_text() for f in (t / "out").iterdir() if f.suffix != ".safetensors")]:
        assert ".tmp-" not in text and ".stages" not in text
    assert "ppl" in (t / "out" / "eval.json").read_text() and len(summary["stages"]) == 3
    assert "## Recipe" in (t / "out" / "README.md").read_text()
    assert not (t / "out" / ".stages").exists() and not [p for p in t.iterdir() if p.name.startswith(".")]
    # the written recipe reproduces the output byte for byte, in another folder
    r = runner.invoke(app, ["run", str(t / "out" / "recipe.yaml"), "-o", str(t / "again")])
    assert r.exit_code == 0, r.output
    assert _files(t / "out") == _files(t / "again")
    # each stage's result is printed as its own command prints it, the evaluation table last
    shown = [r.output.index(s) for s in ("stage 1/3: prune", "expert pruning: frequency, 6 of 8 kept",
                                          "8 -> 6 experts in 2 MoE layers (frequency)", "stage 2/3: merge",
                                          "m-smoe, 6 -> 4 experts per MoE layer", "merged experts per MoE layer",
                                          "stage 3/3: eval", f"{t / 'src'} after stage 2 (merge) vs {t / 'src'}",
                                          "ppl text", "KL(base||model) text", "done: ")]
    assert shown == sorted(shown)
    evaluation = json.loads((t / "again" / "eval.json").read_text())
    assert f"{evaluation['ppl']['text']:.1f}" in r.output[shown[-4]:]


def test_one_line_prune_equals_the_one_stage_recipe(setup):
    t = setup
    args = ["--keep", "5", "--method", "frequency", "--calib", str(t / "text.txt"), "-n", "4", "--seq-len", "32"]
    r = runner.invoke(app, ["prune", str(t / "src"), "-o", str(t / "cli"), *args])
    assert r.exit_code == 0, r.output
    recipe = _write(t, {"model": str(t / "src"), "output": str(t / "recipe"),
                        "calibration": {"calib": str(t / "text.txt"), "n": 4, "seq_len": 32},
                        "stages": [{"prune": {"keep": 5, "method": "frequency"}}]})
    r = runner.invoke(app, ["run", str(recipe)])
    assert r.exit_code == 0, r.output
    assert _files(t / "cli") == _files(t / "recipe")
    assert {"recipe.yaml", "moecompress.json", "README.md", "model.safetensors"} <= set(_files(t / "cli"))


KILL = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)  # as conftest does: the reference ran in this process's settings
    import moecompress.merge.checkpoint as merge_api
    from moecompress.recipe import run_recipe
    real = merge_api.merge_experts
    def merge_then_die(*a, **k):
        real(*a, **k)
        os.kill(os.getpid(), signal.SIGKILL)  # a kill in the middle of stage 2, after its heavy work
    merge_api.merge_experts = merge_then_die
    run_recipe(sys.argv[1])
""")


def test_killed_during_the_second_stage_resumes_to_the_same_bytes(setup):
    t = setup
    recipe = _two_stages(t)
    reference = _write(t, {**recipe, "output": str(t / "ref")}, "ref.yaml")
    run_recipe(reference)
    path = _write(t, recipe)
    import os

    # the package first, then whatever the parent runs with (e.g. another transformers on PYTHONPATH)
    path_env = os.pathsep.join(filter(None, [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", KILL, str(path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path_env})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (t / "out").exists()  # nothing half-built at the destination
    [tmp] = [p for p in t.iterdir() if p.name.startswith(".out.tmp-")]
    assert (tmp / ".stages" / "01-prune.json").is_file() and not (tmp / ".stages" / "02-merge.json").exists()
    said = []
    run_recipe(path, resume=True, say=said.append)
    assert said[0] == "stage 1/3: prune done earlier, resumed" and said[1] == "stage 2/3: merge"
    assert _files(t / "out") == _files(t / "ref")
    assert not [p for p in t.iterdir() if p.name.startswith(".")]  # the killed run's folder was taken over


def test_resume_redoes_a_stage_whose_options_changed(setup, monkeypatch):
    import moecompress.recipe.runner as runner_module

    t = setup
    path = _write(t, {**_two_stages(t), "stages": _two_stages(t)["stages"][:2]})

    def full_disk(*a, **k):
        raise MoECompressError("no space left")

    with monkeypatch.context() as m:
        m.setattr(runner_module, "_finish", full_disk)  # both stages done, the output not assembled
        with pytest.raises(MoECompressError, match=r"stages 1-2 are kept in .*rerun with --resume"):
            run_recipe(path)
    assert not (t / "out").exists()
    said = []
    run_recipe(path, sets=["merge.keep=3"], resume=True, say=said.append)
    assert said == ["stage 1/2: prune done earlier, resumed", "stage 2/2: merge"]
    assert AutoModelForCausalLM.from_pretrained(t / "out").config.num_experts == 3
    assert not [p for p in t.iterdir() if p.name.startswith(".")]


def test_a_plain_rerun_removes_an_interrupted_run_and_says_so(setup, monkeypatch):
    import moecompress.recipe.runner as runner_module

    t = setup
    path = _write(t, {**_two_stages(t), "stages": _two_stages(t)["stages"][:1]})
    with monkeypatch.context() as m:
        m.setattr(runner_module, "_finish", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            run_recipe(path)
    assert [p.name.startswith(".out.tmp-") for p in t.iterdir() if p.name.startswith(".")] == [True]
    r = runner.invoke(app, ["run", str(path)])
    assert r.exit_code == 0, r.output
    assert "removed the completed stages of an interrupted run (--resume continues such a run)" in " ".join(r.output.split())
    assert not [p for p in t.iterdir() if p.name.startswith(".")]


def _stage_example(name: str, t: Path) -> dict:
    """A valid stage of every kind, for the typo test (generated from STAGE_OPTIONS below)."""
    return {"stats": {}, "prune": {"keep": 4}, "merge": {"keep": 4}, "eval": {"ppl": [str(t / "text.txt")]},
            "upload": {"repo_id": "me/x", "dry_run": True}}.get(name, {})


@pytest.mark.parametrize("stage", list(STAGE_OPTIONS))
def test_a_typo_in_any_stage_option_exits_2_with_one_line_before_loading(setup, stage, monkeypatch):
    import moecompress.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    t = setup
    key = (list(recipe_fields(STAGE_OPTIONS[stage])) or ["anything"])[0] + "x"
    stages = [{"prune": {"keep": 6}}, {stage: {**_stage_example(stage, t), key: 1}}]
    path = _write(t, {"model": str(t / "src"), "output": str(t / "o"), "stages": stages})
    for args in (["run", str(path)], ["run", str(path), "--check"]):
        r = runner.invoke(app, args)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1, r.output
        line = yaml.safe_dump({"model": 0, "output": 0, "stages": stages}, sort_keys=False).splitlines()
        want = next(i for i, s in enumerate(line, 1) if s.strip().startswith(f"{key}:"))
        assert f"recipe.yaml:{want}:" in lines[0] and "stage 2" in lines[0] and key in lines[0], lines[0]
    assert not (t / "o").exists()


@pytest.mark.parametrize("bad, message", [
    ({"output": "x", "stages": [{"prune": {}}]}, "needs model"),
    ({"model": "m", "output": "x", "stages": []}, "at least one stage"),
    ({"model": "m", "output": "x", "stages": [{"squash": {}}]}, "unknown stage 'squash'"),
    ({"model": "m", "output": "x", "stages": [{"prune": {"keep": 0}}]}, "stage 1 (prune): keep: Input should be"),
    ({"model": "m", "output": "x", "stages": [{"prune": {"keep": "six"}}]}, "keep: Input should be a valid integer"),
    ({"model": "m", "output": "x", "stages": [{"eval": {}}]}, "nothing to evaluate"),
    ({"model": "m", "output": "x", "extra": 1, "stages": [{"prune": {}}]}, "unknown key 'extra'"),
    ({"model": "m", "calibration": {"calib": "missing.txt"}, "stages": [{"prune": {"keep": 2}}]}, "not found"),
])
def test_malformed_recipes_are_refused(tmp_path, bad, message):
    with pytest.raises(MoECompressError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(_write(tmp_path, bad))


def test_set_overrides_and_check(tmp_path):
    p = _write(tmp_path, {"model": "org/model", "stages": [{"prune": {"keep": 2}}, {"prune": {"keep": 1}}]})
    r = load_recipe(p, ["model=other/model", "prune.method=random", "stages.2.keep=3", "calibration.n=8"])
    assert r.model == "other/model" and [s.options.keep for s in r.stages] == [2, 3]
    assert all(s.options.method == "random" and s.options.n == 8 for s in r.stages)
    res = runner.invoke(app, ["run", str(p), "--check"])
    assert res.exit_code == 0 and "recipe ok: 2 stage(s): prune -> prune" in res.output
    with pytest.raises(MoECompressError, match="no merge stage"):
        load_recipe(p, ["merge.keep=3"])


def test_bad_yaml_cli_exit_2(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: [unclosed\n")
    res = runner.invoke(app, ["run", str(p)])
    assert res.exit_code == 2 and "not valid YAML" in res.output and "Traceback" not in res.output


def test_failed_first_stage_leaves_nothing(setup):
    t = setup
    recipe = {"model": str(t / "src"), "output": str(t / "out"), "stages": [{"prune": {"method": "random", "keep": 99}}]}
    with pytest.raises(MoECompressError):
        run_recipe(_write(t, recipe))
    assert not (t / "out").exists() and not [p for p in t.iterdir() if p.name.startswith(".")]


def test_a_later_stage_asking_for_more_experts_than_remain_fails_before_any_stage_runs(setup, monkeypatch):
    """merge keep: 6 after prune keep: 4 (of 8): one line naming both stages, exit 2, before any
    model is loaded, from `run` and from `run --check` (the local model's config); no output and
    no temporary folder are left."""
    import moecompress.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    t = setup
    recipe = {"model": str(t / "src"), "output": str(t / "out"), "calibration": {"calib": str(t / "text.txt")},
              "stages": [{"prune": {"method": "frequency", "keep": 4}}, {"merge": {"keep": 6}}]}
    path = _write(t, recipe)
    for args in (["run", str(path)], ["run", str(path), "--check"]):
        r = runner.invoke(app, args)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1, r.output
        assert "stage 2 (merge), after stage 1 (prune) leaves 4 experts: --keep must be between 1 and 3" in lines[0]
    assert not (t / "out").exists() and not [p for p in t.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("stages, error", [
    ([{"prune": {"keep": 9}}, {"merge": {"keep": 2}}], "stage 1 (prune): --keep must be between 1 and 7"),
    ([{"prune": {"keep": 9}}], "^--keep must be between 1 and 7"),  # one stage: its own message, as its command
    ([{"prune": {"method": "heapr", "ratio": 0.5}}, {"merge": {"keep": 7}}], None),  # neurons: 8 experts stay
    ([{"prune": {"method": "stun", "sparsity": 0.6, "stun_expert_ratio": 0.5}}, {"merge": {"keep": 4}}],
     "after stage 1 (prune) leaves 4 experts"),  # STUN's first stage removes whole experts
    ([{"prune": {"ratio": 0.25}}, {"quantize": {"bits": 4}}, {"prune": {"keep": 6}}],
     "stage 3 (prune), after stage 1 (prune) leaves 6 experts"),  # the count passes through other stages
    ([{"prune": {"keep": 4}}, {"distill": {"stages": "keep:3,steps:1", "steps": 1}}, {"merge": {"keep": 6}}],
     None),  # distill --stages: known only as it runs; the check stops there
])
def test_expert_counts_flow_through_the_stages(setup, stages, error):
    from moecompress.recipe.runner import check_expert_counts

    t = setup
    recipe = load_recipe(_write(t, {"model": str(t / "src"), "output": str(t / "out"),
                                    "calibration": {"calib": str(t / "text.txt")}, "stages": stages}))
    if error is None:
        check_expert_counts(recipe, 8)
    else:
        with pytest.raises(MoECompressError, match=error.replace("(", r"\(").replace(")", r"\)")):
            check_expert_counts(recipe, 8)


@pytest.mark.parametrize("options", [{"method": "frequency", "keep": 5}, {"method": "heapr", "ratio": 0.5},
                                     {"method": "stun", "sparsity": 0.6, "stun_expert_ratio": 0.3}])
def test_the_count_the_check_predicts_is_the_count_the_stage_writes(setup, options):
    """``experts_after`` (what the recipe check walks) against what prune writes: whole experts,
    neurons (the count stays) and STUN's first stage."""
    from moecompress.options import PruneOptions
    from moecompress.prune import prune_checkpoint
    from moecompress.source import open_source

    t = setup
    opts = PruneOptions(**options, calib=str(t / "text.txt"), n=4, seq_len=32, repair="none")
    prune_checkpoint(t / "src", t / "out", options=opts, progress=False)
    written = open_source(t / "out").num_experts
    assert opts.experts_after(8) == written
    assert (written == 8) == (options["method"] == "heapr")  # neurons: every expert stays
