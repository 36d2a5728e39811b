"""Distillation losses: KL of the next-token distributions and hidden-state MSE.

* :func:`kl_loss` — Hinton et al. 2015's soft-target loss, ``T^2 * KL(p_T || q_T)`` per token
  (teacher ``p``, student ``q``, temperature ``T``), averaged over tokens. With ``top_k`` the
  teacher keeps only its K largest logits (renormalised over them), as SlimMoE distils from the
  teacher's top-8 logits to save memory; the student's log-probabilities are still the full
  softmax, gathered at those K ids, so mass it puts elsewhere is still paid for.
* :func:`hidden_loss` — mean over decoder layers of ``||h_s - h_t||^2 / ||h_t||^2`` (relative, so
  that layers of very different scale weigh the same; MiniLLM/Minitron-style hidden distillation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
            top_k: int | None = None) -> torch.Tensor:
    """Mean over tokens of ``T^2 KL(teacher || student)``; logits [..., V], computed in float32."""
    s = student_logits.float().flatten(0, -2) / temperature
    t = teacher_logits.float().flatten(0, -2) / temperature
    log_q = F.log_softmax(s, dim=-1)
    if top_k is not None and top_k < t.shape[-1]:
        t_top, idx = t.topk(top_k, dim=-1)
        log_p = F.log_softmax(t_top, dim=-1)
        log_q = log_q.gather(-1, idx)
    else:
        log_p = F.log_softmax(t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl.mean() * temperature**2


def hidden_loss(student_hidden, teacher_hidden) -> torch.Tensor:
    """Mean over decoder layers of the relative squared error of the hidden states (the
    embeddings, index 0 of ``output_hidden_states``, are skipped: they are not distilled)."""
    terms = []
    for hs, ht in zip(student_hidden[1:], teacher_hidden[1:]):
        ht = ht.float()
        terms.append((hs.float() - ht).square().sum() / ht.square().sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


def ce_loss(student_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of the student on the data itself."""
    return F.cross_entropy(student_logits[:, :-1].float().reshape(-1, student_logits.shape[-1]),
                           ids[:, 1:].reshape(-1))
