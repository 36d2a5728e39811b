"""Grouped routing (n_group / topk_group): pruning removes the same number of experts from
every group, so the groups stay meaningful and the pruned checkpoint routes as in memory."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompress.arch import moe_view
from moecompress.prune import prune_experts
from moecompress.testing import tiny_model, tokens

GROUPED = {  # family -> config overrides: 16 experts in 4 groups, top-k from 2 groups
    "deepseek_v3": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4),
    "glm4_moe": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4),
    "deepseek_v2": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4),
}


def _routes(model, x):
    """Every MoE layer's top-k choice and weights on the hidden states of ``x``."""
    view, out = moe_view(model), {}
    hooks = [layer.router.register_forward_hook(
        lambda m, a, o, li=layer.layer_idx: out.__setitem__(li, (o[2].sort(-1).values, o[1].sort(-1).values)))
        for layer in view]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("family", sorted(GROUPED))
@pytest.mark.parametrize("method", ["frequency", "naee", "stun", "random"])
def test_grouped_pruning_keeps_groups_and_reloads_identically(family, method, tmp_path):
    model = tiny_model(family, **GROUPED[family])
    src = tmp_path / "src"
    model.save_pretrained(src)
    x = tokens()
    pruned = tiny_model(family, **GROUPED[family])
    res = prune_experts(pruned, keep=8, method=method, tokens=x)
    for li, kept in res.kept.items():  # two of every group of four
        assert [sum(1 for e in kept if e // 4 == g) for g in range(4)] == [2, 2, 2, 2], (li, kept)
    assert pruned.config.n_group == 4 and pruned.config.topk_group == 2
    from moecompress.surgery import prune_checkpoint_files

    out = tmp_path / "out"
    out.mkdir()
    prune_checkpoint_files(src, out, res.kept)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (reloaded.config.n_group, reloaded.config.topk_group, reloaded.config.n_routed_experts) == (4, 2, 8)
    a, b = _routes(pruned, x), _routes(reloaded, x)
    assert a.keys() == b.keys()
    for li in a:
        assert torch.equal(a[li][0], b[li][0]) and torch.allclose(a[li][1], b[li][1], rtol=0, atol=1e-6), li
    with torch.no_grad():
        assert torch.allclose(pruned(x).logits, reloaded(x).logits, rtol=0, atol=1e-5)


def test_unbalanced_keep_falls_back_to_one_group_and_says_so(tmp_path):
    model = tiny_model("deepseek_v3", **GROUPED["deepseek_v3"])
    res = prune_experts(model, keep=6, method="random")  # 6 is not a multiple of 4 groups
    assert res.info["groups"]["n_group"] == 1 and "config becomes n_group 1, topk_group 1" in res.info["groups"]["note"]
    assert (model.config.n_group, model.config.topk_group) == (1, 1)
    assert moe_view(model).group_note is None  # the view that pruned said it; a fresh one has no history
    view = moe_view(tiny_model("deepseek_v3", **GROUPED["deepseek_v3"]))
    view.keep_experts({li: list(range(6)) for li in view.moe_layer_indices})
    assert view.group_note.startswith("n_group 4 -> 1, topk_group 2 -> 1")


def test_grouped_selection_is_per_group_top():
    from moecompress.prune.scores import select_top

    s = torch.tensor([9., 8, 1, 0, 5, 4, 7, 6])
    assert select_top(s, 4) == [0, 1, 6, 7]
    assert select_top(s, 4, groups=2) == [0, 1, 6, 7]
    assert select_top(s, 4, groups=4) == [0, 2, 4, 6]
    assert select_top(s, 4, protected={3}, groups=2) == [0, 3, 6, 7]


@pytest.mark.parametrize("method", ["m-smoe", "hc-smoe"])
def test_grouped_merging_clusters_within_groups_and_reloads_identically(method, tmp_path):
    from moecompress.merge import merge_checkpoint, merge_experts
    from moecompress.testing import SAMPLE_TEXT, char_tokenizer

    overrides = GROUPED["deepseek_v3"]
    model = tiny_model("deepseek_v3", **overrides)
    src = tmp_path / "src"
    model.save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    res = merge_checkpoint(src, tmp_path / "out", keep=8, method=method, calib=str(tmp_path / "calib.txt"),
                           n=4, seq_len=16)
    for li, clusters in res.clusters.items():
        assert all(len({e // 4 for e in c}) == 1 for c in clusters), (li, clusters)  # no cluster spans groups
        assert [sum(1 for d in res.dominant[li] if d // 4 == g) for g in range(4)] == [2, 2, 2, 2]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert (reloaded.config.n_group, reloaded.config.topk_group, reloaded.config.n_routed_experts) == (4, 2, 8)
    merged = tiny_model("deepseek_v3", **overrides)
    from moecompress.calibration import load_calibration

    tokens = load_calibration(char_tokenizer(), str(tmp_path / "calib.txt"), n=4, seq_len=16)
    merge_experts(merged, keep=8, method=method, tokens=tokens)
    x = tokens[:2]
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, reloaded(x).logits, rtol=0, atol=1e-5)
