"""GPT-OSS (openai/gpt-oss-20b/120b): biased router, softmax over the top-k logits,
interleaved gate/up columns, clamped SwiGLU with expert biases."""
from ..spec import FamilySpec

SPEC = FamilySpec(
    name="GPT-OSS",
    model_types=("gpt_oss",),
    num_experts_field="num_local_experts",
    router="router",
    router_expert_tensors=("bias",),
    gate_up_layout="interleaved_in",
    down_layout="in_out",
    activation="gpt_oss_swiglu",
    intermediate_field="intermediate_size",
    removal_effect="none",
)
