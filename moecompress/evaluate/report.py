"""Evaluation results as rows, a rich table (humans), markdown (model cards) and JSON (machines).

Result layout (what ``moecompress eval --json`` writes)::

    {"model": ..., "settings": {"seq_len", "stride", "max_tokens", "dtype", ...},
     "ppl": {name: float}, "tokens": {name: int}, "tasks": {task: {metric: float}},
     "base": {"model": ..., "ppl": {...}, "tasks": {...}},        # only with --base
     "kl": {name: float}, "top1_agreement": {name: float}}       # only with --base
"""

from __future__ import annotations

from .harness import headline_metrics


def rows(result: dict) -> list[tuple[str, float | None, float | None]]:
    """``(metric, model value, base value or None)`` for every number worth showing."""
    base = result.get("base") or {}
    out: list[tuple[str, float | None, float | None]] = []
    for name, value in result.get("ppl", {}).items():
        out.append((f"ppl {name}", value, base.get("ppl", {}).get(name)))
    for name, value in result.get("kl", {}).items():
        out.append((f"KL(base||model) {name}", value, None))
    for name, value in result.get("top1_agreement", {}).items():
        out.append((f"top-1 agreement {name}", value, None))
    base_tasks = base.get("tasks", {})
    for task, metrics in result.get("tasks", {}).items():
        for metric, value in headline_metrics(metrics).items():
            out.append((f"{task} {metric}", value, base_tasks.get(task, {}).get(metric)))
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"


def _change(v: float | None, b: float | None) -> str:
    if v is None or b is None or b == 0:
        return "-"
    return f"{100 * (v - b) / abs(b):+.1f}%"


def _header(result: dict) -> list[str]:
    if result.get("base"):
        return ["metric", "base", "compressed", "change"]
    return ["metric", "value"]


def _cells(result: dict) -> list[list[str]]:
    with_base = bool(result.get("base"))
    cells = []
    for name, v, b in rows(result):
        cells.append([name, _fmt(b), _fmt(v), _change(v, b)] if with_base else [name, _fmt(v)])
    return cells


def rich_table(result: dict, title: str | None = None):
    """One table; with a base model, base and compressed side by side."""
    from rich.table import Table

    header = _header(result)
    title = title or str(result.get("model", ""))
    t = Table(title=title, min_width=len(title) + 2)  # wide enough that the title is not wrapped
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row in _cells(result):
        t.add_row(*row)
    return t


def markdown_table(result: dict) -> str:
    """The same table in GitHub markdown (used in model cards)."""
    header = _header(result)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in _cells(result)]
    return "\n".join(lines) + "\n"


def settings_line(result: dict) -> str:
    """How the numbers were computed, in one sentence (under the tables)."""
    s = result.get("settings", {})
    parts = []
    if result.get("ppl"):
        stride = s.get("stride", s.get("seq_len"))
        kind = "non-overlapping" if stride == s.get("seq_len") else f"stride {stride}"
        first = f"first {s['max_tokens']} tokens" if s.get("max_tokens") else "all tokens"
        parts.append(f"perplexity on the {first} of each file, {kind} windows of {s.get('seq_len')} tokens")
    if result.get("kl"):
        parts.append("KL and top-1 agreement against the base on the same tokens")
    if result.get("tasks"):
        lim = f", limit {s['limit']}" if s.get("limit") else ""
        parts.append(f"lm-eval tasks{lim}")
    if s.get("dtype"):
        parts.append(f"dtype {s['dtype']}")
    return "; ".join(parts)
