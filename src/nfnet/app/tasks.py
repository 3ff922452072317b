"""The one place that turns a composed config into objects and runs them: `train` here, `evaluate`,
`predict` and `export` in nfnet.app.inference_tasks; `TASKS` maps each entry point to its task.

Objects come from the config with `hydra.utils.instantiate` (the module, the datamodule, the
trainer, callbacks and loggers); loggers are always finished, even when the run fails, so that a
multirun never merges two jobs into one wandb run.
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from nfnet.app.budget import apply_budget
from nfnet.app.checks import check_config
from nfnet.app.inference_tasks import evaluate, export, predict
from nfnet.app.loggers import build_loggers, loggable_config
from nfnet.app.machine import per_device_batch_size, world_size
from nfnet.app.pack_task import pack
from nfnet.app.reports import print_config, write_json
from nfnet.app.resume import resolve_checkpoint, run_lock, stops
from nfnet.app.values import input_error, refused_file_error
from nfnet.app.runs import in_multirun
from nfnet.data.datamodule import ImageDataModule
from nfnet.data.folder_split import write_file_list
from nfnet.data.sources import val_root
from nfnet.errors import ConfigError, InputError, TrainingStopped
from nfnet.training.callbacks import EpochLength, StepSeed
from nfnet.training.checkpoints import (
    AtomicCheckpointIO,
    check_disk_space,
    checkpoint_bytes_estimate,
    remove_stale_temp_files,
)
from nfnet.training.loggers import WandbRunInCheckpoint, continue_csv_files, finish_loggers, is_wandb
from nfnet.training.module import NFNetClassifier

log = logging.getLogger(__name__)

# Beside the checkpoints: which files the run validated on.
VAL_FILES = "val_files.txt"


def instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` with the sections as plain dicts; an error of the object's own
    constructor (a weights file refused, a folder that is not there) comes out as itself, not
    wrapped in Hydra's InstantiationException, so that it gets its own one line."""
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(node, **kwargs, _convert_="all")
    except InstantiationException as error:
        if error.__cause__ is not None:
            raise error.__cause__ from None
        raise


def build_datamodule(cfg: DictConfig) -> ImageDataModule:
    return instantiate(cfg.datamodule, batch_size=per_device_batch_size(cfg))


def build_module(cfg: DictConfig, num_classes: int, class_names: list[str] | None = None) -> NFNetClassifier:
    return instantiate(cfg.module, num_classes=num_classes, class_names=class_names)


def _instantiate_all(section: DictConfig | None) -> list[Any]:
    """Instantiate each `_target_` entry of a callbacks/logger group (one key per object)."""
    if not section:
        return []
    return [hydra.utils.instantiate(node) for node in section.values() if node and "_target_" in node]


def _setup_data(cfg: DictConfig, datamodule: ImageDataModule | None = None) -> ImageDataModule:
    """`datamodule` (by default the config's) with its data prepared and split; a data problem is
    one line naming data.root."""
    datamodule = datamodule or build_datamodule(cfg)
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
    except (FileNotFoundError, NotADirectoryError, PermissionError) as error:
        raise ConfigError(f"data.root={str(cfg.data.root)!r}: {error}") from None
    except ValueError as error:  # an empty split, a folder with no images, too many bad files
        raise ConfigError(f"data.root={str(cfg.data.root)!r}: {' '.join(str(error).split())}") from None
    step_examples = datamodule.batch_size * (world_size(cfg) or 1)
    if cfg.get("train", True) and datamodule.num_train_examples < step_examples:
        raise ConfigError(
            f"data.root={str(cfg.data.root)!r}: the training split has {datamodule.num_train_examples} images, fewer "
            f"than one optimizer step takes ({step_examples} = data.batch_size {datamodule.batch_size} x devices x "
            "nodes x accumulate_grad_batches); lower data.batch_size or add images"
        )
    return datamodule


def _checkpoint_plumbing(cfg: DictConfig, callbacks: list[Any], module: NFNetClassifier) -> list[Any]:
    """Trainer plugins for atomic checkpoint writes; refuses to start without room for a checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpointers = [cb for cb in callbacks if isinstance(cb, ModelCheckpoint)]
    per_checkpoint = checkpoint_bytes_estimate(module)
    for folder in sorted({str(cb.dirpath) for cb in checkpointers if cb.dirpath}):
        files = sum(1 for cb in checkpointers if str(cb.dirpath) == folder)
        reason = check_disk_space(folder, per_checkpoint, files)
        if reason:
            raise ConfigError(reason)
        for path in remove_stale_temp_files(folder):
            log.info("removed %s, left by a save that was interrupted", path)
    # XLA saves through its own CheckpointIO (tensors gathered from the TPU); a config that
    # brings its own plugins keeps them.
    if cfg.trainer.get("accelerator") == "tpu" or cfg.trainer.get("plugins"):
        return []
    return [AtomicCheckpointIO()]


def _fit(cfg: DictConfig, trainer: pl.Trainer, module: NFNetClassifier, datamodule, ckpt_path: str | None) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    try:
        # weights_only=True: a checkpoint is a file from anywhere; nothing in it may run.
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except pickle.UnpicklingError as error:
        raise refused_file_error("ckpt_path", ckpt_path, error) from None
    except TrainingStopped as error:
        if not in_multirun():
            raise
        # A sweep studies settings, and a setting that diverges (too large a lambda or LR for
        # the batch) is one of its results: record it and let the other jobs run.
        log.warning("this job stopped: %s; its last good weights are validated and the sweep goes on", error)
        metrics["stopped"] = str(error)
        trainer.validate(module, datamodule=datamodule, verbose=False)
    return metrics


def build_run_module(cfg: DictConfig, datamodule: ImageDataModule) -> NFNetClassifier:
    """The module of a run on `datamodule`'s data; the run's length is fitted to its training split
    first (nfnet.app.budget), since the module's schedule reads it."""
    budget = apply_budget(cfg, datamodule.num_train_examples, datamodule.batch_size)
    if budget:
        log.info(budget)
    try:
        return build_module(cfg, datamodule.num_classes, datamodule.classes)
    except pickle.UnpicklingError as error:  # model.pretrained: the loaders refuse pickled code
        raise refused_file_error("model.pretrained", cfg.model.pretrained, error) from None
    except InputError as error:  # model.pretrained: damaged, or not weights of this model
        raise input_error("model.pretrained", cfg.model.pretrained, error) from None


def run_callbacks(cfg: DictConfig, module: NFNetClassifier, ckpt_path: str | None,
                  checkpoint_dir: str | None = None) -> tuple[list[Any], list[Any], list[Any]]:
    """The callbacks, trainer plugins and loggers of a run; `checkpoint_dir` moves every checkpoint
    callback's files there (an update round keeps them in its registry)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    # EpochLength first, so that the progress bar reads each epoch's own length; StepSeed makes
    # dropout/stochastic-depth masks a function of (seed, epoch, batch): the same after a resume.
    callbacks = [EpochLength(), *_instantiate_all(cfg.get("callbacks")), StepSeed(cfg.seed)]
    for callback in callbacks:
        if checkpoint_dir is not None and isinstance(callback, ModelCheckpoint):
            callback.dirpath = checkpoint_dir
    plugins = _checkpoint_plumbing(cfg, callbacks, module)
    loggers = build_loggers(cfg, ckpt_path)
    callbacks += [WandbRunInCheckpoint(lg) for lg in loggers if is_wandb(lg)]
    return callbacks, plugins, loggers


def build_trainer(cfg: DictConfig, module: NFNetClassifier, callbacks: list[Any], plugins: list[Any],
                  loggers: list[Any]) -> pl.Trainer:
    """The trainer of `cfg.trainer`; the loggers get the resolved config and the parameter counts."""
    extra = {"plugins": plugins} if plugins else {}
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **extra)
    params = list(module.net.parameters())
    for logger in loggers:
        logger.log_hyperparams({
            **loggable_config(cfg),
            "params/total": sum(p.numel() for p in params),
            "params/trainable": sum(p.numel() for p in params if p.requires_grad),
        })
    return trainer


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and optionally test) as the config says; returns the logged metrics and the best checkpoint.

    The metrics are also written to `<run dir>/metrics.json`, one file per job of a sweep. The
    run folder is held against a second live process for the whole run (nfnet.app.resume).
    """
    check_config(cfg)
    with run_lock(cfg), stops(cfg):
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, Any]:
    if cfg.print_config:
        print_config(cfg)
    if cfg.seed is not None:  # `is not None`: seed=0 is a seed too
        pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_checkpoint(cfg)
    datamodule = _setup_data(cfg)
    module = build_run_module(cfg, datamodule)
    callbacks, plugins, loggers = run_callbacks(cfg, module, ckpt_path)
    status = "failed"
    try:
        trainer = build_trainer(cfg, module, callbacks, plugins, loggers)
        if trainer.is_global_zero:
            write_val_files(cfg, datamodule)
        metrics: dict[str, Any] = {}
        if cfg.train:
            metrics = _fit(cfg, trainer, module, datamodule, ckpt_path)
            metrics.update(_as_floats(trainer.callback_metrics))
        if cfg.test and "stopped" not in metrics:
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            if best:
                log.info("testing the best checkpoint: %s", best)
            continue_csv_files(loggers)
            trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
            metrics.update(_as_floats(trainer.callback_metrics))
        if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path:
            metrics["best_model_path"] = trainer.checkpoint_callback.best_model_path
        if trainer.is_global_zero and cfg.paths.get("output_dir"):
            write_json(os.path.join(cfg.paths.output_dir, "metrics.json"), metrics)
        status = "failed" if "stopped" in metrics else "success"  # a stopped job shows as failed in wandb
        return metrics
    finally:
        finish_loggers(loggers, status)


def write_val_files(cfg: DictConfig, datamodule: ImageDataModule) -> None:
    """`<run dir>/val_files.txt`: the run's validation files, one relative path a line (shards
    list theirs in the pack's manifest)."""
    if cfg.paths.get("output_dir") and cfg.data.source != "streaming":
        path = os.path.join(str(cfg.paths.output_dir), VAL_FILES)
        count = write_file_list(path, val_root(cfg.data), datamodule.val_set.samples)
        log.info("the %d validation files are listed in %s", count, path)


def _as_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor))}


def update(cfg: DictConfig) -> dict[str, Any]:
    # Imported here: the update task builds on this module's pieces.
    from nfnet.app.update_task import update as run_update

    return run_update(cfg)


TASKS = {"train": train, "eval": evaluate, "predict": predict, "export": export, "pack": pack, "update": update}
