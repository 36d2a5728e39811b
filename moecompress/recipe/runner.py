"""Running a recipe: stages one after another, each kept under ``.stages/`` of a hidden
temporary sibling of the output (``.OUT.tmp-<pid>-*``, locked while the run lives:
``outputs.LockedTemp``) until the recipe completes; then the last checkpoint's files, the
resolved recipe (``recipe.yaml``, ``moecompress.json`` ``"recipe"``, the model card), the last
evaluation (``eval.json``) and the last statistics (``stats.safetensors``) are assembled there and
the folder is renamed to ``OUTPUT``. So a kill at any moment leaves ``OUTPUT`` as it was (absent,
or the previous complete output), never half of one.

A dead run's temporary folder is removed by the next run, unless that run is ``--resume``: then
its completed stages (those whose recorded input fingerprint and options still match) are taken
over and the run continues from the last of them. Stages record where their input came from as
"MODEL after stage N (NAME)", never as a temporary path, so the same recipe gives the same bytes
in any output folder (``moecompress run OUT/recipe.yaml -o OUT2``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
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
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*")
                                           if f.is_file() and STAGES_DIR not in f.relative_to(p).parts)
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


def _prepare(out: Path, *, overwrite: bool, resume: bool, say: Callable[[str], None]):
    """The locked temporary folder the run builds ``out`` in (``outputs.LockedTemp``), with its
    ``.stages``: with ``resume``, the stages of the latest dead run are moved into it; every
    other dead run's leftovers are removed."""
    from ..outputs import LockedTemp, check_output_folder, clean_stale, is_stale

    check_output_folder(out, overwrite=overwrite, source=None)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        dead = [p for p in out.parent.glob(f".{out.name}.tmp-*") if (p / STAGES_DIR).is_dir() and is_stale(p)]
        tmp = LockedTemp(out)
    except OSError as e:
        raise MoECompressError(f"cannot write to '{out.parent}': {e.strerror or e}; choose a writable output "
                               "folder") from None
    done = lambda p: sorted(f.stem for f in (p / STAGES_DIR).glob("*.json"))  # noqa: E731
    if resume and dead:
        latest = max(dead, key=lambda p: (len(done(p)), p.stat().st_mtime))
        with contextlib.suppress(OSError):  # another --resume took it first: start afresh
            os.replace(latest / STAGES_DIR, tmp.path / STAGES_DIR)
    elif any(done(p) for p in dead):
        say("removed the completed stages of an interrupted run (--resume continues such a run)")
    clean_stale(out)
    (tmp.path / STAGES_DIR).mkdir(exist_ok=True)
    return tmp


def _source(location: Path | str, name: str):
    from ..source import open_source

    return dataclasses.replace(open_source(location), name=name)


def check_expert_counts(recipe: Recipe, num_experts: int) -> None:
    """Each stage's expert count against what the earlier stages leave (``experts_after``), before
    any stage runs: a later stage that asks for more experts than remain (merge ``keep: 30`` after
    prune ``keep: 24``) is refused now, not after the earlier stages' work. Stops at a stage whose
    count is known only as it runs."""
    n, changed_by = num_experts, None
    for stage in recipe.stages:
        if stage.kind != "checkpoint":
            continue
        if not stage.options.implemented:  # (run --check accepts such a stage; run refuses it)
            return
        try:
            after = stage.options.experts_after(n)
        except MoECompressError as e:
            if len(recipe.stages) == 1:  # a one-line command (or one-stage recipe): the stage's own message
                raise
            left = f", after stage {changed_by.index} ({changed_by.name}) leaves {n} experts" if changed_by else ""
            raise MoECompressError(f"{recipe.path}: stage {stage.index} ({stage.name}){left}: {e}") from None
        if after is None:
            return
        if after != n:
            n, changed_by = after, stage


def check_local_expert_counts(recipe: Recipe) -> None:
    """:func:`check_expert_counts` for ``run --check``, from the config of a model in a local
    folder (no weights are read; a Hub id is not looked up: its counts are checked by ``run``)."""
    from ..source import read_source

    folder = Path(recipe.model).expanduser()
    if (folder / "config.json").is_file():
        check_expert_counts(recipe, read_source(folder).num_experts)


def run_stages(recipe: Recipe, *, overwrite: bool = False, resume: bool = False, progress: bool = True,
               say: Callable[[str], None] = lambda m: None,
               report: Callable[[Stage, Any, Any, Path], None] | None = None) -> dict:
    """Run every stage of ``recipe`` (validated by :func:`load_recipe`); returns a summary whose
    ``results`` hold each stage's result object. ``report(stage, result, input, output)`` is
    called after each stage that ran (``input``: the stage's input checkpoint; ``output``: the
    folder or file it wrote, while it still exists)."""
    if not recipe.output:
        raise MoECompressError("the recipe names no output; pass -o OUT (or --set output=OUT)")
    from ..outputs import check_not_input, normal_permissions

    out = Path(recipe.output).expanduser().absolute()
    check_not_input(out, recipe.model)  # the output is not the input, inside it, or containing it
    current = _source(recipe.model, recipe.model)  # a bad input is refused before anything is written
    check_expert_counts(recipe, current.num_experts)
    tmp = _prepare(out, overwrite=overwrite, resume=resume, say=say)
    stages_dir = tmp.path / STAGES_DIR
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
                if report is not None:
                    report(stage, result, current.location, work if stage.kind != "stats" else work / "stats.safetensors")
                done.write_text(json.dumps({"input": want, "output": fingerprint(work),
                                            "result": _jsonable(result)}, indent=2, sort_keys=True) + "\n")
            completed += 1
            last[stage.kind] = work
            if stage.kind == "checkpoint":
                current = _source(work, f"{recipe.model} after stage {stage.index} ({stage.name})")
        _finish(recipe, tmp.path, last)
        normal_permissions(tmp.path)
        tmp.commit()
    except BaseException as e:
        if completed == 0:
            tmp.discard()
            raise
        tmp.release()  # the completed stages stay for --resume (the next plain run removes them)
        if isinstance(e, MoECompressError):
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
