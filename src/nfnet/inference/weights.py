"""Weights of any kind this project reads, as a state dict of the plain NFNet: a train.py
checkpoint (its EMA weights, else the raw ones), safetensors, timm `dm_nfnet_*` files, a folder
in the Hugging Face Hub's timm layout or an `hf-hub:` id already in the local cache
(nfnet.models.timm_hub), and DeepMind's Haiku pickles (nfnet.models.pretrained). No Lightning,
no Hydra."""

from __future__ import annotations

import os
import zipfile

import torch

from nfnet.inference.checkpoint import best_weights, is_training_checkpoint
from nfnet.models.nfnet import NFNet
from nfnet.models.pretrained import fit_state_dict, read_weights, state_dict_in_our_names


def read_any_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The network's weights in `path`, in this model's naming.

    Raises pickle.UnpicklingError for a file that would run code."""
    path = os.path.expanduser(os.fspath(path))
    if path.startswith("hf-hub:") or os.path.isdir(path):  # the Hub's timm layout
        from nfnet.models.timm_hub import read_timm_folder

        return read_timm_folder(path).state_dict
    if not zipfile.is_zipfile(path):
        return read_weights(path)
    contents = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = contents.get("state_dict") if isinstance(contents, dict) else None
    if isinstance(state_dict, dict) and is_training_checkpoint(state_dict):
        return best_weights(state_dict)
    return state_dict_in_our_names(contents)


def load_pretrained(net: NFNet, path: str | os.PathLike) -> NFNet:
    """Loads the weights in `path` into `net`; a classifier of another class count is
    re-initialised (nfnet.models.pretrained.fit_state_dict)."""
    return fit_state_dict(net, read_any_weights(path), os.fspath(path))
