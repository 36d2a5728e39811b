"""The MoE view: per-family equivalence of the canonical view, expert slicing and reload."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompress.arch import moe_view
from moecompress.checkpoint import output_folder, save_model
from moecompress.testing import tiny_model, tokens


def _capture_moe_io(model, view, x):
    caps = {}
    hooks = [
        layer.block.register_forward_hook(
            lambda mod, inp, out, i=layer.layer_idx: caps.__setitem__(i, (inp[0], out[0] if isinstance(out, tuple) else out))
        )
        for layer in view
    ]
    with torch.no_grad():
        logits = model(x).logits
    for h in hooks:
        h.remove()
    return logits, caps


def test_per_expert_path_equals_fused_block(family):
    """route() + expert_forward() per expert reproduces the model's fused MoE block."""
    model = tiny_model(family)
    view = moe_view(model)
    _, caps = _capture_moe_io(model, view, tokens())
    for layer in view:
        xin, yout = caps[layer.layer_idx]
        x = xin.reshape(-1, xin.shape[-1])
        with torch.no_grad():
            y = layer.routed_forward(x)
            shared = layer.shared_forward(x)
        if shared is not None:
            y = y + shared
        torch.testing.assert_close(y, yout.reshape(-1, yout.shape[-1]), atol=1e-6, rtol=1e-5)


def test_canonical_views_alias_fused_storage(family):
    view = moe_view(tiny_model(family))
    layer = view[0]
    E, I, H = layer.num_experts, layer.intermediate_size, layer.hidden_size
    assert layer.gate_proj.shape == (E, I, H) and layer.up_proj.shape == (E, I, H) and layer.down_proj.shape == (E, H, I)
    g, u, d = torch.randn(I, H), torch.randn(I, H), torch.randn(H, I)
    layer.set_expert(3, g, u, d)
    assert torch.equal(layer.gate_proj[3], g) and torch.equal(layer.up_proj[3], u) and torch.equal(layer.down_proj[3], d)
    x = torch.randn(5, H)
    ref = torch.nn.functional.linear(layer._act(x @ g.T, x @ u.T) if layer.expert_biases[0] is None else
                                     layer._act(x @ g.T + layer.expert_biases[0][3], x @ u.T + layer.expert_biases[1][3]), d)
    if layer.expert_biases[2] is not None:
        ref = ref + layer.expert_biases[2][3]
    torch.testing.assert_close(layer.expert_forward(3, x), ref)


def test_keep_all_experts_roundtrip_is_identity(family, tmp_path):
    model = tiny_model(family)
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
    view = moe_view(model)
    view.keep_experts({layer.layer_idx: list(range(layer.num_experts)) for layer in view})
    with output_folder(tmp_path / "out") as tmp:
        save_model(model, tmp, record={"stage": "test"})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, ref, atol=1e-5, rtol=0)


def test_keep_half_reload_equals_in_memory_slicing(family, tmp_path):
    model = tiny_model(family)
    view = moe_view(model)
    E, k = view.num_experts, view.top_k
    keep = {layer.layer_idx: sorted(torch.randperm(E, generator=torch.Generator().manual_seed(layer.layer_idx))[: E // 2].tolist())
            for layer in view}
    view.keep_experts(keep)
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
    with output_folder(tmp_path / "half") as tmp:
        save_model(model, tmp)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "half", dtype=torch.float32).eval()
    rview = moe_view(reloaded)
    assert rview.num_experts == E // 2 and all(layer.num_experts == E // 2 for layer in rview)
    assert rview.top_k == min(k, E // 2)
    assert getattr(reloaded.config, view.spec.num_experts_field) == E // 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, ref, atol=1e-5, rtol=0)


def test_keep_experts_equals_masking_router(family):
    """Slicing experts routes exactly like the full model with removed experts' logits at -inf
    (checked on the router decision of one layer; grouped routing is kept valid)."""
    model = tiny_model(family)
    view = moe_view(model)
    layer = view[-1]
    E = layer.num_experts
    keep = list(range(0, E, 2)) + [1, 3]  # 6 of 8 experts: divisible by two groups
    keep = sorted(keep)
    x = torch.randn(40, layer.hidden_size)
    with torch.no_grad():
        full = layer.route(x)
    view.keep_experts({l.layer_idx: keep for l in view})
    with torch.no_grad():
        pruned = layer.route(x)
    kept_logits = full.logits[:, keep]
    torch.testing.assert_close(pruned.logits, kept_logits)
    if view.spec.scoring == "softmax" and view.spec.router_expert_tensors == () and view.spec.group_fields is None \
            and view.spec.model_types[0] not in ("phimoe", "granitemoe", "gpt_oss"):
        masked = full.logits.masked_fill(~torch.isin(torch.arange(E), torch.tensor(keep)), float("-inf"))
        idx = masked.topk(layer.top_k, dim=-1).indices
        mapped = torch.tensor(keep)[pruned.topk_idx]
        assert torch.equal(idx.sort(-1).values, mapped.sort(-1).values)


def test_set_top_k_updates_modules_and_config():
    model = tiny_model("qwen3_moe")
    view = moe_view(model)
    view.set_top_k(1)
    assert model.config.num_experts_per_tok == 1
    assert all(layer.route(torch.randn(3, layer.hidden_size)).topk_idx.shape == (3, 1) for layer in view)


def test_keep_neurons_matches_sliced_expert(family):
    model = tiny_model(family)
    view = moe_view(model)
    layer = view[0]
    E, I = layer.num_experts, layer.intermediate_size
    keep = torch.stack([torch.randperm(I, generator=torch.Generator().manual_seed(e))[: I // 2].sort().values for e in range(E)])
    x = torch.randn(7, layer.hidden_size)
    with torch.no_grad():
        h = layer.expert_hidden(2, x)
        mask = torch.zeros(I)
        mask[keep[2]] = 1
        ref = layer.expert_forward(2, x, hidden=h * mask)
        layer.keep_neurons(keep)
        assert layer.intermediate_size == I // 2
        torch.testing.assert_close(layer.expert_forward(2, x), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_non_moe_model_is_refused(model_type):
    from moecompress.arch import family_for_config
    from moecompress.errors import MoECompressError
    from transformers import AutoConfig

    with pytest.raises(MoECompressError, match="supported"):
        family_for_config(AutoConfig.for_model(model_type))


def test_output_folder_gets_umask_permissions(tmp_path):
    import os
    import stat

    with output_folder(tmp_path / "out") as tmp:
        (tmp / "w.bin").write_bytes(b"x")
        os.chmod(tmp / "w.bin", 0o600)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "out" / "w.bin").stat().st_mode) == 0o666 & ~umask
