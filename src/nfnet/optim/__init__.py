"""Optimization floor: adaptive gradient clipping, parameter groups by role, schedules, SGD with
a device-side skip, the weights' EMA, and the step guard that ties them together.

Plain PyTorch (no Lightning, no Hydra), usable from any training loop.
"""

from nfnet.optim.agc import AdaptiveGradClipper, adaptive_clip_grad_
from nfnet.optim.ema import ExponentialMovingAverage
from nfnet.optim.param_groups import (
    agc_named_parameters,
    agc_parameters,
    optimizer_param_groups,
    parameter_roles,
    stage_of,
)
from nfnet.optim.schedule import (
    WarmupCosineMultiplier,
    ema_decay,
    scale_lr,
    schedule_lengths,
    warmup_cosine,
    warmup_cosine_scheduler,
)
from nfnet.optim.sgd import SGD
from nfnet.optim.step_guard import StepGuard, grads_finite

__all__ = [
    "SGD",
    "AdaptiveGradClipper",
    "ExponentialMovingAverage",
    "StepGuard",
    "WarmupCosineMultiplier",
    "adaptive_clip_grad_",
    "agc_named_parameters",
    "agc_parameters",
    "ema_decay",
    "grads_finite",
    "optimizer_param_groups",
    "parameter_roles",
    "scale_lr",
    "schedule_lengths",
    "stage_of",
    "warmup_cosine",
    "warmup_cosine_scheduler",
]
