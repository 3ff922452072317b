"""The tasks of eval.py, predict.py and export.py: load one weight set (nfnet.inference) as the
config says, run it, and report."""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import sys
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from nfnet.app.checks import check_eval_config, check_export_config, check_predict_config, export_formats
from nfnet.app.reports import print_table, write_json
from nfnet.app.schema import DataConfig, OptimConfig, constraint_at
from nfnet.app.values import input_error, refused_file_error
from nfnet.data.workers import usable_workers
from nfnet.errors import ConfigError, InputError
from nfnet.inference.classifier import Classifier, from_checkpoint, from_pretrained, from_registry
from nfnet.inference.evaluation import eval_dataset
from nfnet.inference.export import export_classifier
from nfnet.inference.predict import iter_inputs, predict_rows, write_rows
from nfnet.training.module import NFNetClassifier

log = logging.getLogger(__name__)


def load_classifier(cfg: DictConfig) -> Classifier:
    """`ckpt_path` (a train.py checkpoint; `weights` picks EMA or raw), `registry` (update.py's
    model in service, or one of its version folders) or `pretrained` + `model_name`."""
    key = next(k for k in ("registry", "ckpt_path", "pretrained") if cfg.get(k))
    try:
        if key == "registry":
            return from_registry(str(cfg.registry), cfg.image_size, cfg.eval_pad)
        if key == "ckpt_path":
            return from_checkpoint(str(cfg.ckpt_path), cfg.weights, cfg.image_size, cfg.eval_pad)
        return from_pretrained(str(cfg.pretrained), cfg.model_name, cfg.get("class_names"), cfg.image_size, cfg.eval_pad)
    except pickle.UnpicklingError as error:
        raise refused_file_error(key, cfg[key], error) from None
    except InputError as error:
        raise input_error(key, cfg[key], error) from None


# What eval takes over from the data a checkpoint was trained on, to rebuild the same split: values
# only, each held to its schema constraint. Folders never come from a checkpoint (a crafted one
# could name any place, and eval writes there: the embedded dataset, a folder index).
STORED_DATA = ("source", "val_fraction", "split_seed", "max_bad_fraction", "follow_links")


def _eval_data(cfg: DictConfig, classifier: Classifier) -> dict[str, Any]:
    """The data to evaluate on: the source and split the checkpoint was trained on, in the folder
    the command line names (`root=`), or for the embedded dataset in this project's cache; the
    schema's defaults fill what pretrained weights cannot carry (the val fraction, ...)."""
    defaults = {k: v for k, v in vars(DataConfig()).items() if not (isinstance(v, str) and v.startswith("${"))}
    data = {**defaults, "shapes": vars(DataConfig().shapes)}
    stored = classifier.data_hparams.get("data") or {}
    for key in STORED_DATA:
        if key in stored:
            data[key] = _stored(cfg, key, stored[key])
    data["shapes"] = {k: _stored(cfg, f"shapes.{k}", v) for k, v in {**data["shapes"], **(stored.get("shapes") or {})}.items()
                      if k in data["shapes"]}
    if cfg.get("source") is not None:
        data["source"] = cfg.source
    if cfg.get("root") is not None:
        data["root"] = os.path.expanduser(str(cfg.root))
    elif not stored:
        raise ConfigError("pretrained weights carry no dataset: give source=imagenet|imagefolder and root=<folder>")
    elif data["source"] == "shapes":
        data["root"] = os.path.expanduser(str(cfg.paths.data_dir))
        if stored.get("root") is not None and os.path.abspath(str(stored["root"])) != os.path.abspath(data["root"]):
            log.info("the checkpoint's embedded dataset was cached in %s; eval uses this project's cache, %s "
                     "(root=<folder> to choose another)", stored["root"], data["root"])
    else:
        raise ConfigError(
            f"source={data['source']} is read only from a folder the command line names, never from one a checkpoint "
            f"names: add root=<folder> (ckpt_path={str(cfg.ckpt_path)!r} was trained on data={stored.get('source')} "
            f"at {str(stored.get('root'))!r})"
        )
    return {**data, "num_workers": 0, "persistent_workers": False}


def _stored(cfg: DictConfig, key: str, value: Any) -> Any:
    """A data value read from the checkpoint, checked as the command line's would be."""
    constraint = constraint_at(DataConfig, key)
    if constraint is not None and not constraint.ok(value):
        raise ConfigError(f"ckpt_path={str(cfg.ckpt_path)!r}: its stored {constraint.message(f'data.{key}', value)}; "
                          "the checkpoint is damaged or was not written by train.py")
    return value


def _evaluation_module(classifier: Classifier) -> NFNetClassifier:
    """The training module around the loaded network, for its test loop: the same transforms
    and metrics as validation during training. No EMA of its own, no training callbacks."""
    model = {"name": classifier.model_name, "channels_last": False, "compile": False, "pretrained": None}
    optim = {"label_smoothing": OptimConfig().label_smoothing, "ema": {"decay": None}, "skip_nonfinite": False}
    return NFNetClassifier(model, optim, len(classifier.class_names), classifier.class_names, net=classifier.net)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Top-1/top-5 and loss of one weight set on one split; prints a table and writes JSON."""
    check_eval_config(cfg)
    if cfg.seed is not None:
        pl.seed_everything(cfg.seed, workers=True)
    classifier = load_classifier(cfg)
    dataset = eval_dataset(classifier, _eval_data(cfg, classifier), cfg.split)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False,
                                         num_workers=usable_workers(cfg.num_workers))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    result = trainer.test(_evaluation_module(classifier), dataloaders=loader, verbose=False)[0]
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
            write_json(cfg.output, report)
            log.info("wrote %s", cfg.output)
    return report


def predict(cfg: DictConfig) -> int:
    """Top-k classes for an image, a folder, a video or a camera; JSON or CSV. Returns the row count."""
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
    check_export_config(cfg)
    classifier = load_classifier(cfg)
    report = export_classifier(classifier, cfg.output_dir, export_formats(cfg), check=cfg.check, tolerance=cfg.tolerance)
    if cfg.hub.repo_id:
        from nfnet.models.timm_hub import push_timm_folder

        try:
            report["hub"] = push_timm_folder(report["files"]["timm"], cfg.hub.repo_id, private=cfg.hub.private)
        except (PermissionError, ImportError) as error:  # no token, no huggingface_hub: one line
            raise ConfigError(f"hub.repo_id={cfg.hub.repo_id!r}: {error}") from None
    print_table(f"export: {report['weights_file']}", {k: v for k, v in report.items() if k != "class_names"})
    return report
