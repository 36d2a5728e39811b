"""Calibration statistics the merge methods need, gathered in one batched pass.

Per MoE layer (all sums over the calibration tokens, float64):

* ``count`` [E] — top-k hits of each expert (its routing frequency; M-SMoE, HC-SMoE).
* ``output_sum`` [E, H] — sum of every expert's output over *all* tokens, routed or not
  (HC-SMoE Sec. 3.2 feeds every calibration token to every expert); its mean is the feature
  that HC-SMoE clusters. The expert output is linear in its hidden activation, so only the
  hidden activations are summed (``hidden_sum`` [E, I]) and one down projection is applied at
  the end.
* ``logit_gram`` [E, E] — ``L^T L`` of the router logits ``L`` [T, E]; normalising it gives the
  cosine similarity of the experts' logit columns (M-SMoE's routing-policy similarity).
"""

from __future__ import annotations

import torch

from ..arch import MoELayer, Routing


class MergeObserver:
    def __init__(self, *, outputs: bool = True, logits: bool = True):
        self.want_outputs = outputs
        self.want_logits = logits
        self.count: dict[int, torch.Tensor] = {}
        self.hidden_sum: dict[int, torch.Tensor] = {}
        self.logit_gram: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, int] = {}
        self.layers: dict[int, MoELayer] = {}

    @torch.no_grad()
    def observe(self, layer: MoELayer, x: torch.Tensor, routing: Routing, y: torch.Tensor) -> None:
        li, num = layer.layer_idx, layer.num_experts
        if li not in self.count:
            self.layers[li] = layer
            self.count[li] = torch.zeros(num, dtype=torch.float64)
            self.tokens[li] = 0
            if self.want_outputs:
                self.hidden_sum[li] = torch.zeros(num, layer.intermediate_size, dtype=torch.float64)
            if self.want_logits:
                self.logit_gram[li] = torch.zeros(num, num, dtype=torch.float64)
        self.tokens[li] += x.shape[0]
        self.count[li] += torch.bincount(routing.topk_idx.reshape(-1).cpu(), minlength=num).double()
        if self.want_logits:
            logits = routing.logits.double()
            self.logit_gram[li] += (logits.T @ logits).cpu()
        if self.want_outputs:
            for e in range(num):  # one batched matmul per expert over all tokens
                self.hidden_sum[li][e] += layer.expert_hidden(e, x).double().sum(0).cpu()

    @torch.no_grad()
    def mean_outputs(self, layer_idx: int) -> torch.Tensor:
        """[E, H] average output of each expert over all calibration tokens."""
        from ..onload import onloaded

        layer = self.layers[layer_idx]
        mean_hidden = self.hidden_sum[layer_idx] / max(self.tokens[layer_idx], 1)
        with onloaded(layer.block):  # a streamed model's weights
            out = torch.einsum("ehi,ei->eh", layer.down_proj.detach().double().cpu(), mean_hidden)
            down_bias = layer.expert_biases[2]
            return out if down_bias is None else out + down_bias.detach().double().cpu()
