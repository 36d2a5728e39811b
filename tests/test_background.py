"""Background work: its value or exception reaches the waiting thread, and a process that exits
while it runs native code ends with its own exit code, not an abort."""

import subprocess
import sys
import textwrap
import threading

import pytest

from moecompress.background import Background, stop_running


def test_result_value_and_exception_reach_the_waiting_thread():
    names = []
    job = Background(lambda stop: names.append(threading.current_thread().name) or 7, "moecompress-test")
    assert job.result() == 7 and names == ["moecompress-test"]
    failing = Background(lambda stop: 1 / 0, "moecompress-test")
    with pytest.raises(ZeroDivisionError):
        failing.result()
    assert isinstance(failing.error, ZeroDivisionError)


def test_running_work_is_stopped_and_joined_at_exit():
    steps = []

    def work(stop):
        while not stop.is_set():
            steps.append(1)
        return "stopped"

    job = Background(work, "moecompress-test")
    while not steps:
        pass
    stop_running()  # what atexit runs
    assert not job.thread.is_alive() and job.result() == "stopped"


def test_a_process_exiting_with_native_work_running_keeps_its_exit_code():
    """Without the stop at exit, a daemon thread inside torch's native code while the interpreter
    tears down aborts the process: 'terminate called without an active exception', exit 134."""
    script = textwrap.dedent("""
        import time, torch
        from moecompress.background import Background
        t = torch.randn(4_000_000)
        started = []
        def work(stop):
            while not stop.is_set():
                started.append(torch.aminmax(t))
        Background(work, "moecompress-test")
        while not started:
            time.sleep(0.001)
        raise SystemExit(2)
    """)
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                           env={"OMP_NUM_THREADS": "1", "PATH": "", "PYTHONPATH": ":".join(sys.path)})
        assert r.returncode == 2 and "terminate" not in r.stderr, r.stderr


def test_input_scan_stops_when_asked(tmp_path):
    from moecompress.integrity import first_nonfinite
    from moecompress.testing import tiny_checkpoint

    tiny_checkpoint(tmp_path)
    stop = threading.Event()
    assert first_nonfinite(tmp_path, stop=stop) is None
    stop.set()
    with pytest.raises(InterruptedError):  # never a verdict
        first_nonfinite(tmp_path, stop=stop)
