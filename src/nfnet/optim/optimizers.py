"""The optimizer of a run: the paper's SGD, or AdamW for fine-tuning, over the parameter groups by
role (nfnet.optim.param_groups), with a learning-rate multiplier for the classifier and an
optionally frozen trunk.

Training from scratch follows the paper: SGD with Nesterov momentum 0.9 and coupled weight decay
(NFNET_SPEC §4). Fine-tuning a trained trunk on a few thousand images is another problem: the
classifier's new rows start at N(0, 0.01) and must learn in a few hundred steps at a learning
rate small enough not to wreck the trunk. A head multiplier gives the classifier (weight and
bias) its own, larger peak rate; freezing the trunk trains the classifier alone; AdamW's
per-parameter step sizes make one learning rate fit trunk and head of any variant.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from nfnet.optim.param_groups import optimizer_param_groups
from nfnet.optim.sgd import SGD as GuardedSGD

SGD = "sgd"
ADAMW = "adamw"
OPTIMIZERS = (SGD, ADAMW)
# torch's AdamW defaults, as in Loshchilov & Hutter (2019).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class AdamW(torch.optim.AdamW):
    """torch's AdamW, taking StepGuard's skip flag `apply_step` as nfnet.optim.SGD does. The flag
    is read back to the host once per step: AdamW serves short fine-tuning rounds, not the
    launch-bound path the device-side SGD exists for."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.apply_step: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            # The closure runs first: it is where Lightning's hooks set `apply_step`.
            with torch.enable_grad():
                loss = closure()
        if self.apply_step is None or bool(self.apply_step):
            super().step()
        return loss


def freeze_trunk(net: nn.Module) -> int:
    """Every parameter but the classifier's stops taking gradients; returns how many were frozen."""
    head = {id(p) for p in net.classifier.parameters()}
    frozen = [p for p in net.parameters() if id(p) not in head]
    for param in frozen:
        param.requires_grad_(False)
    return len(frozen)


def head_groups(groups: list[dict[str, Any]], head: nn.Module, lr: float) -> list[dict[str, Any]]:
    """`groups` with the parameters of `head` moved into groups of their own (same settings, role
    suffixed `_head`) at learning rate `lr`; the other groups are unchanged."""
    ids = {id(p) for p in head.parameters()}
    split = []
    for group in groups:
        trunk = [p for p in group["params"] if id(p) not in ids]
        own = [p for p in group["params"] if id(p) in ids]
        if trunk:
            split.append({**group, "params": trunk})
        if own:
            split.append({**group, "params": own, "lr": lr, "role": f"{group['role']}_head"})
    return split


def build_optimizer(net: nn.Module, optim: Mapping[str, Any], peak_lr: float) -> GuardedSGD | AdamW:
    """The optimizer `optim` (the config's optim section) asks for, at `peak_lr` (the classifier
    at `peak_lr * optim["head_lr_mult"]`). With `optim["freeze_trunk"]` the trunk is frozen first
    (`freeze_trunk`), so its gradients are never computed."""
    if optim["freeze_trunk"]:
        freeze_trunk(net)
    groups = optimizer_param_groups(net, optim["weight_decay"])
    if optim["head_lr_mult"] != 1:
        groups = head_groups(groups, net.classifier, peak_lr * optim["head_lr_mult"])
    if optim["optimizer"] == ADAMW:
        # torch's AdamW decays decoupled from the gradient (lr * weight_decay * w), per group:
        # gains and biases keep their weight_decay of 0.
        return AdamW(groups, lr=peak_lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    if optim["optimizer"] != SGD:
        raise ValueError(f"optim.optimizer={optim['optimizer']!r} is not one of {', '.join(OPTIMIZERS)}")
    return GuardedSGD(groups, lr=peak_lr, momentum=optim["momentum"], nesterov=optim["nesterov"])
