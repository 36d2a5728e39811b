"""The error path never crashes, and killing a writing command leaves nothing partial."""

from __future__ import annotations

import errno
import functools
import multiprocessing
import os
import random
import signal
import time

import pytest
from typer.testing import CliRunner

from moecompress.cli import app
from moecompress.testing import SAMPLE_TEXT, tiny_checkpoint

# Minimal argv that gets past argument parsing, per command (a new command must be added here).
ARGV = {
    "info": ["info", "x"], "collect": ["stats", "x", "-o", "s.safetensors"], "show": ["stats", "show", "x"],
    "prune": ["prune", "x", "-o", "o", "--keep", "2"], "merge": ["merge", "x", "-o", "o", "--keep", "2"],
    "quantize": ["quantize", "x", "-o", "o"], "distill": ["distill", "x", "-o", "o", "--data", "d.txt"], "eval": ["eval", "x", "--ppl", "f"],
    "bench": ["bench", "x"], "run": ["run", "r.yaml"], "upload": ["upload", "x", "me/x"], "check": ["check", "x"],
    "ls": ["ls", "methods"],
}


def _commands():
    """(name, typer CommandInfo) of every registered command, subcommands of groups included."""
    out = [(c.name or c.callback.__name__, c) for c in app.registered_commands]
    for g in app.registered_groups:
        out += [(c.name or c.callback.__name__, c) for c in g.typer_instance.registered_commands]
    return out


def test_every_command_is_driven():
    assert {n for n, _ in _commands()} == set(ARGV)


@pytest.mark.parametrize("fault", [RuntimeError("injected fault [x]"), OSError(errno.ENOSPC, "No space left", "/out")],
                         ids=["unexpected", "disk-full"])
@pytest.mark.parametrize("name", sorted(ARGV))
def test_injected_fault_never_shows_a_traceback(name, fault, monkeypatch):
    info = dict(_commands())[name]
    original = info.callback

    @functools.wraps(original)  # typer reads the parameters through __wrapped__
    def broken(*args, **kwargs):
        raise fault

    monkeypatch.setattr(info, "callback", broken)
    res = CliRunner().invoke(app, ARGV[name])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert "Traceback" not in res.output and len(lines) == 1, res.output
    if isinstance(fault, OSError):
        assert res.exit_code == 2 and lines[0] == "error: no space left on the device writing '/out'; free space or " \
                                                  "choose another output folder"
    else:
        assert res.exit_code == 1
        assert lines[0] == ("error: unexpected error (RuntimeError: injected fault [x]); "
                            "re-run with --debug for the traceback")
        debug = CliRunner().invoke(app, [*ARGV[name], "--debug"])
        assert debug.exception is fault  # --debug lets the traceback through


def test_interrupt_is_one_line(monkeypatch):
    info = dict(_commands())["info"]

    @functools.wraps(info.callback)
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "callback", interrupted)
    res = CliRunner().invoke(app, ARGV["info"])
    assert res.exit_code == 130 and res.output.startswith("error: interrupted") and "Traceback" not in res.output


# --- kill at random moments ------------------------------------------------------------------

def _stage(kind: str, src, out, calib):
    from moecompress.merge import merge_checkpoint
    from moecompress.prune import prune_checkpoint

    kw = dict(calib=str(calib), n=4, seq_len=16, progress=False, overwrite=True)
    if kind == "prune":
        prune_checkpoint(src, out, keep=6, method="reap", **kw)
    else:
        merge_checkpoint(src, out, keep=4, **kw)


def _child(kind, src, out, calib):
    import torch

    torch.set_num_threads(1)
    _stage(kind, src, out, calib)
    os._exit(0)


@pytest.mark.parametrize("kind", ["prune", "merge"])
def test_sigkill_at_random_moments_leaves_nothing_partial(kind, tmp_path, monkeypatch):
    import threading

    from tqdm.std import tqdm

    from moecompress.check import check_checkpoint

    # tqdm's default write lock holds a multiprocessing semaphore that a forked child shares with
    # this process: a child killed while holding it (transformers' loading bar) would leave every
    # later progress bar here waiting forever. A process-local lock is copied, not shared, by fork.
    monkeypatch.setattr(tqdm, "_lock", threading.RLock(), raising=False)

    src, calib = tmp_path / "src", tmp_path / "calib.txt"
    tiny_checkpoint(src, "qwen3_moe")
    calib.write_text(SAMPLE_TEXT)
    ref = tmp_path / "ref"
    _stage(kind, src, ref, calib)  # warm the imports; the reference bytes
    ctx = multiprocessing.get_context("fork")
    out = tmp_path / "out"
    t0 = time.perf_counter()
    p = ctx.Process(target=_child, args=(kind, src, out, calib))
    p.start()
    p.join()
    full = time.perf_counter() - t0
    assert p.exitcode == 0 and out.is_dir()
    rng = random.Random(0)
    left = 0
    for _ in range(10):
        p = ctx.Process(target=_child, args=(kind, src, out, calib))
        p.start()
        time.sleep(rng.uniform(0, full))
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        left += any(q.name.startswith(".out.tmp-") for q in tmp_path.iterdir())
        # the destination is the previous complete output or a new complete one, never half of one
        assert check_checkpoint(out).ok and (out / "moecompress.json").is_file()
        assert sorted(os.listdir(out)) == sorted(os.listdir(ref))
    print(f"{kind}: one run {full:.2f} s; {left} of 10 kills left a temporary folder")
    assert left >= 1  # the kills did land while the stage was writing
    _stage(kind, src, out, calib)  # a re-run succeeds and removes what the killed runs left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "out", "ref", "src"]
    for name in os.listdir(ref):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
