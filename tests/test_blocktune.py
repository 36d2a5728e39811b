"""Block-wise tuning after the closed-form repair (``--repair refit+tune``, moecompress/blocktune.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from moecompress.arch import moe_view
from moecompress.blocktune import TunePairs, trainable_parameters, tune_layer
from moecompress.capture import LayerCursor
from moecompress.prune import prune_checkpoint
from moecompress.refit import JointRefitObserver, RefitObserver, block_output, swap_in_copies
from moecompress.repair import OriginalStream, repair
from moecompress.testing import pruned_with_originals, saved_tensors, tiny_model, tokens

KEPT = [0, 2, 3, 5]




@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "llama4_text", "gpt_oss"])
def test_tuning_an_unpruned_model_is_the_identity(family):
    """Nothing removed: the pairs' targets are the layer's own outputs, the closed form's held-out
    loss is exactly 0, no epoch beats it, and every byte stays."""
    model = tiny_model(family)
    originals = swap_in_copies(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = repair(model, originals, tokens(8, 16), mode="refit+tune", batch_size=2, progress=False,
                    tune_epochs=2, tune_lr=1e-2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), (family, k)
    for entry in record["layers"].values():
        assert entry["tune"]["heldout_loss"][0] == 0 and entry["tune"]["kept_epoch"] == 0


@pytest.mark.parametrize("target,weight", [("both", 0.5), ("stream", 1.0), ("layer", 0.0)])
def test_pairs_target_is_the_repairs_objective(target, weight):
    """y* = w (y + h_orig - h) + (1 - w) y_orig(x) of the first MoE layer, with h_orig and h the
    original and the pruned model's hidden states after that decoder layer from the two whole
    models' own output_hidden_states, y and y_orig the pruned and original blocks on x."""
    original = tiny_model("qwen3_moe")
    model, originals = pruned_with_originals("qwen3_moe", KEPT)
    toks = tokens(4, 12)
    view = moe_view(model)
    layer = view.layers[0]
    li = layer.layer_idx
    cursor = LayerCursor(model, toks, batch_size=2, view=view)
    stream = OriginalStream(model, view, originals, toks, batch_size=2, until=li) if weight else None
    pairs = TunePairs(torch.device("cpu"))
    fit = JointRefitObserver({li: originals[li]}, {li: stream.after(li)} if stream else None, weight, pairs)
    cursor.advance(li, [fit])
    with torch.no_grad():
        h_orig = original(input_ids=toks, output_hidden_states=True).hidden_states[li + 1].reshape(-1, 32).double()
        h = model(input_ids=toks, output_hidden_states=True).hidden_states[li + 1].reshape(-1, 32).double()
        x = torch.cat(pairs.x).double()
        y = block_output(layer.block, x.float()).double()
        y_orig = block_output(originals[li], x.float()).double()
    want = weight * (y + h_orig - h) + (1 - weight) * y_orig
    assert float((h_orig - h).abs().max()) > 1e-3  # the pruning moved the stream
    torch.testing.assert_close(torch.cat(pairs.target).double(), want, rtol=1e-5, atol=1e-6)


def _layer_and_pairs(family="qwen3_moe", n=8):
    model, originals = pruned_with_originals(family, KEPT)
    toks = tokens(n, 16)
    view = moe_view(model)
    layer = view.layers[0]
    cursor = LayerCursor(model, toks, batch_size=2, view=view)
    pairs = TunePairs(torch.device("cpu"))
    cursor.advance(layer.layer_idx, [RefitObserver({layer.layer_idx: originals[layer.layer_idx]}, pairs=pairs)])
    return layer, pairs


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss", "llama4_text"])
def test_one_epoch_is_one_adam_step_on_the_mean_squared_error(family):
    """Brute force: with every training token in one step, the first epoch moves each tuned tensor
    by Adam's first step, -lr g / (|g| + eps), g the autograd gradient of mean ||f(x) - y*||^2 over
    the training batches (all but the held-out last one); nothing else moves: not the shared
    experts nor their gate (DeepSeek-V3), not the router's bias (gpt-oss)."""
    layer, pairs = _layer_and_pairs(family)
    lr = 1e-4
    ref = copy.deepcopy(layer.block)
    ref_view = type(layer)(layer.model, layer.spec, layer.layer_idx, ref)
    tuned_ref = trainable_parameters(ref_view)
    for p in ref.parameters():
        p.requires_grad_(False)
    for p in tuned_ref.values():
        p.requires_grad_(True)
    held = len(pairs.x) // 8 or 1
    x, t = torch.cat(pairs.x[:-held]), torch.cat(pairs.target[:-held])
    with torch.enable_grad():
        (block_output(ref, x) - t).square().mean().backward()
    before = {n: p.detach().clone() for n, p in layer.block.named_parameters()}
    record = tune_layer(layer, pairs, epochs=1, lr=lr, batch_tokens=10**9)
    assert record["kept_epoch"] == 1 and record["heldout_loss"][1] < record["heldout_loss"][0]
    after = dict(layer.block.named_parameters())
    assert set(tuned_ref) == {n for n in before if not torch.equal(before[n], after[n])}
    assert not any("shared" in n for n in tuned_ref) and any(n.startswith(layer.spec.experts) for n in tuned_ref)
    for name, p in tuned_ref.items():
        g = p.grad.double()
        want = before[name].double() - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(after[name].detach().double(), want, rtol=1e-4, atol=lr * 1e-3)


def test_the_kept_epoch_has_the_least_heldout_loss():
    layer, pairs = _layer_and_pairs(n=16)
    record = tune_layer(layer, pairs, epochs=5, lr=1e-3, batch_tokens=32)
    losses = record["heldout_loss"]
    assert len(losses) == 6 and len(record["train_loss"]) == 5
    assert record["kept_epoch"] == min(range(6), key=losses.__getitem__)
    assert losses[record["kept_epoch"]] < losses[0]
    assert record["train_tokens"] + record["heldout_tokens"] == 16 * 16


def test_a_step_too_large_keeps_the_closed_form():
    """Held-out safeguard: when no epoch beats the closed-form fit on the held-out tokens, the
    layer keeps its weights bit for bit."""
    layer, pairs = _layer_and_pairs(n=16)
    before = {n: p.detach().clone() for n, p in layer.block.named_parameters()}
    record = tune_layer(layer, pairs, epochs=2, lr=10.0, batch_tokens=32)
    assert record["kept_epoch"] == 0 and min(record["heldout_loss"][1:]) > record["heldout_loss"][0]
    assert all(torch.equal(p, before[n]) for n, p in layer.block.named_parameters())


def test_refit_tune_keeps_the_closed_form_where_tuning_does_not_generalise():
    """On a tiny random model with a few hundred tokens the tuning overfits (the held-out loss
    rises from the first epoch): every layer keeps epoch 0, and the model equals the closed-form
    repair's bit for bit; the record says so."""
    toks = tokens(8, 16)
    fitted, originals = pruned_with_originals("deepseek_v3", KEPT)
    repair(fitted, originals, toks, mode="refit", batch_size=2, progress=False)
    tuned, originals2 = pruned_with_originals("deepseek_v3", KEPT)
    record = repair(tuned, originals2, toks, mode="refit+tune", batch_size=2, progress=False, tune_lr=1e-2)
    assert all(e["tune"]["kept_epoch"] == 0 for e in record["layers"].values())
    a, b = fitted.state_dict(), tuned.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert record["tune"]["lr"] == 1e-2 and record["mode"] == "refit+tune"



def test_prune_checkpoint_tunes_deterministically_and_streamed_equals_in_memory(calib_ckpt, tmp_path):
    src, calib = calib_ckpt / "tiny", str(calib_ckpt / "calib.txt")
    kw = dict(keep=4, method="frequency", calib=calib, n=4, seq_len=32, progress=False, repair="refit+tune",
              tune_lr=1e-3, tune_epochs=2)
    prune_checkpoint(src, tmp_path / "a", **kw)
    prune_checkpoint(src, tmp_path / "b", **kw)
    prune_checkpoint(src, tmp_path / "s", max_cpu_memory="40KB", **kw)
    prune_checkpoint(src, tmp_path / "r", **{**kw, "repair": "refit"})
    ta, tb, ts, tr = (saved_tensors(tmp_path / d) for d in "absr")
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k  # same inputs, same bytes
        torch.testing.assert_close(ts[k], ta[k], rtol=1e-2, atol=1e-3)  # bf16: rounding of equal sums
    changed = [k for k in ta if not torch.equal(ta[k], tr[k])]
    assert any(k.endswith("mlp.gate.weight") for k in changed) and any("up_proj" in k for k in changed), changed
    assert all(".mlp.experts." in k or k.endswith("mlp.gate.weight") for k in changed), changed
    record = json.loads((tmp_path / "a" / "moecompress.json").read_text())
    assert record["parameters"]["repair"] == "refit+tune" and record["parameters"]["tune_epochs"] == 2
    assert record["info"]["repair"]["tune"]["lr"] == 1e-3
    assert all(e["tune"]["kept_epoch"] == 2 for e in record["info"]["repair"]["layers"].values())
    png = [(tmp_path / d / "repair_tuning.png").read_bytes() for d in "ab"]
    assert png[0][:8] == b"\x89PNG\r\n\x1a\n" and png[0] == png[1]  # a picture of the tuning, deterministic


def test_cli_tune_options(calib_ckpt, tmp_path):
    from moecompress.testing import invoke_cli

    src, calib = calib_ckpt / "tiny", str(calib_ckpt / "calib.txt")
    r = invoke_cli("prune", str(src), "-o", str(tmp_path / "o"), "--keep", "4", "--method", "frequency",
                   "--calib", calib, "-n", "4", "--seq-len", "32", "--repair", "refit+tune", "--tune-epochs", "1",
                   "--tune-lr", "0.002")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "o" / "moecompress.json").read_text())["info"]["repair"]
    assert rep["mode"] == "refit+tune" and rep["tune"]["epochs"] == 1 and rep["tune"]["lr"] == 0.002
    assert all(len(e["tune"]["heldout_loss"]) == 2 for e in rep["layers"].values())
    r = invoke_cli("prune", str(src), "-o", str(tmp_path / "p"), "--keep", "4", "--calib", calib,
                   "--repair", "refit+tune", "--tune-epochs", "0")
    assert r.exit_code == 2 and not (tmp_path / "p").exists()
