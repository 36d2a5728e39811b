"""DeepSeek-V3 / R1 / Kimi-K2 style: sigmoid scores, e_score_correction_bias, grouped top-k, shared experts."""
from ..spec import FamilySpec

SPEC = FamilySpec(
    name="DeepSeek-V3",
    model_types=("deepseek_v3",),
    num_experts_field="n_routed_experts",
    shared_experts="shared_experts",
    scoring="sigmoid",
    router_expert_tensors=("e_score_correction_bias",),
    scaling_field="routed_scaling_factor",
    norm_topk_field="norm_topk_prob",
    group_fields=("n_group", "topk_group"),
    min_group_size=2,
    dense_layer_fields=("first_k_dense_replace",),
    removal_effect="none",
)
