"""How one model family lays out its MoE layers, declared as data.

Every stage (stats, prune, merge, quantize...) reads and edits MoE layers only through
:class:`moecompress.arch.view.MoELayer`, which interprets a :class:`FamilySpec`. Adding a
family means writing one small file in ``arch/families/`` with one ``FamilySpec``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Layout of transformers' fused expert tensors (E experts, I intermediate, H hidden):
#   "gate_up_out":   gate_up_proj [E, 2I, H], gate rows then up rows (Mixtral, Qwen, DeepSeek, ...)
#   "gate_up_in":    gate_up_proj [E, H, 2I], gate columns then up columns (Llama-4)
#   "interleaved_in": gate_up_proj [E, H, 2I], gate/up columns interleaved (GPT-OSS)
GateUpLayout = Literal["gate_up_out", "gate_up_in", "interleaved_in"]
#   "out_in": down_proj [E, H, I] (nn.Linear convention);  "in_out": down_proj [E, I, H]
DownLayout = Literal["out_in", "in_out"]


@dataclass(frozen=True)
class FamilySpec:
    name: str  # human name, e.g. "Qwen3-MoE"
    model_types: tuple[str, ...]  # config.model_type values served by this spec
    num_experts_field: str  # config field holding the routed-expert count
    moe_block: str = "mlp"  # attribute of a decoder layer holding the MoE block
    router: str = "gate"  # attribute of the MoE block holding the router
    experts: str = "experts"  # attribute of the MoE block holding the fused experts
    layers_path: str = "model.layers"
    shared_experts: str | None = None  # attribute of the block holding the shared expert MLP
    shared_expert_gate: str | None = None  # sigmoid gate on the shared expert (Qwen2-MoE)
    # Probability over all experts used for soft statistics (the router's own top-k code is
    # always used for the actual routing decision).
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    # What the router module returns: (logits, topk_weights, topk_idx) for most families,
    # (dense_scores, logits) for Llama-4.
    router_output: Literal["logits_weights_indices", "scores_logits"] = "logits_weights_indices"
    gate_up_layout: GateUpLayout = "gate_up_out"
    down_layout: DownLayout = "out_in"
    activation: Literal["swiglu", "gpt_oss_swiglu"] = "swiglu"
    # Llama-4 multiplies the expert *input* by the routing score instead of its output.
    weight_on_input: bool = False
    # Per-expert router tensors besides the weight, as dotted paths under the router,
    # each sliced on its last dimension when experts are removed.
    router_expert_tensors: tuple[str, ...] = ()
    top_k_field: str = "num_experts_per_tok"
    intermediate_field: str = "moe_intermediate_size"
    norm_topk_field: str | None = None
    scaling_field: str | None = None
    group_fields: tuple[str, str] | None = None  # (n_group, topk_group) for grouped routing
    # Experts a group needs for its group score: DeepSeek-V3 / GLM-4.5 sum each group's top 2.
    min_group_size: int = 1
    # What removing an expert that a token did not select does to that token's routing (NAEE's
    # incremental search, prune/naee.py): "none": nothing (softmax over the top-k, a renormalised
    # top-k, per-expert sigmoid scores); "softmax": the selection stays and the weights, a softmax
    # over all experts, grow by 1 / (1 - p_removed); "norm_topk": "none" when the config's
    # norm_topk_field is true, else "softmax". None: the selection itself may change (a bias
    # added after a softmax, sparsemixer): every candidate set is routed by the router's code.
    removal_effect: Literal["none", "softmax", "norm_topk"] | None = None
    # Config fields that decide which layers are dense, reported by `info`.
    dense_layer_fields: tuple[str, ...] = field(default_factory=tuple)
