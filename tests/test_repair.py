"""Repair after removal (moecompress/repair.py): identity, closed forms against brute-force
least squares, determinism, streaming, the CLI option and the record."""

from __future__ import annotations

import json

import pytest
import torch

from moecompress.arch import moe_view
from moecompress.capture import run_calibration
from moecompress.prune import prune_checkpoint
from moecompress.refit import JointRefitObserver, block_output, swap_in_copies
from moecompress.repair import RouterObserver, repair
from moecompress.testing import invoke_cli, pruned_with_originals, saved_tensors, tiny_model, tokens

KEPT = [0, 2, 3, 5]


class _Recorder:
    def __init__(self):
        self.calls = {}

    def observe(self, layer, x, routing, y):
        self.calls.setdefault(layer.layer_idx, []).append((x.clone(), routing, y.clone()))




@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "llama4_text"])
@pytest.mark.parametrize("mode,target", [("refit", "both"), ("refit", "stream"), ("refit", "layer"),
                                         ("refit+router", "both")])
def test_repair_of_an_unpruned_model_is_the_identity(family, mode, target):
    model = tiny_model(family)
    originals = swap_in_copies(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = repair(model, originals, tokens(4, 16), mode=mode, batch_size=2, progress=False, target=target)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), (family, k)
    assert all(v["relative_error"] == 0 for v in record["layers"].values())


def _first_layer_traffic(model, toks):
    rec = _Recorder()
    run_calibration(model, toks, [rec], progress=False)
    li = min(rec.calls)
    return moe_view(model).layer(li), rec.calls[li]


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "deepseek_v3"])
def test_router_refit_equals_brute_force_gauss_newton(family):
    """The router step equals ridge least squares on the autograd Jacobian of the pruned layer's
    output with respect to its router rows (selection held fixed, as topk's gradient does):
    normalised softmax (qwen3), plain softmax (olmoe), normalised scaled sigmoid (deepseek_v3)."""
    ridge = 0.05
    model, originals = pruned_with_originals(family, KEPT)
    layer, calls = _first_layer_traffic(model, tokens(3, 12))
    obs = RouterObserver(layer.layer_idx, originals[layer.layer_idx])
    for x, routing, y in calls:
        obs.observe(layer, x, routing, y)
    w0 = layer.router_weight.detach().clone()
    rows, target = [], []
    for x, _, y in calls:
        jac = torch.func.jacrev(lambda w: _routed(layer, x, w))(w0.clone())  # [T, H, S, H]
        rows.append(jac.reshape(-1, w0.numel()).double())
        target.append((block_output(originals[layer.layer_idx], x) - y).reshape(-1).double())
    J, r = torch.cat(rows), torch.cat(target)
    a = J.T @ J
    a, r, J = a.detach(), r.detach(), J.detach()
    lam = ridge * float(a.diagonal().mean()) + 1e-12
    want = w0.double() + torch.linalg.solve(a + lam * torch.eye(a.shape[0], dtype=a.dtype), J.T @ r).reshape(w0.shape)
    layer.router.weight = torch.nn.Parameter(w0.clone(), requires_grad=False)
    info = obs.apply(layer, ridge)
    assert info["router"] == "gauss-newton"
    torch.testing.assert_close(layer.router_weight.double(), want, rtol=1e-4, atol=1e-5)


def _routed(layer, x, w):
    """The block's output as a function of the router rows ``w`` (router module called functionally)."""
    saved = layer.router.weight
    del layer.router.weight
    layer.router.weight = w
    try:
        return block_output(layer.block, x)
    finally:
        layer.router.weight = saved


def _joint_features(layer, calls) -> torch.Tensor:
    """[T, S * I] float64: per token the stacked features [a_1 h_1(x), ..., a_S h_S(x)] (zero for
    unselected experts), built token by token."""
    S, inter = layer.num_experts, layer.intermediate_size
    feats = []
    with torch.no_grad():
        for x, routing, _ in calls:
            for t in range(x.shape[0]):
                f = torch.zeros(S * inter, dtype=torch.float64)
                for c, a in zip(routing.topk_idx[t].tolist(), routing.topk_weight[t].tolist()):
                    f[c * inter:(c + 1) * inter] = a * layer.expert_hidden(c, x[t:t + 1])[0].double()
                feats.append(f)
    return torch.stack(feats)


def _joint_solution(layer, F: torch.Tensor, R: torch.Tensor, ridge: float) -> torch.Tensor:
    """The down projections [S, H, I] after the ridge least-squares fit of features F on R,
    each expert's block regularised by ridge x its mean diagonal."""
    S, inter = layer.num_experts, layer.intermediate_size
    g = F.T @ F
    lam = (ridge * g.diagonal().reshape(S, inter).mean(1) + 1e-12).repeat_interleave(inter)
    delta = torch.linalg.solve(g + torch.diag(lam), F.T @ R)
    return torch.stack([layer.down_proj[c].double() + delta[c * inter:(c + 1) * inter].T for c in range(S)])


def _layer_residual(originals, layer, calls) -> torch.Tensor:
    """[T, H] float64: y_orig(x) - y(x), the original block against the pruned one, per token."""
    with torch.no_grad():
        return torch.cat([(block_output(originals[layer.layer_idx], x) - y).double() for x, _, y in calls])


def test_joint_down_refit_equals_brute_force_least_squares():
    """The joint down-projection fit equals ridge least squares on the stacked per-token
    features [a_1 h_1(x), ..., a_S h_S(x)] (zero for unselected experts), built token by token."""
    ridge = 0.05
    model, originals = pruned_with_originals("qwen3_moe", KEPT)
    layer, calls = _first_layer_traffic(model, tokens(3, 12))
    obs = JointRefitObserver({layer.layer_idx: originals[layer.layer_idx]})
    with torch.no_grad():
        for x, routing, y in calls:
            obs.observe(layer, x, routing, y)
    want = _joint_solution(layer, _joint_features(layer, calls), _layer_residual(originals, layer, calls), ridge)
    with torch.no_grad():
        obs.apply(layer, ridge)
    torch.testing.assert_close(layer.down_proj.double(), want, rtol=1e-4, atol=1e-5)


def _stream_case():
    """A pruned tiny model, its first MoE layer's traffic, and that layer's two residuals per
    token (float64): the stream's h_orig - h after the decoder layer, from the original and the
    pruned model's own ``output_hidden_states``, and the layer's y_orig(x) - y(x)."""
    original = tiny_model("qwen3_moe")
    model, originals = pruned_with_originals("qwen3_moe", KEPT)
    toks = tokens(3, 12)
    layer, calls = _first_layer_traffic(model, toks)
    li = layer.layer_idx
    with torch.no_grad():
        h_orig = original(input_ids=toks, output_hidden_states=True).hidden_states[li + 1]
        h = model(input_ids=toks, output_hidden_states=True).hidden_states[li + 1]
    stream = (h_orig - h).reshape(-1, h.shape[-1]).double()
    assert float(stream.abs().max()) > 1e-3  # pruning moved the stream: the tests have something to fit
    return model, originals, toks, layer, calls, stream, _layer_residual(originals, layer, calls)


def test_stream_target_refit_equals_brute_force_least_squares():
    """With the stream target, the first layer's joint fit equals ridge least squares of the
    stacked features on h_orig - h: the original and the pruned model's hidden states after that
    decoder layer, taken from the two whole models' own ``output_hidden_states``; with ``both``,
    on the mean of that and the layer's own residual y_orig(x) - y(x)."""
    import copy

    ridge = 0.05
    model, originals, toks, layer, calls, stream, layer_resid = _stream_case()
    li = layer.layer_idx
    F = _joint_features(layer, calls)
    # "both": the two objectives summed = the fit of the mean residual
    for target, rhs in [("stream", stream), ("both", (stream + layer_resid) / 2)]:
        want = _joint_solution(layer, F, rhs, ridge)
        fitted = copy.deepcopy(model)
        record = repair(fitted, originals, toks, mode="refit", ridge=ridge, batch_size=1, progress=False, target=target)
        assert record["target"].startswith("original residual stream")
        torch.testing.assert_close(moe_view(fitted).layer(li).down_proj.double(), want, rtol=1e-4, atol=1e-5)
    # the layer target fits another right-hand side: the two differ
    other = copy.deepcopy(model)
    repair(other, originals, toks, mode="refit", ridge=ridge, batch_size=1, progress=False, target="layer")
    assert not torch.allclose(moe_view(other).layer(li).down_proj, moe_view(fitted).layer(li).down_proj)


def test_per_expert_refit_of_both_targets_equals_brute_force_least_squares():
    """The per-expert step (layers too wide for the joint fit) with the default target: each
    expert's ridge least squares on its routed tokens' features a h(x) against its share
    a / sum(a) of the mean of the stream residual (the two models' output_hidden_states) and the
    layer's own residual, built token by token."""
    import copy

    ridge = 0.05
    model, originals, toks, layer, calls, stream, layer_resid = _stream_case()
    e = (stream + layer_resid) / 2
    rows: dict[int, list] = {c: [] for c in range(layer.num_experts)}
    t0 = 0
    with torch.no_grad():
        for x, routing, _ in calls:
            for t in range(x.shape[0]):
                w = routing.topk_weight[t].double()
                for c, a, share in zip(routing.topk_idx[t].tolist(), w.tolist(), (w / w.sum()).tolist()):
                    rows[c].append((a * layer.expert_hidden(c, x[t:t + 1])[0].double(), share * e[t0 + t]))
            t0 += x.shape[0]
    want = layer.down_proj.detach().double().clone()
    for c, r in rows.items():
        if r:
            F, R = torch.stack([f for f, _ in r]), torch.stack([v for _, v in r])
            g = F.T @ F
            lam = ridge * float(g.diagonal().mean()) + 1e-12
            want[c] += torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=g.dtype), F.T @ R).T
    fitted = copy.deepcopy(model)
    repair(fitted, originals, toks, mode="refit", ridge=ridge, batch_size=1, progress=False, target="both", joint=False)
    torch.testing.assert_close(moe_view(fitted).layer(layer.layer_idx).down_proj.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["refit", "refit+router"])
def test_repair_lowers_every_layers_error(mode):
    model, originals = pruned_with_originals("qwen3_moe", KEPT)
    toks = tokens(6, 24)
    repair(model, originals, toks, mode=mode, batch_size=3, progress=False)
    again = repair(model, originals, toks, mode="refit", batch_size=3, progress=False)  # errors after the first repair
    fresh, fresh_originals = pruned_with_originals("qwen3_moe", KEPT)
    before = repair(fresh, fresh_originals, toks, mode="none", progress=False)
    assert before["layers"] == {}
    first = repair(*pruned_with_originals("qwen3_moe", KEPT), toks, mode=mode, batch_size=3, progress=False)
    for li, entry in again["layers"].items():
        assert entry["relative_error"] < first["layers"][li]["relative_error"], li



def test_prune_checkpoint_repairs_deterministically_and_streamed_equals_in_memory(calib_ckpt, tmp_path):
    src, calib = calib_ckpt / "tiny", str(calib_ckpt / "calib.txt")
    kw = dict(keep=4, method="frequency", calib=calib, n=4, seq_len=32, progress=False)
    a = prune_checkpoint(src, tmp_path / "a", repair="refit+router", **kw)
    prune_checkpoint(src, tmp_path / "b", repair="refit+router", **kw)
    prune_checkpoint(src, tmp_path / "s", max_cpu_memory="40KB", repair="refit+router", **kw)
    plain = prune_checkpoint(src, tmp_path / "n", repair="none", **kw)
    ta, tb, ts, tn = (saved_tensors(tmp_path / d) for d in "absn")
    assert ta.keys() == tb.keys() == ts.keys() == tn.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k  # same inputs, same bytes
        torch.testing.assert_close(ts[k], ta[k], rtol=1e-2, atol=1e-3)  # stored in bf16: rounding of equal sums
    assert a.kept == plain.kept
    changed = [k for k in ta if not torch.equal(ta[k], tn[k])]
    assert any("down_proj" in k for k in changed) and any("gate.weight" in k for k in changed)
    assert all("down_proj" in k or "gate.weight" in k for k in changed), changed  # nothing else re-fitted
    record = json.loads((tmp_path / "a" / "moecompress.json").read_text())
    rep = record
    assert rep["parameters"]["repair"] == "refit+router"
    assert set(rep["info"]["repair"]["layers"]) and rep["info"]["repair"]["token_weighting"] == "uniform"
    # the re-fit reads the selection's 4 sequences continued (REPAIR_SEQUENCES, or all the text has)
    from moecompress.calibration import load_calibration
    from transformers import AutoTokenizer

    have = load_calibration(AutoTokenizer.from_pretrained(src), calib, n=4, seq_len=32, extend_to=10**9).shape[0]
    assert 4 < have < 256 and rep["info"]["repair"]["calibration_sequences"] == have
    streamed = json.loads((tmp_path / "s" / "moecompress.json").read_text())
    assert streamed["parameters"]["max_cpu_memory"] == "40KB" and not (tmp_path / "s" / ".moecompress-work").exists()


def test_repair_tokens_continue_the_selections_draw(calib_ckpt):
    from transformers import AutoTokenizer

    from moecompress.calibration import load_calibration
    from moecompress.repair import repair_tokens, selection_and_repair_tokens

    tok, calib = AutoTokenizer.from_pretrained(calib_ckpt / "tiny"), str(calib_ckpt / "calib.txt")
    sel = load_calibration(tok, calib, n=3, seq_len=32, seed=5)
    every = load_calibration(tok, calib, n=1, seq_len=32, extend_to=10**9)
    rep = repair_tokens(tok, calib, n=3, seq_len=32, seed=5, sequences=6)
    assert rep.shape == (6, 32) and every.shape[0] > 6
    rows = {tuple(r.tolist()) for r in rep}
    assert {tuple(r.tolist()) for r in sel} <= rows <= {tuple(r.tolist()) for r in every}
    assert torch.equal(repair_tokens(tok, calib, n=3, seq_len=32, seed=5, sequences=2), sel)  # never fewer than -n
    assert repair_tokens(tok, calib, n=3, seq_len=32, seed=5, sequences=10**9).shape[0] == every.shape[0]
    both = selection_and_repair_tokens(tok, calib, n=3, seq_len=32, seed=5, sequences=6)  # one tokenisation
    assert torch.equal(both[0], sel) and torch.equal(both[1], rep)


def test_cli_repair_option(calib_ckpt, tmp_path):
    src, calib = calib_ckpt / "tiny", str(calib_ckpt / "calib.txt")
    r = invoke_cli("prune", str(src), "-o", str(tmp_path / "o"), "--keep", "4", "--method", "frequency",
                   "--calib", calib, "-n", "4", "--seq-len", "32", "--repair", "refit")
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "o" / "moecompress.json").read_text())
    assert record["parameters"]["repair"] == "refit" and record["info"]["repair"]["mode"] == "refit"
    r = invoke_cli("prune", str(src), "-o", str(tmp_path / "p"), "--keep", "4", "--repair", "bogus")
    assert r.exit_code == 2 and not (tmp_path / "p").exists()


@pytest.mark.parametrize("mode", ["refit+router", "refit+tune"])
def test_merge_with_repair_refits_router_rows_and_down_projections(calib_ckpt, tmp_path, mode):
    from moecompress.merge import merge_checkpoint

    src, calib = calib_ckpt / "tiny", str(calib_ckpt / "calib.txt")
    kw = dict(keep=4, calib=calib, n=4, seq_len=32, progress=False)
    merge_checkpoint(src, tmp_path / "r", repair=mode, **kw, **({"tune_epochs": 3} if mode == "refit+tune" else {}))
    merge_checkpoint(src, tmp_path / "n", repair="none", **kw)
    tr, tn = saved_tensors(tmp_path / "r"), saved_tensors(tmp_path / "n")
    changed = {k for k in tr if not torch.equal(tr[k], tn[k])}
    assert any("down_proj" in k for k in changed) and any("gate.weight" in k for k in changed)
    if mode == "refit+tune":  # the tuned gate/up projections are written too
        assert any("up_proj" in k for k in changed)
    record = json.loads((tmp_path / "r" / "moecompress.json").read_text())
    assert record["parameters"]["repair"] == mode
    if mode == "refit+tune":
        assert record["parameters"]["tune_epochs"] == 3


def test_auto_is_naee_above_top_k_and_frequency_at_or_below():
    from moecompress.prune import select_experts
    from moecompress.prune.auto import auto_rule
    from moecompress.stats import collect_stats

    assert [auto_rule(k, 2) for k in (1, 2, 3, 6)] == ["frequency", "frequency", "naee", "naee"]
    model, toks = tiny_model("mixtral"), tokens(4, 16)  # top-2 of 8
    stats = collect_stats(model, toks, progress=False)
    for keep, other in ((2, "frequency"), (4, "naee")):
        got = select_experts(model, toks, keep=keep, method="auto")
        want = select_experts(model, toks, keep=keep, method=other, stats=stats if other == "frequency" else None)
        assert got == want, keep


def test_routed_slots_equal_the_per_expert_nonzero():
    """One sort for all experts gives each expert's (token, slot) pairs in nonzero's order."""
    from moecompress.refit import routed_slots

    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(12, generator=g)[:3] for _ in range(50)])  # [T, k], distinct per row
    got = [(c, tok.tolist(), pos.tolist()) for c, tok, pos in routed_slots(idx, 12)]
    ref = [(c, *(t.tolist() for t in (idx == c).nonzero(as_tuple=True))) for c in idx.unique().tolist()]
    assert got == ref


def test_expert_blocks_pad_little_and_cover_every_routed_expert():
    """Brute force over random counts: the blocks are consecutive, disjoint, cover exactly the
    experts with tokens, and each block's padded rows respect the row cap (or hold one expert)
    and the padding bound; a block is not cut where its next expert would have fitted."""
    from moecompress.refit import BLOCK_PADDING, block_width, expert_blocks

    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        num = int(torch.randint(1, 40, (1,), generator=g))
        counts = torch.randint(0, 60, (num,), generator=g)
        counts[torch.rand(num, generator=g) < 0.2] = 0
        counts = counts.tolist()
        max_rows = int(torch.randint(1, 400, (1,), generator=g))
        blocks = expert_blocks(counts, max_rows)
        covered = [e for e0, e1 in blocks for e in range(e0, e1)]
        assert covered == [e for e, n in enumerate(counts) if n], (counts, blocks)
        for e0, e1 in blocks:
            padded, rows = (e1 - e0) * block_width(max(counts[e0:e1])), sum(counts[e0:e1])
            assert e1 - e0 == 1 or (padded <= max_rows and padded <= BLOCK_PADDING * rows)
            if e1 < num and counts[e1]:  # the next expert would break a bound
                wider = (e1 + 1 - e0) * block_width(max(counts[e0:e1 + 1]))
                assert wider > max_rows or wider > BLOCK_PADDING * (rows + counts[e1])


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "deepseek_v3", "llama4_text", "gpt_oss"])
@pytest.mark.parametrize("work", [1, 1 << 25])
@pytest.mark.parametrize("stream", [False, True])
def test_block_features_accumulate_the_per_expert_normal_equations(family, work, stream, monkeypatch):
    """The per-expert re-fit's normal equations from batched blocks of experts (padded) equal the
    per-expert products of ``expert_features``: one expert per block (``work`` 1) and blocks of
    every expert, padded; Llama-4 scales the input, GPT-OSS has expert biases (padding stays 0).
    With a stream target the features wait, packed, for the decoder layer's output."""
    from moecompress import refit
    from moecompress.refit import RefitObserver, expert_features

    model, originals = pruned_with_originals(family, KEPT)
    layer, calls = _first_layer_traffic(model, tokens(3, 12))
    monkeypatch.setattr(refit, "BLOCK_WORK_ELEMENTS", work)
    monkeypatch.setattr(refit, "BLOCK_PADDING", 100.0)  # wide blocks: padding certain
    li = layer.layer_idx
    gen = torch.Generator().manual_seed(1)
    targets = [torch.randn(1, x.shape[0], x.shape[1], generator=gen) for x, _, _ in calls]  # h_orig per batch
    outs = [torch.randn(1, x.shape[0], x.shape[1], generator=gen) for x, _, _ in calls]  # the decoder layer's h
    obs = RefitObserver({li: originals[li]}, {li: targets} if stream else None, stream_weight=1.0)
    gram = torch.zeros(layer.num_experts, layer.intermediate_size, layer.intermediate_size, dtype=torch.float64)
    rhs = torch.zeros(layer.num_experts, layer.intermediate_size, layer.hidden_size, dtype=torch.float64)
    seen = torch.zeros(layer.num_experts, dtype=torch.long)
    padded = 0
    with torch.no_grad():
        for batch, (x, routing, y) in enumerate(calls):
            obs.observe(layer, x, routing, y)
            obs.layer_output(li, batch, outs[batch])
            for b in refit.expert_feature_blocks(layer, x, routing):
                padded += b.feat.shape[0] * b.feat.shape[1] - int(b.counts.sum())
                packed = b.packed()  # held for a stream target: the routed rows only, padded again exactly
                assert packed.feat.shape[0] == int(b.counts.sum()) and torch.equal(packed.unpacked(), b.feat)
            resid = (block_output(originals[li], x) - y).double()
            if stream:
                resid = (targets[batch] - outs[batch]).reshape(resid.shape).double()
            for c, tok, feat, share in expert_features(layer, x, routing):
                f = feat.double()
                gram[c] += f.T @ f
                rhs[c] += f.T @ (resid[tok] * share[:, None].double())
                seen[c] += tok.numel()
    assert padded > 0 or work == 1, (family, padded)  # wide blocks do pad here
    assert torch.equal(obs.tokens[li], seen)
    scale = gram.abs().max()
    assert float((obs.gram[li].double() - gram).abs().max()) <= 1e-5 * float(scale), family
    assert float((obs.rhs[li].double() - rhs).abs().max()) <= 1e-5 * float(rhs.abs().max()), family


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "llama4_text", "gpt_oss"])
def test_block_output_in_slices_equals_the_whole_batch(family):
    """The original block run a few tokens at a time (bounding its transient under a GPU cap)
    gives the whole batch's rows; a slice's routed rows stay within a feature block's."""
    from moecompress.refit import BLOCK_WORK_ELEMENTS, block_tokens

    model, originals = pruned_with_originals(family, KEPT)
    layer, calls = _first_layer_traffic(model, tokens(3, 12))
    block = originals[layer.layer_idx]
    x = torch.cat([c[0] for c in calls])
    whole = block_output(block, x)
    for n in (1, 5, x.shape[0] - 1):
        assert torch.allclose(block_output(block, x, n), whole, rtol=1e-5, atol=1e-6), (family, n)
    assert torch.equal(block_output(block, x, x.shape[0]), whole)
    assert block_tokens(layer) * layer.top_k * (layer.hidden_size + layer.intermediate_size) <= BLOCK_WORK_ELEMENTS


def test_the_original_block_is_sliced_under_a_gpu_cap_only(monkeypatch):
    """A streamed model's re-fit runs the original block ``block_tokens`` at a time (its
    transient within the reserve); a model in memory runs it on the whole batch (faster)."""
    from moecompress import refit
    from moecompress.refit import RefitObserver, block_tokens

    seen = []
    whole = refit.block_output
    monkeypatch.setattr(refit, "block_output", lambda block, x, max_tokens=None: seen.append(max_tokens) or
                        whole(block, x, max_tokens))
    model, originals = pruned_with_originals("qwen3_moe", KEPT)
    repair(model, originals, tokens(2, 12), mode="refit", progress=False)
    assert seen and set(seen) == {None}  # in memory
    layer, calls = _first_layer_traffic(model, tokens(2, 12))
    seen.clear()
    obs = RefitObserver({layer.layer_idx: originals[layer.layer_idx]})  # the default: sliced
    for x, routing, y in calls:
        obs.observe(layer, x, routing, y)
    assert set(seen) == {block_tokens(layer)}


def test_tf32_accumulation_is_scoped_to_cuda_and_restored():
    """The re-fit's TF32 products: set only for a CUDA device, only inside, and put back as found."""
    from moecompress import refit

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with refit.accumulation_precision(torch.device("cpu")):
        assert matmul.fp32_precision == before
    with refit.accumulation_precision(torch.device("cuda")):
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before
    with pytest.raises(RuntimeError), refit.accumulation_precision(torch.device("cuda")):
        raise RuntimeError("restored on an error too")
    assert matmul.fp32_precision == before


def test_ridge_solve_equals_lu_and_reads_the_lower_triangle():
    from moecompress.refit import ridge_solve

    gen = torch.Generator().manual_seed(0)
    f = torch.randn(40, 24, generator=gen, dtype=torch.float64)
    g, rhs = (f.T @ f).float(), torch.randn(24, 7, generator=gen)
    lam = torch.full((24,), 0.1 * float(g.diagonal().mean()))
    expected = torch.linalg.solve(g.double() + torch.diag(lam.double()), rhs.double())
    torch.testing.assert_close(ridge_solve(g, lam, rhs), expected, rtol=1e-10, atol=1e-12)
    upper_noise = torch.triu(torch.full_like(g, 1e-3), 1)  # an accumulated Gram is symmetric up to rounding
    torch.testing.assert_close(ridge_solve(g + upper_noise, lam, rhs), expected, rtol=1e-10, atol=1e-12)
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # no Cholesky factor: solved by LU as before
    torch.testing.assert_close(ridge_solve(indefinite, torch.zeros(2), torch.ones(2, 1)),
                               torch.linalg.solve(indefinite.double(), torch.ones(2, 1).double()))
    # batched: each system as alone, the one without a Cholesky factor by LU
    f2 = torch.randn(40, 2, generator=gen, dtype=torch.float64)
    gs = torch.stack([(f2.T @ f2).float(), indefinite, torch.eye(2)])
    lams, rhss = torch.tensor([[0.1, 0.1], [0.0, 0.0], [1.0, 1.0]]), torch.randn(3, 2, 5, generator=gen)
    got = ridge_solve(gs, lams, rhss)
    for i in range(3):
        torch.testing.assert_close(got[i], ridge_solve(gs[i], lams[i], rhss[i]), rtol=1e-12, atol=1e-12)


def test_per_expert_solve_batched_in_memory_equals_one_at_a_time(monkeypatch):
    """In GPU memory the per-expert systems are solved in batches (of ``SOLVE_BUDGET`` bytes);
    under a cap one at a time (the reserve counts one): the same corrections."""
    from moecompress import refit
    from moecompress.refit import RefitObserver

    model, originals = pruned_with_originals("qwen3_moe", KEPT)
    layer, calls = _first_layer_traffic(model, tokens(3, 12))
    li = layer.layer_idx
    obs = RefitObserver({li: originals[li]})
    with torch.no_grad():
        for x, routing, y in calls:
            obs.observe(layer, x, routing, y)
    before = layer.down_proj.detach().clone()
    fits = []
    one = 8 * (3 * layer.intermediate_size ** 2 + 2 * layer.intermediate_size * layer.hidden_size)
    for sliced, budget in ((True, refit.SOLVE_BUDGET), (False, refit.SOLVE_BUDGET), (False, 2 * one + 1)):
        obs.sliced = sliced
        monkeypatch.setattr(refit, "SOLVE_BUDGET", budget)  # (the last: two experts a batch)
        with torch.no_grad():
            layer.down_proj.copy_(before)
            obs.apply(layer, 1e-2)
        fits.append(layer.down_proj.detach().clone())
    assert not torch.equal(fits[0], before)
    for fit in fits[1:]:
        torch.testing.assert_close(fits[0], fit, rtol=1e-6, atol=1e-7)
    obs.tokens[li][1] = 0  # an expert no token chose: left as it is, the others fitted around the gap
    with torch.no_grad():
        layer.down_proj.copy_(before)
        obs.apply(layer, 1e-2)
    assert torch.equal(layer.down_proj[1], before[1])
    others = [c for c in range(layer.num_experts) if c != 1]
    torch.testing.assert_close(layer.down_proj[others], fits[0][others], rtol=1e-6, atol=1e-7)


def test_repair_targets_are_the_options_choices():
    """The CLI / recipe option and the library name the same targets, with the option's default."""
    from typing import get_args

    from moecompress.options.groups import RepairOptions
    from moecompress.repair import DEFAULT_TARGET, REPAIR_TARGETS

    field = RepairOptions.model_fields["repair_target"]
    assert set(get_args(field.annotation)) == set(REPAIR_TARGETS) and DEFAULT_TARGET == field.default


@pytest.mark.parametrize("keep_model", [True, False])
def test_streamed_repair_builds_each_pruned_block_at_its_layer(tmp_path, keep_model):
    """A streamed model's pruned blocks are built when the repair reaches their layer, used from
    the execution device and only then written to their file (or dropped with keep_model=False:
    the surgery has them); the repaired weights equal the in-memory run's, and a kept model runs
    like it."""
    from moecompress.checkpoint import load_model
    from moecompress.merge import blocks as blocks_module
    from moecompress.merge.offload import is_offloaded
    from moecompress.onload import is_streamed
    from moecompress.repair import prune_and_repair

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "src")
    toks = tokens(4, 16)
    in_memory = load_model(tmp_path / "src", dtype="float32")
    layers = moe_view(in_memory).moe_layer_indices
    kept = {li: sorted((li + j) % 8 for j in (0, 2, 3, 5)) for li in layers}
    want = prune_and_repair(in_memory, kept, toks, mode="refit", batch_size=2, progress=False)
    streamed = load_model(tmp_path / "src", dtype="float32", max_cpu_memory="40KB", offload_folder=tmp_path / "off")
    if not is_streamed(streamed):  # a GPU holds this tiny model whole: nothing is offloaded
        pytest.skip("the model fits the GPU: not streamed")
    folder = tmp_path / "pruned"
    seen, published = [], {}
    build = blocks_module.DeferredBlocks.build

    def spy(self, li):
        seen.append((li, sorted(p.name for p in folder.glob("*.safetensors"))))  # files written before layer li's build
        return build(self, li)

    def publish(layer):  # what the surgery beside reads: the final weights, while the layer is built
        published[layer.layer_idx] = layer.down_proj.detach().clone()

    blocks_module.DeferredBlocks.build = spy
    try:
        got = prune_and_repair(streamed, kept, toks, mode="refit", batch_size=2, progress=False,
                               offload_folder=folder, keep_model=keep_model, on_layer_done=publish)
    finally:
        blocks_module.DeferredBlocks.build = build
    # no block is written before the repair has used it
    assert seen == [(li, [f"merged-layer-{j}.safetensors" for j in layers[:i]] if keep_model else [])
                    for i, li in enumerate(layers)]
    assert got["layers"].keys() == want["layers"].keys()
    for li in kept:
        assert got["layers"][li]["relative_error"] == pytest.approx(want["layers"][li]["relative_error"], rel=1e-5)
    view, ref = moe_view(streamed), moe_view(in_memory)
    for layer, reference in zip(view, ref):
        torch.testing.assert_close(published[layer.layer_idx], reference.down_proj.detach(), rtol=1e-5, atol=1e-6)
        if keep_model:
            assert is_offloaded(layer.block) and layer.experts.down_proj.device.type == "meta"
        else:
            assert not is_offloaded(layer.block) and all(p.device.type == "meta" for p in layer.block.parameters())
    if keep_model:
        probe = tokens(2, 9, seed=3)
        with torch.no_grad():
            torch.testing.assert_close(streamed(probe).logits, in_memory(probe).logits, rtol=1e-5, atol=1e-5)
    else:
        assert not list(folder.glob("*.safetensors"))


def test_streamed_prune_without_repair_still_builds_every_block(tmp_path):
    """``mode="none"``: the repair reaches no layer, and ``DeferredBlocks.finish`` builds and
    writes every pruned block (even with keep_model=False: nothing has used them), so the
    streamed model runs as the in-memory one pruned the same way."""
    from moecompress.checkpoint import load_model
    from moecompress.merge.offload import is_offloaded
    from moecompress.onload import is_streamed
    from moecompress.repair import prune_and_repair

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "src")
    in_memory = load_model(tmp_path / "src", dtype="float32")
    kept = {li: [1, 3, 4, 6] for li in moe_view(in_memory).moe_layer_indices}
    prune_and_repair(in_memory, kept, tokens(2, 8), mode="none", progress=False)
    streamed = load_model(tmp_path / "src", dtype="float32", max_cpu_memory="40KB", offload_folder=tmp_path / "off")
    if not is_streamed(streamed):
        pytest.skip("the model fits the GPU: not streamed")
    record = prune_and_repair(streamed, kept, tokens(2, 8), mode="none", progress=False, keep_model=False,
                              offload_folder=tmp_path / "pruned")
    assert record["mode"] == "none" and not record["layers"]
    assert all(is_offloaded(layer.block) for layer in moe_view(streamed))
    probe = tokens(2, 9, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(streamed(probe).logits, in_memory(probe).logits, rtol=1e-5, atol=1e-5)


def test_blocks_grow_without_a_gpu_cap_only(monkeypatch):
    """Without a cap the feature blocks hold up to 1/256 of the GPU's memory (at most
    ``UNCAPPED_BLOCK_ELEMENTS``; off a GPU the capped size), and an uncapped observer's normal
    equations are the capped one's: the blocks only group the experts' products."""
    from types import SimpleNamespace

    from moecompress import refit
    from moecompress.refit import BLOCK_WORK_ELEMENTS, UNCAPPED_BLOCK_ELEMENTS, RefitObserver

    assert refit.uncapped_block_elements(torch.device("cpu")) == BLOCK_WORK_ELEMENTS
    cases = ((24 << 30, (24 << 30) // 256), (141 << 30, UNCAPPED_BLOCK_ELEMENTS), (1 << 30, BLOCK_WORK_ELEMENTS))
    for memory, want in cases:
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev, m=memory: SimpleNamespace(total_memory=m))
        assert refit.uncapped_block_elements(torch.device("cuda", 0)) == want
    model, originals = pruned_with_originals("qwen3_moe", KEPT)
    layer, calls = _first_layer_traffic(model, tokens(3, 12))
    li = layer.layer_idx
    sizes = []
    blocks = refit.expert_feature_blocks
    monkeypatch.setattr(refit, "expert_feature_blocks", lambda *a: sizes.append(a[3]) or blocks(*a))
    monkeypatch.setattr(refit, "uncapped_block_elements", lambda dev: 1)  # one expert per block: unlike the capped
    capped, uncapped = RefitObserver({li: originals[li]}), RefitObserver({li: originals[li]}, sliced=False)
    with torch.no_grad():
        for x, routing, y in calls:
            capped.observe(layer, x, routing, y)
            uncapped.observe(layer, x, routing, y)
    assert set(sizes) == {BLOCK_WORK_ELEMENTS, 1}
    assert torch.equal(capped.tokens[li], uncapped.tokens[li])
    for acc in ("gram", "rhs"):
        a, b = getattr(capped, acc)[li], getattr(uncapped, acc)[li]
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max())), acc


@pytest.mark.parametrize("model_type,keep,streamed", [("qwen3_moe", 5, False), ("mixtral", 4, False),
                                                      ("deepseek_v3", 4, False), ("deepseek_v3", 5, False),
                                                      ("olmoe", 5, True), ("deepseek_v3", 4, True)])
def test_refit_as_each_layer_is_chosen_writes_the_bytes_of_choosing_all_first(tmp_path, monkeypatch, model_type,
                                                                              keep, streamed):
    """A streamed default prune re-fits each layer as soon as NAEE has chosen it
    (``Selection.on_layer``, ``repair.PruneRepair``), while the surgery beside writes the output
    from the kept count: the same files, config and record as choosing every layer first and
    re-fitting after (what a prune in memory does, ``refit_schedule``; forced here both ways).
    Families with per-expert checkpoint keys (mixtral), grouped routing that stays (deepseek_v3 at
    4 of 8) or falls back to one group (at 5), and a streamed model, whose decoder layers then go
    to the GPU once per prune: the MoE block once instead of twice (selection, re-fit), the rest
    once instead of once per pass."""
    import contextlib

    import accelerate.utils

    from moecompress.prune import checkpoint as prune_module
    from moecompress.prune.naee import LayerCache
    from moecompress.repair import LayerRepair
    from moecompress.testing import SAMPLE_TEXT, tiny_checkpoint

    tiny_checkpoint(tmp_path / "src", model_type)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    kw = dict(method="naee", keep=keep, calib=str(tmp_path / "calib.txt"), n=4, seq_len=32, repair_n=6,
              batch_size=2, progress=False, **({"max_cpu_memory": "40KB"} if streamed else {}))
    events, onloads = [], []
    align = accelerate.utils.align_module_device

    @contextlib.contextmanager
    def counted(module, *a, **k):  # what onload.onloaded calls per offloaded module
        onloads.append(type(module).__name__)
        with align(module, *a, **k):
            yield

    monkeypatch.setattr(accelerate.utils, "align_module_device", counted)
    step, cache = LayerRepair.step, LayerCache.__init__
    monkeypatch.setattr(LayerRepair, "step", lambda self, li: events.append(("fit", li)) or step(self, li))
    monkeypatch.setattr(LayerCache, "__init__", lambda self, layer, *a, **k: events.append(("choose", layer.layer_idx))
                        or cache(self, layer, *a, **k))
    if not streamed:  # (streamed: the default)
        monkeypatch.setattr(prune_module, "refit_schedule", lambda lm: "as chosen")
    each = prune_checkpoint(tmp_path / "src", tmp_path / "each", **kw)
    layers = sorted(each.kept)
    assert events == [(what, li) for li in layers for what in ("choose", "fit")]  # interleaved
    experts_onloads = sum(name.endswith("Experts") for name in onloads)
    assert experts_onloads == (len(layers) if streamed else 0)
    other_onloads = sum(not name.endswith(("Experts", "Router")) for name in onloads)  # attention, norms
    events.clear()
    onloads.clear()
    monkeypatch.setattr(prune_module, "refit_schedule", lambda lm: "after")  # (in memory: the default)
    after = prune_checkpoint(tmp_path / "src", tmp_path / "after", **kw)
    assert events == [("choose", li) for li in layers] + [("fit", li) for li in layers]
    assert sum(name.endswith("Experts") for name in onloads) == 2 * experts_onloads
    # the rest of a decoder layer: once for the selection and the re-fit, not once per pass (a dense
    # layer, deepseek_v3's first, is still onloaded by each pass)
    other_after = sum(not name.endswith(("Experts", "Router")) for name in onloads)
    assert (2 * other_onloads <= other_after) if model_type == "olmoe" else other_onloads <= other_after
    assert each.kept == after.kept
    a, b = saved_tensors(tmp_path / "each"), saved_tensors(tmp_path / "after")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "each" / "config.json").read_text() == (tmp_path / "after" / "config.json").read_text()
    records = [json.loads((tmp_path / d / "moecompress.json").read_text()) for d in ("each", "after")]
    for r in records:
        r.pop("seconds", None)
        r.get("info", {}).pop("seconds", None)
    assert records[0]["info"]["repair"] == records[1]["info"]["repair"]
    assert records[0]["kept_experts"] == records[1]["kept_experts"]


def test_the_refit_schedule_follows_where_the_model_runs(tmp_path):
    """Streamed: each layer as chosen (its decoder layer onloaded once); in memory after the
    selection, where the re-fit beside the layers' background loading gained nothing
    (docs/benchmarks.md, "Session 15", "Session 18", "Session 19")."""
    from moecompress.checkpoint import load_model
    from moecompress.onload import is_streamed
    from moecompress.prune.checkpoint import refit_schedule

    tiny_model("olmoe").save_pretrained(tmp_path / "src")
    assert refit_schedule(load_model(tmp_path / "src", dtype="float32")) == "after"
    streamed = load_model(tmp_path / "src", dtype="float32", max_cpu_memory="40KB", offload_folder=tmp_path / "off")
    assert is_streamed(streamed) and refit_schedule(streamed) == "as chosen"
