"""DeepSeek-V2 / V2-Lite: softmax router, optional group-limited greedy top-k, shared experts."""
from ..spec import FamilySpec

SPEC = FamilySpec(
    name="DeepSeek-V2",
    model_types=("deepseek_v2",),
    num_experts_field="n_routed_experts",
    shared_experts="shared_experts",
    scaling_field="routed_scaling_factor",
    norm_topk_field="norm_topk_prob",
    group_fields=("n_group", "topk_group"),
    dense_layer_fields=("first_k_dense_replace",),
    removal_effect="softmax",
)
