"""The MoE view: one object per MoE layer that every stage reads and edits.

Experts are exposed in a canonical layout whatever transformers' fused storage is:
``gate[e]`` and ``up[e]`` are [I, H], ``down[e]`` is [H, I] (``nn.Linear`` convention), so that
``expert(x) = down @ act(gate @ x) * (up @ x)``. The canonical tensors are *views* into the
fused parameters, so writing into them edits the model.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import nn

from .spec import FamilySpec


def _get(obj, dotted: str):
    return operator.attrgetter(dotted)(obj)


def _set(obj, dotted: str, value) -> None:
    head, _, last = dotted.rpartition(".")
    setattr(_get(obj, head) if head else obj, last, value)


@dataclass
class Routing:
    """Routing of T tokens in one MoE layer, exactly as the model's own router decides."""

    logits: torch.Tensor  # [T, E] raw router logits (float32)
    probs: torch.Tensor  # [T, E] softmax or sigmoid of the logits, per the family's scoring
    topk_idx: torch.Tensor  # [T, k] selected experts
    topk_weight: torch.Tensor  # [T, k] weight the model gives each selected expert (float32)

    def dense_weights(self, num_experts: int) -> torch.Tensor:
        """[T, E] matrix with the routing weight of selected experts, 0 elsewhere."""
        out = torch.zeros(self.topk_idx.shape[0], num_experts, dtype=torch.float32, device=self.topk_idx.device)
        return out.scatter_(1, self.topk_idx, self.topk_weight.float())


class MoELayer:
    """A view over one decoder layer's MoE block, driven by the family's :class:`FamilySpec`."""

    def __init__(self, model: nn.Module, spec: FamilySpec, layer_idx: int, block: nn.Module):
        self.model = model
        self.spec = spec
        self.layer_idx = layer_idx
        self.block = block

    # ----- modules -------------------------------------------------------------------
    @property
    def router(self) -> nn.Module:
        return getattr(self.block, self.spec.router)

    @property
    def experts(self) -> nn.Module:
        return getattr(self.block, self.spec.experts)

    @property
    def shared_experts(self) -> nn.Module | None:
        return getattr(self.block, self.spec.shared_experts, None) if self.spec.shared_experts else None

    @property
    def shared_expert_gate(self) -> nn.Module | None:
        return getattr(self.block, self.spec.shared_expert_gate, None) if self.spec.shared_expert_gate else None

    # ----- sizes ---------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return self.router.weight.shape[0]

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    @property
    def hidden_size(self) -> int:
        return self.router.weight.shape[1]

    # ----- routing rules (declared in the spec, resolved with the config) ---------------
    @property
    def removal_effect(self) -> str | None:
        """What removing an expert a token did not select does to its routing: "none",
        "softmax" or None (unknown: see ``FamilySpec.removal_effect``)."""
        effect = self.spec.removal_effect
        if effect == "norm_topk":
            return "none" if getattr(self.model.config, self.spec.norm_topk_field, False) else "softmax"
        return effect

    @property
    def routed_scaling(self) -> float:
        """The constant the routing weights are multiplied by (``scaling_field``; 1 without)."""
        field = self.spec.scaling_field
        value = getattr(self.model.config, field, None) if field else None
        return float(value) if value is not None else 1.0

    @property
    def intermediate_size(self) -> int:
        return self.down_proj.shape[2]

    # ----- router tensors ------------------------------------------------------------
    @property
    def router_weight(self) -> torch.Tensor:
        """[E, H]"""
        return self.router.weight

    @property
    def router_expert_tensors(self) -> dict[str, torch.Tensor]:
        """Per-expert router tensors besides the weight (bias, e_score_correction_bias...)."""
        return {p: _get(self.router, p) for p in self.spec.router_expert_tensors}

    # ----- canonical expert tensors (views) ------------------------------------------
    @property
    def _gate_up(self) -> torch.Tensor:
        return self.experts.gate_up_proj

    @property
    def gate_proj(self) -> torch.Tensor:
        """[E, I, H]"""
        p, layout = self._gate_up, self.spec.gate_up_layout
        if layout == "gate_up_out":
            return p[:, : p.shape[1] // 2, :]
        if layout == "gate_up_in":
            return p[:, :, : p.shape[2] // 2].transpose(1, 2)
        return p[:, :, 0::2].transpose(1, 2)

    @property
    def up_proj(self) -> torch.Tensor:
        """[E, I, H]"""
        p, layout = self._gate_up, self.spec.gate_up_layout
        if layout == "gate_up_out":
            return p[:, p.shape[1] // 2 :, :]
        if layout == "gate_up_in":
            return p[:, :, p.shape[2] // 2 :].transpose(1, 2)
        return p[:, :, 1::2].transpose(1, 2)

    @property
    def down_proj(self) -> torch.Tensor:
        """[E, H, I]"""
        p = self.experts.down_proj
        return p if self.spec.down_layout == "out_in" else p.transpose(1, 2)

    @property
    def expert_biases(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(gate [E, I], up [E, I], down [E, H]) biases, or Nones for bias-free families."""
        b = getattr(self.experts, "gate_up_proj_bias", None)
        if b is None:
            return None, None, None
        return b[:, 0::2], b[:, 1::2], self.experts.down_proj_bias

    def expert_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter of the fused experts module (all carry the expert dimension first)."""
        return dict(self.experts.named_parameters(recurse=False))

    # ----- computation ---------------------------------------------------------------
    def route(self, hidden: torch.Tensor) -> Routing:
        """Route [T, H] tokens with the model's own router module."""
        return self.routing_from_router_output(self.router(hidden))

    def routing_from_router_output(self, out) -> Routing:
        """Normalise what this family's router module returns into a :class:`Routing`."""
        logits, idx, weight = self._router_decisions(out)
        logits = logits.float()
        probs = torch.sigmoid(logits) if self.spec.scoring == "sigmoid" else torch.softmax(logits, dim=-1)
        return Routing(logits=logits, probs=probs, topk_idx=idx, topk_weight=weight.float())

    def topk_from_router_output(self, out, *, as_float32: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_idx, topk_weight as float32, or in the router's own dtype) of a router output:
        the routing decision alone, without :meth:`routing_from_router_output`'s probabilities
        over all experts."""
        _, idx, weight = self._router_decisions(out)
        return idx, weight.float() if as_float32 else weight

    def _router_decisions(self, out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.spec.router_output == "scores_logits":  # Llama-4
            _, logits = out
            topk_logits, idx = torch.topk(logits, self.top_k, dim=-1)
            return logits, idx, torch.sigmoid(topk_logits.float())
        # (logits, weights, indices) in most families and versions, but GraniteMoE's router
        # returned (indices, weights, logits) in transformers 5.17: the integer tensor tells.
        logits, weight, idx = out if out[0].is_floating_point() else out[::-1]
        return logits, idx, weight

    def _act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.spec.activation == "gpt_oss_swiglu":
            limit, alpha = self.experts.limit, self.experts.alpha
            gate = gate.clamp(max=limit)
            up = up.clamp(min=-limit, max=limit)
            return (up + 1) * (gate * torch.sigmoid(gate * alpha))
        return self.experts.act_fn(gate) * up

    def expert_hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Input of expert e's down projection for tokens x [T, H] -> [T, I]."""
        gb, ub, _ = self.expert_biases
        g = x @ self.gate_proj[e].T
        u = x @ self.up_proj[e].T
        if gb is not None:
            g, u = g + gb[e], u + ub[e]
        return self._act(g, u)

    def expert_forward(self, e: int, x: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Unweighted output of expert e on tokens x [T, H] -> [T, H]."""
        h = self.expert_hidden(e, x) if hidden is None else hidden
        y = h @ self.down_proj[e].T
        db = self.expert_biases[2]
        return y + db[e] if db is not None else y

    def experts_hidden(self, x: torch.Tensor, e0: int = 0, e1: int | None = None) -> torch.Tensor:
        """Down-projection inputs [n, C, I] of experts e0..e1-1 (n of them, all by default) in one
        batched computation, for x [n, C, H] (each expert its own rows, e.g. its routed tokens
        padded) or x [C, H] (every expert on the same rows)."""
        e1 = self.num_experts if e1 is None else e1
        if x.dim() == 2:  # (bmm, not matmul's broadcasting, which may copy the strided weight views)
            x = x.expand(e1 - e0, -1, -1)
        gb, ub, _ = self.expert_biases
        g = torch.bmm(x, self.gate_proj[e0:e1].transpose(1, 2))
        u = torch.bmm(x, self.up_proj[e0:e1].transpose(1, 2))
        if gb is not None:
            g, u = g + gb[e0:e1, None, :], u + ub[e0:e1, None, :]
        return self._act(g, u)

    def experts_forward(self, x: torch.Tensor, e0: int = 0, e1: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Experts e0..e1-1 in one batched computation (``experts_hidden``'s rows): down-proj
        input [n, C, I] and unweighted output [n, C, H]."""
        e1 = self.num_experts if e1 is None else e1
        h = self.experts_hidden(x, e0, e1)
        db = self.expert_biases[2]
        out = torch.bmm(h, self.down_proj[e0:e1].transpose(1, 2))
        if db is not None:
            out = out + db[e0:e1, None, :]
        return h, out

    def weighted_expert_output(self, e: int, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Contribution of expert e to the layer output for tokens x with routing weights [T]."""
        if self.spec.weight_on_input:  # Llama-4 scales the input, not the output
            return self.expert_forward(e, x * weight[:, None].to(x.dtype))
        return self.expert_forward(e, x) * weight[:, None].to(x.dtype)

    def shared_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Output of the shared expert(s) (gated where the family gates them), or None."""
        shared = self.shared_experts
        if shared is None:
            return None
        y = shared(x)
        gate = self.shared_expert_gate
        return torch.sigmoid(gate(x)) * y if gate is not None else y

    def routed_forward(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        """Sum of the routed experts' contributions for x [T, H] (a per-expert reference path)."""
        routing = self.route(x) if routing is None else routing
        out = torch.zeros_like(x)
        for e in routing.topk_idx.unique().tolist():
            tok, pos = (routing.topk_idx == e).nonzero(as_tuple=True)
            out.index_add_(0, tok, self.weighted_expert_output(e, x[tok], routing.topk_weight[tok, pos]).to(x.dtype))
        return out

    # ----- edits ---------------------------------------------------------------------
    @torch.no_grad()
    def keep_experts(self, keep: list[int] | torch.Tensor) -> None:
        """Keep only the experts in ``keep`` (in that order): router rows, per-expert router
        tensors and every fused expert tensor are sliced; module counters follow."""
        idx = torch.as_tensor(keep, dtype=torch.long)  # on CPU: checks work for meta models too
        if idx.numel() == 0 or len(set(idx.tolist())) != idx.numel():
            raise ValueError("keep must list distinct experts, at least one")
        if int(idx.min()) < 0 or int(idx.max()) >= self.num_experts:
            raise ValueError(f"expert index out of range 0..{self.num_experts - 1}")
        self.router.weight = nn.Parameter(self.router.weight.data.index_select(0, idx.to(self.router.weight.device)))
        for path, t in self.router_expert_tensors.items():
            new = t.data.index_select(-1, idx.to(t.device))
            # a registered buffer takes a plain tensor; a parameter must stay a parameter
            _set(self.router, path, nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new)
        for name, p in self.expert_parameters().items():
            setattr(self.experts, name, nn.Parameter(p.data.index_select(0, idx.to(p.device))))
        n = idx.numel()
        for mod in (self.block, self.router, self.experts):
            if hasattr(mod, "num_experts"):
                mod.num_experts = n
        if self.top_k > n:
            self.set_top_k(n)

    def set_top_k(self, k: int) -> None:
        for mod in (self.block, self.router, self.experts):
            if hasattr(mod, "top_k"):
                mod.top_k = k

    def route_in_one_group(self) -> None:
        """Grouped routing off in this layer's modules (one group: plain top-k over its experts);
        the config's fields are the model's (``MoEModel._set_config_num_experts``)."""
        for mod in (self.router, self.block):
            for attr in ("num_group", "n_group", "topk_group"):
                if hasattr(mod, attr):
                    setattr(mod, attr, 1)

    @torch.no_grad()
    def set_expert(self, e: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """Replace expert e's weights, given in the canonical layout."""
        self.gate_proj[e].copy_(gate)
        self.up_proj[e].copy_(up)
        self.down_proj[e].copy_(down)

    @torch.no_grad()
    def keep_neurons(self, keep: torch.Tensor) -> None:
        """Keep intermediate neurons ``keep`` [E, I'] of every expert (the same count each, so
        that one ``intermediate_size`` in the config still describes the layer)."""
        keep = torch.as_tensor(keep, dtype=torch.long)
        E, new_i = keep.shape
        dev = self._gate_up.device
        gate = torch.stack([self.gate_proj[e].index_select(0, keep[e].to(dev)) for e in range(E)])
        up = torch.stack([self.up_proj[e].index_select(0, keep[e].to(dev)) for e in range(E)])
        down = torch.stack([self.down_proj[e].index_select(1, keep[e].to(dev)) for e in range(E)])
        layout = self.spec.gate_up_layout
        if layout == "gate_up_out":
            fused = torch.cat([gate, up], dim=1)
        elif layout == "gate_up_in":
            fused = torch.cat([gate, up], dim=1).transpose(1, 2)
        else:  # interleaved columns
            fused = torch.stack([gate, up], dim=2).reshape(E, 2 * new_i, -1).transpose(1, 2)
        self.experts.gate_up_proj = nn.Parameter(fused.contiguous())
        self.experts.down_proj = nn.Parameter((down if self.spec.down_layout == "out_in" else down.transpose(1, 2)).contiguous())
        b = getattr(self.experts, "gate_up_proj_bias", None)
        if b is not None:
            gb = torch.stack([b[e, 0::2].index_select(0, keep[e].to(dev)) for e in range(E)])
            ub = torch.stack([b[e, 1::2].index_select(0, keep[e].to(dev)) for e in range(E)])
            self.experts.gate_up_proj_bias = nn.Parameter(torch.stack([gb, ub], dim=2).reshape(E, 2 * new_i))
        for attr in ("intermediate_dim", "intermediate_size", "expert_dim"):
            if hasattr(self.experts, attr):
                setattr(self.experts, attr, new_i)
