"""`moecompress distill`: losses against naive references, the data order, the stage schedule,
and end-to-end runs on tiny models (loss falls, exact resume, staged shapes, reload)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moecompress.arch import moe_view
from moecompress.distill import distill_checkpoint, parse_stages
from moecompress.distill.data import BatchOrder, shard
from moecompress.distill.expertwise import expert_wise_distill
from moecompress.distill.losses import hidden_loss, kl_loss
from moecompress.options import DistillOptions, validate
from moecompress.errors import MoECompressError
from moecompress.testing import SAMPLE_TEXT, invoke_cli, tiny_checkpoint, tiny_model, tokens

RUN = dict(seq_len=32, batch_size=4, lr=3e-3, warmup=0.0, lr_schedule="constant", progress=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """``teacher/`` and a differently initialised ``student/`` of the same tiny shape, and text."""
    root = tmp_path_factory.mktemp("distill")
    tiny_checkpoint(root / "teacher", "qwen3_moe", seed=0)
    tiny_checkpoint(root / "student", "qwen3_moe", seed=1)
    (root / "data.txt").write_text(SAMPLE_TEXT * 3)
    return root


# ----- losses ----------------------------------------------------------------------------------
def test_kl_matches_naive_reference_and_is_zero_for_identical_logits():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    T = 2.0
    ref = []
    for i in range(2):
        for j in range(3):
            p = torch.softmax(t[i, j] / T, -1)
            q = torch.softmax(s[i, j] / T, -1)
            ref.append(sum(float(p[v] * math.log(p[v] / q[v])) for v in range(11)))
    assert kl_loss(s, t, temperature=T).item() == pytest.approx(T * T * sum(ref) / len(ref), rel=1e-5)
    assert kl_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_top_k_kl_is_the_kl_of_k_tokens_plus_the_rest():
    s, t = torch.randn(5, 9), torch.randn(5, 9)
    k = 3
    total = 0.0
    for r in range(5):
        p, q = torch.softmax(t[r], -1).double(), torch.softmax(s[r], -1).double()
        idx = p.topk(k).indices
        pk = torch.cat([p[idx], 1 - p[idx].sum(0, keepdim=True)])  # K tokens + "any other"
        qk = torch.cat([q[idx], 1 - q[idx].sum(0, keepdim=True)])
        total += float((pk * (pk / qk).log()).sum())
    top = kl_loss(s, t, top_k=k).item()
    assert top == pytest.approx(total / 5, rel=1e-4)
    assert top <= kl_loss(s, t).item()  # a lower bound of the full KL
    assert kl_loss(s, t, top_k=9).item() == pytest.approx(kl_loss(s, t).item(), rel=1e-6)
    assert kl_loss(t, t, top_k=2).item() == pytest.approx(0.0, abs=1e-6)


def test_hidden_loss_is_relative_error_averaged_over_layers_without_embeddings():
    t = [torch.randn(2, 4, 6) for _ in range(3)]
    s = [t[0] + 100.0, t[1] * 1.5, t[2]]  # the embedding term (index 0) is ignored
    assert hidden_loss(s, t).item() == pytest.approx((0.25 + 0.0) / 2, rel=1e-5)


# ----- data order and schedule -----------------------------------------------------------------
def test_batch_order_is_a_seeded_permutation_per_epoch_and_shards_evenly():
    order = BatchOrder(10, 4, seed=3)
    seen = torch.cat([order[i] for i in range(5)])  # 20 positions = 2 epochs, batch 2 spans both
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(BatchOrder(10, 4, seed=3)[2], order[2])
    assert not torch.equal(BatchOrder(10, 4, seed=4)[0], order[0])
    b = order[1]
    assert torch.equal(torch.cat([shard(b, r, 2) for r in range(2)]), b)


def test_stage_schedule_parses_and_refuses_with_one_line():
    st = parse_stages("heapr:0.25,steps:200; keep:16,steps:400,method:frequency ; steps:10")
    assert [(s.op, s.value, s.steps, s.options) for s in st] == [
        ("heapr", 0.25, 200, {}), ("keep", 16, 400, {"method": "frequency"}), (None, None, 10, {})]
    assert st[1].describe() == "keep:16,method:frequency,steps:400"
    for bad, words in [("keep:16", "steps"), ("heapr:1.5,steps:3", "fraction"), ("keep:2.5,steps:1", "whole"),
                       ("foo:1,steps:2", "unknown item"), ("keep:4,merge:2,steps:1", "one operation"), ("", "empty")]:
        with pytest.raises(MoECompressError, match=words):
            parse_stages(bad)


def test_options_give_one_line_errors(pair):
    data = str(pair / "data.txt")
    with pytest.raises(MoECompressError, match="lr"):
        validate(DistillOptions, {"data": data, "lr": -1})
    with pytest.raises(MoECompressError, match="not both"):
        validate(DistillOptions, {"data": data, "steps": 3, "tokens": 100})
    with pytest.raises(MoECompressError, match="unknown option"):
        validate(DistillOptions, {"data": data, "nope": 1})
    with pytest.raises(MoECompressError, match="steps"):
        validate(DistillOptions, {"data": data, "stages": "keep:3"})
    assert validate(DistillOptions, {"data": data, "tokens": 1000, "batch_size": 2, "seq_len": 64}).total_steps() == 8


# ----- end to end ------------------------------------------------------------------------------
def test_kd_loss_falls_and_output_is_a_standard_checkpoint(pair, tmp_path):
    r = distill_checkpoint(pair / "student", tmp_path / "out", teacher=pair / "teacher", data=pair / "data.txt",
                           steps=8, eval=[pair / "data.txt"], eval_tokens=300, eval_seq_len=64, **RUN)
    curve = json.loads((tmp_path / "out" / "loss_curve.json").read_text())
    losses = [row["loss"] for row in curve["steps"]]
    assert len(losses) == 8 and losses[-1] < 0.7 * losses[0]
    assert r.eval_after["data"] < r.eval_before["data"]
    assert (tmp_path / "out" / "loss_curve.png").stat().st_size > 1000
    rec = json.loads((tmp_path / "out" / "moecompress.json").read_text())
    assert rec["stage"] == "distill" and rec["teacher"] == str(pair / "teacher") and rec["steps"] == 8
    assert rec["data"]["sha256"] == r.data_sha256 and rec["seeds"]["data_order"] == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_experts == 8 and model.dtype == torch.float32


def test_resume_after_a_stop_gives_the_bytes_of_an_uninterrupted_run(pair, tmp_path):
    kw = dict(teacher=pair / "teacher", data=pair / "data.txt", steps=5, grad_accum=2, checkpoint_every=2,
              **{**RUN, "lr_schedule": "cosine", "warmup": 0.2})
    stopped = distill_checkpoint(pair / "student", tmp_path / "a", stop_after=3, **kw)
    assert stopped.stopped and not (tmp_path / "a").exists()
    assert [p.name for p in (tmp_path / "a.checkpoints").iterdir()] == ["step-0000003"]
    distill_checkpoint(pair / "student", tmp_path / "a", resume=True, **kw)
    distill_checkpoint(pair / "student", tmp_path / "b", **kw)
    a, b = (tmp_path / "a" / "model.safetensors").read_bytes(), (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a == b
    curve = [json.loads((tmp_path / d / "loss_curve.json").read_text())["steps"] for d in "ab"]
    assert [r["loss"] for r in curve[0]] == [r["loss"] for r in curve[1]]
    assert not (tmp_path / "a.checkpoints").exists()  # the default checkpoint folder goes after success


def test_staged_slimming_produces_the_scheduled_shapes_and_reloads(pair, tmp_path):
    r = distill_checkpoint(pair / "teacher", tmp_path / "s", data=pair / "data.txt",
                           stages="heapr:0.5,steps:2; keep:6,steps:1,method:frequency; keep:4,steps:2", **RUN)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert model.config.num_experts == 4 and model.config.moe_intermediate_size == 8  # of 8 x 16
    assert [s.get("op") for s in r.stages] == ["heapr", "keep", "keep"] and r.steps == 5
    rec = json.loads((tmp_path / "s" / "moecompress.json").read_text())
    assert rec["schedule"] == ["heapr:0.5,steps:2", "keep:6,method:frequency,steps:1", "keep:4,steps:2"]
    assert rec["teacher"] == str(pair / "teacher")
    with torch.no_grad():
        assert torch.isfinite(model(tokens(1, 12)).logits).all()


def test_expert_wise_distillation_lowers_every_layers_error():
    teacher, student = tiny_model("qwen3_moe", seed=0), tiny_model("qwen3_moe", seed=0)
    moe_view(student).keep_experts({layer.layer_idx: [0, 1, 2, 3] for layer in moe_view(student)})
    report = expert_wise_distill(student, teacher, tokens(4, 16), steps=30, lr=1e-2, batch_size=2)
    assert set(report) == {1, 2}
    for r in report.values():
        assert r["relative_error_after"] < r["relative_error_before"]


def test_cli_errors_exit_2(pair, tmp_path):
    base = ["distill", pair / "student", "-o", tmp_path / "x", "--data", pair / "data.txt"]
    res = invoke_cli(*base)
    assert res.exit_code == 2 and "teacher" in res.output
    res = invoke_cli(*base, "--teacher", pair / "teacher", "--optim", "adamw8bit")
    assert res.exit_code == 2 and "CUDA" in res.output
    res = invoke_cli(*base, "--teacher", pair / "teacher", "--stages", "keep:3")
    assert res.exit_code == 2 and "steps" in res.output
    res = invoke_cli(*base, "--teacher", pair / "teacher", "--resume")
    assert res.exit_code == 2 and "no checkpoint" in res.output


def test_recipe_prunes_then_distills_from_the_recipes_model(pair, tmp_path):
    from moecompress.recipe import run_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model: {pair / 'teacher'}
output: {tmp_path / 'out'}
calibration: {{calib: {pair / 'data.txt'}, n: 8, seq_len: 32}}
stages:
  - prune: {{method: frequency, keep: 4}}
  - distill: {{steps: 3, seq_len: 32, batch_size: 4, lr: 0.003}}
""")
    run_recipe(recipe)
    rec = json.loads((tmp_path / "out" / "moecompress.json").read_text())
    assert rec["stage"] == "distill" and rec["teacher"] == str(pair / "teacher") and rec["steps"] == 3
    assert rec["history"][-1]["stage"] == "prune"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_experts == 4
    recipe.write_text(recipe.read_text().replace("lr: 0.003", "lr: -1"))
    with pytest.raises(MoECompressError, match="lr"):
        run_recipe(recipe)


# ----- --cache-teacher -------------------------------------------------------------------------
def _bytes_and_curve(folder):
    curve = json.loads((folder / "loss_curve.json").read_text())["steps"]
    return (folder / "model.safetensors").read_bytes(), [(r["loss"], r["kl"], r["hidden"]) for r in curve]


@pytest.mark.parametrize("top_k,loss", [(None, "kl"), (5, "kl+hidden")])
def test_teacher_cache_gives_the_bytes_of_a_run_without_it(pair, tmp_path, top_k, loss):
    kw = dict(teacher=pair / "teacher", data=pair / "data.txt", steps=3, grad_accum=2, top_k_logits=top_k, loss=loss,
              **RUN)
    distill_checkpoint(pair / "student", tmp_path / "live", **kw)
    cached = distill_checkpoint(pair / "student", tmp_path / "a", cache_teacher=True, teacher_cache_dir=tmp_path / "tc", **kw)
    info = cached.teacher_cache
    assert (info["micro_batches"], info["built"], info["reused"]) == (6, 6, 0)
    assert _bytes_and_curve(tmp_path / "a") == _bytes_and_curve(tmp_path / "live")  # identical on the CPU
    names = {k for f in (tmp_path / "tc").glob("*.safetensors") for k in safe_open(f, "pt").keys()}
    assert names == ({"logits"} if top_k is None else {"logp", "idx", "rest", "hidden"})
    # a second run reads the cache without running the teacher, and is deterministic
    again = distill_checkpoint(pair / "student", tmp_path / "b", cache_teacher=True, teacher_cache_dir=tmp_path / "tc", **kw)
    assert (again.teacher_cache["built"], again.teacher_cache["reused"]) == (0, 6)
    assert _bytes_and_curve(tmp_path / "b") == _bytes_and_curve(tmp_path / "live")
    assert json.loads((tmp_path / "b" / "moecompress.json").read_text())["teacher_cache"]["reused"] == 6


def test_teacher_cache_resumes_and_rebuilds_when_stale(pair, tmp_path):
    kw = dict(teacher=pair / "teacher", data=pair / "data.txt", steps=5, grad_accum=2, checkpoint_every=2,
              top_k_logits=4, **{**RUN, "lr_schedule": "cosine", "warmup": 0.2})
    distill_checkpoint(pair / "student", tmp_path / "live", **kw)
    first = distill_checkpoint(pair / "student", tmp_path / "a", stop_after=3, cache_teacher=True, **kw)
    cache = tmp_path / "a.teacher-cache"  # the default folder
    assert first.stopped and first.teacher_cache["built"] == 10
    resumed = distill_checkpoint(pair / "student", tmp_path / "a", resume=True, cache_teacher=True, **kw)
    assert (resumed.teacher_cache["built"], resumed.teacher_cache["reused"]) == (0, 4)  # micro-batches 6..9
    assert _bytes_and_curve(tmp_path / "a") == _bytes_and_curve(tmp_path / "live")
    # other data: the manifest's key differs, the old records go and new ones are computed
    (tmp_path / "other.txt").write_text(SAMPLE_TEXT[::-1] * 3)
    key = json.loads((cache / "manifest.json").read_text())["key"]
    stale = distill_checkpoint(pair / "student", tmp_path / "c", **{**kw, "data": tmp_path / "other.txt"},
                               cache_teacher=True, teacher_cache_dir=cache)
    assert stale.teacher_cache["stale_rebuilt"] and stale.teacher_cache["built"] == 10
    new_key = json.loads((cache / "manifest.json").read_text())["key"]
    assert new_key["data_sha256"] != key["data_sha256"] and len(list(cache.glob("*.safetensors"))) == 10
    distill_checkpoint(pair / "student", tmp_path / "d", **{**kw, "data": tmp_path / "other.txt"})
    assert _bytes_and_curve(tmp_path / "c") == _bytes_and_curve(tmp_path / "d")


def test_staged_slimming_reads_one_cache_for_every_stage(pair, tmp_path):
    kw = dict(data=pair / "data.txt", stages="heapr:0.5,steps:2; keep:4,steps:2", top_k_logits=6, **RUN)
    r = distill_checkpoint(pair / "teacher", tmp_path / "s", cache_teacher=True, teacher_cache_dir=tmp_path / "tc", **kw)
    assert r.teacher_cache["built"] == 4 and r.steps == 4
    distill_checkpoint(pair / "teacher", tmp_path / "live", **kw)
    assert _bytes_and_curve(tmp_path / "s") == _bytes_and_curve(tmp_path / "live")


def test_teacher_cache_refuses_a_cache_too_large_in_one_line(pair, tmp_path):
    base = ["distill", pair / "student", "-o", tmp_path / "x", "--data", pair / "data.txt", "--teacher",
            pair / "teacher", "--steps", "2", "--seq-len", "32", "--batch-size", "4"]
    res = invoke_cli(*base, "--cache-teacher", "--teacher-cache-max-gib", "1e-6")
    assert res.exit_code == 2 and "--top-k-logits" in res.output and "GiB" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
