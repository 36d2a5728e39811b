"""Expert-wise distillation (MoE-Pruner's recovery step): each MoE block of the pruned student
is trained, on its own, to reproduce the teacher block's output from the teacher's input.

Xie et al., "MoE-Pruner: Pruning Mixture-of-Experts Large Language Model using the Hints from
its Router" (arXiv:2410.12013), Sec. 3.3: the pruned model is fine-tuned with the original
model as teacher, expert by expert, on the MoE layers' outputs. Here, for every MoE layer l::

    min_theta_l  sum_batches ||B_l^student(x_l^T) - B_l^teacher(x_l^T)||^2 / ||B_l^teacher(x_l^T)||^2

with ``x_l^T`` the teacher's input to layer l's MoE block, recorded once by one teacher pass.
Layers are independent, so it needs no full forward or backward of the student, only one
block's backward at a time: cheap, and a good start for the end-to-end KL that follows.
"""

from __future__ import annotations

import torch

from ..arch import moe_view
from ..capture import batches_of


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def expert_wise_distill(student, teacher, tokens: torch.Tensor, *, steps: int, lr: float = 1e-4,
                        batch_size: int = 8, train: str = "all") -> dict[int, dict]:
    """Regress every student MoE block on the teacher's (in place); per layer: relative error
    before and after. ``train`` = ``experts`` keeps the router fixed."""
    s_view, t_view = moe_view(student), moe_view(teacher)
    device = next(student.parameters()).device
    records: dict[int, list] = {layer.layer_idx: [] for layer in t_view}
    hooks = []
    for layer in t_view:
        def on_block(mod, inp, out, li=layer.layer_idx):
            records[li].append((inp[0].detach().float(), _out(out).detach().float()))
        hooks.append(layer.block.register_forward_hook(on_block))
    t_device = next(teacher.parameters()).device
    try:
        with torch.no_grad():
            for chunk in batches_of(tokens, batch_size):
                teacher(input_ids=chunk.to(t_device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    report = {}
    for layer in s_view:
        block, data = layer.block, records[layer.layer_idx]
        params = list(layer.expert_parameters().values())
        if train != "experts":
            params += list(layer.router.parameters())
        saved = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        dtype = params[0].dtype
        opt = torch.optim.Adam(params, lr=lr)

        def error() -> float:
            with torch.no_grad():
                num = sum(float((_out(block(x.to(device, dtype))).float() - y.to(device)).square().sum())
                          for x, y in data)
                den = sum(float(y.square().sum()) for _, y in data)
            return num / max(den, 1e-12)

        before = error()
        for step in range(steps):
            x, y = data[step % len(data)]
            y = y.to(device)
            loss = (_out(block(x.to(device, dtype))).float() - y).square().sum() / y.square().sum().clamp_min(1e-12)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for p, r in zip(params, saved):
            p.requires_grad_(r)
            p.grad = None
        report[layer.layer_idx] = {"relative_error_before": round(before, 6), "relative_error_after": round(error(), 6)}
    return report
