"""Perplexity of a causal LM on a token stream, in fixed-length windows.

Windows (the convention of the testbed's reference figures):

* ``stride == seq_len`` (default): non-overlapping windows. Window ``k`` feeds tokens
  ``[k*seq_len, (k+1)*seq_len)`` and predicts each following token, so every token after the first
  is predicted exactly once, with the context reset at each window boundary. A stream of
  ``N`` ids gives ``N - 1`` scored tokens; the last window may be shorter.
* ``stride < seq_len``: sliding windows of ``seq_len`` tokens that advance by ``stride``; only
  the tokens not scored by an earlier window are scored, so each token is still counted once but
  with up to ``seq_len - stride`` tokens of extra context.

``perplexity = exp(mean over scored tokens of -log p(token | window context))``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from ..errors import MoECompressError
from ..options.groups import DEFAULT_SEQ_LEN


def load_text_tokens(tokenizer, path: str | os.PathLike, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids (1-D ``long``) of a UTF-8 text file, tokenized as one document.

    With ``max_tokens``, keeps the first ``max_tokens + 1`` ids, so that exactly ``max_tokens``
    tokens are *predicted* (the first id is only context): "the first 20k tokens" of the testbed
    figures. The tokenizer's own special tokens (e.g. BOS) are added as ``tokenizer(text)`` does.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise MoECompressError(f"text file '{path}' not found; pass a UTF-8 text file to --ppl")
    if max_tokens is not None and max_tokens < 1:
        raise MoECompressError(f"--max-tokens must be at least 1 (got {max_tokens})")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MoECompressError(f"'{path}' is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    ids = _tokenize_prefix(tokenizer, text, None if max_tokens is None else max_tokens + 1)
    if ids.numel() < 2:
        raise MoECompressError(f"'{path}' gives {ids.numel()} token(s); perplexity needs at least 2")
    return ids


def _tokenize_prefix(tokenizer, text: str, n: int | None) -> torch.Tensor:
    # Tokenizing a 1 GB file to keep 20k tokens is wasteful: tokenize a growing prefix instead.
    # A prefix gives the same leading ids as the full text once it reaches well past the cut
    # (the margin keeps a token split at the prefix's end far from the ids we keep).
    margin = 256
    length = len(text) if n is None else min(len(text), 8 * (n + margin))
    while True:
        ids = tokenizer(text[:length], return_attention_mask=False)["input_ids"]
        if n is None or length >= len(text) or len(ids) >= n + margin:
            return torch.tensor(ids[:n] if n is not None else ids, dtype=torch.long)
        length = min(len(text), 2 * length)


def windows(num_ids: int, seq_len: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """``(begin, end, n_scored)`` for each window: inputs ``ids[begin:end]`` predict
    ``ids[begin+1:end+1]``, of which the last ``n_scored`` are counted."""
    stride = seq_len if stride is None else stride
    if seq_len < 1:
        raise MoECompressError(f"--seq-len must be at least 1 (got {seq_len})")
    if not 1 <= stride <= seq_len:
        raise MoECompressError(f"stride must be between 1 and seq-len ({seq_len}), got {stride}")
    out, scored_until = [], 0  # ids[1:scored_until+1] are already predicted
    for begin in range(0, num_ids - 1, stride):
        end = min(begin + seq_len, num_ids - 1)
        if end > scored_until:
            out.append((begin, end, end - scored_until))
            scored_until = end
        if end == num_ids - 1:
            break
    return out


def model_device(model) -> torch.device:
    """Where the input ids go (the embedding's device, also under a device_map)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def iter_window_logits(models, token_ids: torch.Tensor, seq_len: int, stride: int | None = None,
                       batch_size: int = 1) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """For each batch of equal-length windows: the float32 log-probabilities of the scored
    positions of each model (``[n, vocab]``, on the first model's device) and their targets."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if ids.numel() < 2:
        raise MoECompressError("perplexity needs at least 2 tokens")
    if batch_size < 1:
        raise MoECompressError(f"batch size must be at least 1 (got {batch_size})")
    wins = windows(ids.numel(), seq_len, stride)
    out_dev = model_device(models[0])
    # Group windows of the same length so batches need no padding (only the last one differs).
    i = 0
    while i < len(wins):
        length = wins[i][1] - wins[i][0]
        group = [wins[i]]
        while len(group) < batch_size and i + len(group) < len(wins) and \
                wins[i + len(group)][1] - wins[i + len(group)][0] == length:
            group.append(wins[i + len(group)])
        i += len(group)
        x = torch.stack([ids[b:e] for b, e, _ in group])
        y = torch.cat([ids[e - n + 1:e + 1] for b, e, n in group]).to(out_dev)
        logps = []
        for m in models:
            with torch.inference_mode():
                logits = m(input_ids=x.to(model_device(m)), use_cache=False).logits
            scored = torch.cat([logits[j, length - n:] for j, (_, _, n) in enumerate(group)])
            logps.append(F.log_softmax(scored.to(out_dev, torch.float32), dim=-1))
        yield logps, y


def perplexity(model, token_ids: torch.Tensor, seq_len: int = DEFAULT_SEQ_LEN, *, stride: int | None = None,
               batch_size: int = 1) -> dict:
    """Perplexity of ``model`` on ``token_ids`` (see the module docstring for the windows).

    Returns ``{"ppl", "nll" (mean negative log-likelihood, nats/token), "tokens" (scored),
    "windows", "seq_len", "stride"}``.
    """
    nll, n = 0.0, 0
    for (logp,), y in iter_window_logits([model], token_ids, seq_len, stride, batch_size):
        nll += F.nll_loss(logp, y, reduction="sum").item()
        n += y.numel()
    num = torch.as_tensor(token_ids).numel()
    return {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n, "windows": len(windows(num, seq_len, stride)),
            "seq_len": seq_len, "stride": stride or seq_len}
