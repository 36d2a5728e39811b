"""Baidu ERNIE-4.5-MoE: softmax router whose top-k choice adds a correction bias (moe_statics)."""
from ..spec import FamilySpec

SPEC = FamilySpec(
    name="ERNIE-4.5-MoE",
    model_types=("ernie4_5_moe",),
    num_experts_field="moe_num_experts",
    top_k_field="moe_k",
    shared_experts="shared_experts",
    router_expert_tensors=("moe_statics.e_score_correction_bias",),
    dense_layer_fields=("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval"),
)
