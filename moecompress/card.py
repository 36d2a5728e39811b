"""Model cards for compressed checkpoints, built with huggingface_hub's ``ModelCard``.

The card says where the model came from (``base_model``), what was done to it (every stage
recorded in ``moecompress.json``, with its parameters, and the resulting change in experts,
top-k, parameters and quantization), how well it does (the table of ``moecompress eval --json
DIR/eval.json``, if present) and the full resolved record for reproduction.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .checkpoint import RECORD_FILE
from .errors import MoECompressError
from .plotting import PICTURES

EVAL_FILES = ("eval.json", "moecompress_eval.json")
TAGS = ["moecompress", "moe", "mixture-of-experts", "compressed"]


def _stages(record: dict) -> list[dict]:
    """Earlier stages (oldest first) then the last one, each without its nested history."""
    return [*record.get("history", []), {k: v for k, v in record.items() if k != "history"}]


def original_source(record: dict | None) -> str | None:
    """What the first stage started from (a Hub id or a local path)."""
    if not record:
        return None
    return _stages(record)[0].get("source")


def _looks_like_hub_id(s: str | None) -> bool:
    return bool(s) and s.count("/") == 1 and not s.startswith((".", "/", "~")) and not Path(s).exists()


def _scalar_params(stage: dict) -> dict[str, Any]:
    """The stage's own settings worth a line: scalars from ``parameters``/``options``, no Nones."""
    params = {**stage.get("parameters", {}), **stage.get("options", {})} if isinstance(
        stage.get("parameters", {}), dict) and isinstance(stage.get("options", {}), dict) else {}
    return {k: v for k, v in params.items() if v is not None and isinstance(v, (str, int, float, bool))}


def _summary(folder: Path, source: str | None) -> list[str]:
    """Experts, top-k, parameters and quantization of the result, against the original when local."""
    from .info import model_info

    lines = []
    try:
        after = model_info(folder)
    except MoECompressError:
        return lines
    before = None
    if source and Path(source).expanduser().is_dir():
        try:
            before = model_info(source)
        except MoECompressError:
            before = None

    def fmt(key, f=str):
        a = f(after[key])
        return f"{f(before[key])} → {a}" if before is not None and before[key] != after[key] else a

    def experts(v):
        return ", ".join(map(str, v))

    def params(n):
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"

    lines.append(f"- family: {after['family']} (`{after['model_type']}`), {after['num_moe_layers']} MoE layers")
    lines.append(f"- experts per MoE layer: {fmt('experts_per_layer', experts)}")
    lines.append(f"- top-k: {fmt('top_k')}")
    lines.append(f"- parameters (total): {fmt('total_params', params)}")
    lines.append(f"- parameters (active per token): {fmt('active_params', params)}")
    cfg = json.loads((folder / "config.json").read_text())
    q = cfg.get("quantization_config")
    if q:
        desc = ", ".join(f"{k}={q[k]}" for k in ("quant_method", "bits", "load_in_4bit", "load_in_8bit",
                                                 "group_size") if k in q)
        lines.append(f"- quantization: {desc or json.dumps(q)}")
    quant = after.get("quantization")
    if quant and quant.get("experts_quantized"):
        bits = quant.get("recorded_average_bits") or quant.get("expert_bits_per_weight")
        disk = sum(quant.get("expert_bytes_by_dtype", {}).values())
        lines.append(f"- experts: {bits:.3f} bits per weight (weights, scales and zero points), "
                     f"{disk / 2**20:.2f} MiB of expert tensors on disk; widths per layer: {quant.get('layer_widths')}")
    elif quant and quant.get("experts_quantized") is False:
        lines.append(f"- experts: not quantized ({quant.get('note')})")
    return lines


def load_eval(folder: Path) -> dict | None:
    for name in EVAL_FILES:
        if (folder / name).is_file():
            try:
                return json.loads((folder / name).read_text())
            except json.JSONDecodeError as e:
                raise MoECompressError(f"'{folder / name}' is not valid JSON ({e.msg}); rewrite it with "
                                       "`moecompress eval ... --json`") from None
    return None


def build_card(folder: str | os.PathLike, repo_id: str | None = None, *, base_model: str | None = None,
               eval_result: dict | None = None, name: str | None = None):
    """A ``huggingface_hub.ModelCard`` for the checkpoint in ``folder``.

    ``base_model`` defaults to the record's original source when that is a Hub id.
    ``eval_result`` defaults to ``folder/eval.json`` (the output of ``moecompress eval --json``).
    """
    from huggingface_hub import ModelCard, ModelCardData

    from .evaluate.report import markdown_table, settings_line

    folder = Path(folder)
    record = json.loads((folder / RECORD_FILE).read_text()) if (folder / RECORD_FILE).is_file() else None
    source = original_source(record)
    base_model = base_model or (source if _looks_like_hub_id(source) else None)
    eval_result = eval_result if eval_result is not None else load_eval(folder)
    stages = _stages(record) if record else []

    data = ModelCardData(base_model=base_model, tags=TAGS + sorted({s["stage"] for s in stages if s.get("stage")}),
                         library_name="transformers", pipeline_tag="text-generation")
    name = repo_id.split("/")[-1] if repo_id else (name or folder.resolve().name)
    body = [f"# {name}", ""]
    origin = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else (f"`{source}`" if source
                                                                                      else "its base model")
    body += [f"This Mixture-of-Experts checkpoint was compressed from {origin} with "
             "[moecompress](https://pypi.org/project/moecompress/). It loads in stock `transformers`.", ""]

    body += ["## What was done", ""]
    if stages:
        for i, st in enumerate(stages, 1):
            params = ", ".join(f"{k}={v}" for k, v in _scalar_params(st).items())
            method = f" — method `{st['method']}`" if st.get("method") else ""
            body.append(f"{i}. **{st.get('stage', 'stage')}**{method}" + (f" ({params})" if params else ""))
    else:
        body.append(f"No `{RECORD_FILE}` was found, so the compression steps are not recorded.")
    body.append("")
    summary = _summary(folder, source)
    if summary:
        body += ["Result:", "", *summary, ""]

    if eval_result:
        body += ["## Evaluation", "", markdown_table(eval_result).rstrip(), ""]
        note = settings_line(eval_result)
        if note:
            body += [f"_{note[0].upper()}{note[1:]}._", ""]

    pictures = [(f, caption) for f, caption in PICTURES.items() if (folder / f).is_file()]
    if pictures:
        body += ["## Pictures", ""]
        for f, caption in pictures:
            body += [f"![{f}]({f})", "", caption, ""]

    body += ["## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f'model = AutoModelForCausalLM.from_pretrained("{repo_id or name}", dtype="auto")',
             f'tokenizer = AutoTokenizer.from_pretrained("{repo_id or name}")', "```", ""]
    if record and record.get("recipe"):
        from .recipe.schema import dump_yaml

        body += ["## Recipe", "", "Reproduce it with `moecompress run recipe.yaml -o OUT` (the file is in this "
                 "repository):", "", "```yaml", dump_yaml(record["recipe"]).rstrip(), "```", ""]
    if record:
        body += ["## Record", "", f"The full record (`{RECORD_FILE}`): every stage, its resolved parameters, "
                 "the kept-expert map, seeds and library versions.", "", "<details><summary>moecompress.json</summary>",
                 "", "```json", json.dumps(record, indent=2, sort_keys=True), "```", "", "</details>", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def write_card(folder: str | os.PathLike, repo_id: str | None = None, **kwargs) -> Path:
    """Build the card and save it as ``folder/README.md``."""
    path = Path(folder) / "README.md"
    build_card(folder, repo_id, **kwargs).save(path)
    return path
