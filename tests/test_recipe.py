"""`moecompress run`: YAML recipes chain stages; malformed recipes fail before any work."""

import json

import pytest
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moecompress.cli import app
from moecompress.errors import MoECompressError
from moecompress.recipe import load_recipe, run_recipe
from moecompress.testing import SAMPLE_TEXT, tiny_checkpoint

runner = CliRunner()


def _write(tmp_path, recipe: dict, name="recipe.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(recipe))
    return p


@pytest.fixture
def setup(tmp_path):
    tiny_checkpoint(tmp_path / "src", "qwen3_moe")
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT)
    return tmp_path


def test_recipe_chains_prune_and_eval(setup):
    t = setup
    recipe = {"model": str(t / "src"), "output": str(t / "out"), "seed": 3, "dtype": "float32",
              "stages": [{"prune": {"method": "random", "keep": 6}}, {"prune": {"method": "random", "keep": 4}},
                         {"eval": {"ppl": [str(t / "text.txt")], "base": True, "seq_len": 32, "max_tokens": 200,
                                   "device": "cpu"}}]}
    summary = run_recipe(_write(t, recipe))
    model = AutoModelForCausalLM.from_pretrained(t / "out")
    assert model.config.num_experts == 4
    record = json.loads((t / "out" / "moecompress.json").read_text())
    assert record["recipe"]["stages"] == recipe["stages"] and record["recipe"]["seed"] == 3
    assert len(record["history"]) == 1 and record["history"][0]["stage"] == "prune"  # chain kept
    ev = json.loads((t / "out" / "eval.json").read_text())
    assert "ppl" in json.dumps(ev) and len(summary["stages"]) == 3
    assert not [p for p in t.iterdir() if p.name.startswith(".")]  # no temporary folders left


@pytest.mark.parametrize("bad, message", [
    ({"output": "x", "stages": [{"prune": {}}]}, "model"),
    ({"model": "m", "output": "x", "stages": []}, "at least one stage"),
    ({"model": "m", "output": "x", "stages": [{"squash": {}}]}, "unknown stage 'squash'"),
    ({"model": "m", "output": "x", "stages": [{"eval": {"ppl": ["a"], "bogus": 1}}]}, "unknown option(s) bogus"),
    ({"model": "m", "output": "x", "stages": [{"eval": {}}]}, "no stage that writes a checkpoint"),
    ({"model": "m", "output": "x", "extra": 1, "stages": [{"prune": {}}]}, "extra"),
])
def test_malformed_recipes_are_refused(tmp_path, bad, message):
    with pytest.raises(MoECompressError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(_write(tmp_path, bad))


def test_bad_yaml_cli_exit_2(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: [unclosed\n")
    res = runner.invoke(app, ["run", str(p)])
    assert res.exit_code == 2 and "not valid YAML" in res.output and "Traceback" not in res.output


def test_shipped_recipes_validate():
    from pathlib import Path

    for p in sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml")):
        load_recipe(p)


def test_failed_stage_leaves_nothing(setup):
    t = setup
    recipe = {"model": str(t / "src"), "output": str(t / "out"),
              "stages": [{"prune": {"method": "random", "keep": 99}}]}
    with pytest.raises(MoECompressError):
        run_recipe(_write(t, recipe))
    assert not (t / "out").exists() and not [p for p in t.iterdir() if p.name.startswith(".")]
