"""Mixtral (mistralai/Mixtral-8x7B and friends): softmax router, top-k renormalised."""
from ..spec import FamilySpec

SPEC = FamilySpec(
    name="Mixtral",
    model_types=("mixtral",),
    num_experts_field="num_local_experts",
    intermediate_field="intermediate_size",
    removal_effect="none",
)
