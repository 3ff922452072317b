"""The EMA of the weights, moved once per optimizer step (NFNET_SPEC §4: TF1-style decay warmup).

The EMA copy lives in the LightningModule (`ema_net`), so checkpoints hold it beside the raw
weights and validation measures both. It moves right after the weights, inside the optimizer
step (the module's `optimizer_step` calls `update`): every callback's batch-end hook, a
checkpoint written at this step's end included, then sees the EMA of the same step as the
weights, and a resume from it continues bit-exactly. Under gradient accumulation it moves once
per optimizer step, as in the official code; a step the NonFiniteGuard skipped moved no weight,
so the EMA does not move either.
"""

from __future__ import annotations

import torch

from nfnet.optim.schedule import ema_decay
from nfnet.training.guard import NonFiniteGuard
from nfnet.training.xla import ema_weights_on_device, on_xla


class EMAUpdate:
    def __init__(self, decay: float, guard: NonFiniteGuard | None = None) -> None:
        self.decay = decay
        self.guard = guard

    @torch.no_grad()
    def update(self, net: torch.nn.Module, ema_net: torch.nn.Module, step: int) -> None:
        """Moves `ema_net` towards `net` after 0-based optimizer step `step`."""
        if self.guard is not None and self.guard.skipped_last_step:
            return
        ema_params = list(ema_net.parameters())
        if on_xla(ema_params[0]):  # per-step Python floats can force XLA recompiles (nfnet.training.xla)
            weight = ema_weights_on_device(step, self.decay, len(ema_params), ema_params[0].device)
        else:
            weight = 1.0 - ema_decay(step, self.decay)
        torch._foreach_lerp_(ema_params, [p.detach() for p in net.parameters()], weight)
