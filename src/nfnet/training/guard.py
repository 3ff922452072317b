"""The non-finite step guard: a step whose loss or gradients hold NaN/Inf does not happen.

Such a step is skipped (weights, momentum buffers and EMA untouched), counted in
`train/skipped_steps`, and `max_consecutive` of them in a row stop the run with TrainingStopped,
keeping the last good checkpoint. The step still counts (global_step and the LR schedule
advance, as for a batch AMP's GradScaler skips), so the run keeps its length and schedule.
Not used on XLA, where the check would read a value back to the host every step and stall the
TPU pipeline (docs/RELIABILITY.md).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from nfnet.errors import TrainingStopped
from nfnet.training.xla import on_xla


def poison_nonfinite_loss(loss: torch.Tensor) -> torch.Tensor:
    """A non-finite loss can still give finite gradients (an infinite log-probability under label
    smoothing does): make them NaN, so the guard's one gradient check catches it. Under DDP the
    NaN is all-reduced to every replica, so all skip the same step. A finite loss is multiplied by
    exactly 1: its gradients stay bit-identical."""
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))


class NonFiniteGuard(pl.Callback):
    """Skips optimizer steps with non-finite gradients; the LightningModule must pass its loss
    through `poison_nonfinite_loss` (NFNetClassifier does when optim.skip_nonfinite is on)."""

    def __init__(self, max_consecutive: int | None = 10) -> None:
        self.max_consecutive = max_consecutive
        self.skipped_steps = 0
        self.consecutive = 0
        # Whether the optimizer step being taken was skipped (read by EMAUpdate after it).
        self.skipped_last_step = False

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self.skipped_last_step = False
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads or on_xla(grads[0]):
            return
        # One fused max-abs over all gradients and one host read per step; an Inf/NaN anywhere
        # (or a NaN loss, see poison_nonfinite_loss) makes it non-finite.
        finite = bool(torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all())
        if finite:
            self.consecutive = 0
        else:
            self._skip(trainer, optimizer)
        pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def _skip(self, trainer: pl.Trainer, optimizer) -> None:
        # No gradient reaches the optimizer: SGD leaves the weights and momentum as they were.
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped_last_step = True
        self.skipped_steps += 1
        self.consecutive += 1
        message = (
            f"step {trainer.global_step}: non-finite loss or gradient, optimizer step skipped "
            f"({self.consecutive} in a row, {self.skipped_steps} in this run)"
        )
        if self.max_consecutive is not None and self.consecutive >= self.max_consecutive:
            raise TrainingStopped(
                f"{message}: stopping after optim.max_consecutive_skips={self.max_consecutive} consecutive "
                "non-finite steps. The weights are those of the last good step; lower optim.base_lr, check the "
                "data, or resume from the newest checkpoint."
            )
        rank_zero_warn(message)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
