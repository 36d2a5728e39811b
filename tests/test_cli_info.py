"""`moecompress info` and the CLI's error contract (one line, exit 2, no traceback)."""

import json

from typer.testing import CliRunner

from moecompress.cli import app
from moecompress.info import model_info

runner = CliRunner()


def test_info_counts_parameters(tiny_ckpt):
    folder, model = tiny_ckpt("deepseek_v3")
    data = model_info(folder)
    assert data["family"] == "DeepSeek-V3"
    assert data["moe_layers"] == [1, 2] and data["dense_layers"] == [0]
    assert data["num_experts"] == 8 and data["top_k"] == 2 and data["shared_experts"]
    assert data["total_params"] == sum(p.numel() for p in model.parameters())
    per_expert = 3 * 16 * 32
    assert data["active_params"] == data["total_params"] - 2 * (8 - 2) * per_expert
    # on disk: parameters plus persistent buffers (the e_score_correction_bias of each MoE layer)
    assert data["disk_bytes_by_dtype"] == {"F32": sum(t.numel() for t in model.state_dict().values()) * 4}


def test_info_json_cli(tiny_ckpt):
    folder, _ = tiny_ckpt("mixtral")
    res = runner.invoke(app, ["info", str(folder), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["family"] == "Mixtral"


def test_missing_model_is_one_line_exit_2(tmp_path):
    res = runner.invoke(app, ["info", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_non_moe_model_exit_2(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("llama", hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    res = runner.invoke(app, ["info", str(tmp_path)])
    assert res.exit_code == 2 and "not a supported Mixture-of-Experts family" in res.output


def test_every_stage_has_help():
    for stage in ("info", "stats", "prune", "merge", "quantize", "distill", "eval", "run", "upload"):
        assert runner.invoke(app, [stage, "--help"]).exit_code == 0, stage


def test_uncached_hub_id_offline_is_one_line_exit_2():
    res = runner.invoke(app, ["info", "some-org/some-moe"])
    assert res.exit_code == 2 and "unreachable" in res.output and "Traceback" not in res.output


def test_fitted_tables_wraps_narrow_layouts_without_cutting_cells():
    """Tables wider than the terminal are split into several that repeat the key columns; a
    table with nothing after its repeated columns (one column, narrower than the terminal needs)
    stays one table instead of failing."""
    from moecompress.commands._common import fitted_tables

    heads, rows = ["layer", "entropy", "load CV", "max share"], [["0", "3.141592", "0.500000", "0.250000"]]
    tables = fitted_tables("t", heads, rows, width=30)
    assert len(tables) > 1 and all(t.columns[0].header == "layer" for t in tables)
    assert sorted(c.header for t in tables for c in t.columns[1:]) == sorted(heads[1:])
    one = fitted_tables("t", ["a very long column header"], [["12345678901234567890"]], width=10)
    assert [[c.header for c in t.columns] for t in one] == [["a very long column header"]]
