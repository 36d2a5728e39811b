"""`moecompress bench`: speed and memory figures are produced and sane (tiny model, CPU)."""

import json

import pytest
from typer.testing import CliRunner

from moecompress.bench_speed import benchmark
from moecompress.cli import app
from moecompress.errors import MoECompressError
from moecompress.testing import tiny_model

runner = CliRunner()


def test_benchmark_reports_speed_and_memory():
    model = tiny_model("mixtral")
    r = benchmark(model, prompt_len=16, gen_len=4, batch=2, repeats=1)
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    assert r["memory_kind"] == "rss" and r["peak_memory_bytes"] >= 0
    assert r["weights_bytes"] == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


def test_benchmark_rejects_bad_lengths():
    model = tiny_model("qwen3_moe")
    with pytest.raises(MoECompressError, match="max_position_embeddings"):
        benchmark(model, prompt_len=120, gen_len=20)
    with pytest.raises(MoECompressError, match="--batch"):
        benchmark(model, batch=0)


def test_bench_cli_json(tiny_ckpt):
    folder, _ = tiny_ckpt("qwen3_moe")
    res = runner.invoke(app, ["bench", str(folder), "--prompt-len", "8", "--gen-len", "3", "--repeats", "1", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output[res.output.index("{"):])
    assert data["prompt_len"] == 8 and data["decode_tokens_per_s"] > 0
    res = runner.invoke(app, ["bench", str(folder), "--prompt-len", "8", "--gen-len", "3", "--repeats", "1"])
    assert res.exit_code == 0 and "tokens/s" in res.output
