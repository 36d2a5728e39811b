"""bench/scale.py runs on the GPU machine only: its hooks into the package must still resolve here."""

import importlib.util
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "scale.py"


def _scale():
    spec = importlib.util.spec_from_file_location("bench_scale", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_timed_phase_names_a_function_of_the_package_and_is_restored():
    """A renamed function would silently drop out of the GPU run's time breakdown."""
    scale = _scale()
    from moecompress import integrity

    before = integrity.first_nonfinite
    with scale.phases() as ph:
        assert len(ph._undo) == len(scale.PHASES), [p for p in scale.PHASES if p[1] not in {u[1] for u in ph._undo}]
        assert integrity.first_nonfinite is not before
        assert integrity.has_nonfinite(torch.tensor([1.0, float("nan")]))  # an untimed helper stays as it is
        integrity.first_nonfinite(Path(__file__).parent / "data", {})  # no shards: a timed call of nothing
    assert integrity.first_nonfinite is before
    assert ph.report()["input NaN/Inf scan"]["calls"] == 1
