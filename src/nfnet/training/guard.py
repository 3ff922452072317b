"""The non-finite step guard, as the user sees it: skipped steps counted, logged, warned about,
and `max_consecutive` of them in a row stopping the run.

The skipping itself happens on the device, without a host read (nfnet.optim.step_guard.StepGuard,
run by the LightningModule around each optimizer step): weights, momentum buffers and EMA keep
their bits, and the step still counts (global_step and the LR schedule advance, as for a batch
AMP's GradScaler skips), so the run keeps its length and schedule. This callback reads the
device's two counters back: every step on the CPU (where a read costs nothing), every logging
interval on an accelerator (the stop may then come up to one interval late; the skipped steps
changed nothing meanwhile). It also keeps the counts in checkpoints. Not used on XLA
(docs/RELIABILITY.md).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from nfnet.errors import TrainingStopped
from nfnet.optim.step_guard import StepGuard


def poison_nonfinite_loss(loss: torch.Tensor) -> torch.Tensor:
    """A non-finite loss can still give finite gradients (an infinite log-probability under label
    smoothing does): make them NaN, so that the gradient check catches it. Under DDP the NaN is
    all-reduced to every replica, so all skip the same step. A finite loss is multiplied by
    exactly 1: its gradients stay bit-identical."""
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))


class NonFiniteGuard(pl.Callback):
    """Reads, reports and checkpoints the skip counters of the module's StepGuard (`attach`)."""

    def __init__(self, max_consecutive: int | None = 10) -> None:
        self.max_consecutive = max_consecutive
        # (skipped steps in total, in a row): as last read, or restored from a checkpoint.
        self.counts = (0, 0)
        self.step_guard: StepGuard | None = None

    def attach(self, step_guard: StepGuard) -> None:
        """The StepGuard of this run (built when training starts), given the restored counts."""
        step_guard.load_counts(*self.counts)
        self.step_guard = step_guard

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.step_guard is None or not self.step_guard.check_finite:
            return
        if pl_module.device.type != "cpu" and trainer.global_step % trainer.log_every_n_steps:
            return
        before = self.counts[0]
        self.counts = skipped, consecutive = self.step_guard.counts()
        pl_module.log("train/skipped_steps", float(skipped), on_step=True, on_epoch=False)
        if skipped == before:
            return
        message = (
            f"step {trainer.global_step - 1}: non-finite loss or gradient, optimizer step skipped "
            f"({consecutive} in a row, {skipped} in this run)"
        )
        if self.max_consecutive is not None and consecutive >= self.max_consecutive:
            raise TrainingStopped(
                f"{message}: stopping after optim.max_consecutive_skips={self.max_consecutive} consecutive "
                "non-finite steps. The weights are those of the last good step; lower optim.base_lr, check the "
                "data, or resume from the newest checkpoint."
            )
        rank_zero_warn(message)

    @property
    def skipped_steps(self) -> int:
        return (self.step_guard.counts() if self.step_guard is not None else self.counts)[0]

    def state_dict(self) -> dict[str, Any]:
        skipped, consecutive = self.step_guard.counts() if self.step_guard is not None else self.counts
        return {"skipped_steps": skipped, "consecutive": consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.counts = (int(state_dict.get("skipped_steps", 0)), int(state_dict.get("consecutive", 0)))
