"""Quantization of MoE experts: MC-MoE mixed precision, RTN and GPTQ, compressed-tensors / fake output."""

from .api import QuantizeResult, parse_options, quantize_checkpoint, quantize_model
from .options import QuantizeOptions

__all__ = ["QuantizeOptions", "QuantizeResult", "parse_options", "quantize_checkpoint", "quantize_model"]
