"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): softmax router, optional top-k renormalisation."""
from ..spec import FamilySpec

SPEC = FamilySpec(
    name="Qwen3-MoE",
    model_types=("qwen3_moe",),
    num_experts_field="num_local_experts",
    norm_topk_field="norm_topk_prob",
    dense_layer_fields=("decoder_sparse_step", "mlp_only_layers"),
    removal_effect="norm_topk",
)
