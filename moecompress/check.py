"""``moecompress check``: is a written checkpoint what its config says it is?

Run by hand (``moecompress check OUT``) and at the end of every stage that writes a
checkpoint (prune, merge, fine-grained; ``checkpoint.output_folder(check=True)``): a failed
check removes the output and exits 2 naming the first bad tensor. Modelled on mergekit's
``run_and_check_merge`` (tests/common.py), which every one of its test merges goes through.

What is checked, in this order (the first problem is the one reported):

1. config: a supported MoE family whose fields agree with each other (top-k <= experts,
   ``n_group`` divides the experts and leaves room for top-k, ``topk_group <= n_group``);
2. the safetensors index: every listed shard exists, lists exactly the keys the index maps
   to it, no key in two shards, ``total_size`` equals the tensors' bytes;
3. tensors against a meta-device model built from the config and reverted to checkpoint key
   names by transformers' own ``revert_weight_conversion`` (what ``save_pretrained`` writes):
   none missing, none extra, each with the right shape and dtype. Quantized checkpoints
   (``formats.py``: block-wise FP8, MXFP4) are checked in their stored form. Documented
   extras: the multi-token-prediction layers ``model.layers.{L..L+n-1}.*`` of
   ``num_nextn_predict_layers`` (``mtp.py``), checked like the last decoder layer plus their
   own tensors; tied weights may be absent;
4. values: no NaN / Inf in any floating tensor (FP8: no NaN code), read in chunks.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from . import formats, mtp
from .errors import MoECompressError

SHARD_INDEX = "model.safetensors.index.json"
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U8": torch.uint8, "I8": torch.int8,
              "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


@dataclass
class CheckReport:
    folder: str
    tensors: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)  # one line each; the first names the first bad tensor
    notes: list[str] = field(default_factory=list)  # facts that are not errors (absent optional MTP layer...)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"folder": self.folder, "ok": self.ok, "tensors": self.tensors, "bytes": self.bytes,
                "problems": self.problems, "notes": self.notes}


@dataclass(frozen=True)
class _Expect:
    shape: tuple[int, ...]
    dtypes: frozenset  # acceptable dtypes of the unquantized tensor
    optional: bool = False


def expected_tensors(config) -> dict[str, _Expect]:
    """Checkpoint key -> expected shape and dtypes, from a meta-device model of ``config``."""
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    from .checkpoint import stored_dtype

    stored = stored_dtype(config) or torch.float32
    plain = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(plain, dtype=stored)
    reverted = revert_weight_conversion(model, model.state_dict())
    tied = set((getattr(model, "_tied_weights_keys", None) or {})) if getattr(config, "tie_word_embeddings", False) else set()
    # Tensors the model class keeps in float32 (DeepSeek-V3's e_score_correction_bias: the
    # published checkpoint stores it F32 beside bf16 weights) may be stored in float32 too;
    # from_config does not apply that rule, from_pretrained does.
    fp32 = [*(getattr(model, "_keep_in_fp32_modules", None) or ()), *(getattr(model, "_keep_in_fp32_modules_strict", None) or ())]
    out = {k: _Expect(tuple(t.shape), frozenset({t.dtype, stored} | ({torch.float32} if any(m in k for m in fp32) else set())),
                      optional=k in tied) for k, t in reverted.items()}
    out.update(mtp.expected_tensors(config, out))
    return out


def _config_problems(config) -> list[str]:
    from .arch import family_for_config

    spec = family_for_config(config)
    e, k = getattr(config, spec.num_experts_field, None), getattr(config, spec.top_k_field, None)
    problems = []
    if not isinstance(e, int) or e < 1:
        return [f"config: {spec.num_experts_field} = {e!r} is not a positive expert count"]
    if not isinstance(k, int) or not 1 <= k <= e:
        problems.append(f"config: {spec.top_k_field} = {k!r} must be between 1 and {spec.num_experts_field} = {e}")
    if spec.group_fields:
        ng_f, tg_f = spec.group_fields
        ng, tg = getattr(config, ng_f, None) or 1, getattr(config, tg_f, None) or 1
        if e % ng:
            problems.append(f"config: {ng_f} = {ng} does not divide {spec.num_experts_field} = {e}")
        elif not 1 <= tg <= ng:
            problems.append(f"config: {tg_f} = {tg} must be between 1 and {ng_f} = {ng}")
        elif isinstance(k, int) and k > tg * (e // ng):
            problems.append(f"config: top-k {k} exceeds the {tg * (e // ng)} experts of {tg} of {ng} groups")
    return problems


def _shards(folder: Path, report: CheckReport) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """shard name -> key -> (safetensors dtype, shape); index problems go to ``report``."""
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        report.problems.append(f"no *.safetensors file in {folder}")
        return {}
    headers = {}
    for name in files:
        with safe_open(folder / name, framework="pt") as f:
            headers[name] = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    seen: dict[str, str] = {}
    for name in files:
        for key in sorted(headers[name]):
            if key in seen:
                report.problems.append(f"{key}: stored in both {seen[key]} and {name}")
            seen.setdefault(key, name)
    index = folder / SHARD_INDEX
    if index.exists():
        data = json.loads(index.read_text())
        weight_map = data.get("weight_map", {})
        for key, name in sorted(weight_map.items()):
            if name not in headers:
                report.problems.append(f"{key}: the index maps it to {name}, which does not exist")
            elif key not in headers[name]:
                report.problems.append(f"{key}: the index maps it to {name}, which does not hold it")
        for key in sorted(seen):
            if key not in weight_map:
                report.problems.append(f"{key}: in {seen[key]} but not in {SHARD_INDEX}")
        for name in files:
            if name not in set(weight_map.values()):
                report.problems.append(f"{name}: a shard the index does not list")
        total = sum(_nbytes(d, s) for h in headers.values() for d, s in h.values())
        listed = data.get("metadata", {}).get("total_size")
        if listed is not None and int(listed) != total:
            report.notes.append(f"{SHARD_INDEX}: total_size {listed} differs from the tensors' {total} bytes")
    elif len(files) > 1:
        report.problems.append(f"{len(files)} safetensors files but no {SHARD_INDEX}")
    return headers


def _nbytes(st_dtype: str, shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * _ST_DTYPES[st_dtype].itemsize if st_dtype in _ST_DTYPES else 0


def _tensor_problems(config, found: dict[str, tuple[str, tuple[int, ...]]], report: CheckReport) -> None:
    expected = expected_tensors(config)
    method = formats.quant_method(config)
    present: dict[str, set[str]] = {}  # logical key -> parts found
    for key in sorted(found):
        st_dtype, shape = found[key]
        logical, part = formats.logical_key(key, method)
        exp = expected.get(logical)
        if exp is None:
            report.problems.append(f"{key}: not implied by the config ({_why_unexpected(key, config)})")
            continue
        present.setdefault(logical, set()).add(part)
        want = formats.stored_shape(part, exp.shape, config, logical)
        if want is not None and shape != want:
            report.problems.append(f"{key}: shape {list(shape)}, the config implies {list(want)}")
            continue
        dtype = _ST_DTYPES.get(st_dtype)
        if part == "weight" and dtype not in exp.dtypes and not _quantized_dtype(dtype, logical, found, method):
            report.problems.append(f"{key}: dtype {st_dtype}, expected {'/'.join(sorted(str(d)[6:] for d in exp.dtypes))}")
    for logical, exp in sorted(expected.items()):
        parts = present.get(logical, set())
        if exp.optional or mtp.absent_optional(logical, found, config):
            continue
        if not parts:
            report.problems.append(f"{logical}: missing (the config implies shape {list(exp.shape)})")
        elif "ct_packed" in parts and not {"ct_scale", "ct_shape"} <= parts:
            report.problems.append(f"{logical}: weight_packed without its weight_scale / weight_shape")
        elif parts == {"blocks"} or parts == {"scales"}:
            report.problems.append(f"{logical}: MXFP4 needs both _blocks and _scales, found only _{parts.pop()}")
        elif parts <= {"scale", "activation_scale"}:  # (an FP8 weight without its scales fails its dtype above)
            report.problems.append(f"{logical}: missing, only its {formats.FP8_SCALE} is stored")
    report.notes.extend(mtp.notes(config, found))


def _quantized_dtype(dtype, logical: str, found: dict, method: str | None) -> bool:
    """An FP8 weight with its block scales beside it is the quantized form of the tensor (its
    ``weight_scale`` in compressed-tensors' FP8)."""
    fp8 = dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    if method == "compressed-tensors":
        return fp8 and formats.stored_key(logical, "ct_scale") in found
    return method == "fp8" and fp8 and formats.stored_key(logical, "scale") in found


def _why_unexpected(key: str, config) -> str:
    from .arch import family_for_config

    spec = family_for_config(config)
    m = re.search(r"\.experts\.(\d+)\.", key)
    if m:
        return f"expert {m.group(1)} but {spec.num_experts_field} = {getattr(config, spec.num_experts_field)}"
    m = re.match(rf"{re.escape(spec.layers_path)}\.(\d+)\.", key)
    if m:
        return f"layer {m.group(1)} but num_hidden_layers = {config.num_hidden_layers}" + (
            f" + {mtp.num_mtp_layers(config)} MTP" if mtp.num_mtp_layers(config) else "")
    return "no such weight in the model"


def _value_problems(folder: Path, headers: dict, report: CheckReport, device: str | None) -> None:
    from .integrity import first_nonfinite

    bad = first_nonfinite(folder, headers, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if bad is not None:
        report.problems.append(f"{bad}: NaN or Inf")


def check_checkpoint(folder: str | os.PathLike, *, values: bool = True, device: str | None = None) -> CheckReport:
    """Check the checkpoint in ``folder``; the report lists problems (first = first bad tensor)."""
    from .checkpoint import load_config

    folder = Path(folder)
    report = CheckReport(str(folder))
    config = load_config(folder)
    report.problems += _config_problems(config)
    headers = _shards(folder, report)
    found = {k: v for h in headers.values() for k, v in h.items()}
    report.tensors = len(found)
    report.bytes = sum(_nbytes(d, s) for d, s in found.values())
    if found:
        _tensor_problems(config, found, report)
    if values and not report.problems:
        _value_problems(folder, headers, report, device)
    return report


def require_valid(folder: str | os.PathLike, *, device: str | None = None, written: bool = False,
                  values: bool = True) -> CheckReport:
    """:func:`check_checkpoint`, raising ``MoECompressError`` with the first problem (``written``:
    the stage that wrote ``folder`` is at fault, and its output is removed by the caller)."""
    report = check_checkpoint(folder, device=device, values=values)
    if not report.ok:
        more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        tail = ("; the output was removed (a moecompress bug: please report it)" if written
                else "; this checkpoint does not match its config")
        raise MoECompressError(f"check failed: {report.problems[0]}{more}{tail}")
    return report
