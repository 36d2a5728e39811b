"""IBM GraniteMoE: softmax over the top-k router logits."""
from ..spec import FamilySpec

SPEC = FamilySpec(
    name="GraniteMoE",
    model_types=("granitemoe",),
    num_experts_field="num_local_experts",
    moe_block="block_sparse_moe",
    router="router",
    intermediate_field="intermediate_size",
    removal_effect="none",
)
