"""Pretrained weights: timm's `dm_nfnet_*` state dicts, DeepMind's Haiku checkpoints and
safetensors files -> this model, and loading them into a model with a new classifier.

DeepMind's files are read by the restricted unpickler of `haiku.py`; torch files only with
`weights_only=True`; safetensors files hold no code at all.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

from nfnet.errors import InputError

from .haiku import load_haiku_checkpoint
from .matching import describe, infer_variant, shape_mismatches
from .nfnet import NFNet
# Re-exported: the timm conversion lives in timm.py, next to the export the other way.
from .timm import TIMM_NUMERICS, from_timm_state_dict  # noqa: F401
from .variants import Variant

__all__ = [
    "TIMM_NUMERICS", "from_timm_state_dict", "infer_variant", "load_haiku_checkpoint",
    "load_pretrained", "read_weights", "save_safetensors",
]

log = logging.getLogger(__name__)

# torch.save's pre-1.6 (non-zip) files open with a pickled magic number (torch/serialization).
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_CLASSIFIER = ("classifier.weight", "classifier.bias")


def _is_timm(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "head.fc.weight" in state_dict or any(k.endswith("skipinit_gain") for k in state_dict)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Any supported weights file -> a state dict in this model's naming.

    `.safetensors` (this project's or timm's naming); torch files (.pth/.pt/.bin, plain
    state dicts or under a 'state_dict' key) loaded with weights_only=True; anything else is
    taken for a DeepMind Haiku pickle and read with the restricted unpickler. (Checkpoints of
    train.py hold two weight sets: nfnet.inference.weights picks one before this.)
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return state_dict_in_our_names(load_file(path))
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_TORCH_MAGIC))
    if not (zipfile.is_zipfile(path) or head == _LEGACY_TORCH_MAGIC):
        return load_haiku_checkpoint(path)
    return state_dict_in_our_names(torch.load(path, map_location="cpu", weights_only=True))


def state_dict_in_our_names(contents: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A loaded torch or safetensors file (a state dict, or one under a 'state_dict' key) in this
    model's naming: timm's `dm_nfnet_*` names are converted."""
    if isinstance(contents.get("state_dict"), Mapping):
        contents = contents["state_dict"]
    return from_timm_state_dict(contents) if _is_timm(contents) else dict(contents)


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     variant: Variant | None = None) -> None:
    """Writes a state dict as safetensors, with the variant name in the metadata if known."""
    metadata = {"format": "pt"} | ({"variant": variant.name} if variant else {})
    save_file({k: v.contiguous() for k, v in state_dict.items()}, os.fspath(path), metadata)


def load_pretrained(model: NFNet, path: str | os.PathLike) -> NFNet:
    """Loads weights from `path` (see `read_weights`) into `model` in place and returns it."""
    return fit_state_dict(model, read_weights(path), os.fspath(path))


def fit_state_dict(model: NFNet, state_dict: Mapping[str, torch.Tensor], source: str) -> NFNet:
    """Loads `state_dict` (weights from `source`, named in messages) into `model` in place.

    The trunk must fit exactly. When the weights' classifier has another number of classes than
    the model's, the classifier is re-initialised as the official one (N(0, 0.01) weights, zero
    bias) and a log line says so.
    """
    state_dict = dict(state_dict)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    ckpt_head = state_dict.get("classifier.weight")
    if ckpt_head is not None and ckpt_head.shape != expected["classifier.weight"]:
        for key in _CLASSIFIER:
            state_dict.pop(key, None)
            expected.pop(key)
        model.reset_classifier(model.num_classes)
        log.info("%s: checkpoint classifier has %d classes, the model %d: loaded the trunk and "
                 "re-initialised the classifier", source, ckpt_head.shape[0], model.num_classes)
    problems = shape_mismatches(expected, state_dict)
    if problems:
        raise InputError(f"{source} does not fit {model.variant.name}: {describe(problems)}")
    model.load_state_dict(state_dict, strict=False)
    return model
