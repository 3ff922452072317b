"""NFNetClassifier: the LightningModule that trains an NFNet the way the paper does.

It owns the network and its EMA copy, the soft-target loss with label smoothing, adaptive
gradient clipping (in `on_before_optimizer_step`, where Lightning hands over gradients that are
unscaled, accumulated and, under DDP/XLA, already averaged across replicas), SGD with Nesterov
momentum and role-based weight decay, the per-step warmup + cosine schedule, and the metrics.

The EMA lives here rather than in Lightning's `WeightAveraging` callback because the paper
reports raw and EMA accuracy side by side: that callback swaps the EMA weights in for the whole
validation loop, so only one of the two could be measured per epoch.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from nfnet.data.transforms import normalize
from nfnet.models import create_model
from nfnet.optim.agc import AdaptiveGradClipper
from nfnet.optim.param_groups import agc_named_parameters, optimizer_param_groups, stage_of
from nfnet.optim.schedule import ema_decay, scale_lr, warmup_cosine_scheduler
from nfnet.xla import ema_weights_on_device, forward_in_dtype, log_global_accuracy, log_train_step_xla, on_xla

TOP_K = (1, 5)

# Normalization is done by the module on purpose (it belongs to the network's input contract and
# must run on the device after a uint8 transfer, whatever datamodule feeds it), so Lightning's
# notice that the module's hook wins over the datamodule's is expected, not a problem.
warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")


class NFNetClassifier(pl.LightningModule):
    """Every constructor argument is a primitive, so checkpoints load with `weights_only=True`."""

    def __init__(
        self,
        model_name: str = "nfnet_tiny",
        num_classes: int = 10,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: str | None = None,
        base_lr: float = 0.1,
        reference_batch: int = 256,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 2e-5,
        warmup_epochs: float = 5.0,
        end_lr: float = 0.0,
        label_smoothing: float = 0.1,
        agc_clipping: float | None = 0.01,
        agc_eps: float = 1e-3,
        ema_decay: float | None = 0.99999,
        compile: bool = False,
        channels_last: bool = False,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = create_model(model_name, num_classes=num_classes, **(model_kwargs or {}))
        if pretrained:
            from nfnet.models.pretrained import load_pretrained

            load_pretrained(self.net, pretrained)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        # A frozen copy, updated after each optimizer step; it is part of the state dict, so a
        # checkpoint holds both weight sets and a resume restores both.
        self.ema_net = None
        if ema_decay is not None:
            self.ema_net = copy.deepcopy(self.net).requires_grad_(False)
        self._ema_seen_step = -1
        self.train_metrics = self._make_metrics(num_classes)
        self.val_metrics = self._make_metrics(num_classes)
        self.val_ema_metrics = self._make_metrics(num_classes)
        self.test_metrics = self._make_metrics(num_classes)
        self.test_ema_metrics = self._make_metrics(num_classes)

    @staticmethod
    def _make_metrics(num_classes: int) -> torch.nn.ModuleDict:
        # Top-k on logits with micro averaging is the per-sample ImageNet accuracy; torchmetrics'
        # default ("macro") would average per-class accuracies instead.
        return torch.nn.ModuleDict(
            {
                f"acc_top{k}": MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro")
                for k in TOP_K
            }
        )

    # ----------------------------------------------------------------- data on the device
    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        # Images travel as uint8 (4x fewer bytes than float) and are normalized here, on device.
        images, targets = batch
        images = normalize(images)
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets

    def setup(self, stage: str) -> None:
        if self.hparams.compile and stage == "fit":
            # Compiling the network in place (not the LightningModule) keeps `self.log` out of
            # the graph and the state-dict keys free of an `_orig_mod.` prefix.
            self.net.compile()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    # ----------------------------------------------------------------- loss
    def soft_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Integer labels or mixed soft labels -> smoothed distributions (smoothing after mixing)."""
        num_classes = self.hparams.num_classes
        if targets.dtype in (torch.int64, torch.int32):
            targets = F.one_hot(targets.long(), num_classes).float()
        eps = self.hparams.label_smoothing
        return (1.0 - eps) * targets.float() + eps / num_classes

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # float32 logits: under bf16 the log-softmax of 1000 classes loses too much precision.
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        return -(self.soft_targets(targets) * log_probs).sum(dim=-1).mean()

    @staticmethod
    def hard_labels(targets: torch.Tensor) -> torch.Tensor:
        # For accuracy on mixed batches the dominant source image's label is the reference.
        return targets if targets.ndim == 1 else targets.argmax(dim=-1)

    # ----------------------------------------------------------------- steps
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        # trainer=tpu's precision plugin asks for bf16 compute over float32 weights (nfnet.xla).
        compute_dtype = getattr(self.trainer.precision_plugin, "compute_dtype", None)
        logits = self.net(images) if compute_dtype is None else forward_in_dtype(self.net, images, compute_dtype)
        loss = self.loss(logits, targets)
        labels = self.hard_labels(targets)
        if on_xla(logits):
            # torchmetrics reads its inputs back to the host every step and does not sync
            # across TPU cores; these logs stay on the device and are global per epoch.
            log_train_step_xla(self, loss, logits, labels, TOP_K)
        else:
            for metric in self.train_metrics.values():
                metric.update(logits.detach(), labels)
            self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
            self.log_dict({f"train/{k}": m for k, m in self.train_metrics.items()}, on_step=False, on_epoch=True)
        # The schedule's value is a Python float: logging it costs no device sync.
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _evaluate(self, batch, stage: str, raw_metrics, ema_metrics) -> None:
        images, labels = batch
        logits = self.net(images)
        self.log(f"{stage}/loss", self.loss(logits, labels), on_epoch=True, sync_dist=True)
        if on_xla(logits):  # global across TPU cores, as in training_step
            log_global_accuracy(self, f"{stage}/", logits, labels, TOP_K, prog_bar=True)
            if self.ema_net is not None:
                log_global_accuracy(self, f"{stage}/ema_", self.ema_net(images), labels, TOP_K)
            return
        for metric in raw_metrics.values():
            metric.update(logits, labels)
        self.log_dict({f"{stage}/{k}": m for k, m in raw_metrics.items()}, on_epoch=True, prog_bar=True)
        if self.ema_net is not None:
            ema_logits = self.ema_net(images)
            for metric in ema_metrics.values():
                metric.update(ema_logits, labels)
            self.log_dict({f"{stage}/ema_{k}": m for k, m in ema_metrics.items()}, on_epoch=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics, self.val_ema_metrics)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics, self.test_ema_metrics)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        net = self.ema_net if self.ema_net is not None else self.net
        return torch.softmax(net(images).float(), dim=-1)

    # ----------------------------------------------------------------- AGC and EMA
    def on_fit_start(self) -> None:
        for optimizer in self.trainer.optimizers:
            # Lightning skips unscaling for optimizers that unscale inside step(); AGC would then
            # compare loss-scaled gradients with the weights and clip by the wrong ratio.
            if getattr(optimizer, "_step_supports_amp_scaling", False):
                raise ValueError(
                    f"{type(optimizer).__name__} is fused (it unscales gradients inside step()), "
                    "so adaptive gradient clipping would see loss-scaled gradients. "
                    "Use a non-fused optimizer."
                )
        self.clipper = None
        if self.hparams.agc_clipping is not None:
            # The classifier weight is exempt by role (NFNET_SPEC §3); the plan that batches the
            # unit-wise norms across parameters is built once here, not on every step.
            self.clipper = AdaptiveGradClipper(
                agc_named_parameters(self.net), self.hparams.agc_clipping, self.hparams.agc_eps, group_fn=stage_of
            )

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.clipper is None:
            return
        clip_frac = self.clipper.clip_()
        # A tensor is handed to the logger: it is only read back at the logging interval.
        self.log("train/agc_clip_frac", clip_frac, on_step=True, on_epoch=False)

    def on_train_start(self) -> None:
        self._ema_seen_step = self.global_step

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # global_step counts optimizer steps, so under gradient accumulation the EMA moves once
        # per optimizer step, as in the official code.
        if self.ema_net is None or self.global_step == self._ema_seen_step:
            return
        self._ema_seen_step = self.global_step
        ema_params = list(self.ema_net.parameters())
        if on_xla(ema_params[0]):  # per-step Python floats can force XLA recompiles (see nfnet.xla)
            weight = ema_weights_on_device(
                self.global_step - 1, self.hparams.ema_decay, len(ema_params), ema_params[0].device
            )
        else:
            weight = 1.0 - ema_decay(self.global_step - 1, self.hparams.ema_decay)
        torch._foreach_lerp_(ema_params, [p.detach() for p in self.net.parameters()], weight)

    # ----------------------------------------------------------------- optimizer
    def global_batch_size(self) -> int:
        trainer = self.trainer
        per_device = getattr(trainer.datamodule, "batch_size", None)
        if per_device is None:
            raise ValueError("NFNetClassifier needs a datamodule with a `batch_size` to scale the learning rate")
        return per_device * trainer.world_size * trainer.accumulate_grad_batches

    def configure_optimizers(self):
        peak_lr = scale_lr(self.hparams.base_lr, self.global_batch_size(), self.hparams.reference_batch)
        optimizer = torch.optim.SGD(
            optimizer_param_groups(self.net, self.hparams.weight_decay),
            lr=peak_lr,
            momentum=self.hparams.momentum,
            nesterov=self.hparams.nesterov,
        )
        total_steps = max(1, self.trainer.estimated_stepping_batches)
        steps_per_epoch = total_steps / max(1, self.trainer.max_epochs or 1)
        # A run shorter than its warmup (fast_dev_run, a smoke test) still gets a valid schedule.
        warmup_steps = min(self.hparams.warmup_epochs * steps_per_epoch, total_steps - 1)
        scheduler = warmup_cosine_scheduler(optimizer, warmup_steps, total_steps, self.hparams.end_lr / peak_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
