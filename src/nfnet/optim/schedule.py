"""Learning-rate scaling, warmup + cosine per optimizer step, and the EMA decay warmup.

All closed forms of the official recipe (NFNET_SPEC §4): ``lr = 0.1 * B / 256``; linear warmup
from 0 over 5 epochs (a fractional number of steps: 5 * 1281167 / 4096 = 1563.92), then a
cosine from the peak to 0 over the remaining steps, evaluated at the 0-based optimizer step so
that step 0 trains with lr 0; EMA decay ``min(decay, (1 + t) / (10 + t))``.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

# exp.py `_make_opt` with lr_scale_by_bs=True: lr = base_lr * global_batch / 256.
REFERENCE_BATCH = 256
# exp_nf.py: base lr 0.1, 5 warmup epochs (of 360), EMA decay 0.99999.
PAPER_BASE_LR = 0.1
PAPER_WARMUP_EPOCHS = 5
PAPER_EMA_DECAY = 0.99999
# utils.tf1_ema: the decay warms up as (1 + t) / (10 + t).
_EMA_WARMUP_OFFSET = 10.0


def scale_lr(base_lr: float, global_batch: int, reference_batch: int = REFERENCE_BATCH) -> float:
    """Peak learning rate for ``global_batch`` (per-device batch x devices x accumulation)."""
    if global_batch <= 0 or reference_batch <= 0:
        raise ValueError(
            f"scale_lr: batch sizes must be positive, got global_batch={global_batch}, "
            f"reference_batch={reference_batch}."
        )
    return base_lr * global_batch / reference_batch


def schedule_lengths(
    num_examples: int, global_batch: int, epochs: float, warmup_epochs: float
) -> tuple[float, int]:
    """``(warmup_steps, total_steps)`` as the official config counts them.

    total = ``(num_examples * epochs) // global_batch`` (exp_nf.py ``training_steps``);
    warmup = ``warmup_epochs * num_examples / global_batch``, left fractional, as the official
    ``5 * steps_per_epoch`` is.
    """
    if num_examples <= 0 or global_batch <= 0:
        raise ValueError(
            f"schedule_lengths: need num_examples > 0 and global_batch > 0, got "
            f"{num_examples} and {global_batch}."
        )
    total = int(num_examples * epochs // global_batch)
    warmup = warmup_epochs * num_examples / global_batch
    return warmup, total


def run_schedule_lengths(
    num_examples: int | None, global_batch: int, epochs: int | None, warmup_epochs: float, step_bound: float
) -> tuple[float, int]:
    """``(warmup_steps, total_steps)`` of a training run's schedule.

    The official count (:func:`schedule_lengths`) when the run is whole epochs of
    ``num_examples`` training examples (the loader cuts its epochs to match,
    nfnet.data.sampling.epoch_steps); ``step_bound`` when the trainer cuts the run shorter (a
    step limit, a fraction of each epoch, a smoke test: Lightning's estimated stepping batches),
    with the warmup as the same share of epochs. A run shorter than its warmup still gets a
    valid schedule.
    """
    bound = max(1, int(step_bound)) if math.isfinite(step_bound) else None
    warmup, total = None, bound
    if num_examples and epochs and epochs > 0:
        warmup, total = schedule_lengths(num_examples, global_batch, epochs, warmup_epochs)
    if warmup is None or (bound is not None and total > bound):
        if bound is None:
            raise ValueError("a run without max_epochs needs a step limit (trainer.max_steps) for its LR schedule")
        warmup, total = warmup_epochs * bound / max(1, epochs or 1), bound
    return min(warmup, total - 1), total


def _check_lengths(warmup_steps: float, total_steps: float) -> None:
    if warmup_steps < 0 or total_steps <= warmup_steps:
        raise ValueError(
            f"warmup_cosine: need 0 <= warmup_steps < total_steps, got warmup_steps="
            f"{warmup_steps}, total_steps={total_steps}."
        )


def warmup_cosine(
    step: float,
    peak_lr: float,
    warmup_steps: float,
    total_steps: float,
    end_lr: float = 0.0,
) -> float:
    """Learning rate at 0-based optimizer ``step`` (NFNET_SPEC §4 ``WarmupCosineDecay``).

    ``peak_lr * step / warmup_steps`` while ``step < warmup_steps``; then
    ``end_lr + (peak_lr - end_lr) * (1 + cos(pi * p)) / 2`` with
    ``p = (step - warmup_steps) / (total_steps - warmup_steps)``. Past ``total_steps`` it
    stays at ``end_lr`` (the official formula would swing back up; training never goes there,
    but a scheduler stepped once more than planned should not raise the lr).
    """
    _check_lengths(warmup_steps, total_steps)
    if step < 0:
        raise ValueError(f"warmup_cosine: step must be >= 0, got {step}.")
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
    return end_lr + 0.5 * (peak_lr - end_lr) * (1.0 + math.cos(math.pi * progress))


class WarmupCosineMultiplier:
    """``LambdaLR`` multiplier: ``warmup_cosine(step, 1, ...)`` times each group's initial lr.

    A class rather than a closure so ``LambdaLR.state_dict()`` saves its settings (it only
    saves callable objects): a resumed run can then tell whether its config changed the
    schedule's lengths (:func:`follow_schedule`).
    """

    def __init__(self, warmup_steps: float, total_steps: float, end_factor: float = 0.0) -> None:
        _check_lengths(warmup_steps, total_steps)
        self.warmup_steps = float(warmup_steps)
        self.total_steps = float(total_steps)
        self.end_factor = float(end_factor)

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, 1.0, self.warmup_steps, self.total_steps, self.end_factor)


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: float,
    total_steps: float,
    end_factor: float = 0.0,
) -> LambdaLR:
    """A ``LambdaLR`` to be stepped once per optimizer step; set each group's ``lr`` to its peak.

    At construction the groups' lr becomes the step-0 value (0), so the first optimizer step
    uses lr 0, as the official schedule evaluated at global_step 0 does.
    """
    return LambdaLR(optimizer, WarmupCosineMultiplier(warmup_steps, total_steps, end_factor))


def follow_schedule(scheduler: LambdaLR, warmup_steps: float, total_steps: float) -> str | None:
    """Makes a restored warmup + cosine ``scheduler`` follow new lengths from the step it reached.

    A checkpoint's scheduler state holds the schedule it was written with, so a run resumed with
    more epochs (or another batch size) would stay on the old schedule, which may already have
    decayed to its end LR: the added steps would train at LR 0. The cosine is stretched instead,
    from the current step, and every group's LR is set to the new schedule's value. Returns a
    line saying what changed, or None when the lengths are the same (a resume with the run's
    own config continues bit-exactly).
    """
    multipliers = scheduler.lr_lambdas
    old = (multipliers[0].warmup_steps, multipliers[0].total_steps)
    if old == (float(warmup_steps), float(total_steps)):
        return None
    before = scheduler.optimizer.param_groups[0]["lr"]
    for fn in multipliers:
        _check_lengths(warmup_steps, total_steps)
        fn.warmup_steps, fn.total_steps = float(warmup_steps), float(total_steps)
    step = scheduler.last_epoch
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, multipliers)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    # What get_last_lr() reports (LambdaLR keeps it from its last step).
    scheduler._last_lr = list(lrs)
    return (
        f"the checkpoint's ran {old[1]:.0f} steps (warmup {old[0]:g}), this run's config gives "
        f"{total_steps:.0f} (warmup {warmup_steps:g}); continuing at step {step} on this run's schedule, "
        f"LR {before:.4g} -> {lrs[0]:.4g}"
    )


def ema_decay(step: int | torch.Tensor, decay: float = PAPER_EMA_DECAY) -> float | torch.Tensor:
    """TF1-style EMA decay at 0-based update ``step``: ``min(decay, (1 + t) / (10 + t))``.

    A tensor ``step`` gives a tensor (no host sync, for use inside a compiled/XLA step).
    """
    if isinstance(step, torch.Tensor):
        t = step.to(torch.float32)
        return torch.clamp((1.0 + t) / (_EMA_WARMUP_OFFSET + t), max=decay)
    return min(decay, (1.0 + step) / (_EMA_WARMUP_OFFSET + step))
