"""Pretrained weights: timm's `dm_nfnet_*` state dicts, DeepMind's Haiku checkpoints and
safetensors files -> this model, and loading them into a model with a new classifier.

DeepMind's files are read by the restricted unpickler of `haiku.py`; torch files only with
`weights_only=True`; safetensors files hold no code at all.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

from .haiku import load_haiku_checkpoint
from .matching import check_state_dict, describe, infer_variant, shape_mismatches
from .nfnet import NFNet
from .variants import Variant, get_variant

__all__ = [
    "TIMM_NUMERICS", "from_timm_state_dict", "infer_variant", "load_haiku_checkpoint",
    "load_pretrained", "read_weights", "save_safetensors",
]

log = logging.getLogger(__name__)

# create_model overrides under which this model computes what timm's dm_nfnet_* computes
# (NFNET_SPEC.md §5): exact erf GELU instead of the tanh form, and timm's weight
# standardisation (w - mean) * gain / sqrt((var + 1e-5) * fan_in) (timm `NfCfg.std_conv_eps`
# 1e-5, added to var) instead of the official rsqrt(max(fan_in * var, 1e-4)).
TIMM_NUMERICS = {"gelu_approximate": "none", "ws_eps": 1e-5, "ws_eps_mode": "add"}

# timm dm_nfnet_* module names -> this model's (timm `models/nfnet.py`, NormFreeBlock).
_TIMM_STEM = re.compile(r"^stem\.conv([1-4])\.(\w+)$")
_TIMM_BLOCK = re.compile(r"^(stages\.\d+\.\d+)\.(?:(skipinit_gain)|(.+)\.(\w+))$")
_TIMM_BLOCK_SUBMODULES = {
    "conv1": "conv0", "conv2": "conv1", "conv2b": "conv1b", "conv3": "conv2",
    "downsample.conv": "conv_shortcut", "attn_last.fc1": "se.fc0", "attn_last.fc2": "se.fc1",
}
_TIMM_TOP = {"final_conv": "final_conv", "head.fc": "classifier"}
# torch.save's pre-1.6 (non-zip) files open with a pickled magic number (torch/serialization).
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_CLASSIFIER = ("classifier.weight", "classifier.bias")
_NOT_DM = ("not a timm dm_nfnet_* state dict (timm's nfnet_* and eca_nfnet_* models have "
           "another architecture)")


def _timm_name(key: str) -> str:
    if match := _TIMM_STEM.match(key):
        return f"stem.conv{int(match[1]) - 1}.{match[2]}"
    if match := _TIMM_BLOCK.match(key):
        if match[2]:
            return f"{match[1]}.skip_gain"
        if match[3] in _TIMM_BLOCK_SUBMODULES:
            return f"{match[1]}.{_TIMM_BLOCK_SUBMODULES[match[3]]}.{match[4]}"
    module, _, param = key.rpartition(".")
    if module in _TIMM_TOP:
        return f"{_TIMM_TOP[module]}.{param}"
    raise ValueError(f"unexpected key {key!r}: {_NOT_DM}")


def from_timm_state_dict(state_dict: Mapping[str, torch.Tensor],
                         variant: str | Variant | None = None) -> dict[str, torch.Tensor]:
    """timm `dm_nfnet_f*` state dict -> a state dict for `create_model`.

    timm stores conv gains as (O,1,1,1) and the SE linears as 1x1 convs; here the gains are
    vectors (O,) and the SE linears nn.Linear. With `variant` every shape is checked.
    Logits match timm's under the `TIMM_NUMERICS` overrides.
    """
    if not any(key.endswith(".skipinit_gain") for key in state_dict):
        raise ValueError(f"no skipinit_gain parameters: {_NOT_DM}")
    converted = {}
    for key, value in state_dict.items():
        name = _timm_name(key)
        if name.endswith(".gain"):
            value = value.reshape(-1)  # (O, 1, 1, 1) -> (O,)
        elif ".se.fc" in name and name.endswith(".weight"):
            value = value.flatten(1)  # 1x1 conv (O, I, 1, 1) -> nn.Linear (O, I)
        converted[name] = value.detach().clone()
    if isinstance(variant, str):
        variant = get_variant(variant)
    if variant is not None:
        check_state_dict(converted, variant)
    return converted


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
        raise ValueError(f"{source} does not fit {model.variant.name}: {describe(problems)}")
    model.load_state_dict(state_dict, strict=False)
    return model
