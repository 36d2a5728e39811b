"""A small JSON digest of :class:`Stats` (written beside the safetensors file, shown by
``moecompress stats show``)."""

from __future__ import annotations

import math


def _num(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else round(x, 6)


def layer_summary(stats, li: int) -> dict:
    d = stats.layer_dict(li)
    cnt = d["count"].double()
    total = float(cnt.sum())
    out = {
        "layer": li,
        "experts": int(cnt.numel()),
        "unused_experts": int((cnt == 0).sum()),
        "entropy": _num(d["entropy"]),
        "load_cv": _num(d["load_cv"]),
        "max_share": _num(cnt.max() / total) if total else None,
        "min_share": _num(cnt.min() / total) if total else None,
        "srp": _num(d["srp"]),
        "sch": [_num(v) for v in d["sch"].tolist()],
        "super_experts": [int(i) for i in d["super_experts"].nonzero().flatten().tolist()],
        "super_out_max": _num(d["super_out_max"].max()),
        "top_by_count": [int(i) for i in cnt.argsort(descending=True, stable=True)[:8].tolist()],
        "top_by_reap": [int(i) for i in d["reap"].argsort(descending=True, stable=True)[:8].tolist()],
    }
    return out


def summarize(stats) -> dict:
    return {"meta": stats.meta, "layers": [layer_summary(stats, li) for li in stats.layers]}
