"""Pretrained weights: timm's `dm_nfnet_*` state dicts, DeepMind's Haiku checkpoints and
safetensors files -> this model, and loading them into a model with a new classifier.

DeepMind's files are read by the restricted unpickler of `haiku.py`; torch files only with
`weights_only=True`; safetensors files hold no code at all.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nfnet.errors import InputError

from .haiku import load_haiku_checkpoint
from .head import CLASSIFIER_KEYS, rows_by_name, with_rows
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


# The safetensors metadata key that holds the classifier's class names, as a JSON list.
CLASS_NAMES_KEY = "class_names"


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     variant: Variant | None = None, class_names: Sequence[str] | None = None) -> None:
    """Writes a state dict as safetensors, with the variant name and the classifier's class names
    (one per row, in order) in the metadata when known."""
    metadata = {"format": "pt"} | ({"variant": variant.name} if variant else {})
    if class_names is not None:
        metadata[CLASS_NAMES_KEY] = json.dumps(list(class_names))
    save_file({k: v.contiguous() for k, v in state_dict.items()}, os.fspath(path), metadata)


def safetensors_class_names(path: str | os.PathLike) -> list[str] | None:
    """The class names a safetensors file's metadata records (None when it records none)."""
    with safe_open(os.fspath(path), "pt") as f:
        names = (f.metadata() or {}).get(CLASS_NAMES_KEY)
    return [str(n) for n in json.loads(names)] if names else None


def load_pretrained(model: NFNet, path: str | os.PathLike) -> NFNet:
    """Loads weights from `path` (see `read_weights`) into `model` in place and returns it."""
    return fit_state_dict(model, read_weights(path), os.fspath(path))


def fit_state_dict(model: NFNet, state_dict: Mapping[str, torch.Tensor], source: str,
                   weights_classes: Sequence[str] | None = None,
                   model_classes: Sequence[str] | None = None) -> NFNet:
    """Loads `state_dict` (weights from `source`, named in messages) into `model` in place.

    The trunk must fit exactly. The classifier's rows follow the class names when both the
    weights' and the model's are known and share a class: a class the weights know keeps its row,
    a new class gets a new row (nfnet.models.head), and a class of the weights that the model
    lacks (a renamed or removed class folder) is an InputError naming it. Otherwise (names
    unknown, or none in common: a new task) a classifier of the model's class count is kept, and
    one of another count is re-initialised as the official one (N(0, 0.01) weights, zero bias);
    a log line says which.
    """
    state_dict = dict(state_dict)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    ckpt_head = state_dict.get("classifier.weight")
    shared = set(weights_classes or ()) & set(model_classes or ())
    if ckpt_head is not None and shared:
        gone = [name for name in weights_classes if name not in shared]
        if gone:
            raise InputError(
                f"{source} was trained on classes that the data does not have: {', '.join(gone[:10])}"
                f"{', ...' if len(gone) > 10 else ''} (renamed or removed class folders?); rename them back, or run "
                "update.py with data.class_map saying what each became"
            )
        state_dict = with_rows(state_dict, rows_by_name(weights_classes, model_classes))
        added = [name for name in model_classes if name not in shared]
        if added or list(weights_classes) != list(model_classes):
            log.info("%s: classifier rows kept by class name; %d new row(s) for %s", source, len(added),
                     ", ".join(added) or "no new class")
    elif ckpt_head is not None and (ckpt_head.shape != expected["classifier.weight"] or
                                    (weights_classes and model_classes)):
        for key in CLASSIFIER_KEYS:
            state_dict.pop(key, None)
            expected.pop(key)
        model.reset_classifier(model.num_classes)
        log.info("%s: checkpoint classifier has %d classes, the model %d%s: loaded the trunk and "
                 "re-initialised the classifier", source, ckpt_head.shape[0], model.num_classes,
                 " (no class name in common)" if weights_classes and model_classes else "")
    problems = shape_mismatches(expected, state_dict)
    if problems:
        raise InputError(f"{source} does not fit {model.variant.name}: {describe(problems)}")
    model.load_state_dict(state_dict, strict=False)
    return model
