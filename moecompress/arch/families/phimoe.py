"""Phi-3.5-MoE (PhiMoE): sparsemixer top-2 routing (deterministic at inference)."""
from ..spec import FamilySpec

SPEC = FamilySpec(
    name="PhiMoE",
    model_types=("phimoe",),
    num_experts_field="num_local_experts",
    router="router",
    intermediate_field="intermediate_size",
)
