"""Qwen1.5-MoE / Qwen2-MoE: softmax router, one shared expert behind a sigmoid gate."""
from ..spec import FamilySpec

SPEC = FamilySpec(
    name="Qwen2-MoE",
    model_types=("qwen2_moe",),
    num_experts_field="num_experts",
    shared_experts="shared_expert",
    shared_expert_gate="shared_expert_gate",
    norm_topk_field="norm_topk_prob",
    dense_layer_fields=("decoder_sparse_step", "mlp_only_layers"),
    removal_effect="norm_topk",
)
