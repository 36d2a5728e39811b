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

def _recipe(kind: str, tmp_path, out):
    """The recipe a command runs: `prune`/`merge` on the command line are one-stage recipes
    (commands._common.one_stage); `recipe` is prune then merge."""
    import yaml

    stages = {"prune": [{"prune": {"keep": 6, "method": "reap"}}], "merge": [{"merge": {"keep": 4}}],
              "recipe": [{"prune": {"keep": 6, "method": "frequency"}}, {"merge": {"keep": 4}}]}[kind]
    path = tmp_path / f"{kind}-{out.name}.yaml"
    path.write_text(yaml.safe_dump({"model": str(tmp_path / "src"), "output": str(out),
                                    "calibration": {"calib": str(tmp_path / "calib.txt"), "n": 4, "seq_len": 16},
                                    "stages": stages}))
    return path


def _stage(kind: str, tmp_path, out):
    from moecompress.prune import prune_checkpoint
    from moecompress.recipe import run_recipe

    if kind == "prune-library":  # the library's own path (checkpoint.output_folder)
        prune_checkpoint(tmp_path / "src", out, keep=6, method="reap", calib=str(tmp_path / "calib.txt"), n=4,
                         seq_len=16, progress=False, overwrite=True)
    else:
        run_recipe(_recipe(kind, tmp_path, out), overwrite=True, progress=False)


def _private_tqdm_locks(setattr=setattr):
    """tqdm's default lock is a multiprocessing lock shared with forked children: one killed while
    it holds it leaves every later progress bar of the parent waiting forever. Process-private
    locks instead (and no monitor thread that could hold one while a child is forked)."""
    import threading

    from tqdm import tqdm

    classes = [tqdm]
    for c in classes:
        classes += c.__subclasses__()
    for c in classes:
        if c is tqdm or "_lock" in c.__dict__:
            setattr(c, "_lock", threading.RLock())
    setattr(tqdm, "monitor_interval", 0)


def _child(kind, tmp_path, out):
    import torch

    torch.set_num_threads(1)
    _private_tqdm_locks()
    _stage(kind, tmp_path, out)
    os._exit(0)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("kind", ["prune", "merge", "recipe", "prune-library"])
def test_sigkill_at_random_moments_leaves_nothing_partial(kind, tmp_path, monkeypatch):
    """SIGKILL at 10 random moments: the destination is absent or a complete output, never half
    of one; the next run removes what the killed runs left and writes the same bytes."""
    _private_tqdm_locks(functools.partial(monkeypatch.setattr, raising=False))
    tiny_checkpoint(tmp_path / "src", "qwen3_moe")
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    ref, out = tmp_path / "ref", tmp_path / "out"
    _stage(kind, tmp_path, ref)  # warm the imports; the reference bytes
    ctx = multiprocessing.get_context("fork")
    t0 = time.perf_counter()
    p = ctx.Process(target=_child, args=(kind, tmp_path, tmp_path / "timed"))
    p.start()
    p.join(120)
    full = time.perf_counter() - t0
    assert p.exitcode == 0 and _files(tmp_path / "timed") == _files(ref)
    rng = random.Random(0)
    left = complete = 0
    for _ in range(10):
        p = ctx.Process(target=_child, args=(kind, tmp_path, out))
        p.start()
        time.sleep(rng.uniform(0, full))
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        assert p.exitcode == -signal.SIGKILL or p.exitcode == 0
        left += any(q.name.startswith(".out.tmp-") for q in tmp_path.iterdir())
        # the destination is absent or a complete output (the previous or a new one), never half of one
        if out.exists():
            complete += 1
            assert _files(out) == _files(ref)
    print(f"{kind}: one run {full:.2f} s; {left} of 10 kills left a temporary folder; the output existed after "
          f"{complete}")
    assert left >= 1  # the kills did land while the stage was writing
    _stage(kind, tmp_path, out)  # a re-run succeeds and removes what the killed runs left
    assert sorted(q.name for q in tmp_path.iterdir() if not q.name.endswith(".yaml")) == \
        ["calib.txt", "out", "ref", "src", "timed"]
    assert _files(out) == _files(ref)
