"""Quantization of MoE experts: MC-MoE mixed precision, RTN and GPTQ, compressed-tensors / fake output.

``quantize_checkpoint(src, out, scheme="w4a16", calib=...)`` is the one-liner; ``quantize_model``
works on a loaded model. Every option is a field of :class:`moecompress.options.QuantizeOptions`.
"""

from ..options import QuantizeOptions
from .api import QuantizeResult, quantize_checkpoint, quantize_model

__all__ = ["QuantizeOptions", "QuantizeResult", "quantize_checkpoint", "quantize_model"]
