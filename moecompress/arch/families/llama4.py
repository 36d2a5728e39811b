"""Llama-4 text (Scout / Maverick): sigmoid of the top-k logits scales the expert *input*;
one shared expert; MoE layers interleaved by `interleave_moe_layer_step`."""
from ..spec import FamilySpec

SPEC = FamilySpec(
    name="Llama-4",
    model_types=("llama4_text",),
    num_experts_field="num_local_experts",
    moe_block="feed_forward",
    router="router",
    shared_experts="shared_expert",
    scoring="sigmoid",
    router_output="scores_logits",
    gate_up_layout="gate_up_in",
    down_layout="in_out",
    weight_on_input=True,
    intermediate_field="intermediate_size",
    dense_layer_fields=("interleave_moe_layer_step", "moe_layers"),
)
