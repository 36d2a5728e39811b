"""Fine-grained pruning: HEAPr atomic experts, MoE-Pruner / Wanda / magnitude, N:M, STUN.

Every score is checked against a naive reference written with explicit loops over tokens,
experts and neurons; every edit against the model it should be equivalent to.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from moecompress.arch import moe_view
from moecompress.capture import run_calibration
from moecompress.checkpoint import output_folder, save_model
from moecompress.errors import MoECompressError
from moecompress.finegrained import heapr_prune, heapr_scores, unstructured_prune
from moecompress.finegrained.api import finegrained_prune
from moecompress.prune import prune_checkpoint
from moecompress.prune.registry import effective_method
from moecompress.testing import invoke_cli
from moecompress.finegrained.heapr import _all_scores, kept_size, shared_mlp_parts, zero_atoms
from moecompress.finegrained.stun import stun_prune
from moecompress.finegrained.unstructured import InputNorms, prune_mask, weight_scores
from moecompress.testing import tiny_model, tokens

MATRICES = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls: one thread avoids OpenMP spin-waits on a busy shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _reload(model, tmp_path):
    with output_folder(tmp_path / "out") as tmp:
        save_model(model, tmp, record={"stage": "test"})
    return AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()


# ----- HEAPr --------------------------------------------------------------------------------


def _block_inputs_and_output_grads(model, x):
    """Per MoE layer: the block input [T, H] and dLoss/d(block output) [T, H] (summed token
    cross-entropy), from an additive zero perturbation of each block output (autograd)."""
    view = moe_view(model)
    deltas, inputs, hooks = {}, {}, []
    for layer in view:
        def hook(mod, inp, out, i=layer.layer_idx):
            inputs[i] = inp[0].detach().reshape(-1, inp[0].shape[-1])
            y = out[0] if isinstance(out, tuple) else out
            deltas[i] = torch.zeros_like(y, requires_grad=True)
            return (y + deltas[i], *out[1:]) if isinstance(out, tuple) else y + deltas[i]

        hooks.append(layer.block.register_forward_hook(hook))
    with torch.enable_grad():
        logits = model(x).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").backward()
    for h in hooks:
        h.remove()
    return view, {i: (inputs[i], deltas[i].grad.reshape(inputs[i].shape)) for i in inputs}


def _reference_heapr(model, x):
    """HEAPr's two-stage estimate, literally: G_i = 1/|T_i| sum_{x in T_i} g g^T built explicitly
    (stage 1), then s_k = 1/|T_i| sum_{x in T_i} 1/2 e_k(x)^T G_i e_k(x) (stage 2), T_i the
    tokens routed to expert i.

    g = dL/d(expert i's own output at token x) comes from an additive zero perturbation of each
    MoE block output (autograd); atom outputs e_k(x) = d_k * act(gate_k.x) (up_k.x) are computed
    neuron by neuron, token by token.
    """
    view, io = _block_inputs_and_output_grads(model, x)
    out = {}
    with torch.no_grad():
        for layer in view:
            i = layer.layer_idx
            xs, grad = io[i]
            routing = layer.route(xs)
            gb, ub, _ = layer.expert_biases
            E, inter, H = layer.num_experts, layer.intermediate_size, layer.hidden_size
            S = torch.zeros(E, inter)
            for e in range(E):
                gs, atoms = [], []
                for t in range(xs.shape[0]):
                    slots = (routing.topk_idx[t] == e).nonzero().flatten().tolist()
                    if not slots:
                        continue
                    w = routing.topk_weight[t, slots[0]]
                    x_in, scale = (xs[t] * w, 1.0) if layer.spec.weight_on_input else (xs[t], w)
                    gs.append(scale * grad[t])
                    o = []
                    for k in range(inter):
                        g_pre = layer.gate_proj[e, k] @ x_in + (gb[e, k] if gb is not None else 0)
                        u_pre = layer.up_proj[e, k] @ x_in + (ub[e, k] if ub is not None else 0)
                        a = layer._act(g_pre.reshape(1), u_pre.reshape(1))[0]
                        o.append(layer.down_proj[e, :, k] * a)
                    atoms.append(o)
                if not gs:
                    continue
                He = torch.zeros(H, H)
                for g in gs:
                    He += torch.outer(g, g)
                He /= len(gs)
                for k in range(inter):
                    S[e, k] = sum(0.5 * (o[k] @ He @ o[k]) for o in atoms) / len(atoms)
            out[i] = S
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "llama4_text"])
def test_heapr_scores_equal_bruteforce_output_space_quadratic_form(family):
    model = tiny_model(family, hidden_size=16)
    x = tokens(3, 8)
    got = heapr_scores(model, x, batch_size=2, progress=False)  # two batches: accumulation across batches
    ref = _reference_heapr(model, x)
    assert set(got) == set(ref)
    for i in ref:
        assert (ref[i] > 0).any()
        torch.testing.assert_close(got[i], ref[i], rtol=1e-4, atol=1e-7)


def test_heapr_score_is_a_mean_over_routed_tokens_not_a_sum():
    """s_k averages over T_i in both stages: repeating the calibration set leaves every score
    unchanged (a sum over tokens would double them, and weight experts by their traffic)."""
    model = tiny_model("qwen3_moe", hidden_size=16)
    x = tokens(2, 8)
    once = heapr_scores(model, x, batch_size=2, progress=False)
    twice = heapr_scores(model, torch.cat([x, x]), batch_size=2, progress=False)
    for i in once:
        torch.testing.assert_close(twice[i], once[i], rtol=1e-4, atol=1e-8)


def test_heapr_ratio_zero_is_identity():
    model = tiny_model("qwen3_moe")
    x = tokens()
    ref = _logits(model, x)
    report = heapr_prune(model, x, 0.0, progress=False)
    assert report["intermediate_size_after"] == 16 and model.config.moe_intermediate_size == 16
    torch.testing.assert_close(_logits(model, x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_heapr_shrink_equals_zeroing_lowest_atoms_and_reloads(family, tmp_path):
    model = tiny_model(family)
    x = tokens(2, 10)
    inter = moe_view(model)[0].intermediate_size
    scores = heapr_scores(model, x, progress=False)
    masked = tiny_model(family)
    n_keep = kept_size(inter, 0.25, align=4)
    for layer in moe_view(masked):
        s = scores[layer.layer_idx]
        low = torch.sort(s, dim=1, descending=True, stable=True).indices[:, n_keep:]
        zero_atoms(layer, torch.zeros_like(s, dtype=torch.bool).scatter_(1, low, True))
    report = heapr_prune(model, x, 0.25, align=4, scores=scores, progress=False)
    assert report["intermediate_size_after"] == n_keep < inter
    view = moe_view(model)
    assert all(layer.intermediate_size == n_keep for layer in view)
    assert getattr(model.config, view.spec.intermediate_field) == n_keep
    pruned = _logits(model, x)
    torch.testing.assert_close(pruned, _logits(masked, x), atol=1e-5, rtol=1e-5)
    reloaded = _reload(model, tmp_path)
    assert getattr(reloaded.config, view.spec.intermediate_field) == n_keep
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in masked.parameters())
    torch.testing.assert_close(_logits(reloaded, x), pruned, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["deepseek_v3", "llama4_text"])
def test_heapr_shrinks_tied_shared_expert_by_its_scores_and_reloads(family, tmp_path):
    """DeepSeek / Llama-4 size the shared expert from the routed experts' config field: it
    shrinks too, keeping its own highest-scoring atoms, and the checkpoint reloads."""
    model = tiny_model(family)
    x = tokens(2, 10)
    view = moe_view(model)
    both = _all_scores(model, x, 8, view, progress=False, shared=True)
    ref_shared = _reference_shared_scores(model, x)
    for i, (_, sh) in both.items():
        torch.testing.assert_close(sh, ref_shared[i], rtol=1e-4, atol=1e-7)
    masked = tiny_model(family)
    n_keep = kept_size(16, 0.25, align=4)
    n_shared = shared_mlp_parts(moe_view(masked)[0])[0].weight.shape[0] * n_keep // 16
    for layer in moe_view(masked):
        routed, sh = both[layer.layer_idx]
        low = torch.sort(routed, dim=1, descending=True, stable=True).indices[:, n_keep:]
        zero_atoms(layer, torch.zeros_like(routed, dtype=torch.bool).scatter_(1, low, True))
        gate, up, dn, _ = shared_mlp_parts(layer)
        with torch.no_grad():
            dn.weight[:, torch.sort(sh, descending=True, stable=True).indices[n_shared:]] = 0
    report = heapr_prune(model, x, 0.25, align=4, progress=False)
    assert all(v["after"] == n_shared for v in report["shared_experts_shrunk"].values())
    assert len(report["shared_experts_shrunk"]) == len(view)
    pruned = _logits(model, x)
    torch.testing.assert_close(pruned, _logits(masked, x), atol=1e-5, rtol=1e-5)
    reloaded = _reload(model, tmp_path)
    assert getattr(reloaded.config, view.spec.intermediate_field) == n_keep
    torch.testing.assert_close(_logits(reloaded, x), pruned, atol=1e-5, rtol=1e-5)


def _reference_shared_scores(model, x):
    """Shared expert atoms: 1/2 * mean_t (g_t . d_k)^2 * mean_t a_k(t)^2, token by token."""
    view, io = _block_inputs_and_output_grads(model, x)
    out = {}
    with torch.no_grad():
        for layer in view:
            xs, grad = io[layer.layer_idx]
            gate, up, dn, act = shared_mlp_parts(layer)
            n = dn.weight.shape[1]
            quad, energy = torch.zeros(n), torch.zeros(n)
            for t in range(xs.shape[0]):
                for k in range(n):
                    a = act(gate.weight[k] @ xs[t]) * (up.weight[k] @ xs[t])
                    quad[k] += (grad[t] @ dn.weight[:, k]) ** 2
                    energy[k] += a ** 2
            out[layer.layer_idx] = 0.5 * (quad / xs.shape[0]) * (energy / xs.shape[0])
    return out


def test_heapr_global_ranking_zeros_lowest_atoms_without_resizing():
    model = tiny_model("qwen3_moe")
    x = tokens()
    scores = heapr_scores(model, x, progress=False)
    report = heapr_prune(model, x, 0.3, global_ranking=True, scores=scores, progress=False)
    flat = torch.cat([scores[i].reshape(-1) for i in sorted(scores)])
    n = int(round(0.3 * flat.numel()))
    assert report["atoms_removed"] == n and report["storage"] == "dense-with-zeros"
    threshold = torch.sort(flat).values[n - 1]
    for layer in moe_view(model):
        zero = (layer.down_proj == 0).all(dim=1) & (layer.gate_proj == 0).all(dim=2)  # [E, I]
        assert layer.intermediate_size == 16
        assert (scores[layer.layer_idx][zero] <= threshold).all()
        assert (scores[layer.layer_idx][~zero] >= threshold).all()
    assert sum(int(((layer.down_proj == 0).all(dim=1)).sum()) for layer in moe_view(model)) == n


def test_kept_size_alignment():
    assert kept_size(64, 0.25) == 48
    assert kept_size(24, 0.25, align=8) == 16  # 18 is no multiple of 8: nearest is 16
    assert kept_size(16, 0.25, align=8) == 8  # 12: a tie, and 16 would remove nothing: down
    assert kept_size(64, 0.3, align=8) == 48  # 45 -> 48
    assert kept_size(64, 0.05, align=8) == 56  # 61 -> 64 would remove nothing: down
    assert kept_size(24, 0.25, align=1) == 18
    assert kept_size(20, 0.25, align=8) == 15  # original size unaligned: no rounding
    assert kept_size(64, 0.0) == 64
    with pytest.raises(MoECompressError):
        kept_size(4, 0.99, align=1)
    with pytest.raises(MoECompressError):
        heapr_prune(tiny_model("qwen3_moe"), tokens(), 1.0, progress=False)


# ----- MoE-Pruner / Wanda / magnitude -----------------------------------------------------


def _naive_input_norms(model, x, router_weighted):
    """Per layer and expert: sqrt(sum over routed tokens of (w * input)^2), token by token."""
    view = moe_view(model)
    inputs = {}
    hooks = [layer.block.register_forward_hook(
        lambda m, inp, out, i=layer.layer_idx: inputs.__setitem__(i, inp[0].reshape(-1, inp[0].shape[-1])))
        for layer in view]
    _logits(model, x)
    for h in hooks:
        h.remove()
    out = {}
    with torch.no_grad():
        for layer in view:
            xs = inputs[layer.layer_idx]
            r = layer.route(xs)
            sq_x = torch.zeros(layer.num_experts, layer.hidden_size)
            sq_h = torch.zeros(layer.num_experts, layer.intermediate_size)
            for t in range(xs.shape[0]):
                for slot in range(r.topk_idx.shape[1]):
                    e, w = int(r.topk_idx[t, slot]), float(r.topk_weight[t, slot])
                    x_in = xs[t] * w if layer.spec.weight_on_input else xs[t]
                    h = layer.expert_hidden(e, x_in[None])[0]
                    c = w if router_weighted else 1.0
                    sq_x[e] += (c * x_in) ** 2
                    sq_h[e] += (c * h) ** 2
            out[layer.layer_idx] = (sq_x.sqrt(), sq_h.sqrt())
    return out


@pytest.mark.parametrize("method", ["moe-pruner", "wanda"])
@pytest.mark.parametrize("family", ["qwen3_moe", "llama4_text"])
def test_activation_scores_equal_naive_reference(method, family):
    model = tiny_model(family)
    x = tokens(2, 10)
    norms = InputNorms(moe_view(model).moe_layer_indices, router_weighted=method == "moe-pruner")
    run_calibration(model, x, [norms], batch_size=1, progress=False)
    ref = _naive_input_norms(model, x, router_weighted=method == "moe-pruner")
    for layer in moe_view(model):
        s = weight_scores(layer, method, norms)
        nx, nh = ref[layer.layer_idx]
        seen = norms.tokens[layer.layer_idx] > 0
        for name, n in (("gate_proj", nx), ("up_proj", nx), ("down_proj", nh)):
            expected = getattr(layer, name).abs() * n[:, None, :]
            torch.testing.assert_close(s[name][seen], expected[seen], rtol=1e-4, atol=1e-6)
            # experts no token reached fall back to magnitude
            torch.testing.assert_close(s[name][~seen], getattr(layer, name).abs()[~seen])


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_pruner_score_is_the_papers_eq9_with_eq2_gate(family):
    """Xie et al. 2024, brute force and independent of the library's routing code: with the
    gate of Eq. 2, Gate(x) = Softmax(TopK(x W_g)) (0 off the top-k), and Algorithm 1's dense
    Gate [tokens, experts] over *all* calibration tokens, S_ij = |W_ij| * ||X_j * Gate_e|| (Eq. 9)
    for every expert's gate, up (X = block input) and down projection (X = act(gate x) * (up x))."""
    model = tiny_model(family)
    x = tokens(2, 10)
    view = moe_view(model)
    inputs = {}
    hooks = [layer.block.register_forward_hook(
        lambda m, inp, out, i=layer.layer_idx: inputs.__setitem__(i, inp[0].reshape(-1, inp[0].shape[-1]).detach()))
        for layer in view]
    _logits(model, x)
    for h in hooks:
        h.remove()
    norms = InputNorms(view.moe_layer_indices, router_weighted=True)
    run_calibration(model, x, [norms], progress=False)
    with torch.no_grad():
        for layer in view:
            xs = inputs[layer.layer_idx].float()
            logits = xs @ layer.router_weight.float().T
            top = logits.topk(layer.top_k, dim=-1)
            gate = torch.full_like(logits, float("-inf")).scatter(1, top.indices, top.values).softmax(-1)  # Eq. 2
            scores = weight_scores(layer, "moe-pruner", norms)
            for e in range(layer.num_experts):
                g = gate[:, e:e + 1]  # [T, 1], zero for tokens not routed to e
                if not bool((g > 0).any()):
                    continue
                h = F.silu(xs @ layer.gate_proj[e].T) * (xs @ layer.up_proj[e].T)
                for name, inp in (("gate_proj", xs), ("up_proj", xs), ("down_proj", h)):
                    expected = getattr(layer, name)[e].abs() * (inp * g).norm(dim=0)[None, :]
                    torch.testing.assert_close(scores[name][e], expected, rtol=1e-4, atol=1e-6)
                # the full-softmax probability (not renormalised over the top-k) is a different score
                p_full = logits.softmax(-1)[:, e:e + 1] * (g > 0)
                full = layer.gate_proj[e].abs() * (xs * p_full).norm(dim=0)[None, :]
                assert not torch.allclose(scores["gate_proj"][e], full, rtol=1e-3)


def test_moe_pruner_differs_from_wanda_only_by_router_weights():
    model = tiny_model("qwen3_moe")
    x = tokens(2, 10)
    a = InputNorms(moe_view(model).moe_layer_indices, router_weighted=True)
    b = InputNorms(moe_view(model).moe_layer_indices, router_weighted=False)
    run_calibration(model, x, [a, b], progress=False)
    i = moe_view(model).moe_layer_indices[0]
    assert not torch.allclose(a.sq_in[i], b.sq_in[i])
    assert (a.sq_in[i] <= b.sq_in[i] + 1e-6).all()  # weights are at most 1


@pytest.mark.parametrize("method", ["moe-pruner", "wanda", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.5, 0.25])
def test_sparsity_exact_per_matrix_and_lowest_scores_go(method, sparsity):
    model = tiny_model("qwen3_moe")
    x = tokens(2, 10)
    before = {(layer.layer_idx, n): getattr(layer, n).clone() for layer in moe_view(model) for n in MATRICES}
    # the scores the sequential pass sees for the first MoE layer are those of the dense model
    first = moe_view(model)[0]
    norms = InputNorms([first.layer_idx], router_weighted=method == "moe-pruner")
    run_calibration(model, x, [norms], progress=False)
    first_scores = weight_scores(first, method, norms)
    report = unstructured_prune(model, x, sparsity, method, progress=False)
    assert report["expert_weight_sparsity"] == pytest.approx(sparsity)
    for layer in moe_view(model):
        for name in MATRICES:
            w = getattr(layer, name)
            zeros_per_row = (w == 0).sum(-1)
            assert (zeros_per_row == round(sparsity * w.shape[-1])).all()
            assert report["per_layer"][layer.layer_idx][name] == pytest.approx(sparsity)
            old = before[(layer.layer_idx, name)]
            kept = w != 0
            torch.testing.assert_close(w[kept], old[kept], rtol=0, atol=0)  # one-shot: no weight update
    for name in MATRICES:
        w, s = getattr(first, name), first_scores[name]
        pruned_max = torch.where(w == 0, s, torch.full_like(s, -1.0)).amax(-1)
        kept_min = torch.where(w != 0, s, torch.full_like(s, float("inf"))).amin(-1)
        assert (pruned_max <= kept_min).all()


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern(nm):
    n, m = nm
    model = tiny_model("qwen3_moe")
    x = tokens(2, 10)
    first = moe_view(model)[0]
    norms = InputNorms([first.layer_idx], router_weighted=True)
    run_calibration(model, x, [norms], progress=False)
    scores = weight_scores(first, "moe-pruner", norms)
    report = unstructured_prune(model, x, None, "moe-pruner", nm=f"{n}:{m}", progress=False)
    assert report["nm"] == f"{n}:{m}" and report["expert_weight_sparsity"] == pytest.approx(1 - n / m)
    for layer in moe_view(model):
        for name in MATRICES:
            w = getattr(layer, name)
            groups = (w != 0).reshape(*w.shape[:-1], w.shape[-1] // m, m)
            assert (groups.sum(-1) == n).all()
    for name in MATRICES:  # within each group the kept weights are the top-n scores
        w, s = getattr(first, name), scores[name]
        g_s = s.reshape(*s.shape[:-1], -1, m)
        g_keep = (w != 0).reshape(g_s.shape)
        kept_min = torch.where(g_keep, g_s, torch.full_like(g_s, float("inf"))).amin(-1)
        pruned_max = torch.where(~g_keep, g_s, torch.full_like(g_s, -1.0)).amax(-1)
        assert (pruned_max <= kept_min).all()


def test_prune_mask_rejects_bad_nm():
    with pytest.raises(MoECompressError):
        prune_mask(torch.rand(3, 6), nm=(2, 4))
    with pytest.raises(MoECompressError):
        finegrained_prune(tiny_model("qwen3_moe"), tokens(), "wanda", nm="4:2", progress=False)
    with pytest.raises(MoECompressError):
        finegrained_prune(tiny_model("qwen3_moe"), tokens(), "wanda", sparsity=0.5, nm="2:4", progress=False)


def test_sequential_statistics_see_earlier_layers_pruned():
    x = tokens(2, 10)
    seq = tiny_model("qwen3_moe")
    unstructured_prune(seq, x, 0.5, "wanda", progress=False)
    # by hand: prune layer after layer, re-measuring on the partly pruned model
    manual = tiny_model("qwen3_moe")
    view = moe_view(manual)
    for layer in view:
        norms = InputNorms([layer.layer_idx], router_weighted=False)
        run_calibration(manual, x, [norms], progress=False)
        s = weight_scores(layer, "wanda", norms)
        with torch.no_grad():
            for name in MATRICES:
                getattr(layer, name).masked_fill_(prune_mask(s[name], 0.5), 0)
    for a, b in zip(moe_view(seq), view):
        for name in MATRICES:
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    one_shot = tiny_model("qwen3_moe")
    unstructured_prune(one_shot, x, 0.5, "wanda", sequential=False, progress=False)
    last = moe_view(one_shot)[-1]
    assert not torch.equal(last.down_proj, moe_view(seq)[-1].down_proj)


def test_unstructured_checkpoint_reloads_with_zeros(tmp_path):
    model = tiny_model("mixtral")
    x = tokens()
    unstructured_prune(model, x, None, "moe-pruner", nm="2:4", progress=False)
    ref = _logits(model, x)
    reloaded = _reload(model, tmp_path)
    torch.testing.assert_close(_logits(reloaded, x), ref, atol=1e-5, rtol=1e-5)
    layer = moe_view(reloaded)[0]
    assert float((layer.gate_proj == 0).float().mean()) == pytest.approx(0.5)


# ----- STUN ----------------------------------------------------------------------------------


def _frequency_selector(model, x, keep):
    """Stand-in first stage: keep the experts most often in the top-k."""
    view = moe_view(model)
    counts = {}

    class Count:
        def observe(self, layer, xs, routing, y):
            c = torch.bincount(routing.topk_idx.reshape(-1), minlength=layer.num_experts)
            counts[layer.layer_idx] = counts.get(layer.layer_idx, 0) + c

    run_calibration(model, x, [Count()], view=view, progress=False)
    return {i: torch.sort(c, descending=True, stable=True).indices[:keep].tolist() for i, c in counts.items()}


def test_stun_splits_the_budget(tmp_path):
    model = tiny_model("qwen3_moe")
    x = tokens(2, 10)
    kept = _frequency_selector(tiny_model("qwen3_moe"), x, 6)
    report = stun_prune(model, x, 0.5, 0.25, expert_selector=_frequency_selector, progress=False)
    assert report["experts_after"] == 6 and model.config.num_local_experts == 6
    assert report["kept_experts"] == {i: sorted(v) for i, v in kept.items()}
    s2 = 1 - 0.5 / 0.75
    assert report["unstructured_sparsity"] == pytest.approx(s2)
    assert report["expert_weight_sparsity"] == pytest.approx(1 - 0.75 * (1 - round(s2 * 16) / 16), abs=0.02)
    for layer in moe_view(model):
        assert layer.num_experts == 6
        assert (layer.gate_proj == 0).sum(-1).eq(round(s2 * layer.hidden_size)).all()
    reloaded = _reload(model, tmp_path)
    torch.testing.assert_close(_logits(reloaded, x), _logits(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("expert_method", ["frequency", "stun"])
def test_stun_first_stage_comes_from_the_expert_pruning_registry(expert_method):
    prune = pytest.importorskip("moecompress.prune")
    if expert_method not in prune.METHODS:
        pytest.skip(f"expert-pruning method {expert_method} not registered yet")
    x = tokens(2, 10)
    expected = prune.select_experts(tiny_model("qwen3_moe"), x, keep=4, method=expert_method)
    model = tiny_model("qwen3_moe")
    report = stun_prune(model, x, 0.75, 0.5, expert_method=expert_method, progress=False)
    assert report["kept_experts"] == {i: sorted(v) for i, v in expected.items()}
    assert all(layer.num_experts == 4 for layer in moe_view(model))
    assert report["expert_weight_sparsity"] == pytest.approx(0.75)


def test_stun_refuses_expert_ratio_above_total():
    with pytest.raises(MoECompressError, match="stun-expert-ratio"):
        stun_prune(tiny_model("qwen3_moe"), tokens(), 0.2, 0.5, expert_selector=_frequency_selector, progress=False)


# ----- checkpoint entry point -----------------------------------------------------------------


def test_prune_checkpoint_writes_record_and_refuses_bad_input(tmp_path):
    src = tmp_path / "src"
    tiny_model("qwen3_moe").save_pretrained(src)  # no tokenizer: magnitude needs no calibration
    out = tmp_path / "out"
    result = prune_checkpoint(src, out, method="magnitude", sparsity=0.5, progress=False)
    assert result.kind == "weights" and result.report["expert_weight_sparsity"] == pytest.approx(0.5)
    record = json.loads((out / "moecompress.json").read_text())
    assert record["method"] == "magnitude" and record["kind"] == "weights"
    assert record["parameters"]["sparsity"] == 0.5 and record["report"]["expert_weight_sparsity"] == pytest.approx(0.5)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert float((moe_view(reloaded)[0].up_proj == 0).float().mean()) == pytest.approx(0.5)
    with pytest.raises(MoECompressError, match="exists"):
        prune_checkpoint(src, out, method="magnitude", sparsity=0.5, progress=False)
    with pytest.raises(MoECompressError, match="heapr needs --ratio"):
        prune_checkpoint(src, tmp_path / "o2", method="heapr", progress=False)
    with pytest.raises(MoECompressError, match="tokenizer|sequences"):  # heapr calibrates; this folder has no tokenizer
        prune_checkpoint(src, tmp_path / "o2", method="heapr", ratio=0.25, progress=False)
    assert not (tmp_path / "o2").exists()


def _char_tokenizer():
    """Character-level tokenizer inside the tiny models' 96-token vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789 \n.,:;()[]=+-*/#'\"_?!<>"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture
def tiny_src(tmp_path):
    src = tmp_path / "src"
    tiny_model("qwen3_moe").save_pretrained(src)
    _char_tokenizer().save_pretrained(src)
    calib = tmp_path / "calib.txt"
    calib.write_text("def add(a, b):\n    return a + b  # why, not what\n" * 40)
    return src, calib


def test_cli_heapr_and_stun(tiny_src, tmp_path):
    src, calib = tiny_src
    common = ["--calib", calib, "-n", 4, "--seq-len", 32, "--dtype", "float32", "--batch-size", 2]
    r = invoke_cli("prune", src, "-o", tmp_path / "h", "--method", "heapr", "--ratio", 0.25,
                   "--json", tmp_path / "h.json", *common)
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "h.json").read_text())
    assert data["intermediate_size_after"] == 8 and data["params_after"] < data["params_before"]
    assert data["ratio_effective"] == 0.5  # 12 of 16 rounds to a multiple of 8
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "h").config.moe_intermediate_size == 8
    assert "fine-grained pruning: heapr" in r.output
    # `--method stun` with a second-stage budget runs the whole STUN pipeline
    assert effective_method("stun", 0.5, None) == "stun-unstructured" and effective_method("stun", None, None) == "stun"
    r = invoke_cli("prune", src, "-o", tmp_path / "s", "--method", "stun", "--sparsity", 0.5,
                   "--stun-expert-ratio", 0.25, *common)
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "s" / "moecompress.json").read_text())
    assert record["method"] == "stun-unstructured" and record["report"]["experts_after"] == 6
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "s").config.num_experts == 6
    for args, msg in ((("--method", "wanda", "--sparsity", 0.5, "--keep", 4), "--keep"),
                      (("--method", "wanda", "--ratio", 0.5), "--sparsity")):
        r = invoke_cli("prune", src, "-o", tmp_path / "x", *args, *common)
        assert r.exit_code == 2 and msg in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "x").exists()


def test_prune_command_dispatches_fine_grained_methods(tiny_src, tmp_path):
    from typer.testing import CliRunner

    from moecompress.cli import app

    src, calib = tiny_src
    runner = CliRunner()
    args = ["prune", str(src), "--calib", str(calib), "-n", "4", "--seq-len", "32", "--dtype", "float32"]
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "w"), "--method", "wanda", "--nm", "2:4", "--json", "-"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["nm"] == "2:4" and data["expert_weight_sparsity"] == pytest.approx(0.5)
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "h"), "--method", "heapr", "--ratio", "0.5"])
    assert res.exit_code == 0, res.output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "h").config.moe_intermediate_size == 8
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "f"), "--method", "frequency", "--keep", "4",
                              "--sparsity", "0.5"])
    assert res.exit_code == 2 and "--sparsity" in res.output and not (tmp_path / "f").exists()


@pytest.mark.parametrize("method,opts", [("heapr", {"ratio": 0.5}), ("moe-pruner", {"sparsity": 0.5})])
def test_same_inputs_give_the_same_bytes(tiny_src, tmp_path, method, opts):
    src, calib = tiny_src
    for name in ("a", "b"):
        prune_checkpoint(src, tmp_path / name, method=method, calib=str(calib), n=4, seq_len=32, progress=False,
                         **opts)
    for f in ("model.safetensors", "moecompress.json", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
