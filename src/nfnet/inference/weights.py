"""Weights of any kind this project reads, as a state dict of the plain NFNet: a train.py
checkpoint (its EMA weights, else the raw ones), safetensors, timm `dm_nfnet_*` files, and
DeepMind's Haiku pickles (nfnet.models.pretrained). No Lightning, no Hydra."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence

import torch
from safetensors import safe_open

from nfnet.inference.checkpoint import best_weights, is_training_checkpoint
from nfnet.models.matching import infer_variant
from nfnet.models.nfnet import NFNet
from nfnet.models.pretrained import fit_state_dict, read_weights, safetensors_class_names, state_dict_in_our_names


def read_weights_and_classes(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """The network's weights in `path`, in this model's naming, and the class names of its
    classifier's rows where the file records them (a train.py checkpoint; a safetensors file
    written by this project, a registry version's among them), else None.

    Raises pickle.UnpicklingError for a file that would run code."""
    path = os.path.expanduser(os.fspath(path))
    if path.endswith(".safetensors"):
        return read_weights(path), safetensors_class_names(path)
    if not zipfile.is_zipfile(path):
        return read_weights(path), None
    contents = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = contents.get("state_dict") if isinstance(contents, dict) else None
    if isinstance(state_dict, dict) and is_training_checkpoint(state_dict):
        names = (contents.get("hyper_parameters") or {}).get("class_names")
        return best_weights(state_dict), [str(n) for n in names] if names else None
    return state_dict_in_our_names(contents), None


def weights_variant(path: str | os.PathLike) -> str | None:
    """The variant a train.py checkpoint or a safetensors file holds, read without loading its
    tensors (a checkpoint's hyperparameters, a safetensors header); None for other files."""
    path = os.path.expanduser(os.fspath(path))
    if path.endswith(".safetensors"):
        with safe_open(path, "pt") as f:
            named = (f.metadata() or {}).get("variant")
            shapes = {key: torch.empty(f.get_slice(key).get_shape(), device="meta") for key in f.keys()}
        return named or infer_variant(state_dict_in_our_names(shapes)).name
    if not zipfile.is_zipfile(path):
        return None
    contents = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    hparams = (contents.get("hyper_parameters") if isinstance(contents, dict) else None) or {}
    model = hparams.get("model")
    # Checkpoints written before the config schema name the variant at the top (nfnet.inference.checkpoint).
    return model.get("name") if isinstance(model, dict) else hparams.get("model_name")


def read_any_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The network's weights in `path`, in this model's naming (see `read_weights_and_classes`)."""
    return read_weights_and_classes(path)[0]


def load_pretrained(net: NFNet, path: str | os.PathLike, class_names: Sequence[str] | None = None) -> NFNet:
    """Loads the weights in `path` into `net`. With the data's `class_names` and a file that
    records its own, the classifier's rows follow the names (kept, new ones appended, a missing
    class an InputError); otherwise a classifier of another class count is re-initialised
    (nfnet.models.pretrained.fit_state_dict)."""
    state_dict, weights_classes = read_weights_and_classes(path)
    return fit_state_dict(net, state_dict, os.fspath(path), weights_classes, class_names)
