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
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics.classification import MulticlassAccuracy

from nfnet.checkpoints import TrainingStopped, check_finite
from nfnet.data.transforms import normalize
from nfnet.models import create_model
from nfnet.optim.agc import AdaptiveGradClipper
from nfnet.optim.param_groups import agc_named_parameters, optimizer_param_groups, stage_of
from nfnet.optim.schedule import ema_decay, scale_lr, schedule_lengths, warmup_cosine_scheduler
from nfnet.xla import ema_weights_on_device, forward_in_dtype, log_global_accuracy, log_train_step_xla, on_xla

TOP_K = (1, 5)
# Where the non-finite step counters live in a checkpoint (not in the state dict, so that
# checkpoints written before they existed still load strictly).
NONFINITE_KEY = "nfnet_nonfinite"

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
        skip_nonfinite: bool = True,
        max_consecutive_skips: int | None = 10,
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
        # Non-finite steps: skipped (the step did not happen), counted, and K in a row stop the run.
        self.skipped_steps = 0
        self._consecutive_skips = 0
        self._step_skipped = False
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
        if self._guards_nonfinite(loss):
            # A non-finite loss can still give finite gradients (an infinite log-probability
            # under label smoothing does): make them NaN so the one gradient check below catches
            # it. Under DDP the NaN is all-reduced to every replica, so all skip the same step.
            # A finite loss is multiplied by exactly 1: its gradients stay bit-identical.
            loss = loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
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

    def _guards_nonfinite(self, tensor: torch.Tensor) -> bool:
        # On XLA the check would read a value back to the host every step and stall the TPU
        # pipeline; there non-finite steps are not skipped (docs/RELIABILITY.md).
        return self.hparams.skip_nonfinite and not on_xla(tensor)

    def on_before_optimizer_step(self, optimizer) -> None:
        self._step_skipped = False
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads and self._guards_nonfinite(grads[0]):
            # One fused max-abs over all gradients and one host read per step; an Inf/NaN
            # anywhere (or a NaN loss, see training_step) makes it non-finite.
            finite = bool(torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all())
            if not finite:
                self._skip_step(optimizer)
                return
            self._consecutive_skips = 0
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
        if self.clipper is None:
            return
        clip_frac = self.clipper.clip_()
        # A tensor is handed to the logger: it is only read back at the logging interval.
        self.log("train/agc_clip_frac", clip_frac, on_step=True, on_epoch=False)

    def _skip_step(self, optimizer) -> None:
        """The step did not happen: no gradient reaches the optimizer, so SGD leaves the weights
        and momentum buffers as they were, and the EMA does not move (_update_ema). The
        step still counts (global_step and the LR schedule advance, as for a batch AMP's
        GradScaler skips), so the run keeps its length and schedule."""
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self._step_skipped = True
        self.skipped_steps += 1
        self._consecutive_skips += 1
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
        limit = self.hparams.max_consecutive_skips
        message = (
            f"step {self.global_step}: non-finite loss or gradient, optimizer step skipped "
            f"({self._consecutive_skips} in a row, {self.skipped_steps} in this run)"
        )
        if limit is not None and self._consecutive_skips >= limit:
            raise TrainingStopped(
                f"{message}: stopping after optim.max_consecutive_skips={limit} consecutive non-finite steps. "
                "The weights are those of the last good step and the last checkpoint is kept; lower "
                "optim.base_lr, check the data, or resume from that checkpoint."
            )
        rank_zero_warn(message)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Refuse to write weights or optimizer state holding NaN/Inf (every rank checks the same
        # values, so all of them stop together); the previous checkpoint stays in place.
        check_finite(checkpoint)
        checkpoint[NONFINITE_KEY] = {"skipped_steps": self.skipped_steps, "consecutive": self._consecutive_skips}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get(NONFINITE_KEY) or {}
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._consecutive_skips = int(state.get("consecutive", 0))

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # The EMA moves right after the weights, inside the step: a checkpoint written at this
        # step's end (callbacks run before the module's own batch-end hook) then holds the EMA
        # of the same step as the weights, and a resume from it continues bit-exactly. Called
        # once per optimizer step, so under gradient accumulation too, as in the official code.
        self._update_ema()

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema_net is None or self._step_skipped:  # a skipped step moved no weight
            return
        # global_step still counts the steps before this one here (0 for the first).
        step = self.global_step
        ema_params = list(self.ema_net.parameters())
        if on_xla(ema_params[0]):  # per-step Python floats can force XLA recompiles (see nfnet.xla)
            weight = ema_weights_on_device(step, self.hparams.ema_decay, len(ema_params), ema_params[0].device)
        else:
            weight = 1.0 - ema_decay(step, self.hparams.ema_decay)
        torch._foreach_lerp_(ema_params, [p.detach() for p in self.net.parameters()], weight)

    # ----------------------------------------------------------------- optimizer
    def global_batch_size(self) -> int:
        trainer = self.trainer
        per_device = getattr(trainer.datamodule, "batch_size", None)
        if per_device is None:
            raise ValueError("NFNetClassifier needs a datamodule with a `batch_size` to scale the learning rate")
        return per_device * trainer.world_size * trainer.accumulate_grad_batches

    def _schedule_lengths(self) -> tuple[float, int]:
        """(warmup steps, total steps) of this run's LR schedule.

        The official count when the run is whole epochs of the datamodule's training examples:
        ``E * N // global batch`` steps and ``warmup_epochs * N / global batch`` warmup (the
        sampler cuts epochs from one stream of examples, so the run takes exactly these steps).
        A run that Lightning cuts shorter (max_steps, limit_train_batches, fast_dev_run,
        overfit_batches) follows Lightning's own count instead.
        """
        trainer = self.trainer
        bound = max(1, trainer.estimated_stepping_batches)
        examples = getattr(trainer.datamodule, "num_train_examples", None)
        epochs = trainer.max_epochs
        if examples and epochs and epochs > 0:
            warmup, total = schedule_lengths(examples, self.global_batch_size(), epochs, self.hparams.warmup_epochs)
            if total <= bound:
                return warmup, total
        per_epoch = bound / max(1, epochs or 1)
        return self.hparams.warmup_epochs * per_epoch, bound

    def configure_optimizers(self):
        peak_lr = scale_lr(self.hparams.base_lr, self.global_batch_size(), self.hparams.reference_batch)
        optimizer = torch.optim.SGD(
            optimizer_param_groups(self.net, self.hparams.weight_decay),
            lr=peak_lr,
            momentum=self.hparams.momentum,
            nesterov=self.hparams.nesterov,
        )
        warmup_steps, total_steps = self._schedule_lengths()
        # A run shorter than its warmup (fast_dev_run, a smoke test) still gets a valid schedule.
        warmup_steps = min(warmup_steps, total_steps - 1)
        scheduler = warmup_cosine_scheduler(optimizer, warmup_steps, total_steps, self.hparams.end_lr / peak_lr)
        # A checkpoint restores the schedule it was written with; on_train_start compares.
        self._configured_schedule = [vars(fn).copy() for fn in scheduler.lr_lambdas]
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        self._follow_configured_schedule()

    def _follow_configured_schedule(self) -> None:
        """A run resumed with more epochs (or another batch size) trains on its own schedule.

        The checkpoint's scheduler state holds the schedule's lengths, so a run resumed with
        `trainer.max_epochs` raised would otherwise stay on the old schedule, which has already
        decayed to its end LR: the added epochs would train at LR 0. The cosine is stretched to
        the new length instead, from the step the checkpoint reached. An interrupted run resumed
        with its own config has the same lengths, and nothing changes (bit-exact resume).
        """
        configured = getattr(self, "_configured_schedule", None)
        if not configured or not self.trainer.lr_scheduler_configs:
            return
        scheduler = self.trainer.lr_scheduler_configs[0].scheduler
        restored = [vars(fn).copy() for fn in scheduler.lr_lambdas]
        if restored == configured:
            return
        before = [group["lr"] for group in scheduler.optimizer.param_groups]
        for fn, settings in zip(scheduler.lr_lambdas, configured):
            vars(fn).update(settings)
        step = scheduler.last_epoch
        lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = list(lrs)
        rank_zero_info(
            f"LR schedule: the checkpoint's ran {restored[0]['total_steps']:.0f} steps (warmup "
            f"{restored[0]['warmup_steps']:g}), this run's config gives {configured[0]['total_steps']:.0f} "
            f"(warmup {configured[0]['warmup_steps']:g}); continuing at step {step} on this run's schedule, "
            f"LR {before[0]:.4g} -> {lrs[0]:.4g}"
        )
