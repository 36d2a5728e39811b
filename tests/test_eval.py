"""`moecompress eval`: perplexity windows, KL to the base, lm-eval tasks, tables (no network)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from moecompress.cli import app
from moecompress.errors import MoECompressError
from moecompress.evaluate import (compare_to_base, evaluate_models, load_text_tokens, markdown_table, perplexity,
                                  windows)
from moecompress.testing import tiny_model

runner = CliRunner()
TEXT = ("def add(a, b):\n    return a + b\n\nclass point:\n    x = 1\n    y = 2\n\n"
        "for i in range(10):\n    print(i * i)\n\n# comments explain why, not what.\n") * 8


def char_tokenizer():
    """A character-level tokenizer whose ids fit the tiny models' 96-token vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789 \n.,:;()[]=+-*/#'\"_?!<>ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    assert len(vocab) <= 96
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def reference_ppl(model, ids, seq):
    """Independent perplexity: the testbed's reference loop (non-overlapping windows)."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, seq):
            x = ids[s:s + seq + 1]
            logits = model(x[None, :-1]).logits.float()[0]
            nll += F.cross_entropy(logits, x[1:], reduction="sum").item()
            n += len(x) - 1
    return math.exp(nll / n), n


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture
def ckpt(tmp_path, tok):
    model = tiny_model("qwen3_moe", seed=1)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    text = tmp_path / "val.txt"
    text.write_text(TEXT)
    return folder, model, text


def test_windows_score_every_token_once():
    for n, seq, stride in [(11, 4, None), (12, 4, None), (10, 4, 2), (2, 4, None), (100, 7, 3)]:
        w = windows(n, seq, stride)
        assert sum(k for _, _, k in w) == n - 1
        assert all(e - b <= seq and 1 <= k <= e - b for b, e, k in w)
    assert windows(11, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    with pytest.raises(MoECompressError):
        windows(10, 4, 5)


def test_perplexity_matches_independent_computation(ckpt, tok):
    _, model, text = ckpt
    ids = load_text_tokens(tok, text, max_tokens=300)
    assert ids.numel() == 301
    ref, n = reference_ppl(model, ids, 64)
    for bs in (1, 3):
        r = perplexity(model, ids, 64, batch_size=bs)
        assert r["tokens"] == n == 300
        assert abs(r["ppl"] - ref) / ref < 1e-4  # acceptance asks 0.5%; same windows give ~float noise
    # sliding windows: each token still scored once, more context lowers nothing by construction
    assert perplexity(model, ids, 64, stride=16)["tokens"] == 300


def test_eval_cli_ppl_agrees_with_reference(ckpt, tmp_path, tok):
    folder, model, text = ckpt
    out = tmp_path / "eval.json"
    res = runner.invoke(app, ["eval", str(folder), "--ppl", str(text), "--seq-len", "32", "--max-tokens", "200",
                              "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    ref, _ = reference_ppl(model, load_text_tokens(tok, text, 200), 32)
    assert abs(data["ppl"]["val"] - ref) / ref < 0.005
    assert data["tokens"]["val"] == 200 and data["settings"]["seq_len"] == 32
    assert "ppl val" in res.output


def test_load_text_tokens_prefix_equals_full_tokenization(tmp_path, tok):
    f = tmp_path / "t.txt"
    f.write_text(TEXT * 20)
    full = tok(TEXT * 20)["input_ids"]
    assert load_text_tokens(tok, f, 100).tolist() == full[:101]
    assert load_text_tokens(tok, f).tolist() == full
    with pytest.raises(MoECompressError, match="not found"):
        load_text_tokens(tok, tmp_path / "missing.txt")
    (tmp_path / "one.txt").write_text("a")
    with pytest.raises(MoECompressError, match="at least 2"):
        load_text_tokens(tok, tmp_path / "one.txt")


def test_kl_of_model_with_itself_is_zero(ckpt, tok):
    _, model, text = ckpt
    ids = load_text_tokens(tok, text, 200)
    r = compare_to_base(model, model, ids, 64)
    assert r["kl"] == pytest.approx(0.0, abs=1e-7)
    assert r["top1_agreement"] == 1.0 and r["ppl"] == pytest.approx(r["base_ppl"])
    other = compare_to_base(tiny_model("qwen3_moe", seed=2), model, ids, 64)
    assert other["kl"] > 1e-3 and other["top1_agreement"] < 1.0


def test_side_by_side_table_and_markdown(ckpt, tok):
    _, model, text = ckpt
    result = evaluate_models(tiny_model("qwen3_moe", seed=2), tok, base=model, ppl_files=[text], seq_len=32,
                             max_tokens=100)
    md = markdown_table(result)
    assert md.splitlines()[0] == "| metric | base | compressed | change |"
    assert "| ppl val |" in md and "KL(base\\|\\|model) val" in md
    assert result["base"]["ppl"]["val"] != result["ppl"]["val"]


def test_eval_cli_with_base_itself(ckpt, tmp_path):
    folder, _, text = ckpt
    res = runner.invoke(app, ["eval", str(folder), "--base", str(folder), "--ppl", str(text), "--seq-len", "32",
                              "--max-tokens", "64", "--json", "-"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output[res.output.index("{"):])
    assert data["kl"]["val"] == pytest.approx(0.0, abs=1e-7) and data["top1_agreement"]["val"] == 1.0


@pytest.mark.parametrize("args,msg", [
    ([], "nothing to evaluate"),
    (["--ppl", "/nonexistent/file.txt"], "not found"),
    (["--ppl", "{text}", "--seq-len", "0"], "--seq-len"),
])
def test_eval_cli_errors_are_one_line(ckpt, args, msg):
    folder, _, text = ckpt
    args = [a.replace("{text}", str(text)) for a in args]
    res = runner.invoke(app, ["eval", str(folder), *args])
    assert res.exit_code == 2, res.output
    assert msg in res.output and "Traceback" not in res.output


# ---- lm-eval (the 'eval' extra; installed by the README's install line, so CI runs these) ----

def _lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install -e '.[eval]'")


def _tiny_task(folder):
    docs = [{"q": "x = 1 +", "choices": [" 1", " (", " def"], "answer": 0},
            {"q": "for i in", "choices": [" 7", " range", " +"], "answer": 1},
            {"q": "print(", "choices": [" (", ")", "i)"], "answer": 2},
            {"q": "class", "choices": [" point", " 9", " ="], "answer": 0}]
    (folder / "tiny.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'tiny.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    return docs


def test_lm_eval_local_task_matches_manual_scoring(ckpt, tok, tmp_path):
    _lm_eval()
    from moecompress.evaluate import run_tasks

    _, model, _ = ckpt
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    docs = _tiny_task(task_dir)
    res = run_tasks(model, tok, ["tiny_mc"], include_path=[task_dir])
    # manual: the choice with the highest log-likelihood of its tokens after "q" + " " (target delimiter)
    correct = 0
    for d in docs:
        ctx = tok(d["q"] + " ", add_special_tokens=False)["input_ids"]
        scores = []
        for c in d["choices"]:
            cont = tok(c, add_special_tokens=False)["input_ids"]
            x = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = F.log_softmax(model(x[:, :-1]).logits.float()[0], -1)
            scores.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == d["answer"])
    assert res["tiny_mc"]["acc"] == pytest.approx(correct / len(docs))


def test_eval_cli_shipped_task_offline(ckpt, tmp_path):
    _lm_eval()
    folder, _, _ = ckpt
    out = tmp_path / "e.json"
    res = runner.invoke(app, ["eval", str(folder), "--tasks", "moecompress_python_mc", "--limit", "4",
                              "--json", str(out)])
    assert res.exit_code == 0, res.output
    acc = json.loads(out.read_text())["tasks"]["moecompress_python_mc"]["acc"]
    assert 0.0 <= acc <= 1.0


def test_eval_cli_unknown_task(ckpt, tmp_path, monkeypatch):
    _lm_eval()
    from lm_eval.tasks import TaskManager

    from moecompress.evaluate import harness

    # Indexing lm-eval's thousands of built-in YAMLs takes seconds; the error path is the same without them.
    lm_eval, HFLM, _ = harness._lm_eval()
    monkeypatch.setattr(harness, "_lm_eval", lambda: (lm_eval, HFLM, lambda **kw: TaskManager(
        **{**kw, "include_defaults": False})))
    import moecompress.checkpoint

    def no_load(*a, **k):  # the task names are checked before any model loads
        raise AssertionError("a model was loaded before the task names were checked")

    monkeypatch.setattr(moecompress.checkpoint, "load_model", no_load)
    folder, _, _ = ckpt
    res = runner.invoke(app, ["eval", str(folder), "--tasks", "no_such_task_xyz", "--include-path", str(tmp_path)])
    assert res.exit_code == 2 and "unknown lm-eval task" in res.output
