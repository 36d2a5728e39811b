"""What ``info`` says about a quantized checkpoint: the real average bits per expert weight,
measured from the safetensors headers (weights, scales, zero points, shapes: every byte stored
for the experts), and whether the experts are quantized at all (bitsandbytes leaves them alone)."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

EXPERT_KEY = re.compile(r"experts\.\d+\.")
BNB_NOTE = ("bitsandbytes quantizes nn.Linear modules only: the fused 3-D expert tensors of transformers 5.x stay in "
            "16 bits (bitsandbytes issue 1849), so the experts are NOT quantized")


def _headers(folder: Path):
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            yield json.loads(fh.read(n))


def expert_bytes(folder: Path, fused_names: tuple[str, ...] = ()) -> tuple[int, dict[str, int]]:
    """Bytes of every routed-expert tensor on disk, and those bytes per dtype."""
    total, by_dtype = 0, {}
    for header in _headers(folder):
        for key, t in header.items():
            if key == "__metadata__":
                continue
            if EXPERT_KEY.search(key) and "shared_expert" not in key or any(key.endswith(n) for n in fused_names):
                b = t["data_offsets"][1] - t["data_offsets"][0]
                total += b
                by_dtype[t["dtype"]] = by_dtype.get(t["dtype"], 0) + b
    return total, by_dtype


def quantization_info(folder: Path | None, config, routed_params: int, fused_names: tuple[str, ...] = ()) -> dict | None:
    """``None`` for an unquantized checkpoint without a quantize record."""
    q = getattr(config, "quantization_config", None)
    record = None
    if folder is not None and (folder / "moecompress.json").is_file():
        record = json.loads((folder / "moecompress.json").read_text())
    q = q if isinstance(q, dict) else (q.to_dict() if q is not None and hasattr(q, "to_dict") else q)
    if not q and not (record and record.get("stage") == "quantize"):
        return None
    out: dict = {"method": (q or {}).get("quant_method", "fake (dequantized weights)")}
    if folder is not None and routed_params:
        b, by_dtype = expert_bytes(folder, fused_names)
        out["expert_bits_per_weight"] = round(8 * b / routed_params, 4)
        out["expert_bytes_by_dtype"] = by_dtype
    if out["method"] == "bitsandbytes":
        out["experts_quantized"] = False
        out["note"] = BNB_NOTE
    elif record and record.get("stage") == "quantize":
        out["experts_quantized"] = True
        out["recorded_average_bits"] = record.get("average_bits")
        out["layer_widths"] = record.get("layer_widths")
        if record.get("parameters", {}).get("format") == "fake":
            out["note"] = (f"fake quantization: the weights are stored dequantized; at the recorded widths the experts "
                           f"take {record.get('average_bits'):.3f} bits per weight")
        if record.get("loads_in"):
            out["loads_in"] = record["loads_in"]
    elif q:
        out["experts_quantized"] = out.get("expert_bits_per_weight", 16) < 16
    return out
