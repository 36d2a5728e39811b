"""GLM-4.5 / GLM-4.6 (Glm4Moe): DeepSeek-V3-style sigmoid routing with correction bias, shared experts."""
from ..spec import FamilySpec

SPEC = FamilySpec(
    name="GLM-4.5",
    model_types=("glm4_moe",),
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
