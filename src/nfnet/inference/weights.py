"""Weights of any kind this project reads, as a state dict of the plain NFNet: a train.py
checkpoint (its EMA weights, else the raw ones), safetensors, timm `dm_nfnet_*` files, a folder
in the Hugging Face Hub's timm layout or an `hf-hub:` id already in the local cache
(nfnet.models.timm_hub), and DeepMind's Haiku pickles (nfnet.models.pretrained). No Lightning,
no Hydra."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence

import torch
from safetensors import safe_open

from nfnet.errors import InputError
from nfnet.inference.checkpoint import best_weights, is_training_checkpoint
from nfnet.inference.torch_files import load_torch_file, would_run_code, zip_problem
from nfnet.models.matching import infer_variant
from nfnet.models.nfnet import NFNet
from nfnet.models.pretrained import fit_state_dict, read_weights, safetensors_class_names, state_dict_in_our_names

# What each reader expects, for the message when a file is none of them.
KINDS = "a train.py checkpoint, a torch state dict (timm or this project), safetensors or a DeepMind *_haiku.npz"


def read_weights_and_classes(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """The network's weights in `path`, in this model's naming, and the class names of its
    classifier's rows where the file records them (a train.py checkpoint; a safetensors file
    written by this project, a registry version's among them), else None.

    Raises pickle.UnpicklingError for a file that would run code, InputError (naming the file
    and what is wrong) for one that is damaged or holds no weights."""
    path = os.path.expanduser(os.fspath(path))
    if path.startswith("hf-hub:") or os.path.isdir(path):  # the Hub's timm layout
        from nfnet.models.timm_hub import read_timm_folder

        try:
            folder = read_timm_folder(path)
        except (FileNotFoundError, ValueError) as error:  # a Hub id not in the cache, not a timm folder
            raise InputError(str(error)) from None
        return folder.state_dict, folder.class_names
    if not os.path.isfile(path):
        raise InputError(f"{path} is not a file")
    try:
        contents, class_names = _read(path)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - every reader's failure means this file is not weights
        if would_run_code(error):
            raise
        reason = " ".join(str(error).split()).removeprefix(f"{path}: ")
        raise InputError(f"{path} cannot be read as weights ({reason}); give {KINDS}") from None
    if not contents or not all(isinstance(v, torch.Tensor) for v in contents.values()):
        other = next((k for k, v in contents.items() if not isinstance(v, torch.Tensor)), None)
        what = f"{other!r} is a {type(contents[other]).__name__}, not a tensor" if other is not None else "no tensors"
        raise InputError(f"{path} is not a state dict of weights ({what}); give {KINDS}")
    return contents, class_names


def _read(path: str) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    problem = zip_problem(path)
    if problem:
        raise InputError(f"{path} {problem}")
    if path.endswith(".safetensors"):
        return read_weights(path), safetensors_class_names(path)
    if not zipfile.is_zipfile(path):
        return read_weights(path), None  # a legacy torch file or a Haiku pickle
    contents = load_torch_file(path)
    if not isinstance(contents, Mapping):
        raise InputError(f"{path} holds a {type(contents).__name__}, not a state dict; give {KINDS}")
    state_dict = contents.get("state_dict")
    if isinstance(state_dict, Mapping) and is_training_checkpoint(state_dict):
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
