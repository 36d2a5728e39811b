"""SlimMoE's staged slimming: cut a little, distil from the original model, cut again.

Li et al., "SlimMoE: Structured Compression of Large MoE Models via Expert Slimming and
Distillation" (COLM 2025, arXiv:2506.18349). The paper's observation is that one large cut
leaves a student too far from its teacher for distillation to bring back, while the same cut
made in several stages, each followed by knowledge distillation from the *original* model,
keeps much more. What SlimMoE prunes: the intermediate neurons of every expert's GLU (rows of
W1/W3, columns of W2), all experts kept, plus whole GQA groups of attention; its neuron score
is a first-order sensitivity of the top-8-logit KD loss between the current student and the
teacher. That score is not fully specified in public text, so it is not reproduced here.

What is implemented: a schedule of operations of this library, each followed by KD steps:

* ``heapr:R`` — remove expert neurons with HEAPr (``finegrained.heapr``: a second-order,
  Fisher-based score of each neuron's output on the language-modelling loss, computed on the
  current student), so that a fraction ``R`` of the ORIGINAL intermediate size is gone after
  this stage (``heapr:0.25; heapr:0.5`` ends at half). This is SlimMoE's slimming with
  HEAPr's score instead of SlimMoE's KD sensitivity; attention is not pruned.
* ``keep:N`` / ``ratio:R`` — keep N experts (or remove the fraction R of the original count)
  in every MoE layer with the library's expert pruning (``method:NAME``, default naee).
* ``merge:N`` — merge every layer's experts into N (``merge.merge_experts``, default m-smoe).

Syntax: stages separated by ``;``, each ``op:value`` then ``steps:N`` (KD steps after the op)
and optionally ``method:NAME``. A stage with only ``steps:N`` distils without cutting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import MoECompressError

OPS = ("heapr", "keep", "ratio", "merge")


@dataclass(frozen=True)
class Stage:
    op: str | None  # one of OPS, or None: distillation only
    value: float | None
    steps: int
    options: dict = field(default_factory=dict)  # method:NAME

    def describe(self) -> str:
        if self.op is None:
            return f"steps:{self.steps}"
        extra = "".join(f",{k}:{v}" for k, v in self.options.items())
        return f"{self.op}:{self.value:g}{extra},steps:{self.steps}"


def parse_stages(text: str) -> list[Stage]:
    """``"heapr:0.25,steps:200; keep:16,steps:400"`` -> stages (a one-line error otherwise)."""
    stages = []
    for i, part in enumerate(p.strip() for p in text.split(";")):
        if not part:
            continue
        op = value = steps = None
        options = {}
        for item in (x.strip() for x in part.split(",")):
            key, sep, val = item.partition(":")
            key, val = key.strip(), val.strip()
            if not sep or not val:
                raise MoECompressError(f"stage {i + 1} '{part}': write items as key:value, e.g. heapr:0.25,steps:200")
            if key == "steps":
                steps = _number(val, int, part)
            elif key == "method":
                options["method"] = val
            elif key in OPS:
                if op is not None:
                    raise MoECompressError(f"stage {i + 1} '{part}': one operation per stage ({op} and {key} given)")
                op, value = key, _number(val, int if key in ("keep", "merge") else float, part)
            else:
                raise MoECompressError(f"stage {i + 1} '{part}': unknown item '{key}'; use {', '.join(OPS)}, "
                                       "steps, method")
        if steps is None or steps < 0:
            raise MoECompressError(f"stage {i + 1} '{part}': say how many distillation steps follow, e.g. steps:200")
        if op in ("heapr", "ratio") and not 0 < value < 1:
            raise MoECompressError(f"stage {i + 1} '{part}': {op} takes a fraction in (0, 1), got {value:g}")
        if op in ("keep", "merge") and value < 1:
            raise MoECompressError(f"stage {i + 1} '{part}': {op} takes a count of experts >= 1, got {value:g}")
        if options and op not in ("keep", "ratio", "merge"):
            raise MoECompressError(f"stage {i + 1} '{part}': method: applies to keep, ratio and merge stages")
        stages.append(Stage(op, value, steps, options))
    if not stages:
        raise MoECompressError("--stages is empty; write e.g. 'heapr:0.25,steps:200; heapr:0.5,steps:400'")
    return stages


def _number(val: str, kind, part: str):
    try:
        x = float(val)
    except ValueError:
        raise MoECompressError(f"stage '{part}': '{val}' is not a number") from None
    if kind is int and x != int(x):
        raise MoECompressError(f"stage '{part}': '{val}' must be a whole number")
    return kind(x)


def apply_stage(model, stage: Stage, tokens: torch.Tensor, *, original_experts: int, original_intermediate: int,
                seed: int = 0, batch_size: int = 8, progress: bool = False) -> dict:
    """Apply ``stage``'s cut to ``model`` in place with the calibration ``tokens``; a JSON-able report."""
    from ..arch import moe_view

    view = moe_view(model)
    if stage.op is None:
        return {}
    if stage.op == "heapr":
        from ..finegrained.heapr import heapr_prune

        current = next(iter(view)).intermediate_size
        target = round((1 - stage.value) * original_intermediate)
        if target >= current:
            raise MoECompressError(f"stage '{stage.describe()}' keeps {target} of the original {original_intermediate} "
                                   f"expert neurons but the student already has {current}; schedule growing fractions")
        report = heapr_prune(model, tokens, 1 - target / current, batch_size=batch_size, progress=progress)
        return {"op": "heapr", "intermediate_size": next(iter(view)).intermediate_size, "report": _small(report)}
    if stage.op in ("keep", "ratio"):
        from ..prune import DEFAULT_METHOD, prune_experts

        keep = int(stage.value) if stage.op == "keep" else original_experts - int(round(stage.value * original_experts))
        if not 1 <= keep < view.num_experts:
            raise MoECompressError(f"stage '{stage.describe()}' keeps {keep} experts but the student has "
                                   f"{view.num_experts}; schedule fewer experts at each stage")
        result = prune_experts(model, keep=keep, method=stage.options.get("method", DEFAULT_METHOD), tokens=tokens,
                               seed=seed, batch_size=batch_size, progress=progress)
        return {"op": stage.op, "keep": keep, "method": result.method,
                "kept_experts": {str(k): v for k, v in result.kept.items()}}
    if stage.op == "merge":
        from ..merge import merge_experts
        from ..merge.api import DEFAULT_METHOD as MERGE_DEFAULT

        keep = int(stage.value)
        if not 1 <= keep < view.num_experts:
            raise MoECompressError(f"stage '{stage.describe()}' merges into {keep} experts but the student has "
                                   f"{view.num_experts}; schedule fewer experts at each stage")
        result = merge_experts(model, keep=keep, method=stage.options.get("method", MERGE_DEFAULT), tokens=tokens,
                               batch_size=batch_size, progress=progress)
        return {"op": "merge", "keep": keep, "method": result.method,
                "clusters": {str(k): v for k, v in result.clusters.items()}}
    raise MoECompressError(f"unknown stage operation '{stage.op}'; use {', '.join(OPS)}")


def _small(report: dict) -> dict:
    """The scalar part of a pruning report (per-neuron lists would bloat moecompress.json)."""
    return {k: v for k, v in report.items() if isinstance(v, (int, float, str, bool)) or v is None}
