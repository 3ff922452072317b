"""The one place that turns a composed config into objects and runs them.

Entry points (train.py, eval.py, predict.py, export.py) stay thin: they compose the config with
Hydra and call a function here. Loggers are always finished, even when the run fails, so that a
multirun never merges two jobs into one wandb run.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import pickle
import sys
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from nfnet.checkpoints import TrainingStopped, refused_file_error
from nfnet.config import ConfigError, per_device_batch_size, world_size
from nfnet.data.datamodule import ImageDataModule
from nfnet.module import NFNetClassifier
from nfnet.train_checks import check_config

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig) -> ImageDataModule:
    data, augment = cfg.data, cfg.augment
    shapes = data.get("shapes") or {}
    return ImageDataModule(
        source=data.source,
        root=os.path.expanduser(str(data.root)),
        train_size=data.train_size,
        test_size=data.test_size,
        eval_pad=data.eval_pad,
        batch_size=per_device_batch_size(cfg),
        eval_batch_size=data.eval_batch_size,
        num_workers=data.num_workers,
        pin_memory=data.pin_memory,
        persistent_workers=data.persistent_workers,
        augment=augment.name,
        crop_min_area=augment.get("crop_min_area", 0.08),
        ra_level=augment.get("ra_level"),
        mixup_alpha=augment.get("mixup_alpha", 0.2),
        mixup=augment.get("mixup", True),
        cutmix=augment.get("cutmix", True),
        val_fraction=data.val_fraction,
        split_seed=data.split_seed,
        max_bad_fraction=data.max_bad_fraction,
        shapes_seed=shapes.get("seed", 0),
        shapes_train_per_class=shapes.get("train_per_class", 500),
        shapes_val_per_class=shapes.get("val_per_class", 100),
        shapes_image_size=shapes.get("image_size", 64),
    )


def build_module(cfg: DictConfig, num_classes: int, class_names: list[str] | None = None) -> NFNetClassifier:
    model, optim = cfg.model, cfg.optim
    return NFNetClassifier(
        model_name=model.name,
        num_classes=num_classes,
        model_kwargs={
            "drop_rate": model.drop_rate,
            "stochdepth_rate": model.stochdepth_rate,
            "activation": model.activation,
            "gelu_approximate": model.gelu_approximate,
        },
        pretrained=os.path.expanduser(str(model.pretrained)) if model.pretrained else None,
        base_lr=optim.base_lr,
        reference_batch=optim.reference_batch,
        momentum=optim.momentum,
        nesterov=optim.nesterov,
        weight_decay=optim.weight_decay,
        warmup_epochs=optim.warmup_epochs,
        end_lr=optim.end_lr,
        label_smoothing=optim.label_smoothing,
        agc_clipping=optim.agc.clipping,
        agc_eps=optim.agc.eps,
        ema_decay=optim.ema.decay,
        skip_nonfinite=optim.get("skip_nonfinite", True),
        max_consecutive_skips=optim.get("max_consecutive_skips", 10),
        compile=model.compile,
        channels_last=model.channels_last,
        class_names=class_names,
    )


def _instantiate_all(section: DictConfig | None) -> list[Any]:
    """Instantiate each `_target_` entry of a callbacks/logger group (one key per object)."""
    if not section:
        return []
    return [hydra.utils.instantiate(node) for node in section.values() if node and "_target_" in node]


@rank_zero_only
def print_config(cfg: DictConfig) -> None:
    import rich
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    order = ["model", "data", "augment", "optim", "trainer", "callbacks", "logger", "paths"]
    keys = order + [k for k in cfg if k not in order and k != "hydra"]
    for key in keys:
        if key not in cfg:
            continue
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        tree.add(key, style="bold").add(Syntax(text, "yaml", theme="ansi_dark"))
    rich.print(tree)


def _finish_loggers(loggers: list[Any], status: str) -> None:
    for logger in loggers:
        try:
            logger.finalize(status)
        except Exception:  # a logger that cannot flush must not hide the run's own error
            log.exception("could not finalize logger %s", type(logger).__name__)
    wandb = sys.modules.get("wandb")  # only a run that imported wandb can have a run open
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=0 if status == "success" else 1)


def _loggable_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as loggers show it: one column per top-level group (model.name, ...)."""
    return {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in cfg
        if key != "hydra"  # present only in composed test configs; Hydra's own settings, not the run's
    }


def _write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")


def _checkpoint_dir(cfg: DictConfig) -> str:
    node = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
    return str(node.get("dirpath") or os.path.join(str(cfg.paths.output_dir), "checkpoints"))


def _resolve_resume(cfg: DictConfig) -> None:
    """`resume=true` -> `ckpt_path=<newest checkpoint>` (of this run dir, else the newest earlier run)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from nfnet.checkpoints import find_resume_checkpoint

    if not cfg.get("resume"):
        return
    # A multirun job's siblings are the other jobs of its sweep, not earlier runs of itself.
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    runs_root = None if multirun else os.path.join(str(cfg.paths.log_dir), str(cfg.task_name), "runs")
    path = find_resume_checkpoint(_checkpoint_dir(cfg), runs_root)
    if path is None:
        log.info("resume=true: no checkpoint found, starting a new run")
        return
    log.info("resume=true: resuming from %s", path)
    with open_dict(cfg):
        cfg.ckpt_path = path


def _setup_data(cfg: DictConfig) -> ImageDataModule:
    datamodule = build_datamodule(cfg)
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
    except (FileNotFoundError, NotADirectoryError, PermissionError) as error:
        raise ConfigError(f"data.root={str(cfg.data.root)!r}: {error}") from None
    except ValueError as error:  # an empty split, a folder with no images, too many bad files
        raise ConfigError(f"data.root={str(cfg.data.root)!r}: {' '.join(str(error).split())}") from None
    replicas = world_size(cfg)
    step_examples = datamodule.batch_size * (replicas or 1)
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

    from nfnet.checkpoints import (
        AtomicCheckpointIO,
        check_disk_space,
        checkpoint_bytes_estimate,
        remove_stale_temp_files,
    )

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


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and optionally test) as the config says; returns the logged metrics and the best checkpoint.

    The metrics are also written to `<run dir>/metrics.json`, one file per job of a sweep.
    """
    check_config(cfg)
    if cfg.get("print_config"):
        print_config(cfg)
    if cfg.get("seed") is not None:  # `is not None`: seed=0 is a seed too
        pl.seed_everything(cfg.seed, workers=True)
    _resolve_resume(cfg)

    from nfnet.callbacks import EpochLength, StepSeed, WandbRunInCheckpoint
    from nfnet.loggers import build_loggers, continue_csv_files

    datamodule = _setup_data(cfg)
    try:
        module = build_module(cfg, datamodule.num_classes, datamodule.classes)
    except pickle.UnpicklingError as error:  # model.pretrained: the loaders refuse pickled code
        raise refused_file_error("model.pretrained", cfg.model.pretrained, error) from None
    # First, so that the progress bar reads each epoch's own length.
    callbacks = [EpochLength(), *_instantiate_all(cfg.get("callbacks"))]
    plugins = _checkpoint_plumbing(cfg, callbacks, module)
    # Dropout/stochastic-depth masks from (seed, epoch, batch): the same after a resume.
    callbacks.append(StepSeed(cfg.get("seed")))
    loggers = build_loggers(cfg)
    callbacks += [WandbRunInCheckpoint(lg) for lg in loggers if type(lg).__name__ == "WandbLogger"]
    status = "failed"
    try:
        extra = {"plugins": plugins} if plugins else {}
        trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **extra)
        params = list(module.net.parameters())
        for logger in loggers:
            logger.log_hyperparams(
                {
                    **_loggable_config(cfg),
                    "params/total": sum(p.numel() for p in params),
                    "params/trainable": sum(p.numel() for p in params if p.requires_grad),
                }
            )
        metrics: dict[str, Any] = {}
        if cfg.get("train", True):
            ckpt_path = cfg.get("ckpt_path")
            try:
                # weights_only=True: a checkpoint is a file from anywhere; nothing in it may run.
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
            except pickle.UnpicklingError as error:
                raise refused_file_error("ckpt_path", ckpt_path, error) from None
            except TrainingStopped as error:
                if not _in_sweep():
                    raise
                # A sweep studies settings, and a setting that diverges (too large a lambda or LR
                # for the batch) is one of its results: record it and let the other jobs run.
                log.warning("this job stopped: %s; its last good weights are validated and the sweep goes on", error)
                metrics["stopped"] = str(error)
                trainer.validate(module, datamodule=datamodule, verbose=False)
            metrics.update(_as_floats(trainer.callback_metrics))
        if cfg.get("test", False) and "stopped" not in metrics:
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            if best:
                log.info("testing the best checkpoint: %s", best)
            continue_csv_files(loggers)
            trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
            metrics.update(_as_floats(trainer.callback_metrics))
        if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path:
            metrics["best_model_path"] = trainer.checkpoint_callback.best_model_path
        if trainer.is_global_zero and cfg.paths.get("output_dir"):
            _write_json(os.path.join(cfg.paths.output_dir, "metrics.json"), metrics)
        status = "failed" if "stopped" in metrics else "success"  # a stopped job shows as failed in wandb
        return metrics
    finally:
        _finish_loggers(loggers, status)


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _as_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor))}


# --------------------------------------------------------------------------- eval / predict / export
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Top-1/top-5 and loss of one weight set on one split; prints a table and writes JSON."""
    from nfnet.entry_checks import check_eval_config
    from nfnet.inference import eval_dataset, load_classifier, print_table

    check_eval_config(cfg)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    classifier = load_classifier(cfg)
    dataset = eval_dataset(cfg, classifier)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers
    )
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    # The module's own test loop: the same transforms and metrics as validation during training.
    result = trainer.test(classifier.module, dataloaders=loader, verbose=False)[0]
    report = {
        **classifier.describe(),
        "split": cfg.split,
        "images": len(dataset),
        "image_size": classifier.image_size,
        "eval_pad": classifier.eval_pad,
        "top1": result["test/acc_top1"],
        "top5": result["test/acc_top5"],
        "loss": result["test/loss"],
    }
    if trainer.is_global_zero:
        print_table(f"eval: {report['weights_file']}", report)
        if cfg.get("output"):
            _write_json(cfg.output, report)
            log.info("wrote %s", cfg.output)
    return report


def predict(cfg: DictConfig) -> int:
    """Top-k classes for an image, a folder, a video or a camera; JSON or CSV. Returns the row count."""
    from nfnet.entry_checks import check_predict_config
    from nfnet.inference import iter_inputs, load_classifier, predict_rows, write_rows

    check_predict_config(cfg)
    classifier = load_classifier(cfg)
    device = classifier.to_device(cfg.device)
    items = iter_inputs(str(cfg.input), cfg.video.every_n_frames, cfg.video.max_frames)
    rows = predict_rows(classifier, items, cfg.top_k, cfg.batch_size, device)
    # The first prediction opens the input: a camera or video that cannot be opened fails here,
    # before an existing output file is truncated or a JSON list is begun on standard output.
    first = next(rows, None)
    rows = itertools.chain([] if first is None else [first], rows)
    if cfg.get("output"):
        os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
        with open(cfg.output, "w", newline="") as stream:
            count = write_rows(rows, cfg.format, stream)
        log.info("wrote %d predictions to %s", count, cfg.output)
    else:
        count = write_rows(rows, cfg.format, sys.stdout)
    return count


def export(cfg: DictConfig) -> dict[str, Any]:
    """ONNX / torch.export programs (EMA weights, weight standardization folded into plain convs)
    and/or the weights as safetensors, each checked against the checkpoint's own logits."""
    from nfnet.deploy import export_classifier
    from nfnet.entry_checks import check_export_config, export_formats
    from nfnet.inference import load_classifier, print_table

    check_export_config(cfg)
    classifier = load_classifier(cfg)
    report = export_classifier(classifier, cfg.output_dir, export_formats(cfg), check=cfg.check, tolerance=cfg.tolerance)
    print_table(f"export: {report['weights_file']}", {k: v for k, v in report.items() if k != "class_names"})
    return report
