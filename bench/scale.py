"""Scale benchmark: streaming, stats throughput, end-to-end pruning against the I/O+compute floor.

Runs on the GPU machine against random-weight checkpoints of published shapes
(bench/shaped_checkpoints.py). Measures

  (a) stats throughput vs a plain forward on the same tokens (goal >= 0.8x);
  (b) end-to-end ``prune --ratio 0.5`` wall time vs the floor
        floor = input bytes / read rate + output bytes / write rate + forward FLOPs / matmul rate,
      where the rates are measured on the same machine in the same run (page cache dropped
      with posix_fadvise before every read that is timed);
  (c) peak GPU memory of stats with ``--max-gpu-memory`` (default 4GiB), streamed, and that
      its statistics equal the all-in-memory run.

    python bench/scale.py olmoe-1b-7b --work /tmp/scale --calib .gpu/calib_mix.txt \
        --tokenizer-from .gpu/qwen3moe-32x64-top4 --json $OUT/scale.json

The prunes run the CLI's default (``--method auto``, and with calibration text the re-fit
``--repair refit``) unless ``--method`` / ``--repairs`` say otherwise; every prune records where
its time went (``*_phases``: input scan, load, selection and its NAEE parts, repair and its
parts, shard-surgery write; nested phases are inside their parents).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def drop_cache(folder: Path) -> None:
    """Evict a folder's files from the page cache so that reads really hit the disk."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd) if os.access(f, os.W_OK) else None
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def tensor_digests(folder: Path) -> dict[str, str]:
    """sha256 of each file of a folder's safetensors shards and index (``file:<name>``) and of
    each tensor's bytes: whether two outputs are the same bytes, and which tensors differ where
    they are not (or only the files: the same tensors in another layout)."""
    import hashlib

    from safetensors import safe_open

    out = {}
    for path in sorted([*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")]):
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 26):
                h.update(chunk)
        out[f"file:{path.name}"] = h.hexdigest()
    record = folder / "moecompress.json"
    if record.exists():  # the kept sets: a different choice, or the same choice re-fit differently
        for li, kept in (json.loads(record.read_text()).get("kept_experts") or {}).items():
            out[f"kept:{li}"] = json.dumps(kept)
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                out[name] = hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def digest_differences(first: dict[str, str], other: dict[str, str]) -> dict:
    """How two outputs differ: the count of differing entries, the first names, and the counts
    by kind (layer and expert numbers taken out: ``model.layers.#.mlp.experts.#.down_proj.weight``,
    ``kept:#`` for a layer's kept set, ``file:...`` for a file)."""
    import collections
    import re

    names = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
    kinds = collections.Counter(re.sub(r"\d+", "#", n) for n in names)
    return {"same_bytes": not names, "tensors_differing": len(names), "of": len(first), "first": names[:12],
            "by_kind": dict(sorted(kinds.items()))}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def read_rate(folder: Path) -> float:
    drop_cache(folder)
    n, t0 = 0, time.perf_counter()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(64 << 20):
                n += len(chunk)
    return n / (time.perf_counter() - t0)


def write_rate(folder: Path, nbytes: int) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    buf = os.urandom(64 << 20)
    t0 = time.perf_counter()
    with open(folder / "probe.bin", "wb") as fh:
        for _ in range(max(1, nbytes // len(buf))):
            fh.write(buf)
    rate = (max(1, nbytes // len(buf)) * len(buf)) / (time.perf_counter() - t0)
    (folder / "probe.bin").unlink()
    return rate


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_rate(device: str) -> float:
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    return 10 * 2 * n**3 / (time.perf_counter() - t0)


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


# Where the time of one prune run goes: (module, attribute, label). Wrapped for the run only,
# each call synchronised and timed; nested phases are included in their parents' times.
PHASES = (
    ("moecompress.integrity", "first_nonfinite", "input NaN/Inf scan"),
    ("moecompress.calibration", "load_calibration", "calibration text"),
    ("moecompress.checkpoint", "load_model", "load (includes the scan)"),
    # since session 17 a streamed default's select includes the re-fit of each layer as it is chosen
    ("moecompress.prune.checkpoint", "plan_experts", "select (+ the re-fit, where each layer is re-fit as chosen)"),
    ("moecompress.prune.naee.LayerCache", "observe", "select: naee observe + Gram"),
    ("moecompress.prune.naee", "expert_gram", "select: naee Gram"),
    ("moecompress.prune.naee", "_choose", "select: naee search"),
    ("moecompress.capture.LayerCursor", "__init__", "calibration: record layer-0 inputs"),
    ("moecompress.repair", "prune_and_repair", "repair"),
    ("moecompress.repair.LayerRepair", "step", "repair: one layer"),
    ("moecompress.repair.PruneRepair", "finish", "repair: the layers left, the config"),
    ("moecompress.merge.api", "replace_blocks", "repair: build the pruned blocks"),
    ("moecompress.merge.blocks.DeferredBlocks", "build", "repair: build a pruned block at its layer"),
    ("moecompress.merge.blocks.DeferredBlocks", "done", "repair: hand a final pruned block back"),
    ("moecompress.repair.OriginalStream", "after", "repair: original stream"),
    ("moecompress.capture.LayerCursor", "advance", "cursor: advance"),
    ("moecompress.refit", "block_output", "repair: original block on the pruned inputs"),
    ("moecompress.refit.RefitObserver", "observe", "repair: observe (per expert)"),
    ("moecompress.refit.RefitObserver", "apply", "repair: solve (per expert)"),
    ("moecompress.refit.JointRefitObserver", "observe", "repair: observe (joint)"),
    ("moecompress.refit.JointRefitObserver", "apply", "repair: solve (joint)"),
    ("moecompress.surgery", "prune_checkpoint_files", "write (shard surgery)"),
)


class phases:
    """Context manager: seconds and calls per phase of ``PHASES`` while active (``.seconds``)."""

    def __init__(self, table=PHASES):
        self.table, self.seconds, self.calls, self._undo = table, {}, {}, []
        # (phase left, GiB) each time leaving a phase finds a new GPU peak: the innermost phase
        # around the peak is the first listed at the final figure (nested phases leave first)
        self.new_peaks: list[tuple[str, float]] = []

    def __enter__(self):
        import importlib

        for where, attr, label in self.table:
            owner = None
            try:
                parts = where.split(".")
                for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
                    try:
                        owner = importlib.import_module(".".join(parts[:i]))
                    except ImportError:
                        continue
                    for a in parts[i:]:
                        owner = getattr(owner, a)
                    break
                fn = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
            except (AttributeError, KeyError, TypeError):
                continue  # not in this version of the package
            self._undo.append((owner, attr, fn))
            setattr(owner, attr, self._clocked(fn, label))
        return self

    def _clocked(self, fn, label):
        import functools

        @functools.wraps(fn)
        def run(*args, **kwargs):
            sync()
            t = time.perf_counter()
            try:
                with torch.profiler.record_function(label):  # (a profiler's ranges: profile_tables)
                    return fn(*args, **kwargs)
            finally:
                sync()
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t
                self.calls[label] = self.calls.get(label, 0) + 1
                if torch.cuda.is_available():
                    peak = torch.cuda.max_memory_allocated() / 2**30
                    if not self.new_peaks or peak > self.new_peaks[-1][1]:
                        self.new_peaks.append((label, round(peak, 4)))
        return run

    def __exit__(self, *exc):
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)
        self._undo.clear()

    def report(self) -> dict:
        out = {label: {"s": round(v, 3), "calls": self.calls[label]} for label, v in self.seconds.items()}
        if self.new_peaks:
            out["gpu peak, first seen leaving"] = self.new_peaks[-12:]
        return out


def peak_gpu_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def profile_tables(prof, dev: str, top: int = 25, trace: Path | None = None) -> dict:
    """torch.profiler's summary: the device's busy time (the union of its kernels' intervals,
    not a sum of the operators' and kernels' rows, which counts each kernel twice) against the
    profiled span, per phase of ``PHASES`` (their ``record_function`` ranges) its host time
    against the device time of the kernels it launched, the top ``top`` kernels by device time
    and operators by host time (Python overhead shows as their count). ``trace``: also a
    gzipped Chrome trace there."""
    from torch.autograd import DeviceType

    events = prof.key_averages()
    out = {}
    raw = prof.events()
    labels = {label for _, _, label in PHASES}
    # (a phase's range shows on the device too, as an annotation spanning its kernels: not a kernel)
    kernels = [e for e in raw if e.device_type == DeviceType.CUDA and e.name not in labels
               and not getattr(e, "is_user_annotation", False)]
    if kernels:
        spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
        busy, (lo, hi) = 0.0, spans[0]
        for a, b in spans[1:]:
            if a > hi:
                busy, lo, hi = busy + hi - lo, a, b
            else:
                hi = max(hi, b)
        busy += hi - lo
        cpu = [e for e in raw if e.device_type == DeviceType.CPU]
        span = max(e.time_range.end for e in cpu + kernels) - min(e.time_range.start for e in cpu + kernels)
        out.update(device_busy_s=busy / 1e6, profiled_span_s=span / 1e6, device_busy_share=busy / span,
                   kernel_launches=len(kernels))
        by_name: dict = {}
        for e in kernels:
            n, t = by_name.get(e.name, (0, 0.0))
            by_name[e.name] = (n + 1, t + e.time_range.elapsed_us())
        out["top_kernels"] = [{"name": k[:120], "calls": n, "ms": t / 1e3}
                              for k, (n, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]]
    phase_rows: dict = {}
    for e in raw:  # a phase's host time against the device time of the kernels launched inside it
        if e.device_type == DeviceType.CPU and e.name in labels:
            row = phase_rows.setdefault(e.name, {"calls": 0, "host_ms": 0.0, "device_ms": 0.0})
            row["calls"] += 1
            row["host_ms"] += e.time_range.elapsed_us() / 1e3
            row["device_ms"] += e.device_time_total / 1e3
    out["phases"] = phase_rows
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    out["top_cpu"] = [{"name": e.key[:120], "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3} for e in rows]
    if trace is not None:
        import gzip

        tmp = trace.with_suffix("")
        prof.export_chrome_trace(str(tmp))
        with open(tmp, "rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.unlink()
        out["trace"] = str(trace)
    return out


def naee_layers(a) -> dict:
    """NAEE's time per MoE layer on a shape too large to write (DeepSeek-V3): its first
    ``--naee-layers`` layers, all MoE, built in GPU memory with random weights, pruned to half
    their experts with ``plan_pruning(method="naee")`` on ``-n`` x ``--seq-len`` random tokens.
    The full model's floor is computed from its parameter count with the rates of another run
    (``--rates-from``, e.g. this bench's JSON of a smaller shape on the same machine)."""
    import moecompress.prune.naee as naee
    from shaped_checkpoints import PUBLISHED
    from transformers import AutoConfig, AutoModelForCausalLM

    from moecompress.arch import family_for_config, moe_view
    from moecompress.prune import plan_pruning

    kw = dict(PUBLISHED[a.name])
    model_type = kw.pop("model_type")
    full = AutoConfig.for_model(model_type, **kw)
    spec = family_for_config(full)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(full)
    total = sum(p.numel() for p in meta.parameters())
    routed = sum(p.numel() for n, p in meta.named_parameters() if ".experts." in n and "shared" not in n)
    E, k = int(getattr(full, spec.num_experts_field)), int(getattr(full, spec.top_k_field))
    moe_layers = len(moe_view(meta).layers)
    del meta
    small = {**kw, "num_hidden_layers": a.naee_layers, "vocab_size": 8192}
    if "first_k_dense_replace" in small:
        small["first_k_dense_replace"] = 0
    torch.manual_seed(0)
    t0 = time.perf_counter()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **small), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    build_s = time.perf_counter() - t0
    tokens = torch.randint(3, 8192, (a.n, a.seq_len), generator=torch.Generator().manual_seed(0))
    marks: list[tuple[str, float, float]] = []  # (what, seconds, when it ended)
    choose, observe = naee._choose, naee.LayerCache.observe

    def clocked(fn, label):
        def run(*args, **kwargs):
            sync()
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            marks.append((label, time.perf_counter() - t, time.perf_counter()))
            return out
        return run

    kernels: dict = {}

    def search(*args, **kwargs):  # the second layer's search under torch.profiler (--profile-search)
        if not a.profile_search or kernels or sum(label == "search" for label, _, _ in marks) != 1:
            return clocked(choose, "search")(*args, **kwargs)
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        with profile(activities=acts) as prof:
            out = clocked(choose, "search")(*args, **kwargs)
        kernels["prof"] = prof  # summarised after the run, so that no layer's time includes it
        return out

    every = None
    if a.compare_routed:  # the same selection with every candidate set routed (the incremental rule off)
        from moecompress.arch.view import MoELayer

        rule = MoELayer.removal_effect
        MoELayer.removal_effect = property(lambda self: None)
        naee._choose = clocked(choose, "search (routed)")
        try:
            sync()
            t = time.perf_counter()
            routed_plan, _ = plan_pruning(model, keep=E // 2, method="naee", tokens=tokens, batch_size=a.batch_size)
            sync()
            every = {"naee_total_s": time.perf_counter() - t, "kept": routed_plan.kept,
                      "search_s": [d for label, d, _ in marks if label == "search (routed)"]}
        finally:
            MoELayer.removal_effect, naee._choose = rule, choose
        marks.clear()
    naee._choose, naee.LayerCache.observe = search, clocked(observe, "observe")
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    try:
        plan, _ = plan_pruning(model, keep=E // 2, method="naee", tokens=tokens, batch_size=a.batch_size)
    finally:
        naee._choose, naee.LayerCache.observe = choose, observe
    sync()
    total_s = time.perf_counter() - start
    repair = None
    if a.with_repair:  # the default's re-fit after the selection (prune --repair refit), per layer
        from moecompress.repair import REPAIR_SEQUENCES, prune_and_repair

        # the default re-fit reads the selection's sequences continued to REPAIR_SEQUENCES
        more = max(0, REPAIR_SEQUENCES - a.n)
        rtokens = torch.cat([tokens, torch.randint(3, 8192, (more, a.seq_len), generator=torch.Generator().manual_seed(1))])
        run = lambda: prune_and_repair(model, plan.kept, rtokens, batch_size=a.batch_size, progress=False)  # noqa: E731
        profiler = contextlib.nullcontext()
        if a.profile_repair:  # (the re-fit's time is then the profiled one's: no copy of the model for a second run)
            from torch.profiler import ProfilerActivity, profile

            profiler = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else []))
        with phases() as ph, profiler as prof:
            rec, repair_s = timed(run)
        if a.profile_repair:
            kernels["repair"] = prof
        repair = {"repair_s": repair_s, "repair_s_per_layer": repair_s / a.naee_layers, "phases": ph.report(),
                  "repair_sequences": int(rtokens.shape[0]), "target": rec.get("target"),
                  "peak_gpu_GiB": peak_gpu_gib(), "refit": sorted({v.get("refit") for v in rec["layers"].values()})}
    ends = [start] + [t for label, _, t in marks if label == "search"]
    per_layer = [b - c for c, b in zip(ends, ends[1:])]
    n = len(per_layer)
    res = {"model": a.name, "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__,
           "layers_built": a.naee_layers, "experts": E, "top_k": k, "keep": E // 2, "n": a.n, "seq_len": a.seq_len,
           "build_s": build_s, "naee_total_s": total_s, "naee_layer_s": per_layer,
           "observe_s_per_layer": sum(d for label, d, _ in marks if label == "observe") / n,
           "search_s_per_layer": sum(d for label, d, _ in marks if label == "search") / n,
           "info_layers": plan.info["layers"], "peak_gpu_GiB": peak_gpu_gib(),
           "full_model": {"total_params": total, "routed_expert_params": routed, "moe_layers": moe_layers}}
    per = sorted(per_layer[1:] or per_layer)[len(per_layer[1:] or per_layer) // 2]  # median, first layer warms up
    res["naee_s_per_layer_median"] = per
    res["naee_full_model_s"] = per * moe_layers
    if a.trace_dir:
        a.trace_dir.mkdir(parents=True, exist_ok=True)
    trace = (lambda name: a.trace_dir / name if a.trace_dir else None)
    if "prof" in kernels:
        res["search_profile_layer_1"] = {"search_s": [d for label, d, _ in marks if label == "search"][1],
                                         **profile_tables(kernels["prof"], dev, trace=trace("search_layer1.json.gz"))}
    if "repair" in kernels:
        res["repair_profile"] = {"note": "repair_s above was measured under the profiler",
                                 **profile_tables(kernels["repair"], dev, trace=trace("repair.json.gz"))}
    if every is not None:
        res["routed_every_candidate"] = {"naee_total_s": every["naee_total_s"], "search_s": every["search_s"],
                                         "kept_equal": every["kept"] == plan.kept,
                                         "layers_differing": [li for li in plan.kept if plan.kept[li] != every["kept"][li]]}
    if repair:
        res["repair"] = repair
        res["repair_full_model_s"] = repair["repair_s_per_layer"] * moe_layers
    if a.rates_from and not Path(a.rates_from).is_file():
        res["rates_from_missing"] = str(a.rates_from)  # e.g. the run that measures them failed: keep the timing
    elif a.rates_from:
        rates = json.loads(Path(a.rates_from).read_text())
        active = total - routed * (1 - k / E)
        parts = {"read": 2 * total / rates["read_Bps"], "write": 2 * (total - routed // 2) / rates["write_Bps"],
                 "forward": 2 * active * a.n * a.seq_len / rates["matmul_flops"]}
        floor = sum(parts.values())
        res.update(rates_from=str(a.rates_from), full_floor_s=floor, full_floor_parts_s=parts,
                   full_floor_plus_naee_vs_floor=(floor + res["naee_full_model_s"]) / floor)
        if repair:
            res["full_floor_plus_naee_plus_repair_vs_floor"] = (floor + res["naee_full_model_s"]
                                                                + res["repair_full_model_s"]) / floor
    return res


def main() -> None:
    from shaped_checkpoints import make
    from transformers import AutoTokenizer

    from moecompress.calibration import load_calibration
    from moecompress.checkpoint import load_model
    from moecompress.info import model_info
    from moecompress.stats import collect_stats

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--work", type=Path, default=Path("/tmp/scale"))
    ap.add_argument("--out-work", type=Path,
                    help="where outputs (and the write-rate probe) go, if not --work: e.g. the input on a RAM disk "
                         "and the outputs on the disk, when both do not fit the disk")
    ap.add_argument("--calib", help="calibration text (required but with --naee-layers)")
    ap.add_argument("--tokenizer-from", type=Path, help="(required but with --naee-layers)")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per batch of the stats runs")
    ap.add_argument("--prune-batch-size", type=int,
                    help="sequences per batch of the prunes (default: the CLI's, chosen for the device)")
    ap.add_argument("--max-gpu-memory", default="4GiB")
    ap.add_argument("--max-cpu-memory", default="16GiB", help="CPU cap of the streamed runs (the rest is offloaded to disk)")
    ap.add_argument("--method", default="auto", help="pruning method (default: the CLI's default, auto)")
    ap.add_argument("--repairs", default="default",
                    help="comma list of --repair modes to time each prune with: default (none given: refit with "
                         "calibration text, as the CLI runs), none, refit, refit+router")
    ap.add_argument("--old-schedule-too", action="store_true",
                    help="also time streamed stats batch by batch (the schedule before layer-by-layer streaming)")
    ap.add_argument("--skip", default="",
                    help="comma list of parts to skip: stats,stream,prune,surgery (both of: surgery_memory,surgery_streamed)")
    ap.add_argument("--compare-routed", action="store_true",
                    help="with --naee-layers: first select with every candidate set routed (NAEE's incremental "
                         "rule off): its time and whether the kept sets are equal")
    ap.add_argument("--naee-layers", type=int, default=0,
                    help="only time NAEE per MoE layer on this many layers built in GPU memory (a shape too large "
                         "to write); with --rates-from JSON for the full model's floor")
    ap.add_argument("--rates-from", type=Path)
    ap.add_argument("--with-repair", action="store_true",
                    help="with --naee-layers: also time the default's re-fit (--repair refit) of the pruned layers")
    ap.add_argument("--profile-search", action="store_true",
                    help="with --naee-layers: torch.profiler's top kernels of the second layer's search, in the JSON")
    ap.add_argument("--profile-repair", action="store_true",
                    help="with --naee-layers --with-repair: the re-fit once more under torch.profiler (device "
                         "busy time, top kernels and operators), in the JSON")
    ap.add_argument("--unclocked-too", nargs="?", const="first", choices=("first", "second"),
                    help="time each prune once more without the phases (their synchronisations), before the "
                         "clocked run (first, the default) or after it: the headline time")
    ap.add_argument("--trace-dir", type=Path, help="with --profile-*: gzipped Chrome traces written there")
    ap.add_argument("--also-schedules", default="",
                    help="with the surgery runs: after each prune, one more unclocked prune per re-fit schedule "
                         "listed (comma-separated, repeats allowed: after, as-chosen, default; "
                         "prune.checkpoint.refit_schedule), each's time, and whether its bytes equal the first's")
    ap.add_argument("--schedule", choices=("default", "after", "as-chosen"), default="default",
                    help="every prune of this run with this re-fit schedule (prune.checkpoint.refit_schedule; "
                         "default: as the CLI chooses: as chosen streamed, after in memory)")
    ap.add_argument("--fp32-refit", action="store_true",
                    help="the re-fit's products in float32 on CUDA too (refit.TF32_ACCUMULATION off)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    unknown = sorted(set(filter(None, a.also_schedules.split(","))) - {"after", "as-chosen", "default"})
    if unknown:  # (prune.checkpoint.refit_schedule would take any other name as "after")
        ap.error(f"--also-schedules: unknown schedule(s) {', '.join(unknown)}; use after, as-chosen or default")
    if a.naee_layers:
        res = naee_layers(a)
        print(json.dumps(res, indent=1), flush=True)
        print("SUMMARY", json.dumps(summary(res)), flush=True)
        if a.json:
            a.json.write_text(json.dumps(res, indent=1) + "\n")
        return
    if a.calib is None or a.tokenizer_from is None:
        ap.error("--calib and --tokenizer-from are required")
    skip = set(filter(None, a.skip.split(",")))
    import moecompress.prune.checkpoint as prune_module

    if a.schedule != "default":
        prune_module.refit_schedule = lambda lm, s=a.schedule.replace("-", " "): s
    if a.fp32_refit:
        import moecompress.refit as refit

        refit.TF32_ACCUMULATION = False
    progress = progress_writer(a.json)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    src = a.work / a.name
    outs = a.out_work or a.work
    res: dict = {"model": a.name, "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "n": a.n, "seq_len": a.seq_len,
                 "torch": torch.__version__, "schedule": a.schedule}
    if not (src / "config.json").exists():
        res["generate"] = make(a.name, src, a.tokenizer_from, dev)
        if dev == "cuda":
            torch.cuda.empty_cache()
    info = model_info(src)
    res.update(total_params=info["total_params"], active_params=info["active_params"], input_bytes=folder_bytes(src))
    tok = AutoTokenizer.from_pretrained(src)
    tokens = load_calibration(tok, a.calib, n=a.n, seq_len=a.seq_len, seed=0)
    ntok = tokens.numel()

    res["read_Bps"] = read_rate(src)
    res["write_Bps"] = write_rate(outs / "probe", res["input_bytes"] // 2)
    res["matmul_flops"] = matmul_rate(dev)
    progress(res)

    if "stats" not in skip:
        model = load_model(src, dtype="bfloat16", device=dev)
        dec = getattr(model, model.base_model_prefix)

        def plain():
            with torch.no_grad():
                for b in tokens.split(a.batch_size):
                    dec(input_ids=b.to(dev), use_cache=False)

        plain()  # warm-up
        _, t_plain = timed(plain)
        collect_stats(model, tokens[: a.batch_size], batch_size=a.batch_size, progress=False)  # warm-up
        stats_mem, t_stats = timed(lambda: collect_stats(model, tokens, batch_size=a.batch_size, progress=False))
        res.update(plain_forward_s=t_plain, stats_s=t_stats, plain_tok_s=ntok / t_plain, stats_tok_s=ntok / t_stats,
                   stats_vs_plain=t_plain / t_stats, peak_gpu_in_memory_GiB=peak_gpu_gib())
        del model, dec
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
        progress(res)

    if "stream" not in skip:
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        (model, t_load) = timed(lambda: load_model(src, dtype="bfloat16", max_gpu_memory=a.max_gpu_memory,
                                                   max_cpu_memory=a.max_cpu_memory, offload_folder=outs / "offload"))
        stats_stream, t_sstats = timed(lambda: collect_stats(model, tokens, batch_size=a.batch_size, progress=False))
        res.update(stream_load_s=t_load, stream_stats_s=t_sstats,
                   stream_peak_gpu_GiB=peak_gpu_gib(), max_gpu_memory=a.max_gpu_memory)
        if a.old_schedule_too:
            import moecompress.capture as capture

            streamed, capture.is_streamed = capture.is_streamed, lambda model: False  # batch by batch
            try:
                _, res["stream_stats_batch_by_batch_s"] = timed(
                    lambda: collect_stats(model, tokens, batch_size=a.batch_size, progress=False))
            finally:
                capture.is_streamed = streamed
        if "stats" not in skip:
            same = all(torch.equal(stats_mem.tensors[k].cpu(), stats_stream.tensors[k].cpu())
                       for k in stats_mem.tensors if k.endswith(".count"))
            res["stream_counts_equal_in_memory"] = same
        del model
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
        shutil.rmtree(outs / "offload", ignore_errors=True)
        progress(res)

    from moecompress.prune import prune_checkpoint

    fwd_flops = 2 * res["active_params"] * ntok
    repairs = [r for r in a.repairs.split(",") if r]

    def prune_run(out: Path, cap: str | None, repair: str, device, like: dict | None = None) -> dict:
        """One timed ``prune --ratio 0.5`` from a dropped page cache, its floor (same run's
        rates, this run's output bytes) and where its time went (``phases``)."""
        shutil.rmtree(out, ignore_errors=True)
        drop_cache(src)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        kw = {} if repair == "default" else {"repair": repair}  # "default": what the CLI does
        if a.prune_batch_size:
            kw["batch_size"] = a.prune_batch_size
        if cap:
            kw["max_cpu_memory"] = a.max_cpu_memory
        run = lambda: prune_checkpoint(src, out, ratio=0.5, method=a.method, calib=a.calib, n=a.n,  # noqa: E731
                                       seq_len=a.seq_len, dtype="bfloat16", max_gpu_memory=cap,
                                       device=device, progress=False, overwrite=True, **kw)
        def unclocked_run() -> float:  # the product as a user runs it: no phase's synchronisations
            shutil.rmtree(out, ignore_errors=True)
            drop_cache(src)
            return timed(run)[1]

        unclocked = unclocked_run() if a.unclocked_too == "first" else None
        first = tensor_digests(out) if unclocked is not None else None
        with phases() as ph:
            result, t = timed(run)
        out_bytes = folder_bytes(out)
        digest = tensor_digests(out)
        if a.unclocked_too == "second":  # (which of the two is the process's first prune: order or clocks)
            first = digest
            unclocked = unclocked_run()
            digest = tensor_digests(out)
        # the same prune twice in one process: does it write the same bytes (determinism on this device)
        repeat = digest_differences(first, digest) if first is not None else None
        others = []
        for schedule in filter(None, a.also_schedules.split(",")):  # the same prune, another re-fit schedule
            real, ran = prune_module.refit_schedule, []
            forced = real if schedule == "default" else (lambda lm, s=schedule.replace("-", " "): s)
            prune_module.refit_schedule = lambda lm: ran.append(forced(lm)) or ran[-1]
            try:
                other = {"s": unclocked_run()}
            finally:
                prune_module.refit_schedule = real
            other["schedule"] = ran[-1] if ran else None
            other["differences"] = digest_differences(digest, tensor_digests(out))
            other["same_bytes"] = other["differences"]["same_bytes"]
            others.append(other)
        parts = {"read": res["input_bytes"] / res["read_Bps"], "write": out_bytes / res["write_Bps"],
                 "forward": fwd_flops / res["matmul_flops"]}
        floor = sum(parts.values())
        auto = result.info.get("auto", {}).get("method")
        row = {"s": t, "vs_floor": t / floor, "floor_s": floor, "floor_parts_s": parts, "output_bytes": out_bytes,
               "peak_gpu_GiB": peak_gpu_gib(), "method": a.method + (f" ({auto})" if auto else ""),
               "repair": (result.info.get("repair") or {}).get("mode", "none"), "phases": ph.report()}
        if unclocked is not None:
            row.update(s=unclocked, vs_floor=unclocked / floor, s_clocked=t)
        if repeat is not None:
            row["repeat_differences"] = repeat
        row["digests"] = digest
        if like is not None:  # (streamed: against the prune in GPU memory)
            row["in_memory_differences"] = digest_differences(like, digest)
        if others:  # (in the order run; each compared with this row's clocked prune)
            row["other_schedules"] = [{**o, "vs_floor": o["s"] / floor} for o in others]
        shutil.rmtree(out, ignore_errors=True)
        return row

    if "prune" not in skip:  # in memory, the device given explicitly
        row = prune_run(outs / f"{a.name}-pruned", None, repairs[0], dev)
        res.update(prune_s=row["s"], output_bytes=row["output_bytes"], floor_s=row["floor_s"],
                   prune_vs_floor=row["vs_floor"], floor_parts_s=row["floor_parts_s"], prune_method=row["method"],
                   prune_phases=row["phases"])
        progress(res)
    if "surgery" not in skip:
        # shard surgery (the writer of local safetensors): in GPU memory, then streamed under the cap;
        # each repair mode of --repairs ("default": none given, as the CLI runs)
        written = {}  # repair mode -> the in-memory prune's digests
        for label, cap in (("surgery", None), ("surgery_streamed", a.max_gpu_memory)):
            if {"surgery_streamed": "surgery_streamed", "surgery": "surgery_memory"}[label] in skip:
                continue
            for repair in repairs:
                key = f"prune_{label}" + ("" if repair == "default" else f"_repair_{repair}")
                row = prune_run(outs / f"{a.name}-{label}", cap, repair, None if cap else dev, written.get(repair))
                written.setdefault(repair, row.pop("digests"))
                res.update({f"{key}_s": row["s"], f"{key}_output_bytes": row["output_bytes"],
                            f"{key}_vs_floor": row["vs_floor"], f"{key}_peak_gpu_GiB": row["peak_gpu_GiB"],
                            f"{key}_floor_s": row["floor_s"], f"{key}_method": row["method"],
                            f"{key}_repair": row["repair"], f"{key}_phases": row["phases"], "floor_s": row["floor_s"]})
                if "s_clocked" in row:  # the headline is then the run without the phases' synchronisations
                    res[f"{key}_s_clocked"] = row["s_clocked"]
                for k in ("other_schedules", "repeat_differences", "in_memory_differences"):
                    if k in row:
                        res[f"{key}_{k}"] = row[k]
                progress(res)
    print("SUMMARY", json.dumps(summary(res)), flush=True)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")


def progress_writer(path: Path | None):
    """Print the results so far, and rewrite ``--json`` with them: a run stopped part-way (a device
    call's time limit) keeps what it measured."""
    def write(res: dict) -> None:
        print(json.dumps(res, indent=1), flush=True)
        if path is not None:
            path.write_text(json.dumps(res, indent=1) + "\n")
    return write


def summary(res: dict) -> dict:
    """The headline numbers of a run (one line for a log's tail): times, ratios to the floor,
    peaks, and each prune's four largest phases."""
    out = {}
    for k, v in res.items():
        if k.endswith("_phases"):
            timed = [(label, p) for label, p in v.items() if isinstance(p, dict)]
            top = sorted(timed, key=lambda kv: -kv[1]["s"])[:4]
            out[k] = {label: p["s"] for label, p in top}
            if "gpu peak, first seen leaving" in v:
                out[k]["gpu peak, first seen leaving"] = v["gpu peak, first seen leaving"][-1]
        elif k.endswith("_other_schedules"):
            out[k] = [{"schedule": o["schedule"], "s": round(o["s"], 2), "vs_floor": round(o["vs_floor"], 3),
                       "same": o["same_bytes"], "differ": o["differences"]["tensors_differing"]} for o in v]
        elif k.endswith("_differences"):
            out[k] = {"same": v["same_bytes"], "differ": v["tensors_differing"], "by_kind": v["by_kind"]}
        elif isinstance(v, float) and (k.endswith(("_s", "_vs_floor", "_GiB")) or "vs_floor" in k or "median" in k):
            out[k] = round(v, 3)
    if "repair" in res and isinstance(res["repair"], dict):
        out["repair_s_per_layer"] = round(res["repair"]["repair_s_per_layer"], 3)
    return out


if __name__ == "__main__":
    main()
