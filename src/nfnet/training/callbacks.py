"""Callbacks of a training run besides the module's own (nfnet.training.ema, .guard, .checkpoints).

`AugmentedImageGrid` shows the images the network actually trains on: the first training batch
after mixing and RandAugment, exactly as it reaches the forward pass. A pipeline bug (wrong
colours, crops that miss the object, labels that do not match) is visible there at a glance and
invisible in the loss curve. `StepSeed` makes dropout and stochastic depth a function of the step,
and `EpochLength` gives Lightning each epoch's own number of batches.
"""

from __future__ import annotations

import logging
import os

import lightning.pytorch as pl
import torch
from torchvision.io import write_png
from torchvision.utils import make_grid

from lightning.pytorch.loggers import TensorBoardLogger

from nfnet.data.sampling import derive_seed
from nfnet.data.transforms import IMAGENET_MEAN_255, IMAGENET_STD_255
from nfnet.training.loggers import is_wandb

log = logging.getLogger(__name__)


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """A batch as the network sees it (normalized float, or raw uint8) -> uint8 (N, 3, H, W) on the CPU."""
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images
    mean = torch.tensor(IMAGENET_MEAN_255).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD_255).view(1, 3, 1, 1)
    return (images.float() * std + mean).round().clamp(0, 255).to(torch.uint8)


def describe_targets(targets: torch.Tensor, class_names: list[str] | None, top: int = 2) -> list[str]:
    """One caption per example: the class, or for a mixed example its two largest shares."""
    def name(index: int) -> str:
        return class_names[index] if class_names and index < len(class_names) else str(index)

    targets = targets.detach().cpu()
    if targets.ndim == 1:
        return [name(int(t)) for t in targets]
    weights, indices = targets.float().topk(min(top, targets.shape[1]), dim=1)
    return [
        " + ".join(f"{name(int(i))} {float(w):.2f}" for w, i in zip(ws, idx) if w > 0.005)
        for ws, idx in zip(weights, indices)
    ]


class AugmentedImageGrid(pl.Callback):
    """Logs the first training batch once per run: a PNG grid in the run directory, every image
    with its (mixed) label to wandb, and the grid to TensorBoard, whichever loggers are active."""

    def __init__(self, num_images: int = 32, filename: str = "augmented_images.png", key: str = "train/augmented_images"):
        self.num_images = num_images
        self.filename = filename
        self.key = key
        self._logged = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self._logged:
            return
        self._logged = True
        # fast_dev_run and sanity checks stand in for a real run; their loggers are dummies.
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        images, targets = batch
        images = to_uint8_images(images[: self.num_images])
        captions = describe_targets(targets[: self.num_images], pl_module.hparams.get("class_names"))
        grid = make_grid(images, nrow=8, padding=2)
        path = os.path.join(trainer.default_root_dir, self.filename)
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        write_png(grid, path)
        step = trainer.global_step
        for logger in trainer.loggers:
            if is_wandb(logger):
                logger.log_image(self.key, images=[img.permute(1, 2, 0).numpy() for img in images],
                                 step=step, caption=captions)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(self.key, grid, step)
        log.info("augmented training images: %s", path)


class StepSeed(pl.Callback):
    """Reseeds torch's RNGs before every training batch from (seed, epoch, batch, rank).

    Dropout and stochastic depth then draw the same masks at the same step whether the run went
    through uninterrupted or was killed and resumed from a checkpoint: nothing that happened in
    the process before (validation, data loading in the main process, an earlier run) leaks into
    them. Replicas get different masks, as they should. On XLA the device RNG is torch-xla's own
    and is not reseeded here (docs/RELIABILITY.md).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.seed is None:
            self.seed = torch.initial_seed()  # seed_everything's seed, before any reseeding here

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        seed = derive_seed(self.seed, "step", trainer.current_epoch, batch_idx, trainer.global_rank)
        torch.default_generator.manual_seed(seed)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.manual_seed(seed)  # this process's device; no host sync


class EpochLength(pl.Callback):
    """Tells Lightning how many batches this epoch has when the training sampler knows it.

    An epoch is N training examples cut from one endless stream (nfnet.data.sampling), so
    consecutive epochs differ by one step when N is not a multiple of the step's examples.
    Lightning sizes every epoch by the loader's length, which is the longest epoch's; it would
    then never reach its end-of-epoch validation in a shorter one. Before each epoch (and at the
    start of a run, which may resume mid-epoch) this sets the epoch's batch count and the
    validation point from the sampler's `batches_in_epoch`. Put it before the progress bar, so
    that the bar shows the epoch's own length.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer)

    @staticmethod
    def _apply(trainer: pl.Trainer) -> None:
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if not hasattr(sampler, "batches_in_epoch"):
            return  # another sampler (overfit_batches swaps in a sequential one): Lightning's count stands
        batches = sampler.batches_in_epoch(sampler.epoch)
        limit = trainer.limit_train_batches  # as Lightning reads it: a count, or a fraction of the length
        batches = min(batches, limit if isinstance(limit, int) else int(len(loader) * limit))
        trainer.fit_loop.max_batches = batches
        interval = trainer.val_check_interval
        if isinstance(interval, float) and trainer.val_check_batch is not None:
            trainer.val_check_batch = max(1, int(batches * interval))
