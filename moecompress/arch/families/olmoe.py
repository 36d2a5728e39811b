"""OLMoE (allenai/OLMoE-1B-7B): softmax router over 64 experts, top-8."""
from ..spec import FamilySpec

SPEC = FamilySpec(
    name="OLMoE",
    model_types=("olmoe",),
    num_experts_field="num_experts",
    intermediate_field="intermediate_size",
    norm_topk_field="norm_topk_prob",
    removal_effect="norm_topk",
)
