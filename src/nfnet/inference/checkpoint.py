"""A checkpoint written by train.py, read without Lightning.

Its layout is the LightningModule's (nfnet.training.module.NFNetClassifier): the raw network's
weights under `net.`, the EMA's under `ema_net.` (absent with optim.ema.decay=null), the module's
hyperparameters (`model` and `optim` sections, `num_classes`, `class_names`) and the datamodule's
(`data`, `augment`, `batch_size`). This file is the one place that knows it on the reading side.
Loading is always `torch.load(..., weights_only=True)`: a checkpoint is a file from anywhere, and
a pickle that names anything but tensors and primitives is refused before any of it runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from nfnet.errors import InputError
from nfnet.inference.torch_files import load_torch_file

NET_PREFIX = "net."
EMA_PREFIX = "ema_net."
WEIGHT_SETS = {"raw": NET_PREFIX, "ema": EMA_PREFIX}


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's contents (tensors on the CPU), its hyperparameters in today's layout.

    Raises pickle.UnpicklingError for a file that would run code, InputError for one that is
    damaged or not a train.py checkpoint."""
    checkpoint = load_torch_file(path)
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise InputError(f"{os.fspath(path)} is not a checkpoint written by train.py (no state_dict and hyper_parameters)")
    checkpoint = dict(checkpoint)
    try:
        checkpoint["hyper_parameters"] = _module_hparams(dict(checkpoint["hyper_parameters"]))
        if checkpoint.get("datamodule_hyper_parameters"):
            checkpoint["datamodule_hyper_parameters"] = _datamodule_hparams(dict(checkpoint["datamodule_hyper_parameters"]))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise InputError(f"{os.fspath(path)}: its hyperparameters are not those of a train.py checkpoint "
                         f"({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint["hyper_parameters"].get("model"), Mapping):
        raise InputError(f"{os.fspath(path)}: its hyperparameters hold no model section")
    return checkpoint


def is_training_checkpoint(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith((NET_PREFIX, EMA_PREFIX)) for k in state_dict)


def weights(state_dict: Mapping[str, torch.Tensor], which: str = "ema") -> dict[str, torch.Tensor]:
    """One weight set of a checkpoint's state dict (`ema` or `raw`), in the network's own names;
    empty when the checkpoint has no such set."""
    prefix = WEIGHT_SETS[which]
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def best_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The EMA weights when the checkpoint has them (what the paper reports), else the raw ones."""
    return weights(state_dict, "ema") or weights(state_dict, "raw")


# Checkpoints written before the config schema (nfnet 0.1, flat hyperparameters) are read too: the
# weights, the class names and the data they were trained on stay usable.
_LEGACY_MODEL = ("drop_rate", "stochdepth_rate", "activation", "gelu_approximate")


def _module_hparams(h: dict[str, Any]) -> dict[str, Any]:
    if "model" in h:
        return h
    kwargs = h.get("model_kwargs") or {}
    model = {"name": h["model_name"], **{k: kwargs[k] for k in _LEGACY_MODEL if k in kwargs},
             "pretrained": None, "compile": False, "channels_last": bool(h.get("channels_last", False))}
    optim = {"label_smoothing": h.get("label_smoothing", 0.1), "ema": {"decay": h.get("ema_decay")}}
    return {"model": model, "optim": optim, "num_classes": h["num_classes"], "class_names": h.get("class_names")}


_LEGACY_AUGMENT = {"augment": "name", "crop_min_area": "crop_min_area", "ra_level": "ra_level",
                   "mixup_alpha": "mixup_alpha", "mixup": "mixup", "cutmix": "cutmix"}


def _datamodule_hparams(h: dict[str, Any]) -> dict[str, Any]:
    if "data" in h:
        return h
    augment = {new: h[old] for old, new in _LEGACY_AUGMENT.items() if old in h}
    shapes = {k[len("shapes_"):]: v for k, v in h.items() if k.startswith("shapes_")}
    data = {k: v for k, v in h.items() if k not in _LEGACY_AUGMENT and not k.startswith("shapes_")}
    return {"data": {**data, "shapes": shapes}, "augment": augment, "batch_size": h.get("batch_size")}
