"""Expert merging: clustering, alignment, weighted merge, router rule and re-fit, each checked
against a naive reference (loops over tokens / experts), plus checkpoint and CLI behaviour."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch

from moecompress.arch import moe_view
from moecompress.capture import run_calibration
from moecompress.errors import MoECompressError
from moecompress.merge import merge_checkpoint, merge_experts
from moecompress.merge.align import match_neurons
from moecompress.merge.api import METHODS, merged_expert
from moecompress.merge.cluster import dominant_groups, hierarchical_clusters, logit_cosine
from moecompress.merge.combine import ExpertWeights
from moecompress.merge.observe import MergeObserver
from moecompress.refit import block_output
from moecompress.testing import invoke_cli, tiny_model, tokens

LOAD_CANNOT_STREAM = {"llama4_text": "load_model cannot stream Llama-4 yet: its decoder moves input_ids to the "
                                     "embedding weight's device, which is meta once the embedding is offloaded"}


def _logits(model, toks):
    with torch.no_grad():
        return model(toks).logits


class _Recorder:
    """Keeps every MoE layer's (x, routing, y) of a calibration run."""

    def __init__(self):
        self.calls = {}

    def observe(self, layer, x, routing, y):
        self.calls.setdefault(layer.layer_idx, []).append((x.clone(), routing, y.clone()))


# ----- clustering ------------------------------------------------------------------------------
def _naive_agglomerative(x: torch.Tensor, n: int, linkage: str) -> list[list[int]]:
    d = torch.cdist(x.double(), x.double())
    clusters = [[i] for i in range(x.shape[0])]

    def dist(a, b):
        pair = d[a][:, b]
        if linkage == "single":
            return pair.min()
        if linkage == "complete":
            return pair.max()
        if linkage == "average":
            return pair.mean()
        ca, cb = x[a].double().mean(0), x[b].double().mean(0)  # ward: increase of the within-cluster variance
        return (2 * len(a) * len(b) / (len(a) + len(b))) ** 0.5 * (ca - cb).norm()

    while len(clusters) > n:
        i, j = min(itertools.combinations(range(len(clusters)), 2), key=lambda p: float(dist(clusters[p[0]], clusters[p[1]])))
        clusters[i] = sorted(clusters[i] + clusters[j])
        del clusters[j]
    return sorted(clusters, key=lambda c: c[0])


@pytest.mark.parametrize("linkage", ["single", "complete", "average", "ward"])
def test_hierarchical_clusters_match_naive_agglomeration(linkage):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 5, generator=g)
    for n in (1, 3, 7, 12):
        assert hierarchical_clusters(x, n, linkage) == _naive_agglomerative(x, n, linkage), (linkage, n)


def test_hierarchical_clusters_cosine_groups_by_direction():
    base = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    x = torch.cat([base * 1.0, base * 5.0])  # 0/3, 1/4, 2/5 point the same way at different norms
    assert hierarchical_clusters(x, 3, "average", "cosine") == [[0, 3], [1, 4], [2, 5]]


def test_dominant_groups_match_naive_m_smoe_grouping():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(200, 10, generator=g)
    freq = torch.randint(0, 50, (10,), generator=g).double()
    got = dominant_groups(freq, logit_cosine(logits.T.double() @ logits.double()), 4)
    dominant = sorted(range(10), key=lambda e: (-float(freq[e]), e))[:4]
    want = {d: [d] for d in dominant}
    for e in range(10):
        if e not in want:
            sims = {d: float(torch.nn.functional.cosine_similarity(logits[:, e], logits[:, d], dim=0)) for d in dominant}
            want[max(dominant, key=lambda d: sims[d])].append(e)
    assert got == sorted((sorted(v) for v in want.values()), key=lambda c: c[0])


# ----- calibration statistics --------------------------------------------------------------------
def test_merge_observer_matches_per_token_reference():
    model = tiny_model("gpt_oss")  # biases everywhere: the mean output must include the down bias
    toks = tokens(3, 10)
    obs, rec = MergeObserver(), _Recorder()
    run_calibration(model, toks, [obs, rec], batch_size=2, progress=False)
    for layer in moe_view(model):
        li, E = layer.layer_idx, layer.num_experts
        xs = torch.cat([x for x, _, _ in rec.calls[li]])
        count = torch.zeros(E, dtype=torch.float64)
        gram = torch.zeros(E, E, dtype=torch.float64)
        out = torch.zeros(E, layer.hidden_size, dtype=torch.float64)
        for t in range(xs.shape[0]):
            r = layer.route(xs[t:t + 1])
            for e in r.topk_idx[0].tolist():
                count[e] += 1
            gram += r.logits.double().T @ r.logits.double()
            for e in range(E):
                out[e] += layer.expert_forward(e, xs[t:t + 1]).double()[0]
        assert torch.equal(obs.count[li], count)
        torch.testing.assert_close(obs.logit_gram[li], gram, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(obs.mean_outputs(li), out / xs.shape[0], rtol=1e-4, atol=1e-6)


# ----- alignment and weighted merge ---------------------------------------------------------------
def _random_expert(I=12, H=8, seed=0, bias=True) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return ExpertWeights(r(I, H), r(I, H), r(H, I), r(I) if bias else None, r(I) if bias else None, r(H) if bias else None)


def test_permutation_alignment_recovers_a_permuted_copy_exactly():
    ref = _random_expert()
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    copy_ = ref.permuted(perm)
    aligned = copy_.permuted(match_neurons(ref, copy_))
    for a, b in zip(aligned.tensors(), ref.tensors()):
        assert torch.equal(a, b)
    x = torch.randn(5, 8)  # and the permuted copy is the same function
    f = lambda w: (torch.nn.functional.silu(x @ w.gate.T + w.gate_bias) * (x @ w.up.T + w.up_bias)) @ w.down.T  # noqa: E731
    torch.testing.assert_close(f(copy_), f(ref))


def test_member_permutations_solved_concurrently_equal_the_serial_ones(monkeypatch):
    """The alignments of a layer's members are solved on several threads; each equals the
    serial match_neurons of the member to its cluster's dominant expert."""
    from moecompress.merge.align import member_permutations

    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    layer = moe_view(tiny_model("mixtral"))[0]
    clusters, dominant = [[0, 3, 4], [1], [2, 5, 6, 7]], [3, 1, 6]
    got = member_permutations(layer, clusters, dominant)
    assert sorted(got) == [0, 2, 4, 5, 7]  # every non-dominant member, no one else
    for members, dom in zip(clusters, dominant):
        for e in members:
            if e != dom:
                want = match_neurons(ExpertWeights.read(layer, dom), ExpertWeights.read(layer, e))
                assert torch.equal(got[e], want), e


def test_m_smoe_merges_a_permuted_copy_into_the_original_and_plain_averaging_does_not():
    model = tiny_model("mixtral")
    layer = moe_view(model)[0]
    ref = ExpertWeights.read(layer, 2)
    ref.permuted(torch.randperm(layer.intermediate_size, generator=torch.Generator().manual_seed(0))).write(layer, 5)
    freq = torch.arange(1.0, 9.0)
    aligned, _ = merged_expert(layer, [2, 5], 5, freq, METHODS["m-smoe"])  # 5 dominates: its neuron order
    for a, b in zip(aligned.tensors(), ExpertWeights.read(layer, 5).tensors()):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    plain, _ = merged_expert(layer, [2, 5], 5, freq, METHODS["hc-smoe"])
    assert not torch.allclose(plain.gate, layer.gate_proj[5], atol=1e-3)


@pytest.mark.parametrize("method", ["hc-smoe", "average"])
def test_merge_is_the_frequency_weighted_or_uniform_average(method):
    model = tiny_model("gpt_oss")
    layer = moe_view(model)[1]
    members, freq = [0, 3, 6], torch.tensor([4.0, 0, 0, 1.0, 0, 0, 3.0, 0])
    got, w = merged_expert(layer, members, 0, freq, METHODS[method])
    want_w = [0.5, 0.125, 0.375] if method == "hc-smoe" else [1 / 3] * 3
    assert w.tolist() == pytest.approx(want_w)
    experts = [ExpertWeights.read(layer, e) for e in members]
    for i, name in enumerate(("gate", "up", "down", "gate_bias", "up_bias", "down_bias")):
        want = sum(wi * getattr(x, name) for wi, x in zip(want_w, experts))
        torch.testing.assert_close(got.tensors()[i], want, rtol=1e-6, atol=1e-6, msg=name)


# ----- whole-model behaviour ---------------------------------------------------------------------------
@pytest.mark.parametrize("family, method", [("qwen3_moe", "m-smoe"), ("qwen3_moe", "hc-smoe"), ("qwen3_moe", "average"),
                                            ("mixtral", "m-smoe")])  # families whose top-k weights sum to 1
def test_merging_identical_experts_changes_no_output(family, method):
    model = tiny_model(family)
    for layer in moe_view(model):
        w = ExpertWeights.read(layer, 0)
        for e in range(1, layer.num_experts):
            w.write(layer, e)
    toks = tokens(2, 12)
    before = _logits(model, toks)
    result = merge_experts(model, keep=3, method=method, tokens=tokens(3, 16, seed=1), progress=False)
    assert all(len(g) == 3 for g in result.clusters.values())
    torch.testing.assert_close(_logits(model, toks), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", ["dominant", "weighted"])
def test_router_rule(rule):
    model = tiny_model("deepseek_v3")  # router rows plus a per-expert e_score_correction_bias
    original = copy.deepcopy(model)
    toks = tokens(4, 16)
    obs = MergeObserver(outputs=False, logits=False)
    run_calibration(original, toks, [obs], progress=False)
    result = merge_experts(model, keep=3, method="m-smoe", tokens=toks, router=rule, refit=False, progress=False)
    for layer, orig in zip(moe_view(model), moe_view(original)):
        li = layer.layer_idx
        rows, bias = orig.router_weight.detach(), orig.router_expert_tensors["e_score_correction_bias"]
        for j, (members, dom) in enumerate(zip(result.clusters[li], result.dominant[li])):
            freq = obs.count[li][members]
            assert dom == members[int(torch.argmax(freq))]  # the most frequent member (lowest index on ties)
            if rule == "dominant":
                want_row, want_bias = rows[dom], bias[dom]
            else:
                w = (freq / freq.sum()).float() if freq.sum() > 0 else torch.full((len(members),), 1 / len(members))
                want_row, want_bias = (w[:, None] * rows[members]).sum(0), (w * bias[members]).sum()
            torch.testing.assert_close(layer.router_weight[j], want_row, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(layer.router_expert_tensors["e_score_correction_bias"][j], want_bias)
        assert layer.num_experts == 3 and model.config.n_routed_experts == 3


def test_refit_equals_naive_per_token_least_squares():
    """The re-fit of the first MoE layer (its input is the same before and after merging) equals
    the ridge solution built token by token: rows a*h(x) of each merged expert, target its share
    of the residual between the original and the merged layer."""
    ridge = 0.05
    original = tiny_model("qwen3_moe")
    toks = tokens(6, 24)
    clusters = {1: [[0, 1, 2], [3], [4, 5], [6, 7]], 2: [[0, 7], [1, 2], [3, 4], [5, 6]]}
    plain = tiny_model("qwen3_moe")
    merge_experts(plain, keep=4, tokens=toks, clusters=clusters, refit=False, progress=False)
    fitted = tiny_model("qwen3_moe")
    merge_experts(fitted, keep=4, tokens=toks, clusters=clusters, refit=True, ridge=ridge, progress=False)

    rec = _Recorder()
    run_calibration(plain, toks, [rec], progress=False)
    layer = moe_view(plain).layer(1)
    orig_block = moe_view(original).layer(1).block
    rows = {c: ([], []) for c in range(4)}
    torch.set_grad_enabled(False)
    for x, _, y in rec.calls[1]:
        y_orig = block_output(orig_block, x)
        for t in range(x.shape[0]):
            r = layer.route(x[t:t + 1])
            w = r.topk_weight[0]
            for c, a in zip(r.topk_idx[0].tolist(), w.tolist()):
                rows[c][0].append(a * layer.expert_hidden(c, x[t:t + 1])[0].double())
                rows[c][1].append((y_orig[t] - y[t]).double() * a / float(w.sum()))
    for c in range(4):
        F, S = torch.stack(rows[c][0]), torch.stack(rows[c][1])
        g = F.T @ F
        lam = ridge * float(g.diagonal().mean()) + 1e-12
        delta = torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=g.dtype), F.T @ S)
        want = layer.down_proj[c].double() + delta.T
        torch.testing.assert_close(moe_view(fitted).layer(1).down_proj[c].double(), want, rtol=1e-4, atol=1e-5)
    torch.set_grad_enabled(True)
    # the re-fit touches only the down projections
    for a, b in ((moe_view(fitted).layer(2), moe_view(plain).layer(2)),):
        assert torch.equal(a.gate_proj, b.gate_proj) and torch.equal(a.router_weight, b.router_weight)


def test_refit_lowers_the_first_layer_error_for_every_family(family):
    toks = tokens(4, 16)
    original = tiny_model(family)
    first = moe_view(original)[0].layer_idx
    rec = _Recorder()
    run_calibration(original, toks, [rec], progress=False)
    errors = {}
    for refit in (False, True):
        model = tiny_model(family)
        merge_experts(model, keep=4, tokens=toks, refit=refit, progress=False)
        block = moe_view(model).layer(first).block
        with torch.no_grad():
            errors[refit] = sum(float((block_output(block, x) - y).square().sum()) for x, _, y in rec.calls[first])
    assert errors[True] < errors[False], (family, errors)


def test_stats_file_supplies_the_frequencies(tmp_path):
    from moecompress.stats import collect_stats

    toks = tokens(4, 16)
    stats = collect_stats(tiny_model("qwen3_moe"), tokens(5, 16, seed=7), progress=False)
    for li in stats.layers:  # make expert 7 the most frequent everywhere
        c = stats.get(li, "count").clone()
        c[7] = c.max() + 100
        stats.set(li, "count", c)
    result = merge_experts(tiny_model("qwen3_moe"), keep=2, tokens=toks, stats=stats, refit=False, progress=False)
    assert all(7 in d for d in result.dominant.values())
    bad = collect_stats(tiny_model("qwen3_moe", num_experts=6), toks, progress=False)
    with pytest.raises(MoECompressError, match="6 experts"):
        merge_experts(tiny_model("qwen3_moe"), keep=2, tokens=toks, stats=bad, progress=False)


def test_bad_options_raise_user_errors():
    model, toks = tiny_model("qwen3_moe"), tokens(2, 8)
    for kwargs, msg in ((dict(keep=8), "--keep"), (dict(keep=0), "--keep"), (dict(keep=4, method="x"), "method"),
                        (dict(keep=4, linkage="x"), "linkage"), (dict(keep=4, router="x"), "router"),
                        (dict(keep=4, linkage="ward", metric="cosine"), "ward"),
                        (dict(keep=4, clusters={1: [[0, 1]], 2: [[0]]}), "partition")):
        with pytest.raises(MoECompressError, match=msg):
            merge_experts(model, tokens=toks, progress=False, **kwargs)


# ----- checkpoint and CLI ------------------------------------------------------------------------------


def test_cli_merges_deterministically_and_output_reloads(calib_ckpt, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from moecompress.commands._common import console

    monkeypatch.setattr(console, "width", 80)  # COLUMNS=80: the table's numbers are shown in full

    common = (calib_ckpt / "tiny", "--keep", 3, "--calib", calib_ckpt / "calib.txt", "-n", 4, "--seq-len", 32, "--batch-size", 2)
    r1 = invoke_cli("merge", *common, "-o", tmp_path / "a", "--json", tmp_path / "a.json")
    assert r1.exit_code == 0, r1.output
    assert "m-smoe, 8 -> 3 experts" in r1.output
    r2 = invoke_cli("merge", *common, "-o", tmp_path / "b")
    assert r2.exit_code == 0, r2.output
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert {"model.safetensors", "moecompress.json", "tokenizer.json", "config.json"} <= set(files)
    for name in files:  # same inputs and seed: same bytes
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    record = json.loads((tmp_path / "a" / "moecompress.json").read_text())
    result = json.loads((tmp_path / "a.json").read_text())
    assert "…" not in r1.output and max(map(len, r1.output.splitlines())) <= 80
    for err in result["merge_error"].values():
        assert err is None or f" {err:.3f} " in r1.output
    assert record["stage"] == "merge" and record["method"] == "m-smoe" and record["parameters"]["keep"] == 3
    assert record["clusters"] == result["clusters"] and set(record["clusters"]) == {"1", "2"}
    for li, groups in record["clusters"].items():
        assert sorted(e for g in groups for e in g) == list(range(8))
        assert [d in g for d, g in zip(record["dominant_experts"][li], groups)] == [True] * 3

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert loaded.config.num_local_experts == 3 and loaded.config.num_experts_per_tok == 2
    # the saved checkpoint is exactly what the library computes on a loaded model
    from transformers import AutoTokenizer

    from moecompress.calibration import load_calibration

    toks = load_calibration(AutoTokenizer.from_pretrained(calib_ckpt / "tiny"), calib_ckpt / "calib.txt", n=4, seq_len=32)
    model = tiny_model("qwen3_moe")
    merge_experts(model, keep=3, tokens=toks, batch_size=2, progress=False)
    probe = tokens(1, 9)
    torch.testing.assert_close(_logits(loaded, probe), _logits(model, probe))


def test_merge_checkpoint_hc_smoe_without_refit(calib_ckpt, tmp_path):
    result = merge_checkpoint(calib_ckpt / "tiny", tmp_path / "o", keep=5, method="hc-smoe", calib=str(calib_ckpt / "calib.txt"),
                              n=2, seq_len=32, refit=False, linkage="complete", progress=False)
    record = json.loads((tmp_path / "o" / "moecompress.json").read_text())
    assert record["parameters"]["refit"] is False and record["parameters"]["linkage"] == "complete"
    assert result.merge_error == {} and all(len(g) == 5 for g in result.clusters.values())


@pytest.mark.parametrize("args, msg", [
    (("--keep", 8), "--keep must be between 1 and 7"),
    (("--keep", 3, "--method", "ties"), "--method: Input should be 'm-smoe', 'hc-smoe' or 'average'"),
    (("--keep", 3, "--linkage", "centroid"), "--linkage: Input should be"),
    (("--keep", 3, "--calib", "missing.txt"), "not found"),
    (("--keep", 3, "--stats", "missing.safetensors"), "not found"),
    (("--keep", 3, "--max-gpu-memory", "lots"), "cannot read memory size 'lots'"),
    (("--keep", 3, "--max-cpu-memory", "4XB"), "cannot read memory size '4XB'"),
])
def test_cli_errors_exit_2_and_write_nothing(calib_ckpt, tmp_path, args, msg):
    out = tmp_path / "out"
    r = invoke_cli("merge", calib_ckpt / "tiny", "-o", out, *args)
    assert r.exit_code == 2, r.output
    assert msg in " ".join(r.output.split())
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_cli_refuses_missing_model_and_existing_output(calib_ckpt, tmp_path):
    r = invoke_cli("merge", tmp_path / "nope", "-o", tmp_path / "x", "--keep", 2)
    assert r.exit_code == 2 and "not found" in r.output
    (tmp_path / "exists").mkdir()
    r = invoke_cli("merge", calib_ckpt / "tiny", "-o", tmp_path / "exists", "--keep", 2, "--calib", calib_ckpt / "calib.txt")
    assert r.exit_code == 2 and "--overwrite" in r.output


# ----- streaming and shard surgery ----------------------------------------------------------------
def _write_by_surgery(src, out, model, result):
    from moecompress.merge.checkpoint import merged_replacements
    from moecompress.surgery import prune_checkpoint_files

    out.mkdir()
    prune_checkpoint_files(src, out, result.dominant, replace=merged_replacements(model, result))


def _same_tensors(folder_a, folder_b):
    from safetensors import safe_open

    with safe_open(folder_a / "model.safetensors", "pt") as a, safe_open(folder_b / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


@pytest.mark.parametrize("refit, router", [(False, "weighted"), (True, "dominant")])
def test_surgery_writes_what_save_pretrained_writes_for_the_merged_model(family, refit, router, tmp_path):
    """Shard surgery with the merged experts as replacements (only those that changed: clusters
    of several members, every expert after a re-fit, router rows under the weighted rule)
    writes exactly the tensors save_pretrained writes for the model merged in memory."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    model.save_pretrained(tmp_path / "src")
    result = merge_experts(model, keep=3, tokens=tokens(4, 16), refit=refit, router=router, batch_size=2, progress=False)
    _write_by_surgery(tmp_path / "src", tmp_path / "out", model, result)
    model.save_pretrained(tmp_path / "ref")
    _same_tensors(tmp_path / "out", tmp_path / "ref")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    probe = tokens(2, 9, seed=3)
    torch.testing.assert_close(_logits(reloaded, probe), _logits(model, probe), rtol=0, atol=1e-6)


def test_streamed_merge_equals_in_memory(family, tmp_path):
    """A model streamed under a tiny CPU cap (its layers offloaded to disk) is merged layer by
    layer, the merged blocks offloaded too: same clusters, errors, merged weights (hence the
    same checkpoint bytes) and logits as merging the model loaded in memory."""
    from moecompress.checkpoint import load_model
    from moecompress.merge.offload import is_offloaded

    if family in LOAD_CANNOT_STREAM:
        pytest.skip(LOAD_CANNOT_STREAM[family])
    tiny_model(family).save_pretrained(tmp_path / "src")
    options = dict(keep=4, tokens=tokens(4, 16), router="weighted", batch_size=2, progress=False)
    in_memory = load_model(tmp_path / "src", dtype="float32")
    want = merge_experts(in_memory, **options)
    streamed = load_model(tmp_path / "src", dtype="float32", max_cpu_memory="40KB", offload_folder=tmp_path / "off")
    assert any(p.device.type == "meta" for p in streamed.parameters())  # really offloaded
    got = merge_experts(streamed, offload_folder=tmp_path / "merged", **options)
    assert got.clusters == want.clusters and got.dominant == want.dominant and got.merge_error == want.merge_error
    for layer in moe_view(streamed):  # the merged blocks wait on disk as well
        assert is_offloaded(layer.block) and layer.experts.gate_up_proj.device.type == "meta"
    probe = tokens(2, 9, seed=3)
    assert torch.equal(_logits(streamed, probe), _logits(in_memory, probe))
    for name, model, result in (("a", in_memory, want), ("b", streamed, got)):
        _write_by_surgery(tmp_path / "src", tmp_path / name, model, result)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_streamed_merge_with_repair_builds_each_block_at_its_layer(tmp_path):
    """``merge --repair`` on a streamed model builds each merged block when the repair reaches its
    layer (``merge.blocks.defer_blocks``, as prune does) and ends with every block written to its
    file: the same clusters, errors and logits as the merge in memory."""
    from moecompress.checkpoint import load_model
    from moecompress.merge import blocks as blocks_module
    from moecompress.merge.offload import is_offloaded
    from moecompress.onload import is_streamed

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "src")
    options = dict(keep=4, tokens=tokens(4, 16), router="weighted", batch_size=2, progress=False, repair="refit")
    in_memory = load_model(tmp_path / "src", dtype="float32")
    want = merge_experts(in_memory, **options)
    streamed = load_model(tmp_path / "src", dtype="float32", max_cpu_memory="40KB", offload_folder=tmp_path / "off")
    if not is_streamed(streamed):
        pytest.skip("the model fits the GPU: not streamed")
    built = []
    build = blocks_module.DeferredBlocks.build

    def spy(self, li):
        built.append(li)
        return build(self, li)

    blocks_module.DeferredBlocks.build = spy
    try:
        got = merge_experts(streamed, offload_folder=tmp_path / "merged", **options)
    finally:
        blocks_module.DeferredBlocks.build = build
    assert built == moe_view(streamed).moe_layer_indices  # one at a time, in order, by the repair
    assert got.clusters == want.clusters and got.dominant == want.dominant
    assert got.merge_error == pytest.approx(want.merge_error, rel=1e-5)
    for layer in moe_view(streamed):
        assert is_offloaded(layer.block) and layer.experts.gate_up_proj.device.type == "meta"
    probe = tokens(2, 9, seed=3)
    torch.testing.assert_close(_logits(streamed, probe), _logits(in_memory, probe), rtol=1e-5, atol=1e-5)


def test_cli_streamed_merge_writes_the_same_checkpoint(calib_ckpt, tmp_path):
    """`merge --max-cpu-memory` (streamed, disk offload) writes the same files as the in-memory
    run, through shard surgery, leaves no offload files behind, and the output reloads."""
    from transformers import AutoModelForCausalLM

    common = (calib_ckpt / "tiny", "--keep", 3, "--calib", calib_ckpt / "calib.txt", "-n", 4, "--seq-len", 32,
              "--batch-size", 2, "--router", "weighted")
    r = invoke_cli("merge", *common, "-o", tmp_path / "mem")
    assert r.exit_code == 0, r.output
    r = invoke_cli("merge", *common, "-o", tmp_path / "streamed", "--max-cpu-memory", "40KB")
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in (tmp_path / "mem").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "streamed").iterdir())  # no work folder left
    for name in files:
        if name not in ("moecompress.json", "recipe.yaml", "README.md"):  # these name the memory cap
            assert (tmp_path / "mem" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes(), name
    record = json.loads((tmp_path / "streamed" / "moecompress.json").read_text())
    assert record["writer"] == "shard surgery" and record["parameters"]["max_cpu_memory"] == "40KB"
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "mem")
    assert a.config.num_local_experts == 3
    probe = tokens(1, 9)
    assert torch.equal(_logits(a, probe), _logits(b, probe))


def test_streamed_merge_needs_safetensors(calib_ckpt, tmp_path):
    import shutil

    src = tmp_path / "nosafetensors"
    src.mkdir()
    for f in calib_ckpt.joinpath("tiny").iterdir():
        if f.suffix != ".safetensors":
            shutil.copyfile(f, src / f.name)
    from safetensors.torch import load_file

    torch.save(load_file(calib_ckpt / "tiny" / "model.safetensors"), src / "pytorch_model.bin")  # weights, not safetensors
    r = invoke_cli("merge", src, "-o", tmp_path / "out", "--keep", 3, "--calib", calib_ckpt / "calib.txt",
                   "--max-gpu-memory", "4GiB")
    assert r.exit_code == 2 and "needs a safetensors checkpoint" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "out").exists()


def test_refit_in_layer_groups_bounds_the_accumulators():
    """With a budget below one layer's accumulators every layer is re-fitted in its own pass:
    the first layer's re-fit is the same as in one pass (same inputs), later layers are fitted
    on the already re-fitted earlier layers, and the groups follow the model's shape."""
    from moecompress import refit as refit_mod

    toks = tokens(6, 24)
    clusters = {1: [[0, 1, 2], [3], [4, 5], [6, 7]], 2: [[0, 7], [1, 2], [3, 4], [5, 6]]}
    one_pass, grouped = tiny_model("qwen3_moe"), tiny_model("qwen3_moe")
    merge_experts(one_pass, keep=4, tokens=toks, clusters=clusters, refit=True, progress=False)
    budget = refit_mod.ACCUMULATOR_BUDGET
    refit_mod.ACCUMULATOR_BUDGET = 1  # monkeypatching the module default: merge_experts uses it
    try:
        assert [len(g) for g in refit_mod.layer_groups(moe_view(grouped), 1)] == [1] * len(moe_view(grouped))
        result = merge_experts(grouped, keep=4, tokens=toks, clusters=clusters, refit=True, progress=False)
    finally:
        refit_mod.ACCUMULATOR_BUDGET = budget
    a, b = moe_view(one_pass), moe_view(grouped)
    torch.testing.assert_close(b.layer(1).down_proj, a.layer(1).down_proj, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(b.layer(2).down_proj, a.layer(2).down_proj, rtol=1e-5, atol=1e-6)
    assert set(result.merge_error) == {1, 2}  # every layer re-fitted (and its error reported)
    assert len(refit_mod.layer_groups(moe_view(grouped))) == 1  # the default budget: one pass here


def test_refit_carrying_activations_equals_a_pass_from_the_embeddings_per_group(family):
    """The re-fit carries the calibration activations from layer group to group (each layer
    run twice: observed, then re-fitted). That equals, bit for bit, the plain definition: one
    calibration pass from the embeddings per group, after the earlier groups were re-fitted."""
    from moecompress.capture import run_calibration
    from moecompress.refit import RefitObserver, refit_to_original, swap_in_copies
    from moecompress.arch import MoELayer

    toks = tokens(5, 16)

    def pruned_copies():
        model = tiny_model(family)
        originals = swap_in_copies(model)
        view = moe_view(model)
        view.keep_experts({layer.layer_idx: [0, 2, 3, 5] for layer in view})
        return model, originals

    model, originals = pruned_copies()
    got = refit_to_original(model, originals, toks, ridge=1e-2, batch_size=2, progress=False, budget=1)
    ref, ref_originals = pruned_copies()
    view = moe_view(ref)
    want = {}
    for layer in view:  # budget 1: one layer per group
        obs = RefitObserver({layer.layer_idx: ref_originals[layer.layer_idx]})
        run_calibration(ref, toks, [obs], batch_size=2, progress=False, stop_after=layer.layer_idx, layer_by_layer=False)
        obs.apply(layer, 1e-2)
        want[layer.layer_idx] = obs.relative_error(layer.layer_idx)
    assert got == want and len(got) == len(view) >= 2
    for a, b in zip(moe_view(model), view):
        assert isinstance(a, MoELayer) and torch.equal(a.down_proj, b.down_proj), a.layer_idx


def test_run_calibration_stops_after_a_layer():
    model, toks = tiny_model("qwen3_moe"), tokens(3, 16)
    rec = _Recorder()
    first = moe_view(model)[0].layer_idx
    run_calibration(model, toks, [rec], batch_size=2, progress=False, stop_after=first)
    assert set(rec.calls) == {first} and len(rec.calls[first]) == 2  # both batches, no later layer


def test_streamed_working_bytes_counts_the_merged_block_and_the_accumulators():
    """What a streamed merge reserves on the GPU besides the streamed weights and the room
    ``load_model`` keeps for one onloaded layer: one merged block (keep/E of an original one)
    and the re-fit accumulators held at once, with one block of experts' features."""
    from moecompress.merge.checkpoint import streamed_working_bytes
    from moecompress.refit import accumulator_bytes, block_working_bytes

    model = tiny_model("qwen3_moe")
    view = moe_view(model)
    layer = view[0]
    block = sum(p.numel() for p in layer.block.parameters()) * 4  # float32
    keep = layer.num_experts // 2
    accum = sum(accumulator_bytes(x) for x in view) * keep // layer.num_experts  # all fit the default budget
    assert streamed_working_bytes(model.config, keep, refit=False, dtype="float32") == block * keep // layer.num_experts
    assert streamed_working_bytes(model.config, keep, refit=True, dtype="float32") == \
        block * keep // layer.num_experts + accum + block_working_bytes(layer.hidden_size, layer.intermediate_size)
    from moecompress.repair import working_bytes

    for mode in ("refit", "refit+tune"):  # --repair replaces the re-fit: its own working set is reserved
        assert streamed_working_bytes(model.config, keep, refit=True, dtype="float32", repair=mode) == \
            block * keep // layer.num_experts + working_bytes(view, keep, mode)
    assert working_bytes(view, keep, "refit+tune") > working_bytes(view, keep, "refit")
