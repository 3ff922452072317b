"""NFNetClassifier: the LightningModule that trains an NFNet the way the paper does.

It owns the network and its EMA copy, the soft-target loss with label smoothing after mixing, the
metrics (raw and EMA side by side, as the paper reports both), SGD with Nesterov momentum and
role-based weight decay under the per-step warmup + cosine schedule, and adaptive gradient
clipping in `on_before_optimizer_step`, where Lightning hands over gradients that are unscaled,
accumulated and, under DDP/XLA, already averaged across replicas. Around each
optimizer step it runs, on the device and without a host read, the finiteness check of the
gradients, AGC, the (possibly skipped) SGD step and EMA update (nfnet.optim.step_guard); the
callbacks that report the skips and refuse non-finite checkpoints come with it
(`configure_callbacks`), so a plain `Trainer` gets them too.

Its arguments are the config's `model` and `optim` sections as plain mappings (their schema and
defaults: nfnet.app.schema), so checkpoints hold primitives only and load with `weights_only=True`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from nfnet.data.transforms import normalize
from nfnet.inference.weights import load_pretrained
from nfnet.models import create_model
from nfnet.models.nfnet import NFNet
from nfnet.optim.agc import AdaptiveGradClipper, check_unscaled_gradients
from nfnet.optim.ema import ExponentialMovingAverage
from nfnet.optim.optimizers import build_optimizer
from nfnet.optim.param_groups import agc_named_parameters, stage_of
from nfnet.optim.schedule import follow_schedule, run_schedule_lengths, scale_lr, warmup_cosine_scheduler
from nfnet.optim.step_guard import StepGuard
from nfnet.training.checkpoints import FiniteCheckpoints
from nfnet.training.guard import NonFiniteGuard, poison_nonfinite_loss
from nfnet.training.metrics import accuracies, dominant_labels, log_evaluation_metrics, log_training_metrics
from nfnet.training.xla import forward_in_dtype, on_xla

# Normalization is done by the module on purpose (it belongs to the network's input contract and
# must run on the device after a uint8 transfer, whatever datamodule feeds it), so Lightning's
# notice that the module's hook wins over the datamodule's is expected, not a problem.
warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")


class NFNetClassifier(pl.LightningModule):
    def __init__(self, model: Mapping[str, Any], optim: Mapping[str, Any], num_classes: int,
                 class_names: list[str] | None = None, net: NFNet | None = None) -> None:
        """`net`: an NFNet already built and loaded (evaluation of converted weights); by default
        the network is built from `model`."""
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        if net is None:
            net = create_model(
                model["name"], num_classes=num_classes, drop_rate=model["drop_rate"],
                stochdepth_rate=model["stochdepth_rate"], activation=model["activation"],
                gelu_approximate=model["gelu_approximate"], grad_checkpointing=model["grad_checkpointing"],
            )
        self.net = net
        if model["pretrained"]:
            load_pretrained(self.net, model["pretrained"], class_names)
        if model["channels_last"]:
            self.net = self.net.to(memory_format=torch.channels_last)
        # A frozen copy moved after each optimizer step; it is part of the state dict, so a
        # checkpoint holds both weight sets and a resume restores both.
        self.ema_net = copy.deepcopy(self.net).requires_grad_(False) if optim["ema"]["decay"] is not None else None
        self.guard = NonFiniteGuard(optim["max_consecutive_skips"]) if optim["skip_nonfinite"] else None
        # By stage ("fit" for training: ModuleDict keys may not shadow nn.Module.train).
        self.metrics = torch.nn.ModuleDict(
            {stage: accuracies(num_classes) for stage in ("fit", "val", "val_ema", "test", "test_ema")}
        )
        # Built in on_fit_start / on_train_start, once the parameters are where training runs
        # them and a checkpoint has restored its step.
        self.clipper: AdaptiveGradClipper | None = None
        self.step_guard: StepGuard | None = None
        # (warmup, total) steps as configure_optimizers planned them, before the loop starts
        # (EpochLength then resizes each epoch); on_train_start holds a restored schedule to it.
        self.planned_schedule: tuple[float, int] | None = None

    def configure_callbacks(self) -> list[pl.Callback]:
        return [FiniteCheckpoints(), *([self.guard] if self.guard is not None else [])]

    # ----------------------------------------------------------------- data on the device
    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        # Images travel as uint8 (4x fewer bytes than float) and are normalized here, on device.
        images, targets = batch
        images = normalize(images)
        if self.hparams.model["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets

    def setup(self, stage: str) -> None:
        mode = self.hparams.model["compile"]
        if mode and stage == "fit":
            # Compiling the network in place (not the LightningModule) keeps `self.log` out of
            # the graph and the state-dict keys free of an `_orig_mod.` prefix.
            self.net.compile(mode=None if mode in (True, "default") else mode)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    # ----------------------------------------------------------------- loss
    def soft_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Integer labels or mixed soft labels -> smoothed distributions (smoothing after mixing)."""
        num_classes, eps = self.hparams.num_classes, self.hparams.optim["label_smoothing"]
        if targets.dtype in (torch.int64, torch.int32):
            targets = F.one_hot(targets.long(), num_classes)
        return (1.0 - eps) * targets.float() + eps / num_classes

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # float32 logits: under bf16 the log-softmax of 1000 classes loses too much precision.
        return -(self.soft_targets(targets) * torch.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()

    # ----------------------------------------------------------------- steps
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        # trainer=tpu's precision plugin asks for bf16 compute over float32 weights (nfnet.training.xla).
        compute_dtype = getattr(self.trainer.precision_plugin, "compute_dtype", None)
        logits = self.net(images) if compute_dtype is None else forward_in_dtype(self.net, images, compute_dtype)
        loss = self.loss(logits, targets)
        log_training_metrics(self, loss, logits, dominant_labels(targets), self.metrics["fit"])
        # The schedule's value is a Python float: logging it costs no device sync.
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        if self.hparams.optim["skip_nonfinite"] and not on_xla(loss):
            loss = poison_nonfinite_loss(loss)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        images, labels = batch
        for net, name, prefix in ((self.net, stage, f"{stage}/"), (self.ema_net, f"{stage}_ema", f"{stage}/ema_")):
            if net is None:
                continue
            logits, raw = net(images), net is self.net
            if raw:
                self.log(f"{stage}/loss", self.loss(logits, labels), on_epoch=True, sync_dist=True)
            log_evaluation_metrics(self, prefix, logits, labels, self.metrics[name], prog_bar=raw)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        net = self.ema_net if self.ema_net is not None else self.net
        return torch.softmax(net(images).float(), dim=-1)

    # ----------------------------------------------------------------- AGC
    def on_fit_start(self) -> None:
        agc = self.hparams.optim["agc"]
        if agc["clipping"] is not None:
            for optimizer in self.trainer.optimizers:
                check_unscaled_gradients(optimizer)
            # The classifier weight is exempt by role (NFNET_SPEC §3); the plan that batches the
            # unit-wise norms across parameters is built once here, not on every step.
            self.clipper = AdaptiveGradClipper(agc_named_parameters(self.net), agc["clipping"], agc["eps"], group_fn=stage_of)

    def on_before_optimizer_step(self, optimizer) -> None:
        # The gradients' finiteness flag (arms the optimizer's device-side skip), then AGC.
        self.step_guard.before_step()
        if self.clipper is None:
            return
        # Tensors go to the logger: they are read back only at the logging interval. Per stage,
        # the fractions show where lambda bites (a dashboard for tuning it).
        self.log("train/agc_clip_frac", self.step_guard.clip_fraction, on_step=True, on_epoch=False)
        fractions = {f"train/agc_clip_frac_{group}": value for group, value in self.clipper.group_fractions().items()}
        self.log_dict(fractions, on_step=True, on_epoch=False)

    # ----------------------------------------------------------------- optimizer and schedule
    def global_batch_size(self) -> int:
        trainer = self.trainer
        if getattr(trainer.datamodule, "batch_size", None) is None:
            raise ValueError("NFNetClassifier needs a datamodule with a `batch_size` to scale the learning rate")
        return trainer.datamodule.batch_size * trainer.world_size * trainer.accumulate_grad_batches

    def configure_optimizers(self):
        optim = self.hparams.optim
        peak_lr = scale_lr(optim["base_lr"], self.global_batch_size(), optim["reference_batch"])
        # The paper's SGD (nfnet.optim.SGD: a few foreach kernels, a device-side skip) or AdamW.
        optimizer = build_optimizer(self.net, optim, peak_lr)
        trainer = self.trainer
        self.planned_schedule = warmup, total = run_schedule_lengths(
            getattr(trainer.datamodule, "num_train_examples", None), self.global_batch_size(), trainer.max_epochs,
            optim["warmup_epochs"], trainer.estimated_stepping_batches,
        )
        scheduler = warmup_cosine_scheduler(optimizer, warmup, total, optim["end_lr"] / peak_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # The EMA moves right after the weights, inside the step: every batch-end hook, a
        # checkpoint of this step included, sees both of the same step (bit-exact resume).
        self.step_guard.after_step()

    def on_train_start(self) -> None:
        ema = None
        if self.ema_net is not None:  # its step is the restored global_step; TPUs have no float64
            step_dtype = torch.float32 if on_xla(self.ema_net.classifier.weight) else torch.float64
            ema = ExponentialMovingAverage(list(self.ema_net.parameters()), list(self.net.parameters()),
                                           self.hparams.optim["ema"]["decay"], self.global_step, step_dtype)
        check = self.guard is not None and not on_xla(self.net.classifier.weight)  # XLA: docs/RELIABILITY.md
        self.step_guard = StepGuard(self.trainer.optimizers[0], self.clipper, ema, check_finite=check)
        if self.guard is not None:
            self.guard.attach(self.step_guard)
        # A checkpoint restores the schedule it was written with: a run resumed with more epochs
        # would stay on the old one, already decayed to its end LR. Follow this run's config.
        if not self.trainer.lr_scheduler_configs:
            return
        change = follow_schedule(self.trainer.lr_scheduler_configs[0].scheduler, *self.planned_schedule)
        if change is not None:
            rank_zero_info(f"LR schedule: {change}")
