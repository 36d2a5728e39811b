"""Model card and Hub upload, against a local HTTP server that speaks the Hub API (no network)."""

import base64
import json
import re
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moecompress.card import build_card
from moecompress.checkpoint import write_record
from moecompress.cli import app
from moecompress.errors import MoECompressError
from moecompress.upload import upload

runner = CliRunner()


@pytest.fixture
def compressed(tiny_ckpt, tmp_path):
    """A 'pruned' checkpoint folder: weights, a two-stage record and an eval.json."""
    folder, _ = tiny_ckpt("qwen3_moe")
    write_record(folder, {"stage": "stats", "method": "frequency", "parameters": {"n": 64}}, source="Qwen/Qwen3-30B-A3B")
    rec = json.loads((folder / "moecompress.json").read_text())
    rec = {"stage": "prune", "method": "reap", "seed": 0, "parameters": {"keep": 6, "calib": "calib_mix.txt"},
           "kept_experts": {"1": [0, 1, 2, 3, 5, 7]}, "source": "/tmp/stats-out", "history": [rec]}
    (folder / "moecompress.json").write_text(json.dumps(rec))
    ev = {"model": str(folder), "settings": {"seq_len": 512, "stride": 512, "max_tokens": 20000},
          "ppl": {"val_docs": 14.2}, "tokens": {"val_docs": 20000}, "tasks": {},
          "base": {"model": "base", "ppl": {"val_docs": 12.5}, "tasks": {}},
          "kl": {"val_docs": 0.05}, "top1_agreement": {"val_docs": 0.9}}
    (folder / "eval.json").write_text(json.dumps(ev))
    return folder


def test_card_contains_recipe_and_table(compressed):
    card = build_card(compressed, "me/tiny-pruned")
    text = str(card)
    assert card.data.base_model == "Qwen/Qwen3-30B-A3B"
    assert {"moecompress", "moe", "prune", "stats"} <= set(card.data.tags)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "**prune** — method `reap` (keep=6, calib=calib_mix.txt)" in text
    assert "| metric | base | compressed | change |" in text
    assert "| ppl val_docs | 12.50 | 14.20 | +13.6% |" in text
    assert '"kept_experts"' in text  # the full recipe / record
    assert "experts per MoE layer: 8" in text


def test_card_shows_the_pictures_in_the_folder(compressed):
    """A stage's PNG in the output folder (plotting.PICTURES) appears in the card with its caption;
    a folder without one gets no Pictures section."""
    from moecompress.plotting import PICTURES

    assert "## Pictures" not in str(build_card(compressed))
    (compressed / "bit_map.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    text = str(build_card(compressed))
    assert "## Pictures" in text and "![bit_map.png](bit_map.png)" in text and PICTURES["bit_map.png"] in text
    assert "loss_curve.png" not in text


def test_dry_run_writes_card_and_lists_files(compressed, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    res = runner.invoke(app, ["upload", str(compressed), "me/tiny", "--dry-run", "--json", "-"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    names = {f["path"] for f in out["files"]}
    assert {"README.md", "config.json", "moecompress.json", "eval.json", "model.safetensors"} <= names
    assert out["url"] is None and Path(out["card"]).read_text().startswith("---")
    assert not (compressed / "README.md").exists()  # the folder itself is never written to


@pytest.mark.parametrize("case", ["missing", "no_weights", "bad_repo"])
def test_upload_input_errors(tmp_path, compressed, case):
    if case == "missing":
        args = [str(tmp_path / "nope"), "me/x"]
    elif case == "no_weights":
        (tmp_path / "cfg").mkdir()
        (tmp_path / "cfg" / "config.json").write_text("{}")
        args = [str(tmp_path / "cfg"), "me/x"]
    else:
        args = [str(compressed), "not a repo id"]
    res = runner.invoke(app, ["upload", *args, "--dry-run"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_no_token_is_a_clear_error(compressed, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    res = runner.invoke(app, ["upload", str(compressed), "me/x"])
    assert res.exit_code == 2 and "no Hugging Face token" in res.output


class FakeHub(BaseHTTPRequestHandler):
    """Answers the calls HfApi.create_repo + upload_folder make; records what it received."""

    received: dict = {}
    calls: list = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, code, payload):
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        base = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"
        self.calls.append((self.path, self.headers.get("Authorization")))
        if self.path == "/api/repos/create":
            req = json.loads(body)
            self.received["create"] = req
            return self._reply(200, {"url": f"{base}/{req['organization']}/{req['name']}"})
        if self.path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/main", self.path):
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/main", self.path):
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.received[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return self._reply(200, {"commitUrl": f"{base}/{m.group(1)}/commit/{'a' * 40}", "commitOid": "a" * 40})
        self._reply(404, {"error": f"unexpected call {self.path}"})

    def do_GET(self):
        self.calls.append((self.path, self.headers.get("Authorization")))
        self._reply(404, {"error": f"unexpected call {self.path}"})


@contextmanager
def fake_hub():
    """A Hub stand-in on 127.0.0.1 (random port) that shuts itself down after 60 s at the latest."""
    FakeHub.received, FakeHub.calls = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(60, server.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def online(monkeypatch):
    # conftest sets HF_HUB_OFFLINE=1 (read once by huggingface_hub); the fake Hub is local, so allow it here.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_upload_to_local_hub(compressed, online):
    with fake_hub() as endpoint:
        out = upload(compressed, "me/tiny-pruned", private=True, token="hf_test", endpoint=endpoint)
    got = FakeHub.received
    assert got["create"] == {"name": "tiny-pruned", "organization": "me", "visibility": "private"}
    assert {f["path"] for f in out["files"]} == set(got) - {"create"}
    assert got["config.json"] == (compressed / "config.json").read_bytes()
    assert b"moecompress" in got["README.md"] and b"| ppl val_docs |" in got["README.md"]
    assert all(auth == "Bearer hf_test" for _, auth in FakeHub.calls)
    assert out["url"].endswith("/me/tiny-pruned") and out["commit"] == "a" * 40


def test_upload_cli_to_local_hub(compressed, online, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    with fake_hub() as endpoint:
        res = runner.invoke(app, ["upload", str(compressed), "me/tiny", "--endpoint", endpoint])
    assert res.exit_code == 0, res.output
    assert "uploaded:" in res.output and "model.safetensors" in FakeHub.received
    assert all(auth == "Bearer hf_env" for _, auth in FakeHub.calls)


def test_unreachable_hub_is_a_clear_error(compressed, online):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MoECompressError, match="cannot reach the Hugging Face Hub"):
        upload(compressed, "me/x", token="hf_test", endpoint=f"http://127.0.0.1:{port}")
