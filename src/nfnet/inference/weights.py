"""Weights of any kind this project reads, as a state dict of the plain NFNet: a train.py
checkpoint (its EMA weights, else the raw ones), safetensors, timm `dm_nfnet_*` files, a folder
in the Hugging Face Hub's timm layout or an `hf-hub:` id already in the local cache
(nfnet.models.timm_hub), and DeepMind's Haiku pickles (nfnet.models.pretrained). No Lightning,
no Hydra."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping

import torch

from nfnet.errors import InputError
from nfnet.inference.checkpoint import best_weights, is_training_checkpoint
from nfnet.inference.torch_files import load_torch_file, would_run_code, zip_problem
from nfnet.models.nfnet import NFNet
from nfnet.models.pretrained import fit_state_dict, read_weights, state_dict_in_our_names

# What each reader expects, for the message when a file is none of them.
KINDS = "a train.py checkpoint, a torch state dict (timm or this project), safetensors or a DeepMind *_haiku.npz"


def read_any_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The network's weights in `path`, in this model's naming.

    Raises pickle.UnpicklingError for a file that would run code, InputError (naming the file
    and what is wrong) for one that is damaged or holds no weights."""
    path = os.path.expanduser(os.fspath(path))
    if path.startswith("hf-hub:") or os.path.isdir(path):  # the Hub's timm layout
        from nfnet.models.timm_hub import read_timm_folder

        try:
            return read_timm_folder(path).state_dict
        except (FileNotFoundError, ValueError) as error:  # a Hub id not in the cache, not a timm folder
            raise InputError(str(error)) from None
    if not os.path.isfile(path):
        raise InputError(f"{path} is not a file")
    try:
        contents = _read(path)
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
    return contents


def _read(path: str) -> dict[str, torch.Tensor]:
    problem = zip_problem(path)
    if problem:
        raise InputError(f"{path} {problem}")
    if not zipfile.is_zipfile(path):
        return read_weights(path)  # safetensors, a legacy torch file or a Haiku pickle
    contents = load_torch_file(path)
    if not isinstance(contents, Mapping):
        raise InputError(f"{path} holds a {type(contents).__name__}, not a state dict; give {KINDS}")
    state_dict = contents.get("state_dict")
    if isinstance(state_dict, Mapping) and is_training_checkpoint(state_dict):
        return best_weights(state_dict)
    return state_dict_in_our_names(contents)


def load_pretrained(net: NFNet, path: str | os.PathLike) -> NFNet:
    """Loads the weights in `path` into `net`; a classifier of another class count is
    re-initialised (nfnet.models.pretrained.fit_state_dict)."""
    return fit_state_dict(net, read_any_weights(path), os.fspath(path))
