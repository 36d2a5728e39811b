"""How far a compressed model's next-token distribution moved from its base model's.

On the same windows as :func:`~moecompress.evaluate.perplexity.perplexity`:

* ``kl``: mean over scored tokens of ``KL(p_base || p_model) = sum_v p_base(v) (log p_base(v) - log p_model(v))``
  in nats. 0 for identical models; unlike perplexity it sees the whole distribution.
* ``top1_agreement``: fraction of tokens where both models' most likely next token is the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..options.groups import DEFAULT_SEQ_LEN
from .perplexity import iter_window_logits, windows


def compare_to_base(model, base, token_ids: torch.Tensor, seq_len: int = DEFAULT_SEQ_LEN, *, stride: int | None = None,
                    batch_size: int = 1) -> dict:
    """KL(base || model), top-1 agreement, and both perplexities, in one pass over the windows.

    Returns ``{"kl", "top1_agreement", "ppl", "base_ppl", "tokens", "windows", "seq_len", "stride"}``.
    """
    if model.config.vocab_size != base.config.vocab_size:
        from ..errors import MoECompressError

        raise MoECompressError(f"model and base have different vocabularies ({model.config.vocab_size} vs "
                               f"{base.config.vocab_size}); pass the base this model was compressed from")
    kl = agree = nll = base_nll = 0.0
    n = 0
    for (logp, base_logp), y in iter_window_logits([model, base], token_ids, seq_len, stride, batch_size):
        # sum_v p_base * (log p_base - log p_model); exact 0 when the log-probs are equal
        kl += F.kl_div(logp, base_logp, log_target=True, reduction="sum").item()
        agree += (logp.argmax(-1) == base_logp.argmax(-1)).sum().item()
        nll += F.nll_loss(logp, y, reduction="sum").item()
        base_nll += F.nll_loss(base_logp, y, reduction="sum").item()
        n += y.numel()
    num = torch.as_tensor(token_ids).numel()
    return {"kl": kl / n, "top1_agreement": agree / n, "ppl": math.exp(nll / n), "base_ppl": math.exp(base_nll / n),
            "tokens": n, "windows": len(windows(num, seq_len, stride)), "seq_len": seq_len, "stride": stride or seq_len}


def kl_divergence(model, base, token_ids: torch.Tensor, seq_len: int = DEFAULT_SEQ_LEN, *, stride: int | None = None,
                  batch_size: int = 1) -> float:
    """Mean per-token KL(base || model) in nats (see :func:`compare_to_base`)."""
    return compare_to_base(model, base, token_ids, seq_len, stride=stride, batch_size=batch_size)["kl"]
