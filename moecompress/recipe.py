"""`moecompress run RECIPE.yaml`: chain stages from one YAML recipe.

    model: Qwen/Qwen3-30B-A3B            # or a local folder
    output: out/qwen3-30b-pruned
    seed: 0
    calibration: {calib: calibration/mix.txt, n: 64, seq_len: 512}
    stages:
      - prune: {method: reap, ratio: 0.25}
      - eval: {ppl: [val.txt], base: true}

Modelled on llm-compressor's recipes: a list of stages, each a name and its options, which
are exactly the options of the stage's library function (checked before any work starts).
Checkpoint stages run one after another, each reading the previous one's output from a
temporary folder; only the final checkpoint lands in ``output`` (renamed into place when the
whole recipe succeeded), with the resolved recipe recorded in ``moecompress.json`` and eval
results in ``eval.json``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .checkpoint import RECORD_FILE, output_folder
from .errors import MoECompressError
from .options import CalibrationOptions




class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    output: str
    seed: int = 0
    dtype: str | None = None
    device: str | None = None
    calibration: CalibrationOptions | None = None
    stages: list[dict[str, dict[str, Any] | None]]

    @field_validator("stages")
    @classmethod
    def _one_name_each(cls, stages):
        if not stages:
            raise ValueError("a recipe needs at least one stage")
        for i, st in enumerate(stages):
            if len(st) != 1:
                raise ValueError(f"stage {i + 1} must be one mapping 'name: {{options}}', got {sorted(st)}")
        return stages


@dataclass(frozen=True)
class Stage:
    """A stage of the recipe runner: the library function and what it consumes."""

    name: str
    target: str  # "module:function"
    writes_checkpoint: bool = True
    calibrated: bool = True  # takes calib / n / seq_len / seed

    def function(self) -> Callable:
        module, _, fn = self.target.partition(":")
        return getattr(importlib.import_module(module), fn)


# The library function of every implemented stage (the recipe runner runs those in STAGES).
LIBRARY = {
    "stats": "moecompress.stats.api:stats_for_checkpoint",
    "prune": "moecompress.prune.checkpoint:prune_checkpoint",
    "merge": "moecompress.merge.api:merge_checkpoint",
    "eval": "moecompress.evaluate:evaluate_checkpoint",
    "upload": "moecompress.upload:upload",
}


def library_functions() -> dict[str, Callable]:
    return {name: Stage(name, target).function() for name, target in LIBRARY.items()}


STAGES = {
    "prune": Stage("prune", "moecompress.prune.checkpoint:prune_checkpoint"),
    "merge": Stage("merge", "moecompress.merge.api:merge_checkpoint"),
    "eval": Stage("eval", "moecompress.evaluate:evaluate_checkpoint", writes_checkpoint=False, calibrated=False),
}


def recipe_schema() -> dict:
    """JSON schema of every stage's options as a recipe may set them (from the options models)."""
    from .options import STAGE_OPTIONS
    from .options.base import recipe_fields

    out = {}
    for name, model in STAGE_OPTIONS.items():
        schema = model.model_json_schema()
        keep = recipe_fields(model)
        schema["properties"] = {k: v for k, v in schema["properties"].items() if k in keep}
        schema["required"] = [k for k in schema.get("required", []) if k in keep]
        out[name] = schema
    return out


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise MoECompressError(f"recipe '{path}' not found; pass a YAML file (see recipes/ for examples)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise MoECompressError(f"recipe '{path}' is not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise MoECompressError(f"recipe '{path}' must be a mapping with model, output and stages")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "recipe"
        raise MoECompressError(f"malformed recipe '{path}': {loc}: {err['msg']}") from None
    _check_stages(recipe)
    return recipe


def _stage_call(recipe: Recipe, index: int) -> tuple[Stage, Callable, dict[str, Any]]:
    (name, options), = recipe.stages[index].items()
    options = dict(options or {})
    if name not in STAGES:
        raise MoECompressError(f"recipe stage {index + 1}: unknown stage '{name}'; stages: {', '.join(STAGES)}")
    stage = STAGES[name]
    fn = stage.function()
    kwargs: dict[str, Any] = {}
    if stage.calibrated:
        if recipe.calibration is not None:
            kwargs.update(recipe.calibration.model_dump(exclude_unset=True))
        kwargs["seed"] = recipe.seed
    if recipe.dtype is not None:
        kwargs["dtype"] = recipe.dtype
    if recipe.device is not None:
        kwargs["device"] = recipe.device
    kwargs.update(options)
    params = dict(inspect.signature(fn).parameters)
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        allowed = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY
                   and p not in ("progress", "options")]
        raise MoECompressError(f"recipe stage {index + 1} ({name}): unknown option(s) {', '.join(unknown)}; "
                               f"options: {', '.join(allowed)}")
    return stage, fn, kwargs


def _check_stages(recipe: Recipe) -> None:
    for i in range(len(recipe.stages)):
        _stage_call(recipe, i)
    if not any(STAGES[next(iter(s))].writes_checkpoint for s in recipe.stages):
        raise MoECompressError("recipe has no stage that writes a checkpoint (prune or merge)")


def run_recipe(path: str | Path, *, overwrite: bool = False, say: Callable[[str], None] = lambda m: None) -> dict:
    """Run every stage of the recipe at ``path``; returns a summary (also in the output folder)."""
    recipe = load_recipe(path)
    resolved = recipe.model_dump()
    summary: dict[str, Any] = {"recipe": resolved, "stages": []}
    with output_folder(recipe.output, overwrite=overwrite, source=recipe.model) as final:
        work = Path(tempfile.mkdtemp(prefix=".stages-", dir=final.parent))
        try:
            current: str = recipe.model
            evals = []
            for i in range(len(recipe.stages)):
                stage, fn, kwargs = _stage_call(recipe, i)
                say(f"stage {i + 1}/{len(recipe.stages)}: {stage.name} {kwargs}")
                if stage.writes_checkpoint:
                    out = work / f"{i + 1:02d}-{stage.name}"
                    result = fn(current, out, **kwargs)
                    current = str(out)
                else:  # eval: base true means the recipe's input model
                    if kwargs.get("base") is True:
                        kwargs["base"] = recipe.model
                    result = fn(current, **kwargs)
                    evals.append(result)
                summary["stages"].append({"stage": stage.name, "options": kwargs, "result": _jsonable(result)})
            for f in Path(current).iterdir():
                shutil.move(str(f), final / f.name)
            record_path = final / RECORD_FILE
            record = json.loads(record_path.read_text()) if record_path.exists() else {}
            record["recipe"] = resolved
            record_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            if evals:
                (final / "eval.json").write_text(json.dumps(_jsonable(evals[-1]), indent=2, sort_keys=True) + "\n")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return summary


def _jsonable(o):
    if hasattr(o, "to_dict"):
        o = o.to_dict()
    try:
        return json.loads(json.dumps(o, default=str))
    except (TypeError, ValueError):
        return str(o)
