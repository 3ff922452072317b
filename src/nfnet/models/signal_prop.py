"""Signal propagation: the statistics of the residual stream after every block.

These are the data of a Signal Propagation Plot (Brock et al. 2021, "Characterizing signal
propagation..."): per residual block, the squared mean of each channel and the variance of
each channel over (batch, H, W), averaged over channels. At initialization the variance of
the stream should follow the expected_std^2 that the beta schedule assumes (NFNET_SPEC.md
§1.4), which makes this the check that the alpha/beta bookkeeping is right.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .nfnet import NFBlock


class BlockSignal(NamedTuple):
    name: str  # the block's module name, e.g. 'stages.2.3'
    mean_sq: float  # channel-averaged squared mean of the block's output
    var: float  # channel-averaged variance of the block's output


@torch.no_grad()
def signal_propagation(model: nn.Module, images: torch.Tensor) -> list[BlockSignal]:
    """Runs `model` on `images` in eval mode and returns one BlockSignal per NFBlock, in
    forward order. The model's training flag is restored afterwards."""
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name: str):
        def hook(_module, _inputs, output: torch.Tensor):
            x = output.float()
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
            stats[name] = ((mean ** 2).mean(), var.mean())
        return hook

    handles = [module.register_forward_hook(record(name))
               for name, module in model.named_modules() if isinstance(module, NFBlock)]
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [BlockSignal(name, float(mean_sq), float(var))
            for name, (mean_sq, var) in stats.items()]
