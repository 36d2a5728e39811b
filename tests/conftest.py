import os

import pytest
import torch

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One thread: tiny models gain nothing from more, and on a busy machine OpenMP threads
# spin-waiting for a core made tiny forwards ~1000x slower.
torch.set_num_threads(1)

from moecompress.testing import TINY_CONFIGS, tiny_model  # noqa: E402

FAMILIES = sorted(TINY_CONFIGS)


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_under_pytest(tmp_path_factory):
    """What the library puts in the system's temporary folder (upload dry runs' staging
    folders, which they keep by design; offload folders) goes under pytest's own base folder,
    which pytest prunes, instead of accumulating in /tmp run after run."""
    import tempfile

    previous = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("system-tmp"))
    yield
    tempfile.tempdir = previous


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny_ckpt(tmp_path):
    """Factory: save a tiny model of a family to a folder, return (folder, model)."""

    def make(model_type="qwen3_moe", seed=0, **overrides):
        model = tiny_model(model_type, seed=seed, **overrides)
        folder = tmp_path / f"{model_type}-src"
        model.save_pretrained(folder)
        return folder, model

    return make


@pytest.fixture(scope="module")
def calib_ckpt(tmp_path_factory):
    """A folder with ``tiny/`` (a qwen3_moe checkpoint with tokenizer) and ``calib.txt``."""
    from moecompress.testing import SAMPLE_TEXT, tiny_checkpoint

    root = tmp_path_factory.mktemp("calib-ckpt")
    tiny_checkpoint(root / "tiny", "qwen3_moe")
    (root / "calib.txt").write_text(SAMPLE_TEXT)
    return root
