"""NAEE's vectorised search equals the per-candidate NAEE it replaced, on every family."""

from __future__ import annotations

import json

import pytest
import torch

from moecompress.arch import moe_view
from moecompress.capture import run_calibration
from moecompress.prune.naee import LayerCache, expert_gram, removal_sets, search
from moecompress.prune.subrouter import SubsetRouters, route_subset, sub_router
from moecompress.testing import TINY_CONFIGS, tiny_model, tokens

from naee_cases import CASES, REFERENCE, run_case

FAMILIES = sorted(TINY_CONFIGS)
_REF = json.loads(REFERENCE.read_text())


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_same_kept_sets_scores_and_record_as_the_per_candidate_naee(family, case):
    old, new = _REF[f"{family}/{case}"], run_case(family, case)
    assert new["kept"] == old["kept"]
    assert new["evaluated_sets"] == old["evaluated_sets"]
    for li, ref in old["scores"].items():
        # to float32 rounding of the layer's largest error (removing an unused expert gives an
        # error of 0 that the per-candidate path computed as ~1e-14 noise)
        scale = max(abs(v) for v in ref)
        assert new["scores"][li] == pytest.approx(ref, abs=1e-5 * scale + 1e-12)
        assert new["relative_error"][li] == pytest.approx(old["relative_error"][li], abs=1e-6)


def _layer_cache(family):
    model, toks = tiny_model(family), tokens(2, 12)
    view = moe_view(model)
    layer = view.layers[-1]
    cache = LayerCache(layer, per_batch=10_000, seed=0)
    run_calibration(model, toks, [cache], batch_size=2, view=view, progress=False)
    return layer, cache


@pytest.mark.parametrize("family", FAMILIES)
def test_subset_routing_equals_the_pruned_layers_router(family):
    """One router call for many kept sets == the sub-router of each set run on the inputs."""
    layer, cache = _layer_cache(family)
    x, logits, E = torch.cat(cache.x), torch.cat(cache.logits), layer.num_experts
    g = torch.Generator().manual_seed(1)
    for m in (2, 3, 4, 6, E - 1):
        sets = torch.stack([torch.randperm(E, generator=g)[:m].sort().values for _ in range(5)])
        idx, weight = SubsetRouters(layer).route(logits, sets)  # [T, C, k]
        got = torch.zeros(*idx.shape[:2], E).scatter_(2, idx, weight).transpose(0, 1)
        for c, s in enumerate(sets):
            ref = route_subset(layer, sub_router(layer, s), s, x).dense_weights(E)
            assert torch.equal(got[c] != 0, ref != 0), (m, s)  # the same experts chosen for every token
            torch.testing.assert_close(got[c], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_subset_errors_equal_a_per_candidate_reference(family):
    layer, cache = _layer_cache(family)
    errors = cache.errors()
    E = layer.num_experts
    x, w, gram = errors.x, errors.w, errors.gram
    # the Gram matrices of the batched forward are those of one expert at a time
    f = torch.stack([layer.expert_forward(e, x).float() for e in range(E)], dim=1)
    torch.testing.assert_close(gram, f @ f.transpose(1, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(expert_gram(layer, x), gram, rtol=0, atol=0)
    sets = torch.tensor([[0, 2, 3, 5], [1, 2, 6, 7], [0, 1, 2, 3]])
    got = errors(sets)
    for c, s in enumerate(sets):
        d = w - route_subset(layer, sub_router(layer, s), s, x).dense_weights(E)
        ref = sum(float(torch.sum((d[t] @ f[t]).double() ** 2)) for t in range(x.shape[0]))  # ||sum_e d_e f_e||^2
        assert float(got[c]) == pytest.approx(ref, rel=1e-4, abs=1e-9)
    assert errors.evaluated == 3
    errors.work_elements = 1  # one token per block: the same errors
    torch.testing.assert_close(errors(sets), got, rtol=1e-6, atol=1e-12)
    if family in ("deepseek_v3", "glm4_moe"):  # their routers take the top 2 of each group: 2 experts at least
        return
    singles = torch.tensor([[1], [5]])  # single experts: routed one set at a time
    for s, e in zip(singles, errors(singles)):
        d = w - route_subset(layer, sub_router(layer, s), s, x).dense_weights(E)
        assert float(e) == pytest.approx(sum(float(torch.sum((d[t] @ f[t]).double() ** 2)) for t in range(x.shape[0])),
                                         rel=1e-4, abs=1e-9, nan_ok=True)  # PhiMoE: nan in both


def test_search_exhaustive_and_beam_in_rounds():
    weights = [5.0, 1.0, 7.0, 0.5, 3.0, 9.0, 2.0, 4.0]
    calls = []

    def batched(fn):
        def errors(sets):
            calls.append(sets.shape)
            return torch.tensor([fn(s) for s in sets.tolist()], dtype=torch.float64)
        return errors

    def additive(s):  # error = weight of the removed experts: greedy is optimal here
        return sum(w for e, w in enumerate(weights) if e not in s)

    kept, err, how = search(batched(additive), 8, 4, {3}, max_combinations=0, beam=1)
    assert how == "beam" and kept == [0, 2, 3, 5] and err == pytest.approx(1.0 + 3.0 + 2.0 + 4.0)
    # one call per round: 7, 6, 5, 4 unprotected experts to drop from 8, 7, 6, 5 kept
    assert calls == [torch.Size([7, 7]), torch.Size([6, 6]), torch.Size([5, 5]), torch.Size([4, 4])]

    import itertools

    def pairwise(s):  # interactions: greedy could be fooled, exhaustive is not
        return sum(abs(a - b) % 3 for a, b in itertools.combinations(s, 2)) + (0 if 7 in s else 5)

    kept, err, how = search(batched(pairwise), 8, 3, set(), max_combinations=1000, beam=1)
    brute = min((pairwise(list(c)), list(c)) for c in itertools.combinations(range(8), 3))
    assert how == "exhaustive" and (err, kept) == brute

    # ties go to the lexicographically first set, with a beam of 2 (duplicates merged)
    calls.clear()
    kept, err, how = search(batched(lambda s: 0.0), 6, 3, set(), max_combinations=0, beam=2)
    assert kept == [0, 1, 2] and err == 0.0
    assert calls[1] == torch.Size([9, 4])  # {0..4} and {0,1,2,3,5} minus one: 9 distinct sets


INCREMENTAL = [f for f in FAMILIES if moe_view(tiny_model(f)).layers[0].removal_effect]


def _removal_sets(parent):
    sets = removal_sets(parent.unsqueeze(0))[0]
    # position j dropped, as a per-set loop would build it
    assert torch.equal(sets, torch.stack([torch.cat([parent[:j], parent[j + 1:]]) for j in range(parent.numel())]))
    return sets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", INCREMENTAL)
@torch.no_grad()
def test_incremental_rounds_equal_routing_every_candidate(family, dtype):
    """A round of the beam by the incremental rule (the router run for the parent set and, per
    token, for the sets without one of its selected experts) == every candidate set routed by
    the router's own code. In bf16 the logits tie often (8 bits of mantissa): tied tokens are
    routed in full, so the rule still matches to the rounding of a weight."""
    model = tiny_model(family).to(dtype)
    view = moe_view(model)
    layer = view.layers[-1]
    cache = LayerCache(layer, per_batch=10_000, seed=0)
    run_calibration(model, tokens(8, 32), [cache], batch_size=2, view=view, progress=False)
    errors = cache.errors()
    E, effect = layer.num_experts, layer.removal_effect
    g = torch.Generator().manual_seed(0)
    checked = 0
    for m in (E, E - 1, E - 2, 4, 3):
        parent = torch.randperm(E, generator=g)[:m].sort().values
        fast = errors.removals(parent, effect)
        if fast is None:  # sets that may route in groups: every candidate is routed (DeepSeek, GLM)
            assert errors.routers._groups(m) > 1 or errors.routers._groups(m - 1) > 1
            continue
        ref = errors(_removal_sets(parent))
        assert fast == pytest.approx(ref, rel=1e-4 if dtype == torch.bfloat16 else 1e-6, abs=1e-9 * float(ref.max()))
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
@torch.no_grad()
def test_tied_tokens_in_a_fixed_room_or_counted_give_the_same_round(family, monkeypatch):
    """A round routes its tied tokens in a room of fixed size, so that nothing waits for their
    count: the same errors and tie counts as routing them in as many rows as they are, and a
    round whose tied tokens overflow the room is computed again with the count read."""
    import moecompress.prune.naee as naee

    model = tiny_model(family, num_experts=32, num_experts_per_tok=4).to(torch.bfloat16)  # bf16 logits: ties
    view = moe_view(model)
    layer = view.layers[-1]
    cache = LayerCache(layer, per_batch=10_000, seed=0)
    run_calibration(model, tokens(8, 32), [cache], batch_size=2, view=view, progress=False)
    E, effect = layer.num_experts, layer.removal_effect
    parents = [torch.arange(E)] + [torch.randperm(E, generator=torch.Generator().manual_seed(s))[:E - 2].sort().values
                                   for s in range(3)]

    def rounds():
        errors = cache.errors()
        got = [errors.removals(p, effect) for p in parents]
        return got, errors.tied_tokens, errors.round_tokens

    def counted(self, parent, form, pos_of, t0, t1, ties=None):  # the tied tokens' count read: no room
        return block(self, parent, form, pos_of, t0, t1)

    block = naee.SubsetErrors._removals_block
    roomy, tight = rounds(), None
    monkeypatch.setattr(naee, "_TIED_ROOM", 0.0)
    monkeypatch.setattr(naee, "_TIED_MIN_ROOM", 1)  # every round with 2 tied tokens or more: computed again
    tight = rounds()
    monkeypatch.setattr(naee.SubsetErrors, "_removals_block", counted)
    exact = rounds()
    assert exact[1] >= 2, exact[1:]  # tied tokens: a round with 2 or more overflows the tight room
    for got in (roomy, tight):
        assert got[1:] == exact[1:]
        for a, b in zip(got[0], exact[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
@torch.no_grad()
def test_incremental_rounds_with_a_correction_bias(family, dtype):
    """Ungrouped sigmoid routers with a correction bias (GLM-4.5-Air, Kimi-K2): a token's top-k
    is by sigmoid(z) + b, not by its logits. The tie check ranks by that score, so the rule's
    rounds equal the routed ones with almost no token routed in full (by the logits, 60-78% of
    tokens were)."""
    model = tiny_model(family, n_group=1, topk_group=1, n_routed_experts=16, num_experts_per_tok=4).to(dtype)
    view = moe_view(model)
    layer = view.layers[-1]
    assert layer.router_expert_tensors["e_score_correction_bias"].abs().max() > 0.05
    cache = LayerCache(layer, per_batch=10_000, seed=0)
    run_calibration(model, tokens(8, 32), [cache], batch_size=2, view=view, progress=False)
    errors = cache.errors()
    g = torch.Generator().manual_seed(0)
    for m in (16, 15, 10, 6):
        parent = torch.randperm(16, generator=g)[:m].sort().values
        fast = errors.removals(parent, layer.removal_effect)
        ref = errors(_removal_sets(parent))
        assert fast == pytest.approx(ref, rel=1e-6, abs=1e-9 * float(ref.max()))
    assert errors.tied_tokens <= 0.02 * errors.round_tokens


def test_grouped_layers_use_the_rule_on_rounds_that_route_plainly(monkeypatch):
    """DeepSeek-V3's full set routes in groups, so the scores cannot check the rule: the first
    round whose sets route plainly is routed for every set as well and checks it, and the later
    plain rounds use it. The same kept sets, errors and counts as routing every set."""
    import moecompress.arch.view as view_module
    from moecompress.prune import plan_pruning

    def plan():
        model = tiny_model("deepseek_v3", n_group=4, topk_group=2)  # 8 experts: only the full set routes in groups
        return plan_pruning(model, keep=3, method="naee", tokens=tokens(4, 16), batch_size=2,
                            naee_max_combinations=0)[0]

    ruled = plan()
    assert {r["incremental"] for r in ruled.info["layers"].values()} == {"none"}
    monkeypatch.setattr(view_module.MoELayer, "removal_effect", property(lambda self: None))
    routed = plan()
    assert {r["incremental"] for r in routed.info["layers"].values()} == {None}
    assert ruled.kept == routed.kept
    for li, rec in routed.info["layers"].items():
        assert ruled.info["layers"][li]["relative_error"] == pytest.approx(rec["relative_error"], rel=1e-6)
        assert ruled.info["layers"][li]["evaluated_sets"] == rec["evaluated_sets"]


def test_incremental_rule_is_checked_against_the_router_before_use(monkeypatch):
    """A wrong rule (OLMoE without norm_topk_prob said to leave the weights alone) is caught on
    the widest round, which is scored with the router's own code, and is not used: the kept
    sets are those of routing every candidate set."""
    import moecompress.arch.view as view_module
    from moecompress.prune import plan_pruning

    def plan():
        model = tiny_model("olmoe")
        model.config.norm_topk_prob = False
        for layer in moe_view(model):
            layer.router.norm_topk_prob = False
        return plan_pruning(model, keep=3, method="naee", tokens=tokens(4, 16), batch_size=2,
                            naee_max_combinations=0)[0]

    right = plan()
    assert {r["incremental"] for r in right.info["layers"].values()} == {"softmax"}
    monkeypatch.setattr(view_module.MoELayer, "removal_effect", property(lambda self: "none"))
    wrong = plan()
    assert {r["incremental"] for r in wrong.info["layers"].values()} == {None}
    monkeypatch.setattr(view_module.MoELayer, "removal_effect", property(lambda self: None))
    routed = plan()
    assert wrong.kept == routed.kept == right.kept
    for li, rec in routed.info["layers"].items():
        assert right.info["layers"][li]["relative_error"] == pytest.approx(rec["relative_error"], rel=1e-6)
        assert right.info["layers"][li]["evaluated_sets"] == rec["evaluated_sets"]


def test_search_by_removals_equals_search_by_sets():
    """The beam fed whole rounds (each parent without each expert) picks what it picks when fed
    the candidate sets, beam > 1 included (a set reached from two parents counted once)."""
    import itertools

    def pairwise(s):
        return sum(abs(a - b) % 3 for a, b in itertools.combinations(s, 2)) + (0 if 7 in s else 5) + 0.01 * sum(s)

    class BySets:
        def __init__(self):
            self.evaluated = 0

        def __call__(self, sets):
            self.evaluated += sets.shape[0]
            return torch.tensor([pairwise(s) for s in sets.tolist()], dtype=torch.float64)

    class ByRemovals(BySets):
        def removals(self, parents):
            return torch.stack([self.__call__(_removal_sets(p)) for p in parents]).reshape(parents.shape)

        def __call__(self, sets):  # the rounds' own calls are not counted
            return torch.tensor([pairwise(s) for s in sets.tolist()], dtype=torch.float64)

        def note_evaluated(self, n):
            self.evaluated += n

    for beam in (1, 2, 3):
        a, b = BySets(), ByRemovals()
        assert search(a, 9, 3, {4}, max_combinations=0, beam=beam) == search(b, 9, 3, {4}, max_combinations=0, beam=beam)
        assert a.evaluated == b.evaluated
