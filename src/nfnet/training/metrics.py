"""The module's metrics: top-1 and top-5 accuracy with torchmetrics, and on XLA as logged means
that are global across TPU cores.

Lightning's XLA strategy never initialises `torch.distributed`, so torchmetrics objects do not
sync across TPU cores (their epoch values would be one core's), and their input checks read
tensors back to the host every step. On XLA the module logs per-batch means with the batch size
and `sync_dist=True` instead: Lightning accumulates sum(value * n) and sum(n) on the device and
reduces both across cores once per epoch, which is the exact global mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics.classification import MulticlassAccuracy

from nfnet.training.xla import on_xla

TOP_K = (1, 5)


def accuracies(num_classes: int) -> torch.nn.ModuleDict:
    """`acc_top1`, `acc_top5` metrics (k capped at the class count)."""
    # Top-k on logits with micro averaging is the per-sample ImageNet accuracy; torchmetrics'
    # default ("macro") would average per-class accuracies instead.
    return torch.nn.ModuleDict(
        {f"acc_top{k}": MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro") for k in TOP_K}
    )


def topk_accuracies(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Per-batch top-k accuracies, one float32 entry per k, with static shapes and no host read.

    k is capped at the class count (top-5 of 3 classes is top-3), as the torchmetrics path does.
    """
    num_classes = logits.shape[-1]
    ks = [min(k, num_classes) for k in ks]
    top = logits.topk(max(ks), dim=-1).indices  # (B, max k), sorted by score
    hit = (top == labels[:, None]).to(torch.float32)
    # hit has at most one 1 per row, so its running sum over ranks says "in the top k".
    in_top = hit.cumsum(dim=-1)  # (B, max k)
    return torch.stack([in_top[:, k - 1].mean() for k in ks])


def log_global_accuracy(
    module: Any, prefix: str, logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int], **log_kwargs: Any
) -> None:
    """Logs `{prefix}acc_top{k}` as epoch values that are global across TPU cores.

    Each is a per-batch mean logged with its batch size and `sync_dist=True`: Lightning keeps
    sum(mean * n) and sum(n) on the device and reduces both across cores only when it computes
    the epoch value, so every core reports correct / seen over all cores' examples.
    """
    batch_size = labels.shape[0]
    for k, value in zip(ks, topk_accuracies(logits, labels, ks).unbind()):
        module.log(
            f"{prefix}acc_top{k}", value, on_step=False, on_epoch=True, sync_dist=True,
            batch_size=batch_size, reduce_fx="mean", **log_kwargs,
        )


def log_train_step_xla(
    module: Any, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]
) -> None:
    """The training-step logs on XLA: nothing is read back to the host inside the step.

    The per-step loss is this core's (it goes to the logger only every `log_every_n_steps` and
    never to the progress bar, which would read it back every step); the epoch loss and
    accuracies are global, reduced once per epoch.
    """
    batch_size = labels.shape[0]
    module.log("train/loss", loss.detach(), on_step=True, on_epoch=False)
    module.log(
        "train/loss_epoch", loss.detach(), on_step=False, on_epoch=True, sync_dist=True,
        batch_size=batch_size, reduce_fx="mean",
    )
    log_global_accuracy(module, "train/", logits.detach(), labels, ks)


def dominant_labels(targets: torch.Tensor) -> torch.Tensor:
    """Integer labels, or for mixed soft targets the dominant source image's label: the
    reference of the training accuracy on mixed batches."""
    return targets if targets.ndim == 1 else targets.argmax(dim=-1)


def log_training_metrics(module: Any, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                         metrics: torch.nn.ModuleDict) -> None:
    """`train/loss` and the training accuracies: torchmetrics, or on XLA global means."""
    if on_xla(logits):
        log_train_step_xla(module, loss, logits, labels, TOP_K)
        return
    for metric in metrics.values():
        metric.update(logits.detach(), labels)
    module.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
    module.log_dict({f"train/{k}": m for k, m in metrics.items()}, on_step=False, on_epoch=True)


def log_evaluation_metrics(module: Any, prefix: str, logits: torch.Tensor, labels: torch.Tensor,
                           metrics: torch.nn.ModuleDict, prog_bar: bool) -> None:
    """`<prefix>acc_top1/5` of an evaluation step: torchmetrics, or on XLA global means."""
    if on_xla(logits):
        log_global_accuracy(module, prefix, logits, labels, TOP_K, prog_bar=prog_bar)
        return
    for metric in metrics.values():
        metric.update(logits, labels)
    module.log_dict({f"{prefix}{k}": m for k, m in metrics.items()}, on_epoch=True, prog_bar=prog_bar)
