"""Expert pruning: identity, equivalence with router-logit masking, scores against naive
per-token references, NAEE's exhaustive optimum, STUN's clustering, determinism, CLI errors."""

import copy
import itertools
import json
import operator

import pytest
import torch
import torch.nn.functional as F

from moecompress.arch import moe_view
from moecompress.capture import run_calibration
from moecompress.prune import METHODS, plan_pruning, prune_experts, select_experts
from moecompress.prune.stun import greedy_clusters, representative, threshold_clusters
from moecompress.prune.subrouter import SubsetRouting
from moecompress.testing import invoke_cli, TINY_CONFIGS, tiny_model, tokens

ALL_FAMILIES = sorted(TINY_CONFIGS)


def _logits(model, toks):
    with torch.no_grad():
        return model(toks).logits


# ----- identity and equivalence -------------------------------------------------------------
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_keeping_all_experts_is_identity(family):
    model, toks = tiny_model(family), tokens(2, 10)
    ref = _logits(model, toks)
    view = moe_view(model)
    with SubsetRouting({l.layer_idx: (l, list(range(l.num_experts))) for l in view}):
        assert torch.equal(_logits(model, toks), ref)  # routing among all experts changes nothing
    result = prune_experts(model, keep=view.num_experts, method="random")
    assert all(k == list(range(view.num_experts)) for k in result.kept.values())
    assert torch.equal(_logits(model, toks), ref)


def _masked_routing(family, config, logits, keep_mask, k):
    """The family's top-k routing on logits with removed experts at -inf (reference)."""
    masked = logits.float().masked_fill(~keep_mask, float("-inf"))
    if family in ("granitemoe", "gpt_oss"):  # top-k of the logits, softmax over the k
        top, idx = masked.topk(k, dim=-1)
        return masked, torch.softmax(top, dim=-1), idx
    top, idx = torch.softmax(masked, dim=-1).topk(k, dim=-1)
    if family == "mixtral" or getattr(config, "norm_topk_prob", False):
        top = top / top.sum(-1, keepdim=True)
    return masked, top, idx


SOFTMAX_FAMILIES = ["granitemoe", "gpt_oss", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]


@pytest.mark.parametrize("family", SOFTMAX_FAMILIES)
def test_pruning_equals_masking_removed_router_logits(family):
    """The pruned model computes what the full model computes when the removed experts'
    router logits are -inf before softmax / top-k."""
    model, toks = tiny_model(family), tokens(2, 10)
    view = moe_view(model)
    g = torch.Generator().manual_seed(1)
    keep = {l.layer_idx: sorted(torch.randperm(l.num_experts, generator=g)[:5].tolist()) for l in view}
    hooks = []
    for layer in view:
        mask = torch.zeros(layer.num_experts, dtype=torch.bool)
        mask[keep[layer.layer_idx]] = True

        def hook(mod, args, out, mask=mask, k=layer.top_k):
            reverse = not out[0].is_floating_point()  # GraniteMoE on transformers 5.17
            logits, weight, _ = out[::-1] if reverse else out
            masked, w, idx = _masked_routing(family, model.config, logits, mask, k)
            res = (masked.to(logits.dtype), w.to(weight.dtype), idx)
            return res[::-1] if reverse else res

        hooks.append(layer.router.register_forward_hook(hook))
    masked_logits = _logits(model, toks)
    for h in hooks:
        h.remove()
    pruned = copy.deepcopy(model)
    moe_view(pruned).keep_experts(keep)
    torch.testing.assert_close(_logits(pruned, toks), masked_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(model, toks), masked_logits)  # the mask did something


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_subset_routing_equals_pruned_model(family):
    """Routing among kept experts (what NAEE scores and its sequential pass use) is exactly
    what the pruned checkpoint computes, for every family (groups, biases, Llama-4 scores)."""
    model, toks = tiny_model(family), tokens(2, 10)
    view = moe_view(model)
    keep = {l.layer_idx: [0, 2, 3, 5, 6, 7] for l in view}
    with SubsetRouting({l.layer_idx: (l, keep[l.layer_idx]) for l in view}):
        routed = _logits(model, toks)
    pruned = copy.deepcopy(model)
    moe_view(pruned).keep_experts(keep)
    torch.testing.assert_close(_logits(pruned, toks), routed, rtol=1e-5, atol=1e-5)


# ----- score methods against naive references ----------------------------------------------
class _Recorder:
    def __init__(self):
        self.calls, self.residual = {}, {}

    def observe(self, layer, x, routing, y):
        h = self.residual.pop(layer.layer_idx).reshape(-1, x.shape[1])
        self.calls.setdefault(layer.layer_idx, []).append((x.clone(), routing, h.clone()))


@torch.no_grad()
def _naive_scores(model, toks):
    """Per-token loops over (token, selected expert): every score method's statistic."""
    view = moe_view(model)
    rec = _Recorder()
    decoder_layers = operator.attrgetter(view.spec.layers_path)(model)
    hooks = [decoder_layers[l.layer_idx].post_attention_layernorm.register_forward_pre_hook(
        lambda mod, args, li=l.layer_idx: rec.residual.__setitem__(li, args[0])) for l in view]
    run_calibration(model, toks, [rec], batch_size=2, progress=False)
    for h in hooks:
        h.remove()
    out = {}
    for layer in view:
        E = layer.num_experts
        s = {m: torch.zeros(E, dtype=torch.float64) for m in ("frequency", "soft-frequency", "ean", "reap", "easy-ep", "tcess")}
        contrib_n = torch.zeros(E, dtype=torch.float64)
        T = 0
        for x, routing, h in rec.calls[layer.layer_idx]:
            for t in range(x.shape[0]):
                T += 1
                s["soft-frequency"] += routing.probs[t].double()
                routed = torch.zeros(x.shape[1])
                contribs = []
                for e, w in zip(routing.topk_idx[t].tolist(), routing.topk_weight[t].tolist()):
                    o = layer.expert_forward(e, x[t : t + 1])[0].float()
                    s["frequency"][e] += 1
                    s["ean"][e] += o.norm()
                    s["reap"][e] += w * o.norm()
                    contrib_n[e] += 1
                    routed += w * o
                    contribs.append((e, w * o.norm()))
                cos = F.cosine_similarity(h[t].float(), h[t].float() + routed, dim=0)
                for e, c in contribs:
                    s["easy-ep"][e] += c * max(0.0, 1 - float(cos))
                top, idx = routing.logits[t].topk(routing.topk_idx.shape[1])
                for e, p in zip(idx.tolist(), torch.softmax(top.double(), 0).tolist()):
                    s["tcess"][e] += p
        s["reap"] /= contrib_n.clamp_min(1)
        s["tcess"] /= T
        out[layer.layer_idx] = s
    return out


SCORE_METHODS = ["frequency", "soft-frequency", "ean", "reap", "easy-ep", "tcess"]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_scores_equal_naive_reference(family):
    model, toks = tiny_model(family), tokens(3, 12)
    naive = _naive_scores(model, toks)
    for method in SCORE_METHODS:
        plan, _ = plan_pruning(model, keep=5, method=method, tokens=toks)
        for li, ref in naive.items():
            got = plan.scores[li]
            torch.testing.assert_close(got, ref[method], rtol=1e-4, atol=1e-5, msg=f"{method} layer {li}")
            order = sorted(range(len(got)), key=lambda e: (-float(ref[method][e]), e))
            assert plan.kept[li] == sorted(order[:5]), (method, li)


def test_random_is_seeded():
    model = tiny_model("qwen3_moe")
    a = select_experts(model, keep=4, method="random", seed=3)
    assert a == select_experts(model, keep=4, method="random", seed=3)
    assert a != select_experts(model, keep=4, method="random", seed=4)


# ----- NAEE -----------------------------------------------------------------------------------
@torch.no_grad()
def _layer_inputs(model, toks, layer_idx):
    xs = []

    class Grab:
        def observe(self, layer, x, routing, y):
            if layer.layer_idx == layer_idx:
                xs.append((x.clone(), routing))

    run_calibration(model, toks, [Grab()], batch_size=2, progress=False)
    return xs


@torch.no_grad()
def _naive_best_set(model, layer, toks, keep):
    """Brute force over every kept set: sum over tokens of ||F(x) - F_S(x)||^2 with F_S the
    layer whose removed experts' logits are -inf (per-token loops)."""
    calls = _layer_inputs(model, toks, layer.layer_idx)
    E, k = layer.num_experts, layer.top_k
    outs = [(x, r, torch.stack([layer.expert_forward(e, x).float() for e in range(E)], 1)) for x, r in calls]
    best, total = None, 0.0
    for x, r, f in outs:
        for t in range(x.shape[0]):
            full = sum(w * f[t, e] for e, w in zip(r.topk_idx[t].tolist(), r.topk_weight[t].tolist()))
            total += float(full.double().square().sum())
    for combo in itertools.combinations(range(E), keep):
        mask = torch.zeros(E, dtype=torch.bool)
        mask[list(combo)] = True
        err = 0.0
        for x, r, f in outs:
            _, w2, i2 = _masked_routing("qwen3_moe", model.config, r.logits, mask, k)
            for t in range(x.shape[0]):
                full = sum(w * f[t, e] for e, w in zip(r.topk_idx[t].tolist(), r.topk_weight[t].tolist()))
                part = sum(w * f[t, e] for e, w in zip(i2[t].tolist(), w2[t].tolist()))
                err += float((full - part).double().square().sum())
        if best is None or err < best[1] - 1e-9:
            best = (list(combo), err)
    return best[0], best[1] / total


def test_naee_finds_the_exhaustive_optimum_layer_by_layer():
    model, toks = tiny_model("qwen3_moe"), tokens(2, 12)
    plan, _ = plan_pruning(model, keep=6, method="naee", tokens=toks, batch_size=2, naee_tokens=10_000)
    reference = copy.deepcopy(model)
    ref_view = moe_view(reference)
    for layer in ref_view:  # sequential: each layer sees the layers before it already pruned
        best, rel = _naive_best_set(reference, layer, toks, 6)
        assert plan.kept[layer.layer_idx] == best
        info = plan.info["layers"][layer.layer_idx]
        assert info["search"] == "exhaustive" and info["tokens"] == 24
        assert info["relative_error"] == pytest.approx(rel, rel=1e-4, abs=1e-7)
        layer.keep_experts(best)
    assert plan.kept != {l.layer_idx: list(range(6)) for l in ref_view}  # not trivially the first six


# ----- STUN -----------------------------------------------------------------------------------
def test_stun_greedy_clusters():
    pts = torch.tensor([0.0, 0.1, 5.0, 5.1, 7.0])
    d = (pts[:, None] - pts[None]).abs()
    assert greedy_clusters(d, 3) == [[0, 1], [2, 3], [4]]
    assert greedy_clusters(d, 3, protected={2, 3}) == [[0, 1], [2], [3, 4]]
    chain = torch.arange(6.0)
    d = (chain[:, None] - chain[None]).abs()
    # Without a threshold the greedy merge chains neighbours into one long cluster...
    assert greedy_clusters(d, 2) == [[0, 1, 2, 3, 4], [5]]
    # ...the authors' rejection threshold (smallest that reaches the target) keeps them compact.
    assert threshold_clusters(d, 2) == [[0, 1, 2], [3, 4, 5]]


def test_stun_representative_and_selection():
    model = tiny_model("mixtral")
    view = moe_view(model)
    layer = view[0]
    members = [1, 4, 6]
    flat = torch.stack([torch.cat([layer.gate_proj[e].flatten(), layer.up_proj[e].flatten(),
                                   layer.down_proj[e].flatten()]) for e in members])
    closest = members[int((flat - flat.mean(0)).norm(dim=1).argmin())]
    assert representative(layer, members) == closest
    assert representative(layer, members, protected={6}) == 6
    plan, _ = plan_pruning(model, keep=5, method="stun")
    for layer in view:
        clusters = plan.info["layers"][layer.layer_idx]["clusters"]
        assert len(plan.kept[layer.layer_idx]) == 5
        assert sum(len(c) - 1 for c in clusters) == 3  # 8 experts in 5 clusters


# ----- protection, data requirements --------------------------------------------------------
@pytest.mark.parametrize("method", ["random", "frequency", "naee", "stun"])
def test_protected_super_experts_are_kept(method):
    from moecompress.stats import collect_stats

    model, toks = tiny_model("qwen3_moe"), tokens(2, 12)
    stats = collect_stats(model, toks, progress=False)
    for li in stats.layers:  # protect each layer's least used expert
        mask = torch.zeros_like(stats.get(li, "super_experts"))
        mask[int(stats.get(li, "count").argmin())] = True
        stats.set(li, "super_experts", mask)
    kept = select_experts(model, toks, keep=3, method=method, stats=stats, protect_super_experts=True)
    for li in stats.layers:
        assert int(stats.get(li, "count").argmin()) in kept[li]


def test_library_errors():
    from moecompress.errors import MoECompressError

    model = tiny_model("qwen3_moe")
    for kwargs, msg in [({"method": "nope"}, "unknown pruning method"), ({"method": "naee"}, "--calib"),
                        ({"method": "frequency"}, "--calib FILE or --stats"), ({"keep": 0}, "between 1"),
                        ({"method": "random", "naee_beems": 2}, "unknown pruning option")]:
        with pytest.raises(MoECompressError, match=msg):
            select_experts(model, **{"keep": 4, **kwargs})


def test_every_method_is_registered_with_a_paper_or_baseline():
    assert set(METHODS) == {"random", "frequency", "soft-frequency", "ean", "reap", "easy-ep", "tcess", "naee", "stun",
                            # REAP's own code's criteria (CerebrasResearch/reap), issue 19
                            "weighted-ean-sum", "ean-mean", "reap-l2", "ean-ca", "max-activations",
                            "auto"}  # the robust default (naee above top-k, frequency at or below), issue 19
    assert all(m.summary and m.select.__doc__ for m in METHODS.values())


# ----- checkpoint and CLI ---------------------------------------------------------------------


def test_cli_prunes_deterministically_and_output_loads(calib_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    common = (calib_ckpt / "tiny", "--keep", 6, "--calib", calib_ckpt / "calib.txt", "-n", 4, "--seq-len", 32, "--batch-size", 2,
              "--repair", "none")  # compared with the sliced model below
    r1 = invoke_cli("prune", *common, "-o", tmp_path / "a", "--json", tmp_path / "a.json")
    assert r1.exit_code == 0, r1.output
    assert "6 of 8 kept" in r1.output and "8 -> 6 experts" in r1.output
    r2 = invoke_cli("prune", *common, "-o", tmp_path / "b")
    assert r2.exit_code == 0, r2.output
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "model.safetensors" in files and "moecompress.json" in files and "tokenizer.json" in files
    for name in files:  # same seed, same bytes
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    record = json.loads((tmp_path / "a" / "moecompress.json").read_text())
    result = json.loads((tmp_path / "a.json").read_text())
    assert record["stage"] == "prune" and record["method"] == "auto" and record["seed"] == 0
    assert record["info"]["auto"]["method"] == "naee"  # 6 kept > top-2
    assert record["kept_experts"] == result["kept_experts"] and len(record["kept_experts"]) == 2
    assert all(len(v) == 6 for v in record["kept_experts"].values())

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert loaded.config.num_local_experts == 6 and loaded.config.num_experts_per_tok == 2
    model = tiny_model("qwen3_moe")
    kept = {int(k): v for k, v in record["kept_experts"].items()}
    moe_view(model).keep_experts(kept)
    toks = tokens(1, 9)
    torch.testing.assert_close(_logits(loaded, toks), _logits(model, toks))


def test_cli_ratio_stats_file_and_topk_clamp(calib_ckpt, tmp_path):
    from moecompress.stats import collect_stats
    from transformers import AutoModelForCausalLM

    stats = collect_stats(tiny_model("qwen3_moe"), tokens(3, 16), progress=False)
    stats.save(tmp_path / "s.safetensors")
    r = invoke_cli("prune", calib_ckpt / "tiny", "-o", tmp_path / "f", "--ratio", 0.875, "--method", "frequency",
             "--stats", tmp_path / "s.safetensors")
    assert r.exit_code == 0, r.output
    cfg = AutoModelForCausalLM.from_pretrained(tmp_path / "f").config
    assert cfg.num_local_experts == 1 and cfg.num_experts_per_tok == 1  # top-k = min(top-k, kept)
    record = json.loads((tmp_path / "f" / "moecompress.json").read_text())
    for li in stats.layers:
        assert record["kept_experts"][str(li)] == [int(stats.get(li, "count").argmax())]


def test_cli_errors_exit_2_before_work(calib_ckpt, tmp_path):
    tiny, calib = calib_ckpt / "tiny", calib_ckpt / "calib.txt"
    (tmp_path / "exists").mkdir()
    (tmp_path / "afile").write_text("x")
    cases = [
        (("--ratio", 1.5, "--calib", calib), "--ratio: Input should be less than 1"),
        (("--ratio", 0, "--calib", calib), "--ratio: Input should be greater than 0"),
        (("--keep", 8, "--calib", calib), "--keep must be between 1 and 7"),
        (("--keep", 0, "--calib", calib), "--keep: Input should be greater than or equal to 1"),
        (("--keep", 4, "--seq-len", 1), "--seq-len: Input should be greater than or equal to 2"),
        (("--keep", 4, "--ratio", 0.5, "--calib", calib), "exactly one of --keep"),
        (("--calib", calib), "exactly one of --keep"),
        (("--keep", 4, "--calib", tmp_path / "missing.txt"), "not found"),
        (("--keep", 4, "--method", "frequency", "--stats", tmp_path / "missing.safetensors"), "not found"),
        (("--keep", 4, "--method", "magic"), "unknown pruning method"),
    ]
    for args, msg in cases:
        r = invoke_cli("prune", tiny, "-o", tmp_path / "out", *args)
        assert r.exit_code == 2 and msg in r.output and len(r.output.strip().splitlines()) == 1, (args, r.output)
        assert not (tmp_path / "out").exists()
    r = invoke_cli("prune", tiny, "-o", tmp_path / "exists", "--keep", 4, "--method", "random")
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = invoke_cli("prune", tiny, "-o", tmp_path / "afile" / "sub", "--keep", 4, "--method", "random")
    assert r.exit_code == 2 and "cannot write" in r.output
    r = invoke_cli("prune", tmp_path / "no-model", "-o", tmp_path / "out", "--keep", 4, "--method", "random")
    assert r.exit_code == 2 and "not found" in r.output
