"""DeepMind's Haiku checkpoints (`F0_haiku.npz` ... `F6_haiku.npz`) -> this model's state dict.

The files are dill pickles, not numpy zips, of `{module_path: {param: float32 array}}`, conv
weights HWIO, linear weights IO (NFNET_SPEC.md §2.3). Unpickling runs whatever callables the
file names, so they are read with an unpickler that resolves only the handful of globals
needed to rebuild dicts and numpy arrays, and refuses every other one by name before
anything is called.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
from typing import Any, Mapping

import numpy as np
import torch

from .matching import check_state_dict
from .variants import Variant, get_variant

# numpy's array and scalar reconstructors, taken from numpy itself so that both spellings a
# file may use (numpy.core.multiarray in numpy 1.x, numpy._core.multiarray in 2.x) resolve to
# the functions of the installed numpy.
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
_SCALAR = np.float32(0).__reduce__()[0]
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
# Haiku's immutable params containers as old checkpoints pickled them: FlatMapping (and the
# FlatMap it became) reduce to `FlatMapping(mapping)`, frozendict to `frozendict(dict)`
# (haiku `_src/data_structures.py`). They are rebuilt as plain dicts without importing haiku.
_HAIKU_CONTAINERS = ("FlatMapping", "FlatMap", "frozendict")
_HAIKU_MODULE = "haiku._src.data_structures"


def _plain_mapping(mapping: Mapping = (), **kwargs) -> dict:
    return dict(mapping, **kwargs)


# Pickle protocol 2 has no bytes type: a file written with it (numpy 1.x pickles did so) stores
# an array's bytes as `_codecs.encode(<str>, "latin1")`. Only that use is resolved: a str to bytes.
_LATIN1 = ("latin1", "latin-1", "iso-8859-1")


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Stands in for `_codecs.encode` in a protocol-2 pickle: str -> bytes, latin1 only."""
    if not isinstance(text, str) or encoding.lower() not in _LATIN1:
        raise pickle.UnpicklingError(
            f"_codecs.encode record of {type(text).__name__} with encoding {encoding!r} refused "
            "(a protocol-2 array pickle encodes a str as latin1)"
        )
    return text.encode("latin1")


def _create_array(f, args, state, npdict=None) -> np.ndarray:
    """Stands in for `dill._dill._create_array` (how dill pickles ndarrays): f(*args) and
    then __setstate__(state), with f held to numpy's own reconstructor."""
    if f is not _RECONSTRUCT:
        raise pickle.UnpicklingError(f"dill array record with constructor {f!r} refused")
    if npdict:
        raise pickle.UnpicklingError("dill array record with instance attributes refused")
    array = f(*args)
    array.__setstate__(state)
    return array


class _ParamsUnpickler(pickle.Unpickler):
    """Resolves only what a params pickle needs; any other global is an error naming it."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _NUMPY_MODULES and name == "_reconstruct":
            return _RECONSTRUCT
        if module in _NUMPY_MODULES and name == "scalar":
            return _SCALAR
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "dill._dill" and name == "_create_array":
            return _create_array
        if module == "_codecs" and name == "encode":
            return _latin1_bytes
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == _HAIKU_MODULE and name in _HAIKU_CONTAINERS:
            return _plain_mapping
        raise pickle.UnpicklingError(
            f"refusing global '{module}.{name}': a DeepMind NFNet checkpoint holds only dicts "
            "and numpy arrays, so this file is not one (or not one this loader knows)"
        )


def read_haiku_params(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """The raw `{module_path: {param: array}}` of a DeepMind checkpoint, safely unpickled."""
    with open(path, "rb") as f:
        try:
            params = _ParamsUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{os.fspath(path)}: {e}") from None
    if not isinstance(params, Mapping) or not all(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(f"{os.fspath(path)}: expected {{module: {{param: array}}}}, "
                         f"got {type(params).__name__}")
    return {module: dict(leaves) for module, leaves in params.items()}


# NFNET_SPEC.md §2.3: module paths under the top-level 'NFNet' module.
_ROOT = "NFNet/~/"
_BLOCK = re.compile(r"^nf_block(?:_(\d+))?(?:/~/(.+))?$")
# Haiku's names inside a block -> this model's.
_BLOCK_SUBMODULES = {
    "conv0": "conv0", "conv1": "conv1", "conv1b": "conv1b", "conv2": "conv2",
    "conv_shortcut": "conv_shortcut",
    "squeeze_excite/~/linear": "se.fc0", "squeeze_excite/~/linear_1": "se.fc1",
}
_TOP_MODULES = {f"stem_conv{i}": f"stem.conv{i}" for i in range(4)}
_TOP_MODULES.update(final_conv="final_conv", linear="classifier")
_PARAMS = {"w": "weight", "b": "bias", "gain": "gain", "bias": "bias", "skip_gain": "skip_gain"}


def _to_tensor(array: np.ndarray | torch.Tensor, param: str) -> torch.Tensor:
    # Also takes tensors, so the mapping can be checked on meta tensors without memory.
    tensor = torch.as_tensor(array)
    if param == "w" and tensor.dim() == 4:  # HWIO -> OIHW
        tensor = tensor.permute(3, 2, 0, 1)
    elif param == "w" and tensor.dim() == 2:  # (in, out) -> nn.Linear's (out, in)
        tensor = tensor.t()
    # A contiguous copy that owns its memory (not a view of the unpickled array).
    return tensor.clone(memory_format=torch.contiguous_format)


def _block_index(module: str) -> tuple[int, str] | None:
    match = _BLOCK.match(module)
    if match is None:
        return None
    index = int(match[1]) if match[1] else 0  # the first block carries no suffix (§2.3)
    return index, match[2] or ""


def _infer_depths(params: Mapping[str, Any]) -> tuple[int, ...]:
    # Every stage opens with a projection block (stride 2, or stage 0's channel change), and
    # only those have a conv_shortcut, so the shortcuts mark where stages begin.
    blocks = {_block_index(m[len(_ROOT):]) for m in params if m.startswith(_ROOT)} - {None}
    indices = sorted({index for index, _ in blocks})
    starts = sorted(index for index, sub in blocks if sub == "conv_shortcut")
    if not indices or indices != list(range(len(indices))) or not starts or starts[0] != 0:
        raise ValueError("cannot read the stage layout from the checkpoint's nf_block modules; "
                         "pass variant=")
    return tuple(b - a for a, b in zip(starts, starts[1:] + [len(indices)]))


def _module_name(module: str, locations: list[tuple[int, int]]) -> str:
    """A Haiku module path -> this model's module name; (stage, block) per global index."""
    local = module[len(_ROOT):] if module.startswith(_ROOT) else None
    if local in _TOP_MODULES:
        return _TOP_MODULES[local]
    block = _block_index(local) if local is not None else None
    if block is not None and block[0] < len(locations):
        index, sub = block
        stage, b = locations[index]
        if sub == "":
            return f"stages.{stage}.{b}"
        if sub in _BLOCK_SUBMODULES:
            return f"stages.{stage}.{b}.{_BLOCK_SUBMODULES[sub]}"
    raise ValueError(f"unexpected module {module!r} in the checkpoint (of an NFNet with "
                     f"{len(locations)} blocks)")


def haiku_to_state_dict(params: Mapping[str, Mapping[str, np.ndarray]],
                        depths: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
    """Maps `{module_path: {param: array}}` onto this model's parameter names and layouts."""
    depths = depths or _infer_depths(params)
    locations = [(s, b) for s, depth in enumerate(depths) for b in range(depth)]
    state_dict = {}
    for module, leaves in params.items():
        name = _module_name(module, locations)
        for param, array in leaves.items():
            if param not in _PARAMS:
                raise ValueError(f"unexpected parameter {param!r} of module {module!r}")
            state_dict[f"{name}.{_PARAMS[param]}"] = _to_tensor(array, param)
    return state_dict


def load_haiku_checkpoint(path: str | os.PathLike,
                          variant: str | Variant | None = None) -> dict[str, torch.Tensor]:
    """DeepMind's `F*_haiku.npz` -> a state dict for `create_model`, running no code from it.

    `variant` (a name or Variant) fixes the stage depths and is checked against every
    tensor's shape; without it the depths are read from the checkpoint's structure.
    """
    if isinstance(variant, str):
        variant = get_variant(variant)
    state_dict = haiku_to_state_dict(read_haiku_params(path), variant.depths if variant else None)
    if variant is not None:
        check_state_dict(state_dict, variant)
    return state_dict
