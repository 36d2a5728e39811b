"""Every recipe in recipes/ passes `run --check` and runs end to end on a tiny random model of the
family its header names (--set model=...); `moecompress ls` lists methods, families, recipes."""

import re
from pathlib import Path

import pytest
from transformers import AutoConfig
from typer.testing import CliRunner

from moecompress.cli import app
from moecompress.testing import SAMPLE_TEXT, tiny_checkpoint

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
runner = CliRunner()


def _family(path: Path) -> str | None:
    m = re.search(r"tiny random (\w+) model", path.read_text())
    return m.group(1) if m else None


def test_there_are_recipes_and_each_says_what_it_needs():
    assert len(RECIPES) >= 9
    for p in RECIPES:
        head = [line for line in p.read_text().splitlines() if line.startswith("#")]
        assert head and "Needs:" in " ".join(head), p.name


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_passes_check(path):
    r = runner.invoke(app, ["run", str(path), "--check"])
    assert r.exit_code == 0 and "recipe ok" in r.output, r.output


@pytest.mark.parametrize("path", [p for p in RECIPES if _family(p)], ids=lambda p: p.stem)
def test_shipped_recipe_runs_on_a_tiny_model(path, tmp_path):
    family = _family(path)
    tiny_checkpoint(tmp_path / "tiny", family)
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT)
    text = path.read_text()
    sets = [f"model={tmp_path / 'tiny'}", f"calibration.calib={tmp_path / 'text.txt'}", "calibration.n=4",
            "calibration.seq_len=32"]
    if "- eval:" in text:
        sets += ["eval.limit=4", "eval.device=cpu", "eval.seq_len=32", f"eval.ppl=[{tmp_path / 'text.txt'}]",
                 "eval.max_tokens=200"]
    if "- distill:" in text:
        sets += ["distill.steps=2", "distill.seq_len=32", "distill.batch_size=2"]
    ci_line = next(line for line in text.splitlines() if "tiny random" in line)
    sets += [x for x in re.findall(r"--set (\S+=\S+)", ci_line) if not x.startswith("model=")]  # what the recipe's header says its tiny run needs
    if "- quantize:" in text:
        sets += ["quantize.group_size=8"]  # the tiny experts have 16-32 input columns
    args = ["run", str(path), "-o", str(tmp_path / "out"), *[x for s in sets for x in ("--set", s)]]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    assert {"recipe.yaml", "moecompress.json", "README.md", "config.json"} <= {p.name for p in out.iterdir()}
    assert AutoConfig.from_pretrained(out).model_type == AutoConfig.from_pretrained(tmp_path / "tiny").model_type
    if "- eval:" in text:
        assert (out / "eval.json").is_file()


def test_ls_lists_methods_families_and_recipes():
    from moecompress.arch import registry as families
    from moecompress.prune.registry import registry as methods

    wide = dict(terminal_width=300)
    out = runner.invoke(app, ["ls", "methods"], **wide).output
    assert all(f"prune --method {m}" in out for m in methods()) and "merge --method m-smoe" in out
    out = runner.invoke(app, ["ls", "families"], **wide).output
    assert all(t in out for t in families())
    out = runner.invoke(app, ["ls", "recipes"], **wide).output
    assert all(p.name in out for p in RECIPES)
    r = runner.invoke(app, ["ls", "stages"])
    assert r.exit_code == 2 and "use one of" in r.output
