"""The calibration runner's two schedules: batch by batch and layer by layer (streamed models)."""

import math

import pytest
import torch

from moecompress.arch import moe_view
from moecompress.capture import run_calibration
from moecompress.onload import is_streamed
from moecompress.checkpoint import load_model
from moecompress.stats import collect_stats
from moecompress.testing import tiny_model, tokens

N, S, BATCH = 5, 24, 2  # three batches, the last one short


class _Record:
    """Keeps every (layer, batch) an observer sees."""

    def __init__(self):
        self.seen: dict[int, list] = {}

    def observe(self, layer, x, routing, y):
        self.seen.setdefault(layer.layer_idx, []).append(
            (x.clone(), routing.topk_idx.clone(), routing.topk_weight.clone(), y.clone()))


def _observed(model, toks, **kw):
    rec = _Record()
    run_calibration(model, toks, [rec], batch_size=BATCH, progress=False, **kw)
    return rec.seen


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for li in a:
        assert len(a[li]) == len(b[li]) == math.ceil(N / BATCH)
        for ta, tb in zip(a[li], b[li]):
            for u, v in zip(ta, tb):
                assert torch.equal(u, v), li


def test_layer_by_layer_equals_batch_by_batch(family):
    """Every family (sliding-window masks per layer, dense first layers, MLA...): recording the
    decoder layers' inputs and running them one layer at a time gives every observer exactly
    the tensors of the batch-by-batch forward, and the same statistics bit for bit."""
    model = tiny_model(family)
    toks = tokens(N, S)
    _assert_same(_observed(model, toks, layer_by_layer=True), _observed(model, toks, layer_by_layer=False))
    assert all(type(m).__name__ != "_RecordInputs" for m in model.modules())  # the layers are back


def test_stop_after_ends_both_schedules_at_the_same_layer():
    model = tiny_model("qwen3_moe", num_hidden_layers=4)
    view = moe_view(model)
    stop = view.moe_layer_indices[1]
    toks = tokens(N, S)
    a = _observed(model, toks, layer_by_layer=True, stop_after=stop)
    b = _observed(model, toks, layer_by_layer=False, stop_after=stop)
    assert sorted(a) == [li for li in view.moe_layer_indices if li <= stop]
    _assert_same(a, b)


def _count_onloads(view) -> dict[int, int]:
    """layer index -> how many times its offloaded experts module is onloaded, from now on."""
    onloads = {}
    for layer in view:
        hook = layer.experts._hf_hook
        original = hook.pre_forward

        def counting(module, *args, _li=layer.layer_idx, _orig=original, **kwargs):
            onloads[_li] = onloads.get(_li, 0) + 1
            return _orig(module, *args, **kwargs)

        hook.pre_forward = counting
    return onloads


def test_streamed_model_runs_layer_by_layer_and_onloads_each_layer_once(tmp_path):
    """A streamed model (disk offload) runs layer by layer by default: each offloaded experts
    module is onloaded once per calibration run, not once per batch, and the observers see
    the in-memory tensors exactly."""
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "src")
    toks = tokens(N, S)
    in_memory = load_model(tmp_path / "src", dtype="float32")
    streamed = load_model(tmp_path / "src", dtype="float32", max_cpu_memory="30KB", offload_folder=tmp_path / "off")
    assert is_streamed(streamed) and not is_streamed(in_memory)
    view = moe_view(streamed)
    onloads = _count_onloads(view)
    got = _observed(streamed, toks)
    assert onloads == {li: 1 for li in view.moe_layer_indices}
    _assert_same(got, _observed(in_memory, toks))
    onloads.clear()
    _observed(streamed, toks, layer_by_layer=False)  # the other schedule: once per batch at least
    assert all(v >= math.ceil(N / BATCH) for v in onloads.values())
    mem = collect_stats(in_memory, toks, batch_size=BATCH, segment_len=8, progress=False)
    st = collect_stats(streamed, toks, batch_size=BATCH, segment_len=8, progress=False)
    for key, t in mem.tensors.items():
        assert torch.equal(st.tensors[key], t), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_hidden_states_kept_on_the_gpu_give_the_bytes_of_the_cpu_store(monkeypatch):
    """A cursor of a model in GPU memory keeps the hidden states there (capture._activation_store);
    the repair (the cursor's heaviest user: three passes per layer) gives the same weights as
    with the hidden states waiting in CPU memory."""
    import copy

    from moecompress import capture
    from moecompress.refit import swap_in_copies
    from moecompress.repair import repair

    base = tiny_model("qwen3_moe").cuda()
    toks = tokens(4, 16)

    def repaired(share):
        monkeypatch.setattr(capture, "ACTIVATIONS_DEVICE_SHARE", share)
        model = copy.deepcopy(base)
        originals = swap_in_copies(model)
        view = moe_view(model)
        view.keep_experts({layer.layer_idx: [0, 2, 3, 5] for layer in view})
        cursor = capture.LayerCursor(model, toks, batch_size=2)
        assert cursor.store.type == ("cuda" if share == 1 else "cpu")
        repair(model, originals, toks, mode="refit", batch_size=2, progress=False)
        return model.state_dict()

    on_gpu, on_cpu = repaired(1), repaired(10**30)
    for k in on_gpu:
        assert torch.equal(on_gpu[k], on_cpu[k]), k


def test_streamed_naee_brings_each_layer_over_once_and_chooses_as_in_memory(tmp_path):
    """NAEE edits layer by layer with ``LayerCursor.editing(hold=True)``: a streamed layer is
    onloaded once for its observed run, the search and its pruned run (twice before), and the
    kept sets and scores are those of the model in memory."""
    from moecompress.prune.api import plan_experts

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "src")
    toks = tokens(N, S)
    in_memory = load_model(tmp_path / "src", dtype="float32")
    streamed = load_model(tmp_path / "src", dtype="float32", max_cpu_memory="30KB", offload_folder=tmp_path / "off")
    assert is_streamed(streamed)
    view = moe_view(streamed)
    onloads = _count_onloads(view)
    got = plan_experts(streamed, keep=4, method="naee", tokens=toks, batch_size=BATCH)
    want = plan_experts(in_memory, keep=4, method="naee", tokens=toks, batch_size=BATCH)
    assert onloads == {li: 1 for li in view.moe_layer_indices}
    assert got.kept == want.kept
    for li in want.scores:
        torch.testing.assert_close(torch.tensor(got.scores[li]), torch.tensor(want.scores[li]), rtol=1e-5, atol=1e-9)
    assert all(p.device.type == "meta" for layer in view for p in layer.experts.parameters())  # let go after


def test_editing_keeps_only_the_edited_runs_outputs(monkeypatch):
    """``LayerCursor.editing`` runs a layer observed, lets the block edit it, then runs it again:
    only the second run's outputs are stored (a streamed cursor copies each to CPU memory), and
    they are what a plain advance of the edited layer gives. A cursor whose outputs were just
    discarded refuses to advance or to give its state until one is restored."""
    from moecompress import capture

    def tensors(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return 1
        if isinstance(obj, (tuple, list)):
            return sum(tensors(o) for o in obj)
        return sum(tensors(o) for o in obj.values()) if isinstance(obj, dict) else 0

    model = tiny_model("qwen3_moe")
    view = moe_view(model)
    moves = []
    real = capture.moved
    monkeypatch.setattr(capture, "moved", lambda t, d: moves.append(t) or real(t, d))
    cursor = capture.LayerCursor(model, tokens(N, S), batch_size=BATCH, view=view)
    before = cursor.state()
    # per batch, the observed run moves its inputs and arguments to the device, and nothing back
    inputs = sum(1 + tensors(args) for args in cursor.args[0])
    moves.clear()
    with cursor.editing(0, [_Record()]):
        assert len(moves) == inputs
        with pytest.raises(RuntimeError, match="restore a state"):
            cursor.advance(1)
        with pytest.raises(RuntimeError, match="restore a state"):
            cursor.state()
        with torch.no_grad():
            view[0].down_proj.mul_(0.5)
        moves.clear()
    assert len(moves) == inputs + len(cursor.hidden)  # the edited run: and its outputs into the store
    got = list(cursor.hidden)
    cursor.restore(before)
    cursor.advance(0)
    for a, b in zip(got, cursor.hidden):
        assert torch.equal(a, b)


@pytest.mark.parametrize("own_folder", [True, False])
def test_a_streamed_load_is_refused_when_the_offload_cannot_fit(tmp_path, monkeypatch, own_folder):
    """The weights beyond the memory caps go to the offload folder: a disk too small for them is
    found before loading (one line naming the remedy), and a folder of our own is removed."""
    import shutil
    import tempfile
    from collections import namedtuple

    from moecompress.checkpoint import offloaded_bytes
    from moecompress.errors import MoECompressError

    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "src")
    weights = sum(p.numel() for p in model.parameters()) * 4
    assert offloaded_bytes(model.config, torch.float32, {"cpu": 30_000}) == weights - 30_000
    assert offloaded_bytes(model.config, torch.float32, {"cpu": 2 * weights}) == 0
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    # (measured where the folder will be: a folder given need not exist yet)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path) and usage(1 << 40, 1 << 40, weights // 4))
    mine = tmp_path / "mine"
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: str(mine.mkdir() or mine))
    folder = None if own_folder else tmp_path / "off"
    with pytest.raises(MoECompressError, match=r"offloading the weights beyond the memory caps needs about .* raise "
                                               r"--max-cpu-memory"):
        load_model(tmp_path / "src", dtype="float32", max_cpu_memory="30KB", offload_folder=folder)
    assert not mine.exists()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 0, 1 << 40))
    assert is_streamed(load_model(tmp_path / "src", dtype="float32", max_cpu_memory="30KB", offload_folder=folder))
