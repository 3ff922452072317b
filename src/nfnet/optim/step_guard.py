"""What runs between ``backward`` and the next forward, on the device and without a host read:
the finiteness check of the gradients, AGC, the (possibly skipped) SGD step, the (possibly
skipped) EMA update and the skip counters.

A step whose gradients hold a NaN or an Inf anywhere is skipped: weights, momentum buffers and
EMA keep their exact bits, the step still counts (the schedule and the EMA's t advance), and two
counters (skipped steps in total, skipped steps in a row) say so. Nothing is read back to the
host: a step has no data-dependent Python branch, so it can run inside a CUDA graph or a
``torch.compile(fullgraph=True)`` region, and the counters are read only when someone logs them.

Order, and why (NFNET_SPEC §3): the check reads the raw gradients (after DDP/XLA averaged them,
before anything edits them); AGC clips the raw gradients, before weight decay and momentum (it
runs on every step, its result discarded with the step when the gradients are not finite; AGC
raises nothing and reads nothing back on NaN/Inf); SGD then applies or not; the EMA follows the
weights of the same step.

In a Lightning module (``NFNetClassifier``), the intended wiring:

- ``configure_optimizers``: ``nfnet.optim.SGD(optimizer_param_groups(net, wd), lr=peak_lr,
  momentum=0.9, nesterov=True)`` with the same LambdaLR. For a CUDA graph, ``lr`` is a 0-dim
  float32 tensor on the device: LambdaLR then fills it in place (code that assigns
  ``group["lr"] = x``, as ``_follow_configured_schedule`` does, must ``fill_`` it instead).
- ``on_train_start`` (after a checkpoint restored weights, optimizer and ``global_step``):
  ``StepGuard(trainer.optimizers[0], clipper, ExponentialMovingAverage(ema_net.parameters(),
  net.parameters(), decay, step=trainer.global_step))``, then ``guard.load_counts(...)`` with
  the counts ``on_load_checkpoint`` found.
- ``on_before_optimizer_step``: ``guard.before_step()`` (arms ``optimizer.apply_step``); log
  ``guard.clip_fraction`` and ``guard.skipped_steps`` as tensors (read at the log interval).
- ``optimizer_step``: ``super().optimizer_step(...)``, then ``guard.after_step()``.
- every ``log_every_n_steps`` and in ``on_save_checkpoint``: ``guard.counts()`` (one host read);
  the ``max_consecutive_skips`` stop is decided there, so it may come up to one log interval
  late (the skipped steps changed nothing meanwhile).
- gone: the per-step ``bool(...)`` read, ``p.grad = None`` skipping, ``_step_skipped``, the
  Python-float EMA weight and its ``[p.detach() for p in ...]`` (233 ops per F0 step).

Tensors a CUDA graph of this step needs: ``lr`` (above), ``ema.step`` and the counters (held
here, advanced in place), the flag (made in the step), and static gradients (a captured step
reads the ``.grad`` tensors it saw: zero them in place, ``zero_grad(set_to_none=False)``, or copy
fresh ones in). fp16 with a GradScaler keeps the scaler's own host-read skip; bf16 needs none.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nfnet.optim.agc import AdaptiveGradClipper
from nfnet.optim.ema import ExponentialMovingAverage
from nfnet.optim.optimizers import AdamW
from nfnet.optim.sgd import SGD


@torch.no_grad()
def grads_finite(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Whether every element of every tensor is finite, as a 0-dim bool tensor on their
    (single) device: one fused max-abs per tensor list (``_foreach_norm`` with ord inf, which
    cannot overflow as a 2-norm can), then one reduction. Nothing is read back to the host."""
    if not grads:
        raise ValueError("grads_finite: no tensors to check.")
    return torch.stack(torch._foreach_norm(list(grads), float("inf"))).isfinite().all()


class StepGuard:
    """Device-side non-finite step skipping around an ``nfnet.optim.SGD`` step, with optional
    AGC before it and an EMA update after it (see the module docstring for the order).

    Attributes, all tensors on the parameters' device, valid after ``before_step``:
    ``finite`` (0-dim bool: this step applies), ``clip_fraction`` (0-dim float32, or None
    without a clipper), ``skipped_steps`` and ``consecutive_skips`` (0-dim int64 counters).
    """

    def __init__(self, optimizer: SGD | AdamW, clipper: AdaptiveGradClipper | None = None,
                 ema: ExponentialMovingAverage | None = None, check_finite: bool = True) -> None:
        if not isinstance(optimizer, (SGD, AdamW)):
            raise TypeError(
                f"StepGuard needs nfnet.optim.SGD (it skips steps on the device) or "
                f"nfnet.optim.optimizers.AdamW, got {type(optimizer).__name__}."
            )
        self.optimizer = optimizer
        self.clipper = clipper
        self.ema = ema
        # False: every step applies (no flag, no counting), e.g. where the check is not wanted.
        self.check_finite = check_finite
        device = next(p.device for g in optimizer.param_groups for p in g["params"])
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.consecutive_skips = torch.zeros((), dtype=torch.int64, device=device)
        self.finite: torch.Tensor | None = None
        self.clip_fraction: torch.Tensor | None = None
        # Whether before_step ran since the last after_step: a stale flag would mask the EMA
        # and the counters of the wrong step.
        self._armed = False

    @torch.no_grad()
    def before_step(self) -> None:
        """Checks the gradients, arms the optimizer's skip flag, clips (AGC)."""
        if self.check_finite:
            grads = [p.grad for group in self.optimizer.param_groups for p in group["params"]
                     if p.grad is not None]
            self.finite = grads_finite(grads)
        self.optimizer.apply_step = self.finite
        if self.clipper is not None:
            self.clip_fraction = self.clipper.clip_()
        self._armed = True

    @torch.no_grad()
    def after_step(self) -> None:
        """The EMA update and the counters, both masked by this step's flag."""
        if not self._armed:
            raise RuntimeError("StepGuard.after_step: before_step was not called for this step.")
        self._armed = False
        if self.ema is not None:
            self.ema.update_(self.finite)
        if self.finite is None:
            return
        skipped = self.finite.logical_not()
        self.skipped_steps.add_(skipped)
        self.consecutive_skips.add_(1).mul_(skipped)

    def step(self) -> None:
        """``before_step``, the optimizer step, ``after_step``: a whole step for a plain loop."""
        self.before_step()
        self.optimizer.step()
        self.after_step()

    def counts(self) -> tuple[int, int]:
        """(skipped steps in total, skipped steps in a row), read back to the host: for logging
        and checkpoints, not for every step."""
        return int(self.skipped_steps), int(self.consecutive_skips)

    def load_counts(self, skipped_steps: int, consecutive_skips: int) -> None:
        self.skipped_steps.fill_(skipped_steps)
        self.consecutive_skips.fill_(consecutive_skips)
