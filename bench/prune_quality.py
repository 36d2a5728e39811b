"""Quality of expert pruning on the testbed: method x repair x kept count x calibration seed x model.

Each variant is what ``moecompress prune --method M --repair R --seed S`` computes, through the
library calls of ``prune_checkpoint``: the calibration tokens of ``selection_and_repair_tokens`` (64 x 512
tokens of calib_mix.txt drawn with the seed), the kept sets of ``plan_experts`` (the seed also
seeds NAEE's token subsample), then ``keep_experts`` (no repair) or ``repair.prune_and_repair``
on the repair's calibration tokens (``repair.repair_tokens``); the model is cast to the
checkpoint's dtype (bf16), SAVED, reloaded with stock ``from_pretrained`` in float32, and its
perplexity measured on the first 20k tokens of val_docs / val_code / val_quotes
(non-overlapping 512-token windows, the testbed's reference method). The computation is float32
on every device (``--dtype``), so a GPU run gives the CPU's figures. To be economical the
routing statistics are collected once per model and seed, each kept set is selected once and
shared by the repair modes, and variants with the same kept set and repair are evaluated once.

Times: "select_s" is the selection, "repair_s" the repair (or the plain slicing), "eval_s" the
save + reload + perplexity.

  # the whole grid of issue 19 (both models, all kept counts, seeds 0-2, frequency +
  # weighted-ean-sum + the default, with and without repair), the table written into
  # docs/benchmarks.md between the prune-grid markers:
  python bench/prune_quality.py --acceptance --device cuda --json OUT.json --docs docs/benchmarks.md
  # the per-method grid (every method, seed 0, no repair):
  python bench/prune_quality.py --methods ... --repairs none --markdown table.md

``--domain`` adds the domain-calibration runs (calib_code vs calib_docs, 16 of 32, qwen).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moecompress.arch import moe_view  # noqa: E402
from moecompress.checkpoint import load_model, save_model  # noqa: E402
from moecompress.evaluate.perplexity import load_text_tokens, perplexity  # noqa: E402
from moecompress.prune import DEFAULT_METHOD, METHODS  # noqa: E402
from moecompress.prune.api import plan_experts  # noqa: E402
from moecompress.repair import DEFAULT_MODE, DEFAULT_TARGET, prune_and_repair, selection_and_repair_tokens  # noqa: E402
from moecompress.stats import collect_stats  # noqa: E402
from moecompress.stats.api import default_batch_size  # noqa: E402

TESTBED = Path(__file__).resolve().parents[2] / "shared" / "testbed"
EVAL_FILES = ("val_docs.txt", "val_code.txt", "val_quotes.txt")
DOMAINS = ("docs", "code", "quotes")
KEEPS = {"qwen3moe-32x64-top4": (24, 16, 8), "mixtral-8x256-top2": (6, 4, 2)}
ACCEPTANCE_METHODS = ("frequency", "weighted-ean-sum", DEFAULT_METHOD)
# Issue 19's acceptance: (model, kept) -> {domain: highest mean perplexity allowed}.
TARGETS = {("qwen3moe-32x64-top4", 16): {"docs": 15.0, "code": 9.5}, ("qwen3moe-32x64-top4", 24): {"docs": 12.75},
           ("qwen3moe-32x64-top4", 8): {"docs": 22.0}, ("mixtral-8x256-top2", 4): {"docs": 14.0, "code": 10.0}}
TOLERANCE = 1.02  # the robustness rule: the default never more than 2% worse than a baseline


def describe(device: str) -> str:
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "CPU"
    return f"{name}, torch {torch.__version__}, transformers {__import__('transformers').__version__}"


BEGIN, END = "<!-- prune-grid:begin (bench/prune_quality.py --docs) -->", "<!-- prune-grid:end -->"


def evaluate(folder: Path, ids: dict[str, torch.Tensor], device: str) -> dict[str, float]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    return {name: round(perplexity(model, t, 512)["ppl"], 3) for name, t in ids.items()}


def parse_options(items: list[str]) -> dict:
    out = {}
    for item in items:
        k, _, v = item.partition("=")
        out[k] = json.loads(v) if v[:1].isdigit() or v in ("true", "false") or v[:1] == "-" else v
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--testbed", default=str(TESTBED), help="folder with models/<name> and text/*.txt")
    ap.add_argument("--models", nargs="+", default=list(KEEPS))
    ap.add_argument("--methods", nargs="+", help="default: every method (--acceptance: frequency, "
                    "weighted-ean-sum and the default)")
    ap.add_argument("--repairs", nargs="+", help="none refit refit+router refit+tune, each optionally @stream or @layer "
                    "(the re-fit's target) and :RIDGE (default: none; --acceptance: none and the default repair)")
    ap.add_argument("--seeds", nargs="+", type=int, help="calibration seeds (default 0; --acceptance: 0 1 2)")
    ap.add_argument("--keeps", nargs="*", default=[], help="MODEL=K1,K2,... (default: 24,16,8 / 6,4,2)")
    ap.add_argument("--acceptance", action="store_true", help="issue 19's grid: seeds 0 1 2, frequency, "
                    "weighted-ean-sum and the default, without and with the default repair")
    ap.add_argument("--calib", default="calib_mix.txt")
    ap.add_argument("-n", type=int, default=64, help="calibration sequences (of 512 tokens)")
    ap.add_argument("--repair-n", type=int, help="the repair's calibration sequences (default: the library's)")
    ap.add_argument("--eval-tokens", type=int, default=20_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="compute dtype (the checkpoints are saved in bf16)")
    ap.add_argument("--domain", action="store_true", help="also calib_code / calib_docs at 16 of 32 (qwen)")
    ap.add_argument("--option", action="append", default=[], help="method option KEY=VALUE (repeatable)")
    ap.add_argument("--json", type=Path, help="rows (appended to: rows already there are not run again)")
    ap.add_argument("--markdown", type=Path, help="write the tables here")
    ap.add_argument("--docs", type=Path, help="write the tables into this file between the prune-grid markers")
    ap.add_argument("--render", nargs="+", type=Path, help="run nothing: the tables of these --json files "
                    "(e.g. one per model and seed, run in parallel)")
    a = ap.parse_args(argv)
    a.seeds = a.seeds if a.seeds is not None else [0, 1, 2] if a.acceptance else [0]
    a.methods = a.methods or (list(ACCEPTANCE_METHODS) if a.acceptance else list(METHODS))
    a.repairs = a.repairs or (["none", DEFAULT_MODE] if a.acceptance else ["none"])
    a.keep_map = dict(KEEPS)
    for item in a.keeps:
        name, _, ks = item.partition("=")
        a.keep_map[name] = tuple(int(k) for k in ks.split(","))
    return a


def run(a: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    tb = Path(a.testbed)
    options = parse_options(a.option)
    rows = json.loads(a.json.read_text()) if a.json and a.json.exists() else []
    key = ("model", "seed", "keep", "method", "repair", "calib")
    done = {tuple(r.get(k) for k in key) for r in rows}
    on_gpu = a.device != "cpu"
    for name in a.models:
        src = tb / "models" / name
        if not (src / "config.json").is_file():
            raise SystemExit(f"no testbed model {src}: pass --testbed FOLDER (with models/<name> and text/*.txt)")
        tok = AutoTokenizer.from_pretrained(src)
        ids = {f.split("_")[1].split(".")[0]: load_text_tokens(tok, tb / "text" / f, a.eval_tokens) for f in EVAL_FILES}
        if (name, None, None, "(base)", None, None) not in done:
            rows.append({"model": name, "seed": None, "keep": None, "method": "(base)", "repair": None, "calib": None,
                         "ppl": evaluate(src, ids, a.device), "device": describe(a.device)})
            print(json.dumps(rows[-1]), flush=True)
        runs = [(k, m, a.calib) for k in a.keep_map[name] for m in a.methods]
        if a.domain and name.startswith("qwen"):
            runs += [(16, m, c) for m in dict.fromkeys([DEFAULT_METHOD, "frequency"])
                     for c in ("calib_code.txt", "calib_docs.txt")]
        for seed in a.seeds:
            todo = [r for r in runs if any((name, seed, r[0], r[1], rep, r[2]) not in done for rep in a.repairs)]
            if not todo:
                continue
            model = load_model(src, dtype=a.dtype, device=None if a.device == "cpu" else a.device)
            evaluated: dict[tuple, dict] = {}  # (calib, kept, repair) -> the row that measured it
            for calib in dict.fromkeys(c for _, _, c in todo):
                calib_file = str(tb / "text" / calib)
                tokens, rtokens = selection_and_repair_tokens(tok, calib_file, n=a.n, seq_len=512, seed=seed,
                                                              sequences=a.repair_n)
                batch_size = default_batch_size(512, a.n, on_gpu=on_gpu)
                stats = None
                for keep, method, c in todo:
                    if c != calib:
                        continue
                    if stats is None and METHODS[method].needs != "nothing":
                        stats = collect_stats(model, tokens, batch_size=batch_size, progress=False)
                    t = time.perf_counter()
                    kept = plan_experts(model, keep=keep, method=method, tokens=tokens, stats=stats, seed=seed,
                                        batch_size=batch_size, **options).kept
                    select_s = time.perf_counter() - t
                    for repair in a.repairs:
                        if (name, seed, keep, method, repair, calib) in done:
                            continue
                        row = {"model": name, "seed": seed, "keep": keep, "method": method, "repair": repair,
                               "calib": calib, "select_s": round(select_s, 2), "options": options,
                               "device": describe(a.device),
                               "kept": {str(k): v for k, v in kept.items()}}
                        same = evaluated.get((calib, json.dumps(kept, sort_keys=True), repair))
                        if same is not None:  # e.g. auto at kept <= top-k is frequency: measured once
                            row.update({k: same[k] for k in ("ppl", "repair_s", "eval_s")}, same_as=same["method"])
                        else:
                            row.update(prune_eval(model, kept, repair, rtokens, batch_size, src, ids, a.device, seed))
                            evaluated[(calib, json.dumps(kept, sort_keys=True), repair)] = row
                        rows.append(row)
                        print(json.dumps({k: v for k, v in row.items() if k != "kept"}), flush=True)
                        if a.json:
                            a.json.write_text(json.dumps(rows, indent=1) + "\n")
            del model
    return rows


def prune_eval(model, kept, repair, tokens, batch_size, src, ids, device, seed: int = 0) -> dict:
    pruned = copy.deepcopy(model)
    t = time.perf_counter()
    if repair == "none":
        moe_view(pruned).keep_experts(kept)
    else:  # MODE[@TARGET][:RIDGE][/eEPOCHS][/lrLR] (e.g. refit@layer: the re-fit's target before the
        # stream target; refit+tune/e2/lr3e-4: the tuning's epochs and learning rate)
        spec, *tune = repair.split("/")
        tune = {t[:1] if t[0] == "e" else t[:2]: float(t[1:] if t[0] == "e" else t[2:]) for t in tune}
        spec, _, ridge = spec.partition(":")
        mode, _, target = spec.partition("@")
        prune_and_repair(pruned, kept, tokens, mode=mode, batch_size=batch_size, progress=False,
                         target=target or DEFAULT_TARGET, ridge=float(ridge) if ridge else None,
                         tune_epochs=int(tune["e"]) if "e" in tune else None, tune_lr=tune.get("lr"),
                         seed=seed)  # orders refit+tune's tokens, as prune --seed does
    repair_s = time.perf_counter() - t
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pruned.to(torch.bfloat16)  # the testbed checkpoints' dtype, as prune_checkpoint writes them
        save_model(pruned, Path(tmp) / "m", source=src)
        del pruned
        ppl = evaluate(Path(tmp) / "m", ids, device)
    return {"ppl": ppl, "repair_s": round(repair_s, 2), "eval_s": round(time.perf_counter() - t, 2)}


# ----- tables ------------------------------------------------------------------------------
def cell_means(rows: list[dict]) -> dict[tuple, dict]:
    """(model, calib, keep, method, repair) -> mean perplexity per domain, seeds, mean times."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["keep"] is not None:
            groups.setdefault((r["model"], r["calib"], r["keep"], r["method"], r["repair"]), []).append(r)
    out = {}
    for k, rs in groups.items():
        out[k] = {"ppl": {d: sum(r["ppl"][d] for r in rs) / len(rs) for d in DOMAINS},
                  "seeds": sorted(r["seed"] for r in rs),
                  "per_seed": {r["seed"]: r["ppl"] for r in rs},
                  "seconds": sum(r.get("select_s", 0) + r.get("repair_s", 0) for r in rs) / len(rs),
                  "repair_s": sum(r.get("repair_s", 0) for r in rs) / len(rs)}
    return out


def _fmt(p: dict) -> str:
    return " / ".join(f"{p[d]:.2f}" for d in DOMAINS)


def markdown(rows: list[dict], keeps: dict, calib: str = "calib_mix.txt") -> str:
    means = cell_means(rows)
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows):
        base = next(r for r in rows if r["model"] == name and r["keep"] is None)["ppl"]
        measured = {r["keep"] for r in rows if r["model"] == name and r["keep"] is not None}
        keeps = {**keeps, name: [k for k in keeps.get(name, sorted(measured, reverse=True)) if k in measured]}
        n_experts = 32 if name.startswith("qwen") else 8
        seeds = sorted({s for k, v in means.items() if k[0] == name for s in v["seeds"]})
        lines += [f"**{name}** (base: docs {base['docs']:.2f} / code {base['code']:.2f} / quotes {base['quotes']:.2f}; "
                  f"docs / code / quotes, mean of seeds {', '.join(map(str, seeds))}; time: selection + repair, s)", "",
                  "| method | repair | " + " | ".join(f"{k} of {n_experts}" for k in keeps[name]) + " |",
                  "|---|---|" + "---|" * len(keeps[name])]
        variants = dict.fromkeys((k[3], k[4]) for k in means if k[0] == name and k[1] == calib)
        for method, repair in variants:
            cells = []
            for k in keeps[name]:
                m = means.get((name, calib, k, method, repair))
                cells.append("—" if m is None else f"{_fmt(m['ppl'])} ({m['seconds']:.0f} s)")
            label = f"**{method}** (default)" if method == DEFAULT_METHOD else method
            lines.append(f"| {label} | {repair} | " + " | ".join(cells) + " |")
        lines.append("")
        per_seed = [(k, m) for k, m in sorted(means.items(), key=lambda i: i[0][2], reverse=True)
                    if k[0] == name and k[1] == calib and k[3] == DEFAULT_METHOD and k[4] == DEFAULT_MODE
                    and len(m["seeds"]) > 1]
        if per_seed:
            lines += [f"Default ({DEFAULT_METHOD} + {DEFAULT_MODE}) per seed:", "",
                      "| kept | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
            for k, m in per_seed:
                lines.append(f"| {k[2]} of {n_experts} | " + " | ".join(
                    _fmt(m["per_seed"][s]) if s in m["per_seed"] else "—" for s in seeds) + " |")
            lines.append("")
        dom = sorted((k, m) for k, m in means.items() if k[0] == name and k[1] != calib)
        if dom:
            lines += ["| method, repair | kept | calibration | docs / code / quotes |", "|---|---|---|---|"]
            lines += [f"| {k[3]}, {k[4]} | {k[2]} | {k[1]} | {_fmt(m['ppl'])} |" for k, m in dom]
            lines.append("")
    lines += verdicts(means, calib)
    return "\n".join(lines) + "\n"


def verdicts(means: dict, calib: str = "calib_mix.txt") -> list[str]:
    """Issue 19's acceptance on the measured means (only what the rows cover): for the default
    (``DEFAULT_METHOD`` + ``--repair DEFAULT_MODE``) and, where measured, the default method with
    ``--repair refit+tune``."""
    out = []
    for mode in (DEFAULT_MODE, "refit+tune"):
        out += _verdicts(means, calib, mode)
    return out


def _verdicts(means: dict, calib: str, mode: str) -> list[str]:
    out = []
    default = {k[:3]: m for k, m in means.items() if k[3] == DEFAULT_METHOD and k[4] == mode and k[1] == calib}
    if not default:
        return out
    label = "default" if mode == DEFAULT_MODE else "default method"
    out += [f"Acceptance (mean over the seeds measured; {label} = {DEFAULT_METHOD} + --repair {mode}):", ""]
    for (model, keep), targets in TARGETS.items():
        m = default.get((model, calib, keep))
        if m is not None:
            for d, bar in targets.items():
                ok = "met" if m["ppl"][d] <= bar else "**not met**"
                out.append(f"* {model} {keep} kept, {d}: {m['ppl'][d]:.3f} <= {bar} {ok}")
    for baseline in ("frequency", "weighted-ean-sum"):
        for repair in ("none", mode):
            worst, n = None, 0
            for (model, c, keep), m in default.items():
                b = means.get((model, c, keep, baseline, repair))
                if b is None:
                    continue
                n += 1
                for d in DOMAINS:
                    ratio = m["ppl"][d] / b["ppl"][d]
                    if worst is None or ratio > worst[0]:
                        worst = (ratio, model, keep, d)
            if worst is not None:
                ok = "holds" if worst[0] <= TOLERANCE else "**fails**"
                out.append(f"* vs {baseline} (repair {repair}), {n} cells: worst ratio {worst[0]:.3f} "
                           f"({worst[1]}, {worst[2]} kept, {worst[3]}): 2% rule {ok}")
    out.append("")
    return out


def write_docs(path: Path, text: str, command: str, rows: list[dict]) -> None:
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path} has no '{BEGIN}' ... '{END}' markers")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    devices = ", ".join(dict.fromkeys(r.get("device", "?") for r in rows))
    body = f"\n```console\n$ {command}\n```\n\n(written by the command; measured on {devices})\n\n{text}"
    path.write_text(head + BEGIN + body + END + tail)


def main(argv=None) -> None:
    a = parse_args(argv)
    start = time.perf_counter()
    if a.render:
        rows = [r for f in a.render for r in json.loads(f.read_text())]
    else:
        rows = run(a)
        print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    if a.json and not a.render:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    text = markdown(rows, a.keep_map, a.calib)
    if a.markdown:
        a.markdown.write_text(text)
    if a.docs:
        write_docs(a.docs, text, "python bench/prune_quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   rows)


if __name__ == "__main__":
    main()
