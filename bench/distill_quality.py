"""Quality of `moecompress distill` on the testbed: does distillation bring back what pruning lost?

  python bench/distill_quality.py [--model DIR] [--text DIR] [--data FILE ...] [--work DIR]
      [--keep 16] [--run NAME JSON ...] [--json OUT] [--device cpu|cuda]

1. One-shot: the model pruned to ``--keep`` experts with the default method (naee, 64 x 512
   tokens of calib_mix.txt, seed 0), cached in ``--work``.
2. Every ``--run NAME JSON`` distils: a run without ``stages`` starts from the one-shot model with
   the original as teacher; a run with ``stages`` slims the original itself (SlimMoE). The JSON
   holds ``distill_checkpoint`` options (default run: 60 steps, seq 256, batch 4, lr 3e-4).
3. Perplexity of the original, the one-shot model and every result: first 20k tokens of
   val_docs / val_code / val_quotes, 512-token windows, fp32 (the testbed's reference method),
   on the reloaded checkpoint as written.

Training data: ``--data`` files (default calib_mix.txt), concatenated; all are training-side text
of the testbed (make/build_corpus.py), none of the held-out val_* text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moecompress.checkpoint import load_model  # noqa: E402
from moecompress.distill import distill_checkpoint  # noqa: E402
from moecompress.evaluate.perplexity import load_text_tokens, perplexity  # noqa: E402
from moecompress.prune import prune_checkpoint  # noqa: E402

# ../shared/testbed from the repository (a worktree at /work/wt/X also finds /work/shared)
TESTBED = next((p / "shared" / "testbed" for p in Path(__file__).resolve().parents[1:4]
                if (p / "shared" / "testbed").is_dir()), Path("../shared/testbed"))
EVALS = ("val_docs", "val_code", "val_quotes")
DEFAULT_RUN = {"steps": 60, "seq_len": 256, "batch_size": 4, "lr": 3e-4}


def ppl(model_dir, texts: Path, device: str) -> dict:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, dtype="float32", device=device)
    out = {}
    for name in EVALS:
        ids = load_text_tokens(tok, texts / f"{name}.txt", 20_000)
        out[name] = round(perplexity(model, ids, 512, batch_size=8)["ppl"], 3)
    del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(TESTBED / "models" / "qwen3moe-32x64-top4"))
    ap.add_argument("--text", default=str(TESTBED / "text"))
    ap.add_argument("--data", nargs="*", default=None)
    ap.add_argument("--work", default="/tmp/distill-bench")
    ap.add_argument("--keep", type=int, default=16)
    ap.add_argument("--run", nargs=2, action="append", metavar=("NAME", "JSON"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    a = ap.parse_args()
    texts, work = Path(a.text), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data_files = a.data or [str(texts / "calib_mix.txt")]
    data = work / "train.txt"
    data.write_text("\n\n".join(Path(f).read_text(encoding="utf-8") for f in data_files), encoding="utf-8")
    pruned = work / f"oneshot{a.keep}"
    t = time.perf_counter()
    if not pruned.exists():
        prune_checkpoint(a.model, pruned, keep=a.keep, calib=str(texts / "calib_mix.txt"), n=64, seq_len=512,
                         device=a.device if a.device != "cpu" else None, progress=False)
    prune_s = time.perf_counter() - t
    result = {"model": a.model, "keep": a.keep, "data": data_files, "device": a.device,
              "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "base": ppl(a.model, texts, a.device), "oneshot": ppl(pruned, texts, a.device),
              "prune_seconds": round(prune_s, 1), "runs": []}
    print(json.dumps({k: result[k] for k in ("base", "oneshot")}), flush=True)
    save(result, a.json)
    for name, spec in a.run or [["kd", json.dumps(DEFAULT_RUN)]]:
        opts = {**DEFAULT_RUN, **json.loads(spec)}
        out = work / f"run-{name}"
        staged = "stages" in opts
        if staged:
            opts.pop("steps", None)
        t = time.perf_counter()
        try:
            r = distill_checkpoint(a.model if staged else pruned, out, teacher=a.model, data=data, overwrite=True,
                                   cpu=a.device == "cpu", progress=False, **opts)
        except Exception as e:  # one failed run must not lose the others' figures
            result["runs"].append({"name": name, "options": opts, "error": f"{type(e).__name__}: {e}"})
            print(result["runs"][-1], flush=True)
            continue
        wall = time.perf_counter() - t
        row = {"name": name, "options": opts, "student": "original, staged" if staged else "one-shot",
               "steps": r.steps, "tokens": r.tokens, "train_seconds": r.seconds, "wall_seconds": round(wall, 1),
               "tokens_per_s": round(r.tokens_per_s), "loss_first": r.first_loss, "loss_last": r.last_loss,
               "ppl": ppl(out, texts, a.device), "data_sha256": r.data_sha256}
        gap = result["oneshot"]["val_docs"] - result["base"]["val_docs"]
        row["docs_gap_recovered"] = round((result["oneshot"]["val_docs"] - row["ppl"]["val_docs"]) / gap, 3)
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
        save(result, a.json)  # after every run: a time limit keeps what was measured


def save(result: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
