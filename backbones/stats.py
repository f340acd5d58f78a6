"""Parameters and FLOPs per stage, counted by `torch.utils.flop_counter`. Build the model under
`torch.device("meta")` to count without memory or compute. GFLOPs count a multiply-add as 2 FLOPs; the ResNet paper's Table 1 "FLOPs" are
multiply-adds, reported here as GMACs.
"""
from typing import List, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def stage_names(model: nn.Module) -> List[str]:
    """The units a reader thinks in: stem and res2..res5, then the FPN's own convolutions, then heads."""
    names = []
    for name, child in model.named_children():
        if name == "bottom_up":
            names += [f"bottom_up.{n}" for n, _ in child.named_children()]
        else:
            names.append(name)
    return names


def model_stats(model: nn.Module, input_size: Sequence[int] = (224, 224), batch: int = 1):
    """Rows of (stage, parameters, GFLOPs, GMACs) for one forward pass, plus a final "total" row."""
    in_channels = getattr(model, "in_channels", None) or getattr(
        getattr(model, "bottom_up", None), "in_channels", 3)
    device = next(model.parameters()).device
    x = torch.zeros(batch, in_channels, *input_size, device=device)
    was_training = model.training
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    model.train(was_training)
    root = type(model).__name__
    flops = {k[len(root) + 1:]: sum(v.values()) for k, v in counter.get_flop_counts().items()
             if k.startswith(root + ".")}
    rows = []
    for name in stage_names(model):
        module = model.get_submodule(name)
        params = sum(p.numel() for p in module.parameters())
        # A ModuleList is never called itself: its FLOPs are those of its direct children.
        f = flops.get(name) or sum(v for k, v in flops.items()
                                   if k.startswith(name + ".") and "." not in k[len(name) + 1:])
        rows.append((name, params, f / 1e9, f / 2e9))
    total = counter.get_total_flops()
    rows.append(("total", sum(p.numel() for p in model.parameters()), total / 1e9, total / 2e9))
    return rows


def format_stats(rows) -> str:
    lines = [f"{'stage':<22}{'params':>14}{'GFLOPs':>10}{'GMACs':>10}"]
    for name, params, gflops, gmacs in rows:
        lines.append(f"{name:<22}{params:>14,}{gflops:>10.3f}{gmacs:>10.3f}")
    return "\n".join(lines)
