"""Routing statistics: every statistic against a naive per-token reference, on every family."""

import json
import math
import operator

import numpy as np
import pytest
import torch

from moecompress.arch import moe_view
from moecompress.capture import run_calibration
from moecompress.stats import STAT_NAMES, Stats, collect_stats
from moecompress.stats.grouped import routed_activations
from moecompress.stats.locality import simulate_cache
from moecompress.stats.super_experts import super_expert_mask
from moecompress.testing import invoke_cli, tiny_model, tokens

N, S, BATCH, SEG = 3, 20, 2, 4  # 2 batches, the last one partial


class _Recorder:
    """Keeps every MoE layer's (x, routing, y) per batch, plus the residual entering the block."""

    def __init__(self):
        self.calls: dict[int, list] = {}
        self.residual: dict[int, torch.Tensor] = {}

    def observe(self, layer, x, routing, y):
        h = self.residual.pop(layer.layer_idx).reshape(-1, x.shape[1])
        self.calls.setdefault(layer.layer_idx, []).append((x.clone(), routing, y.clone(), h.clone()))


def _record(model, toks):
    view = moe_view(model)
    rec = _Recorder()
    decoder_layers = operator.attrgetter(view.spec.layers_path)(model)
    hooks = []
    for layer in view:
        def pre(mod, args, li=layer.layer_idx):
            rec.residual[li] = args[0]
        hooks.append(decoder_layers[layer.layer_idx].post_attention_layernorm.register_forward_pre_hook(pre))
    run_calibration(model, toks, [rec], batch_size=BATCH, progress=False)
    for h in hooks:
        h.remove()
    return view, rec


@torch.no_grad()
def _naive_layer(layer, calls, k, residual_scale):
    """Per-token loops over (token, selected expert), using only the MoE view's per-expert API."""
    E = layer.num_experts
    r = {n: np.zeros(E) for n in ("count", "soft", "gate", "ean", "contrib", "easy", "tcess", "in_max", "out_max",
                                  "contrib_sq", "top")}
    out_sum = np.zeros((E, layer.hidden_size))  # REAP's routed characteristic activation, summed
    coact = np.zeros((E, E), dtype=np.int64)
    ent, T = 0.0, 0
    for x, routing, _y, h in calls:
        for t in range(x.shape[0]):
            T += 1
            xt = x[t : t + 1]
            p = routing.probs[t].double()
            r["soft"] += p.numpy()
            q = p / p.sum()
            ent += float(-(q * torch.log(q)).sum())
            lg = routing.logits[t].double()
            top = torch.topk(lg, k)
            loc = torch.softmax(top.values, 0)
            for e, v in zip(top.indices.tolist(), loc.tolist()):
                r["tcess"][e] += v
            sel = routing.topk_idx[t].tolist()
            for i in sel:
                for j in sel:
                    coact[i, j] += 1
            routed = torch.zeros_like(xt)
            per = []
            for j, e in enumerate(sel):
                g = routing.topk_weight[t, j]
                w = layer.weighted_expert_output(e, xt, g.reshape(1))
                routed += w
                if layer.spec.weight_on_input:
                    inp = xt * g
                    o = layer.expert_forward(e, inp)
                    hid = layer.expert_hidden(e, inp)
                    contrib = float(o.norm())
                else:
                    o = layer.expert_forward(e, xt)
                    hid = layer.expert_hidden(e, xt)
                    contrib = float(g) * float(o.norm())
                    assert math.isclose(contrib, float(w.norm()), rel_tol=1e-4, abs_tol=1e-6)
                r["count"][e] += 1
                r["gate"][e] += float(g)
                r["ean"][e] += float(o.norm())
                r["contrib"][e] += contrib
                r["in_max"][e] = max(r["in_max"][e], float(hid.abs().max()))
                r["out_max"][e] = max(r["out_max"][e], float(o.abs().max()))
                r["contrib_sq"][e] += contrib**2
                r["top"][e] = max(r["top"][e], float(o.max()))  # REAP's max_activations start at 0
                out_sum[e] += o[0].double().numpy()
                per.append((e, contrib))
            ht = h[t].float()
            cos = torch.nn.functional.cosine_similarity(ht, ht + residual_scale * routed[0].float(), dim=0)
            s = max(0.0, 1.0 - float(cos))
            for e, c in per:
                r["easy"][e] += c * s
    used = np.maximum(r["count"], 1)
    cnt = r["count"]
    return {
        "count": cnt, "soft_count": r["soft"], "gate_mean": r["gate"] / used, "ean": r["ean"],
        "reap": r["contrib"] / used, "easy_ep": r["easy"], "tcess": r["tcess"] / T, "coactivation": coact,
        "entropy": ent / T, "load_cv": cnt.std() / cnt.mean(),
        "super_in_max": r["in_max"], "super_out_max": r["out_max"],
        # REAP's code criteria (CerebrasResearch/reap, pruning_metrics.py and prune.py)
        "weighted_ean_sum": r["contrib"], "ean_mean": r["ean"] / used, "reap_l2": np.sqrt(r["contrib_sq"] / used),
        "ean_ca": np.linalg.norm(out_sum / used[:, None], axis=1), "max_activations": r["top"],
    }


def _naive_srp(seqs, E, m, k):
    """seqs: list of [S, k] lists. Best F1 over a threshold shared by all sliding windows."""
    best = 0.0
    for c in range(m + 1):
        M = P = A = 0
        for seq in seqs:
            for s in range(len(seq) - m + 1):
                cnt = [0] * E
                for tok in seq[s : s + m]:
                    for e in tok:
                        cnt[e] += 1
                group = [e for e in range(E) if cnt[e] >= c]
                M += sum(cnt[e] for e in group)
                P += len(group) * m
                A += m * k
        best = max(best, 2 * M / (P + A))
    return best


def _naive_sch(seq, E, m, C):
    """One sequence, explicit sets: a cache of C experts that sees the m-token segment starting
    at the current token (authors' calc_fsf); returns hits."""
    cache, seen, last, hits = set(), set(), {}, 0
    for t, tok in enumerate(seq):
        new_before = 0
        for e in tok:
            if e in cache:
                hits += 1
            elif e not in seen:
                if len(seen) + new_before < C:
                    hits += 1
                new_before += 1
        seen |= set(tok)
        for e in tok:
            last[e] = t
        cache |= set(tok)
        while len(cache) > C:
            def prio(e):
                fut = sum(tok2.count(e) for tok2 in seq[t + 1 : t + m])  # the segment [t, t + m)
                return (fut, last.get(e, -1), -e)
            victim = min((e for e in cache if e not in tok), key=prio)
            cache.remove(victim)
    return hits


_COLLECTED: dict = {}


@pytest.fixture
def collected(family):
    """Collected once per family and shared by the tests below (the machine is small)."""
    if family not in _COLLECTED:
        model = tiny_model(family)
        toks = tokens(N, S)
        _COLLECTED[family] = model, toks, collect_stats(model, toks, batch_size=BATCH, segment_len=SEG, progress=False)
    return _COLLECTED[family]


def test_counts_and_soft_counts_sum(collected, family):
    model, toks, stats = collected
    k = stats.meta["top_k"]
    for li in stats.layers:
        assert int(stats.get(li, "count").sum()) == toks.numel() * k
        assert torch.equal(stats.get(li, "coactivation").diagonal(), stats.get(li, "count"))
        if moe_view(model).spec.scoring == "softmax":
            assert stats.get(li, "soft_count").sum().item() == pytest.approx(toks.numel(), rel=1e-5)
    assert set(stats.names) == set(STAT_NAMES)


def test_every_statistic_equals_naive_reference(collected, family):
    model, toks, stats = collected
    view, rec = _record(model, toks)
    k = stats.meta["top_k"]
    scale = float(getattr(model.config, "residual_multiplier", 1.0) or 1.0)
    for layer in view:
        li = layer.layer_idx
        ref = _naive_layer(layer, rec.calls[li], k, scale)
        for name, want in ref.items():
            got = stats.get(li, name).double().numpy()
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6, err_msg=f"{family} layer {li} {name}")
        seqs = torch.cat([r.topk_idx for _, r, _, _ in rec.calls[li]]).reshape(N, S, k).tolist()
        assert stats.get(li, "srp").item() == pytest.approx(_naive_srp(seqs, layer.num_experts, SEG, k), rel=1e-6)
        for C, got in zip(stats.meta["sch_cache_sizes"], stats.get(li, "sch").tolist()):
            want = sum(_naive_sch(s, layer.num_experts, SEG, C) for s in seqs) / (N * S * k)
            assert got == pytest.approx(want, rel=1e-6), (family, li, C)
    # super experts: the model-wide rule, recomputed with numpy
    allmax = np.concatenate([stats.get(li, "super_out_max").double().numpy() for li in stats.layers])
    thr = max(np.percentile(allmax, 99.5), allmax.max() / 10)
    for li in stats.layers:
        want = stats.get(li, "super_out_max").double().numpy() > thr
        assert stats.get(li, "super_experts").numpy().tolist() == want.tolist()


def test_same_seed_same_bytes(tmp_path):
    paths = []
    for i in range(2):
        s = collect_stats(tiny_model("mixtral"), tokens(N, S), batch_size=BATCH, segment_len=SEG, progress=False,
                          meta={"seed": 0})
        paths.append(s.save(tmp_path / f"s{i}.safetensors"))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].with_suffix(".json").read_bytes() == paths[1].with_suffix(".json").read_bytes()
    loaded = Stats.load(paths[0])
    assert loaded.meta["seed"] == 0 and loaded.meta["tokens"] == N * S
    assert torch.equal(loaded.get(loaded.layers[0], "count"), s.get(s.layers[0], "count"))


def test_batch_size_does_not_change_results():
    model, toks = tiny_model("qwen2_moe"), tokens(4, S)
    a = collect_stats(model, toks, batch_size=1, segment_len=SEG, progress=False)
    b = collect_stats(model, toks, batch_size=4, segment_len=SEG, progress=False)
    for key in a.tensors:
        torch.testing.assert_close(a.tensors[key].double(), b.tensors[key].double(), rtol=1e-4, atol=1e-5)


def test_expert_chunking_is_exact():
    model = tiny_model("gpt_oss")  # biases and the clamped activation
    view, rec = _record(model, tokens(N, S))
    layer = view[0]
    x, routing, _, _ = rec.calls[layer.layer_idx][0]
    whole = routed_activations(layer, x, routing, max_elements=1 << 30, want_routed_output=True)  # one padded bmm
    chunked = routed_activations(layer, x, routing, max_elements=0, want_routed_output=True)  # expert by expert
    for f in ("out_norm", "contribution_norm", "in_absmax", "out_absmax", "routed_output"):
        torch.testing.assert_close(getattr(whole, f), getattr(chunked, f))
    from moecompress.stats import grouped

    if grouped._GROUPED_MM is not None:  # the GPU path (grouped matmuls), where torch runs it on CPU too
        gmm = routed_activations(layer, x, routing, want_routed_output=True, grouped_mm=True)
        if ("cpu", x.dtype) not in grouped._GROUPED_MM_BROKEN:
            for f in ("out_norm", "contribution_norm", "in_absmax", "out_absmax", "routed_output"):
                torch.testing.assert_close(getattr(gmm, f), getattr(chunked, f), rtol=1e-5, atol=1e-6)
    # the routed output is the layer's own routed path
    torch.testing.assert_close(whole.routed_output, layer.routed_forward(x, routing), rtol=1e-4, atol=1e-6)


def test_sch_bounds_and_full_cache():
    g = torch.Generator().manual_seed(0)
    seqs = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(30)]).reshape(1, 1, 30, 2)
    rates = simulate_cache(seqs, 6, 4, (2, 3, 6))[0]
    assert rates[2] == 1.0  # a cache holding every expert never misses
    assert 0 <= rates[0] <= rates[1] <= rates[2]
    # the torch implementation (what runs on a GPU), in memory-bounded row chunks, agrees
    from moecompress.stats.locality import _simulate_cache_torch

    many = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(3 * 4 * 30)]).reshape(3, 4, 30, 2)
    assert torch.equal(_simulate_cache_torch(many, 6, 4, (2, 3, 6), max_elements=500), simulate_cache(many, 6, 4, (2, 3, 6)))


def test_super_expert_rule():
    vals = {0: torch.ones(100), 1: torch.ones(100)}
    vals[1][7] = 50.0  # one massive outlier
    masks = super_expert_mask(vals)
    assert masks[1].nonzero().flatten().tolist() == [7] and not masks[0].any()
    assert not any(m.any() for m in super_expert_mask({0: torch.ones(300)}).values())


def test_bad_tokens_are_refused():
    from moecompress.errors import MoECompressError

    with pytest.raises(MoECompressError):
        collect_stats(tiny_model("mixtral"), torch.zeros(5, dtype=torch.long), progress=False)


# ----- CLI -------------------------------------------------------------------------------


def test_cli_collect_show_and_errors(tmp_path, monkeypatch):
    from moecompress.commands._common import console
    from moecompress.testing import SAMPLE_TEXT, tiny_checkpoint

    calib_ckpt = tmp_path / "tiny"
    tiny_checkpoint(calib_ckpt, "qwen3_moe")
    calib = tmp_path / "calib.txt"
    calib.write_text(SAMPLE_TEXT)
    out = tmp_path / "s.safetensors"
    args = ("stats", calib_ckpt, "--calib", calib, "-n", 4, "--seq-len", 32, "--batch-size", 3, "--segment-len", 8, "-o", out)
    r = invoke_cli(*args)
    assert r.exit_code == 0, r.output
    assert out.is_file() and out.with_suffix(".json").is_file() and "routing statistics" in r.output
    s = Stats.load(out)
    assert s.meta["n"] == 4 and s.meta["seq_len"] == 32 and s.meta["calib"] == str(calib)
    assert int(s.get(s.layers[0], "count").sum()) == 4 * 32 * s.meta["top_k"]

    again = invoke_cli(*args)  # existing output without --overwrite
    assert again.exit_code == 2 and "--overwrite" in again.output
    out2 = tmp_path / "s2.safetensors"
    assert invoke_cli(*args[:-1], out2).exit_code == 0
    assert out.read_bytes() == out2.read_bytes()  # same seed, same bytes

    monkeypatch.setattr(console, "width", 80)  # COLUMNS=80: no number is cut to "0.05…"
    shown = invoke_cli("stats", "show", out, "--layer", s.layers[0])
    assert shown.exit_code == 0, shown.output
    assert "per-expert" in shown.output and "…" not in shown.output
    assert max(map(len, shown.output.splitlines())) <= 80
    cells = set(shown.output.replace("│", " ").split())
    for name in ("count", "soft_count", "gate_mean", "ean", "reap", "easy_ep", "tcess", "super_in_max", "super_out_max"):
        for v in s.get(s.layers[0], name).tolist():
            assert (str(int(v)) if name == "count" else f"{v:.3g}") in cells, (name, v)
    for row in s.summary()["layers"]:
        assert f"{row['entropy']:.3f}" in cells and "/".join(f"{v:.2f}" for v in row["sch"]) in cells
    as_json = invoke_cli("stats", "show", out, "--json")
    assert json.loads(as_json.output)["meta"]["tokens"] == 128

    for bad, msg in [
        (("stats", calib_ckpt, "--calib", tmp_path / "nope.txt", "-o", tmp_path / "x.safetensors"), "not found"),
        (("stats", tmp_path / "no-model", "--calib", calib, "-o", tmp_path / "x.safetensors"), "not found"),
        (("stats", calib_ckpt, "--calib", calib, "-n", 500, "--seq-len", 32, "-o", tmp_path / "x.safetensors"), "lower -n"),
        (("stats", "show", tmp_path / "missing.safetensors"), "not found"),
        (("stats", "show", out, "--layer", 99), "not an MoE layer"),
    ]:
        r = invoke_cli(*bad)
        assert r.exit_code == 2 and msg in r.output, (bad, r.output)
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_plot(tmp_path):
    s = collect_stats(tiny_model("mixtral"), tokens(N, S), progress=False)
    f = s.save(tmp_path / "s.safetensors")
    r = invoke_cli("stats", "show", f, "--plot", tmp_path / "usage.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert r.exit_code == 2 and "needs matplotlib" in r.output
        return
    assert r.exit_code == 0, r.output
    assert (tmp_path / "usage.png").read_bytes()[:4] == b"\x89PNG"


def test_fused_experts_match_the_stock_forward(family):
    """With fuse_experts the experts run once, through the statistics' grouped computation:
    the model's logits stay the stock ones (to float rounding), the statistics the same."""
    model, toks = tiny_model(family), tokens(N, S)
    with torch.no_grad():
        want = model(input_ids=toks).logits
    obs_logits = {}

    from moecompress.stats.observer import StatsObserver

    obs = StatsObserver(S)
    undo = obs.fuse_experts(moe_view(model))
    try:
        with torch.no_grad():
            obs_logits["fused"] = model(input_ids=toks).logits
    finally:
        for u in undo:
            u()
    torch.testing.assert_close(obs_logits["fused"], want, rtol=1e-4, atol=1e-5)
    assert all("forward" not in layer.experts.__dict__ for layer in moe_view(model))  # undone
    if not moe_view(model).spec.weight_on_input:
        assert obs.pending  # the fused path ran


def test_flushing_every_layer_equals_flushing_every_batch():
    """The observer reduces what it kept of all layers at once; flushing after every single
    layer (a tiny memory budget) must give the same statistics."""
    from moecompress.stats.observer import StatsObserver

    model, toks = tiny_model("qwen3_moe"), tokens(N, S)
    results = []
    for flush_bytes in (1, 1 << 30):
        obs = StatsObserver(S, segment_len=SEG, flush_bytes=flush_bytes)
        undo = obs.fuse_experts(moe_view(model))
        try:
            run_calibration(model, toks, [obs], batch_size=BATCH, progress=False)
        finally:
            for u in undo:
                u()
        results.append(obs.finalize())
    for li, stats in results[0].items():
        for name, t in stats.items():
            torch.testing.assert_close(t.double(), results[1][li][name].double(), rtol=1e-6, atol=1e-7)


def test_segment_sums_equal_index_add():
    from moecompress.stats.observer import segment_sums

    g = torch.Generator().manual_seed(0)
    expert = torch.sort(torch.randint(0, 5, (40,), generator=g)).values
    expert[expert == 3] = 2  # an expert with no pairs
    values = torch.rand(2, 3, 40, generator=g, dtype=torch.float64)
    offsets = torch.searchsorted(expert, torch.arange(6)).expand(2, 6)
    want = torch.zeros(2, 5, 3, dtype=torch.float64)
    for i in range(2):
        want[i].index_add_(0, expert, values[i].T)
    torch.testing.assert_close(segment_sums(values, offsets), want)


def test_srp_histograms_equal_a_window_by_window_count():
    from moecompress.stats.locality import srp_histograms

    g = torch.Generator().manual_seed(1)
    L, B, S, E, k, m = 2, 3, 25, 6, 2, 4
    seqs = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(L * B * S)]).reshape(L, B, S, k)
    hit = torch.zeros(L, B, S, E).scatter_(3, seqs, 1.0)
    hist, windows = srp_histograms(hit, m)
    assert windows == B * (S - m + 1)
    for layer in range(L):
        want = torch.zeros(m + 1, dtype=torch.int64)
        for b in range(B):
            for start in range(S - m + 1):
                window = seqs[layer, b, start:start + m].reshape(-1).tolist()
                for e in range(E):
                    want[window.count(e)] += 1
        assert torch.equal(hist[layer], want)


def test_cli_streamed_stats_equal_in_memory(tmp_path):
    """`stats --max-cpu-memory` streams the model (disk offload, layer by layer): the same
    statistics as in memory, the offload folder is gone afterwards, and bad caps exit 2."""
    import glob
    import tempfile

    from moecompress.testing import SAMPLE_TEXT, tiny_checkpoint

    ckpt = tmp_path / "tiny"
    tiny_checkpoint(ckpt, "qwen3_moe")
    calib = tmp_path / "calib.txt"
    calib.write_text(SAMPLE_TEXT)
    common = ("stats", ckpt, "--calib", calib, "-n", 4, "--seq-len", 32, "--batch-size", 2, "--segment-len", 8)
    before = set(glob.glob(f"{tempfile.gettempdir()}/moecompress-offload-*"))
    assert invoke_cli(*common, "-o", tmp_path / "mem.safetensors").exit_code == 0
    r = invoke_cli(*common, "--max-cpu-memory", "40KB", "-o", tmp_path / "streamed.safetensors")
    assert r.exit_code == 0, r.output
    import gc

    gc.collect()
    assert set(glob.glob(f"{tempfile.gettempdir()}/moecompress-offload-*")) <= before  # cleaned up
    mem, streamed = Stats.load(tmp_path / "mem.safetensors"), Stats.load(tmp_path / "streamed.safetensors")
    for key, t in mem.tensors.items():
        if t.is_floating_point():
            torch.testing.assert_close(streamed.tensors[key], t, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(streamed.tensors[key], t), key
    bad = invoke_cli(*common, "--max-gpu-memory", "lots", "-o", tmp_path / "x.safetensors")
    assert bad.exit_code == 2 and "Traceback" not in bad.output and not (tmp_path / "x.safetensors").exists()


def test_streamed_stats_fuse_the_experts_and_equal_in_memory(tmp_path):
    """On a streamed model (accelerate hooks, disk offload) the statistics' grouped computation
    replaces the hooked experts' forward too: each batch onloads the experts once, and the
    statistics are the in-memory ones."""
    from moecompress.checkpoint import load_model
    from moecompress.stats.observer import StatsObserver

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "src")
    toks = tokens(N, S)
    in_memory = collect_stats(load_model(tmp_path / "src", dtype="float32"), toks, batch_size=BATCH,
                              segment_len=SEG, progress=False)
    streamed_model = load_model(tmp_path / "src", dtype="float32", max_cpu_memory="30KB", offload_folder=tmp_path / "off")
    view = moe_view(streamed_model)
    assert all(hasattr(layer.experts, "_hf_hook") for layer in view)  # really streamed
    obs = StatsObserver(S, segment_len=SEG)
    accelerates = [layer.experts._old_forward for layer in view]
    undo = obs.fuse_experts(view)
    assert all(layer.experts._old_forward is not f for layer, f in zip(view, accelerates))
    try:
        run_calibration(streamed_model, toks, [obs], batch_size=BATCH, progress=False)
    finally:
        for u in undo:
            u()
    assert obs.reused == len(view) * math.ceil(N / BATCH)  # every layer and batch fused
    assert all(layer.experts._old_forward is f for layer, f in zip(view, accelerates))  # undone
    streamed = collect_stats(streamed_model, toks, batch_size=BATCH, segment_len=SEG, progress=False)
    for key, t in in_memory.tensors.items():
        assert torch.equal(streamed.tensors[key], t), key


# ----- definitions pinned on hand-computable cases (audit against the authors' sources) ------


def test_sch_segment_starts_at_the_current_token():
    """SCH (authors' calc_fsf, future_len = m): eviction priority = uses in the segment of m
    tokens starting at the current one. With m = 1 that is no look-ahead (LRU)."""
    from moecompress.stats.locality import SCHBuffer

    seq = torch.tensor([0, 1, 2, 0, 1]).reshape(1, 5, 1)  # k = 1, E = 3, cache of 2
    rates = {}
    for m in (1, 2):
        buf = SCHBuffer()
        buf.add(0, seq, 3)
        rates[m] = buf.finalize(m, (2,))[0].item()
    # m = 1 (LRU): hit, hit (cold start), miss (evicts 0), miss (evicts 1), miss -> 2/5
    assert rates[1] == pytest.approx(0.4)
    # m = 2: at t=2 the segment [2, 3] holds expert 0 -> evict 1; t=3 hits; t=4 misses -> 3/5
    assert rates[2] == pytest.approx(0.6)
    assert _naive_sch(seq.reshape(5, 1).tolist(), 3, 1, 2) == 2 and _naive_sch(seq.reshape(5, 1).tolist(), 3, 2, 2) == 3


def test_srp_hand_case():
    """SRP (authors' 30_srp_calc.py / 31_srp_refine.py, layer level): best F1 over a threshold c
    shared by all windows and experts, F1 = 2 M / (P + A)."""
    from moecompress.stats.locality import srp_from_histogram, srp_histograms

    seqs = torch.tensor([0, 0, 1]).reshape(1, 1, 3, 1)  # k = 1, E = 2, windows of m = 2: [0, 0], [0, 1]
    hit = torch.zeros(1, 1, 3, 2).scatter_(3, seqs, 1.0)
    hist, windows = srp_histograms(hit, 2)
    assert windows == 2 and hist[0].tolist() == [1, 2, 1]  # counts c_e: (2, 0) and (1, 1)
    # A = 4; c=0: M=4, P=8 -> 8/12; c=1: M=4, P=6 -> 0.8; c=2: M=2, P=2 -> 4/6
    assert srp_from_histogram(hist[0], windows, 2, 1).item() == pytest.approx(0.8)


def test_super_expert_rule_thresholds_are_strict_and_global():
    """Su et al. (as implemented by REAP's get_super_expert_indices): a > P99.5 of all layers'
    maxima and a > max / 10, strict."""
    vals = {0: torch.ones(200), 1: torch.ones(200)}
    vals[0][3] = 100.0
    vals[1][5] = 10.0  # exactly max / 10: not a super expert
    vals[1][6] = 10.5  # above both thresholds (P99.5 of 400 values lies below it)
    masks = super_expert_mask(vals)
    assert masks[0].nonzero().flatten().tolist() == [3] and masks[1].nonzero().flatten().tolist() == [6]
