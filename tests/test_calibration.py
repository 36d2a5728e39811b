"""Calibration loaders: files, shipped sets, modes, seeds and the errors a user can cause."""

import json
from pathlib import Path

import pytest
import torch

import moecompress
from moecompress.calibration import check_source, default_sets, default_sets_dir, load_calibration, read_documents
from moecompress.errors import MoECompressError


class WordTokenizer:
    """Offline stand-in for a HF tokenizer: one id per whitespace-separated word."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        class Out:
            pass

        out = Out()
        out.input_ids = [3 + (sum(map(ord, w)) % 90) for w in text.split()]
        return out


TOK = WordTokenizer()


def _words(n, start=0):
    return " ".join(f"w{i}" for i in range(start, start + n))


def test_txt_chunks_are_deterministic_per_seed(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(_words(1000))
    a = load_calibration(TOK, f, n=5, seq_len=32, seed=1)
    b = load_calibration(TOK, f, n=5, seq_len=32, seed=1)
    c = load_calibration(TOK, f, n=5, seq_len=32, seed=2)
    assert a.shape == (5, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    # chunks are non-overlapping slices of the token stream, in stream order
    stream = torch.tensor(TOK(_words(1000)).input_ids[: 31 * 32]).reshape(31, 32)
    assert all(any(torch.equal(row, s) for s in stream) for row in a)


def test_jsonl_field_and_document_mode(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"body": _words(40, i * 100)} for i in range(6)] + [{"body": "too short"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = load_calibration(TOK, f, n=6, seq_len=40, seed=0, mode="document", field="body")
    assert docs.shape == (6, 40)  # the short document is skipped
    with pytest.raises(MoECompressError, match="no field 'text'.*--field"):
        load_calibration(TOK, f, n=1, seq_len=8)
    with pytest.raises(MoECompressError, match="only 6 sequences"):
        load_calibration(TOK, f, n=7, seq_len=40, mode="document", field="body")


def test_txt_document_mode_splits_at_blank_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n\n".join(_words(20, i * 50) for i in range(4)))
    assert len(read_documents(f, mode="document")) == 4
    assert len(read_documents(f, mode="chunk")) == 1
    assert load_calibration(TOK, f, n=4, seq_len=20, mode="document").shape == (4, 20)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": [_words(50, i * 100) for i in range(3)], "id": [1, 2, 3]}), f)
    assert load_calibration(TOK, f, n=3, seq_len=16, field="content").shape == (3, 16)
    with pytest.raises(MoECompressError, match="no column 'text'"):
        load_calibration(TOK, f, n=1, seq_len=16)


@pytest.mark.parametrize("content,match", [
    ("", "holds no text"),
    ("   \n\n  ", "holds no text"),
    ("a b c", "only 0 sequences"),
])
def test_empty_or_too_short_text(tmp_path, content, match):
    f = tmp_path / "e.txt"
    f.write_text(content)
    with pytest.raises(MoECompressError, match=match):
        load_calibration(TOK, f, n=1, seq_len=16)


def test_bad_jsonl_lines(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(MoECompressError, match=r"b.jsonl:2 is not valid JSON"):
        read_documents(f)
    f.write_text('["a list"]\n')
    with pytest.raises(MoECompressError, match="not a JSON object"):
        read_documents(f)


def test_bad_arguments(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(_words(100))
    with pytest.raises(MoECompressError, match="-n >= 1"):
        load_calibration(TOK, f, n=0, seq_len=8)
    with pytest.raises(MoECompressError, match="unknown calibration mode"):
        load_calibration(TOK, f, n=1, seq_len=8, mode="lines")
    with pytest.raises(MoECompressError, match="not found"):
        load_calibration(TOK, tmp_path / "missing.txt", n=1, seq_len=8)
    with pytest.raises(MoECompressError, match="not found"):
        check_source("data/missing.jsonl")  # a relative path, not a Hub name
    with pytest.raises(MoECompressError, match="is a folder"):
        load_calibration(TOK, tmp_path, n=1, seq_len=8)


def test_hub_name_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_source("someorg/somedata:train")  # accepted as a Hub name without touching the network
    with pytest.raises(MoECompressError, match="(unreachable|install `datasets`).*local"):
        read_documents("someorg/somedata:train")


def test_shipped_sets_are_package_data_and_load():
    sets = default_sets()
    assert {"python_docs", "python_code", "numpy_docs"} <= set(sets)
    # the real folder lives inside the package, so wheels carry it as package data
    assert default_sets_dir() == Path(moecompress.__file__).resolve().parent / "calibration_data"
    assert sum(p.stat().st_size for p in sets.values()) < 2_000_000
    for name in ("python_docs", "python_code", "numpy_docs.jsonl"):
        toks = load_calibration(TOK, name, n=8, seq_len=64, seed=0)
        assert toks.shape == (8, 64)
    assert load_calibration(TOK, "numpy_docs", n=8, seq_len=64, mode="document").shape == (8, 64)
    readme = (default_sets_dir() / "README.md").read_text()
    assert all(name in readme for name in sets)
