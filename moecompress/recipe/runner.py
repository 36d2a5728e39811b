"""Running a recipe: stages one after another, each kept under ``OUTPUT/.stages/`` until the
recipe completes, so that ``--resume`` continues after a crash or a kill from the last completed
stage (one whose recorded input fingerprint and options still match).

When every stage is done, the last checkpoint's files move into ``OUTPUT`` with the resolved
recipe in ``recipe.yaml``, in ``moecompress.json`` (``"recipe"``) and in the model card
(``README.md``), the last evaluation in ``eval.json`` and the last statistics in
``stats.safetensors``; ``.stages`` is removed. Stages record where their input came from as
"MODEL after stage N (NAME)", never as a temporary path, so the same recipe gives the same
bytes in any output folder (``moecompress run OUT/recipe.yaml -o OUT2``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

from ..errors import MoECompressError
from .schema import Recipe, Stage, library_function, load_recipe

STAGES_DIR = ".stages"
RECIPE_FILE = "recipe.yaml"
_WHOLE_FILE = 64 * 2**20  # files up to this size are hashed whole; larger ones by size + head + tail


def fingerprint(path: str | Path) -> str:
    """A hash of a file or of a folder's files (names, sizes, contents; the head and tail MiB
    of files over 64 MiB, so that resuming a 60 GB model does not re-read it)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and STAGES_DIR not in f.parts)
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(p) if f != p else f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= _WHOLE_FILE:
                h.update(fh.read())
            else:
                h.update(fh.read(2**20))
                fh.seek(size - 2**20)
                h.update(fh.read())
    return h.hexdigest()


def _input_fingerprint(location, stage: Stage) -> dict:
    """What a stage's result depends on: its input checkpoint, its options and the files they name."""
    files = {}
    for key, value in stage.options.recorded().items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and Path(v).expanduser().is_file():
                files[f"{key}:{v}"] = fingerprint(Path(v).expanduser())
    src = Path(location) if Path(str(location)).exists() else None
    return {"model": fingerprint(src) if src is not None else str(location), "options": stage.resolved(),
            "files": files}


def _prepare(out: Path, *, overwrite: bool, resume: bool) -> bool:
    """Make ``out/.stages``; returns whether ``out`` was created here."""
    stages = out / STAGES_DIR
    if out.exists() and not out.is_dir():
        raise MoECompressError(f"output '{out}' is a file; choose a folder path")
    if out.exists() and not (resume and stages.is_dir()):
        if stages.is_dir() and not overwrite:
            raise MoECompressError(f"output '{out}' holds an interrupted run; pass --resume to continue it or "
                                   "--overwrite to start again")
        if not overwrite:
            raise MoECompressError(f"output '{out}' exists; pass --overwrite to replace it")
        from ..outputs import RECORD_FILE

        if not (stages.is_dir() or (out / RECORD_FILE).is_file() or not any(out.iterdir())):
            raise MoECompressError(f"--overwrite refuses to replace '{out}': it is not empty and not a moecompress "
                                   f"output (no {RECORD_FILE}); delete it yourself or choose another folder")
        shutil.rmtree(out)
    created = not out.exists()
    try:
        stages.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MoECompressError(f"cannot write to '{out}': {e.strerror or e}; choose a writable output folder") from None
    return created


def _source(location: Path | str, name: str):
    from ..source import open_source

    return dataclasses.replace(open_source(location), name=name)


def run_stages(recipe: Recipe, *, overwrite: bool = False, resume: bool = False, progress: bool = True,
               say: Callable[[str], None] = lambda m: None) -> dict:
    """Run every stage of ``recipe`` (validated by :func:`load_recipe`); returns a summary whose
    ``results`` hold each stage's result object."""
    if not recipe.output:
        raise MoECompressError("the recipe names no output; pass -o OUT (or --set output=OUT)")
    from ..outputs import check_not_input

    out = Path(recipe.output).expanduser().absolute()
    check_not_input(out, recipe.model)  # the output is not the input, inside it, or containing it
    current = _source(recipe.model, recipe.model)  # a bad input is refused before anything is written
    created = _prepare(out, overwrite=overwrite, resume=resume)
    stages_dir = out / STAGES_DIR
    last: dict[str, Path] = {}
    results: list[Any] = []
    completed = 0
    try:
        for stage in recipe.stages:
            if stage.kind == "upload":
                continue  # after the output is complete
            tag = f"{stage.index:02d}-{stage.name}"
            work, done = stages_dir / tag, stages_dir / f"{tag}.json"
            want = _input_fingerprint(current.location, stage)
            record = json.loads(done.read_text()) if done.is_file() else None
            if record and record["input"] == want and work.exists() and record["output"] == fingerprint(work):
                say(f"stage {stage.index}/{len(recipe.stages)}: {stage.name} done earlier, resumed")
                results.append(record.get("result"))
            else:
                for p in stages_dir.iterdir():  # this stage and every later one are redone
                    if p.name >= tag or p.name.startswith("."):
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
                say(f"stage {stage.index}/{len(recipe.stages)}: {stage.name}")
                result = _run_one(stage, current, work, progress)
                results.append(result)
                done.write_text(json.dumps({"input": want, "output": fingerprint(work),
                                            "result": _jsonable(result)}, indent=2, sort_keys=True) + "\n")
            completed += 1
            last[stage.kind] = work
            if stage.kind == "checkpoint":
                current = _source(work, f"{recipe.model} after stage {stage.index} ({stage.name})")
        _finish(recipe, out, last)
    except BaseException as e:
        if completed == 0 and created:
            shutil.rmtree(out, ignore_errors=True)
        elif isinstance(e, MoECompressError):
            raise MoECompressError(f"{e} (stages 1-{completed} are kept in {stages_dir}: fix the recipe and rerun with "
                                   "--resume)") from None
        raise
    for stage in recipe.stages:
        if stage.kind == "upload":
            say(f"stage {stage.index}/{len(recipe.stages)}: upload")
            results.append(library_function("upload")(out, options=stage.options))
    return {"recipe": recipe.resolved(), "output": str(out),
            "stages": [{"stage": s.name, "result": _jsonable(r)} for s, r in zip(recipe.stages, results)],
            "results": results}


def _run_one(stage: Stage, current, work: Path, progress: bool):
    fn = library_function(stage.name)
    if stage.kind == "checkpoint":
        return fn(current, work, options=stage.options, progress=progress)
    work.mkdir()
    if stage.kind == "stats":
        return fn(current, work / "stats.safetensors", options=stage.options, progress=progress)
    result = fn(current, options=stage.options)
    (work / "eval.json").write_text(json.dumps(_jsonable(result), indent=2, sort_keys=True) + "\n")
    return result


def _finish(recipe: Recipe, out: Path, last: dict[str, Path]) -> None:
    from ..card import write_card
    from ..checkpoint import RECORD_FILE, _json_default

    if "checkpoint" in last:
        for f in sorted(last["checkpoint"].iterdir()):
            shutil.move(str(f), out / f.name)
    if "stats" in last:
        for f in sorted(last["stats"].iterdir()):
            shutil.move(str(f), out / f.name)
    if "eval" in last:
        shutil.move(str(last["eval"] / "eval.json"), out / "eval.json")
    (out / RECIPE_FILE).write_text(recipe.yaml())
    record_path = out / RECORD_FILE
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record["recipe"] = recipe.resolved()
    record_path.write_text(json.dumps(record, indent=2, sort_keys=True, default=_json_default) + "\n")
    if "checkpoint" in last:
        write_card(out, name=f"{Path(recipe.model).name}-moecompress")
    shutil.rmtree(out / STAGES_DIR)


def run_recipe(path: str | Path, *, sets: list[str] = (), output: str | None = None, overwrite: bool = False,
               resume: bool = False, progress: bool = True, say: Callable[[str], None] = lambda m: None) -> dict:
    """Read, validate and run the recipe at ``path`` (see :func:`run_stages`)."""
    recipe = load_recipe(path, sets, output=output)
    summary = run_stages(recipe, overwrite=overwrite, resume=resume, progress=progress, say=say)
    summary.pop("results")
    return summary


def _jsonable(o):
    if hasattr(o, "to_dict"):
        try:
            o = o.to_dict(with_time=False)
        except TypeError:
            o = o.to_dict()
    if hasattr(o, "summary") and callable(o.summary):  # routing statistics
        o = o.summary()
    try:
        return json.loads(json.dumps(o, default=str))
    except (TypeError, ValueError):
        return str(o)
