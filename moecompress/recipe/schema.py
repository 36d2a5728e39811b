"""Reading a recipe: YAML with line numbers, ``--set`` overrides, and every stage validated
against its options model before any model is loaded.

    model: Qwen/Qwen3-30B-A3B            # or a local folder
    output: out/qwen3-30b-pruned          # optional: `run -o` / `--set output=...`
    seed: 0                               # top-level defaults for every stage that takes them:
    dtype: auto                           #   seed, dtype, device, max_gpu_memory, max_cpu_memory
    calibration: {calib: python_docs, n: 64, seq_len: 512}
    stages:
      - prune: {method: reap, ratio: 0.25}
      - eval: {ppl: [val.txt], base: true}   # base: true = the recipe's model

A stage's options are exactly its library function's (``moecompress.options``); the resolved
recipe lists every option of every stage, so it reproduces the run by itself.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from ..errors import MoECompressError
from pydantic import ValidationError

from ..options import STAGE_OPTIONS, CalibrationOptions, LoadingOptions, Options, StreamingOptions
from ..options.base import one_line_error, recipe_fields

# What a stage does with the current checkpoint: writes a new one, writes a file, reads it.
KINDS = {"stats": "stats", "prune": "checkpoint", "merge": "checkpoint", "quantize": "checkpoint",
         "distill": "checkpoint", "eval": "eval", "upload": "upload"}
LIBRARY = {
    "stats": "moecompress.stats.api:stats_for_checkpoint",
    "prune": "moecompress.prune.checkpoint:prune_checkpoint",
    "merge": "moecompress.merge.checkpoint:merge_checkpoint",
    "quantize": "moecompress.quantize.api:quantize_checkpoint",
    "distill": "moecompress.distill.api:distill_checkpoint",
    "eval": "moecompress.evaluate:evaluate_checkpoint",
    "upload": "moecompress.upload:upload",
}
TOP_LEVEL = ("model", "output", "seed", *LoadingOptions.model_fields, *StreamingOptions.model_fields,
             "calibration", "stages")
_DEFAULTS = ("seed", *LoadingOptions.model_fields, *StreamingOptions.model_fields)


def library_function(name: str) -> Callable:
    module, _, fn = LIBRARY[name].partition(":")
    return getattr(importlib.import_module(module), fn)


def library_functions() -> dict[str, Callable]:
    """Stage name -> library function, for the stages implemented in this version."""
    return {name: library_function(name) for name, model in STAGE_OPTIONS.items() if model.implemented}


def recipe_schema() -> dict:
    """JSON schema of every stage's options as a recipe may set them (from the options models)."""
    out = {}
    for name, model in STAGE_OPTIONS.items():
        schema = model.model_json_schema()
        keep = recipe_fields(model)
        schema["properties"] = {k: v for k, v in schema.get("properties", {}).items() if k in keep}
        schema["required"] = [k for k in schema.get("required", []) if k in keep]
        out[name] = schema
    return out


@dataclass
class Stage:
    index: int  # 1-based
    name: str
    options: Options

    @property
    def kind(self) -> str:
        return KINDS[self.name]

    def resolved(self) -> dict:
        return {self.name: self.options.recorded()}


@dataclass
class Recipe:
    path: str
    model: str
    output: str | None
    stages: list[Stage]

    def resolved(self) -> dict:
        """The fully resolved recipe: the model and every option of every stage (no output:
        where a result is written is not part of what it is)."""
        return {"model": self.model, "stages": [s.resolved() for s in self.stages]}

    def yaml(self) -> str:
        return dump_yaml(self.resolved())


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)


# ----- YAML with line numbers ------------------------------------------------------------------
def _lines(node, path=()) -> dict[tuple, int]:
    """(key, path, ...) -> 1-based line of every mapping key / sequence item in a composed node."""
    out = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            out.update(_lines(v, (*path, k.value)))
            out[(*path, k.value)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out.update(_lines(v, (*path, i)))
    return out


def _read(path: str | Path) -> tuple[dict, dict[tuple, int]]:
    p = Path(path)
    if not p.is_file():
        raise MoECompressError(f"recipe '{path}' not found; pass a YAML file (see recipes/ or `moecompress ls recipes`)")
    text = p.read_text()
    try:
        data, node = yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise MoECompressError(f"recipe '{path}' is not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise MoECompressError(f"recipe '{path}' must be a mapping with model and stages")
    return data, _lines(node) if node is not None else {}


def apply_sets(data: dict, sets: list[str]) -> dict:
    """``--set key=value``: ``model=...``, ``output=...``, ``calibration.n=8``, ``prune.keep=4`` (every
    stage of that name) or ``stages.2.keep=4`` (the second stage); values are YAML scalars."""
    for item in sets:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise MoECompressError(f"--set '{item}': write it as key=value, e.g. --set model=path/to/model")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            raise MoECompressError(f"--set {key}: '{text}' is not a YAML value; quote it") from None
        parts = key.split(".")
        if parts[0] == "stages" and len(parts) == 3 and parts[1].isdigit():
            i = int(parts[1]) - 1
            if not 0 <= i < len(data.get("stages") or []):
                raise MoECompressError(f"--set {key}: the recipe has no stage {parts[1]}")
            (name, opts), = data["stages"][i].items()
            data["stages"][i] = {name: {**(opts or {}), parts[2]: value}}
        elif len(parts) == 2 and parts[0] in STAGE_OPTIONS:
            hits = [i for i, st in enumerate(data.get("stages") or []) if isinstance(st, dict) and parts[0] in st]
            if not hits:
                raise MoECompressError(f"--set {key}: the recipe has no {parts[0]} stage")
            for i in hits:
                data["stages"][i] = {parts[0]: {**(data["stages"][i][parts[0]] or {}), parts[1]: value}}
        elif len(parts) == 2 and parts[0] == "calibration":
            data["calibration"] = {**(data.get("calibration") or {}), parts[1]: value}
        elif len(parts) == 1:
            data[key] = value
        else:
            raise MoECompressError(f"--set {key}: use model=, output=, calibration.KEY=, STAGE.KEY= or stages.N.KEY=")
    return data


def load_recipe(path: str | Path, sets: list[str] = (), *, output: str | None = None, check: bool = False) -> Recipe:
    """Read, override and validate the recipe at ``path``; one-line errors name the stage, the
    key and its line. Loads no model (a Hub model id is not even looked up). With ``check`` a
    stage this version does not implement is accepted (``run`` refuses it)."""
    data, lines = _read(path)
    data = apply_sets(data, list(sets))

    def at(*key) -> str:
        line = lines.get(key)
        return f"{path}:{line}: " if line else f"{path}: "

    unknown = [k for k in data if k not in TOP_LEVEL]
    if unknown:
        raise MoECompressError(f"{at(unknown[0])}unknown key '{unknown[0]}'; a recipe has {', '.join(TOP_LEVEL)}")
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise MoECompressError(f"{at('model')}the recipe needs model: a checkpoint folder or Hub id")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise MoECompressError(f"{at('stages')}a recipe needs at least one stage under stages:")
    calibration = data.get("calibration") or {}
    if not isinstance(calibration, dict):
        raise MoECompressError(f"{at('calibration')}calibration must be a mapping (calib, n, seq_len, ...)")
    bad = [k for k in calibration if k not in CalibrationOptions.model_fields]
    if bad:
        raise MoECompressError(f"{at('calibration', bad[0])}calibration.{bad[0]}: unknown option; options: "
                               f"{', '.join(CalibrationOptions.model_fields)}")
    defaults = {k: data[k] for k in _DEFAULTS if k in data}
    parsed = []
    for i, st in enumerate(stages):
        if not isinstance(st, dict) or len(st) != 1:
            raise MoECompressError(f"{at('stages', i)}stage {i + 1} must be one mapping 'name: {{options}}'")
        (name, given), = st.items()
        if name not in STAGE_OPTIONS:
            raise MoECompressError(f"{at('stages', i, name)}unknown stage '{name}'; stages: {', '.join(STAGE_OPTIONS)}")
        given = given or {}
        if not isinstance(given, dict):
            raise MoECompressError(f"{at('stages', i, name)}stage {i + 1} ({name}): options must be a mapping")
        model = STAGE_OPTIONS[name]
        allowed = recipe_fields(model)
        where = f"stage {i + 1} ({name}): "
        for key in given:  # unknown keys first, with their line, before any value is looked at
            if key not in allowed:
                raise MoECompressError(f"{at('stages', i, name, key)}{where}{key}: unknown option; options: "
                                       f"{', '.join(allowed) or '(none)'}")
        if not model.implemented:
            if check:  # its options cannot be checked yet; the stage is named in the check's note
                parsed.append(Stage(i + 1, name, model.model_construct()))
                continue
            raise MoECompressError(f"{at('stages', i, name)}{where}the {name} stage is not implemented in this "
                                   "version; remove the stage or update moecompress")
        values = {**{k: v for k, v in {**defaults, **calibration}.items() if k in allowed}, **given}
        if name == "eval" and values.get("base") is True:
            values["base"] = data["model"]
        if name == "distill":  # distil from the recipe's model, on its calibration text, unless told
            if values.get("teacher") in (None, True):
                values["teacher"] = data["model"]
            if "data" not in values and "calib" in calibration:
                values["data"] = calibration["calib"]
        try:
            options = model.model_validate(values)
        except ValidationError as e:
            loc = e.errors()[0]["loc"]
            key = str(loc[0]) if loc else None
            line = (lines.get(("stages", i, name, key)) or lines.get(("calibration", key)) or lines.get((key,))
                    if key else lines.get(("stages", i, name)))
            raise MoECompressError(f"{path}:{line or '?'}: {where}{one_line_error(e)}") from None
        parsed.append(Stage(i + 1, name, options))
    if not any(s.kind == "checkpoint" for s in parsed) and not any(s.kind in ("stats", "eval") for s in parsed):
        raise MoECompressError(f"{at('stages')}the recipe has no stage that computes anything")
    return Recipe(path=str(path), model=data["model"], output=output or data.get("output"), stages=parsed)
