"""The Hugging Face Hub's timm folder layout: `model.safetensors` in timm's names and a
`config.json` that timm reads, written from and read back to this project's NFNet.

A folder written by `save_timm_folder` loads in timm as a user would load any timm model:

    timm.create_model("local-dir:<folder>", pretrained=True)   # "hf-hub:<repo_id>" once pushed
    timm.create_model(architecture, pretrained=True, num_classes=N, **model_args,
                      pretrained_cfg_overlay=dict(file="<folder>/model.safetensors", num_classes=N))

(`num_classes` goes into the overlay too: timm drops a classifier whose class count differs
from its pretrained config's.) huggingface_hub is needed only for `hf-hub:` ids and the push;
nothing here downloads.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from safetensors.torch import load_file, save_file

from .nfnet import ALPHA, NFNet
from .timm import (
    TIMM_NUMERICS, from_timm_state_dict, model_overrides, timm_differences, timm_model_kwargs,
    timm_model_name, to_timm_state_dict, variant_of_timm_architecture,
)

__all__ = [
    "EVAL_PAD", "IMAGENET_MEAN_255", "IMAGENET_STD_255", "TimmFolder", "push_timm_folder",
    "read_timm_folder", "save_timm_folder", "timm_data_config",
]

# ImageNet statistics on the 0-255 scale, as this project's data pipeline normalises
# (data/transforms.py, the official dataset.py MEAN_RGB / STDDEV_RGB).
IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# The official eval (NFNET_SPEC.md §4.2): squash-resize to (S + 32)^2, centre-crop S.
EVAL_PAD = 32
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# The top-level config.json key of what this project needs back; timm reads only its own keys.
_OURS = "nfnet"
_HUB_PREFIX = "hf-hub:"


def _crop_pct(image_size: int, eval_pad: int) -> float:
    """timm's squash eval resizes to floor(S / crop_pct) before the centre crop of S: the
    crop_pct that makes that S + eval_pad, nudged inside the interval when S / (S / (S + p))
    rounds just under S + p."""
    crop_pct = image_size / (image_size + eval_pad)
    if math.floor(image_size / crop_pct) != image_size + eval_pad:
        crop_pct = image_size / (image_size + eval_pad + 0.5)
    return crop_pct


def timm_data_config(image_size: int, eval_pad: int = EVAL_PAD,
                     mean: Sequence[float] = IMAGENET_MEAN_255,
                     std: Sequence[float] = IMAGENET_STD_255) -> dict[str, Any]:
    """timm's eval preprocessing settings (pretrained_cfg keys, `timm.data.create_transform`
    kwargs) for this project's eval: squash-resize to (S + eval_pad)^2, centre-crop S = image_size,
    bicubic, normalise with `mean`/`std` given on the 0-255 scale (written on timm's 0-1 scale).

    timm's "squash" mode resizes to floor(S / crop_pct) and crops the same centred window; it
    resizes with PIL/torchvision's antialiased bicubic where this project uses TF's bicubic
    without antialiasing, so the pixels differ slightly on downscaling.
    """
    if max(mean) <= 1.0:
        raise ValueError(f"mean={tuple(mean)} looks like the 0-1 scale; pass the 0-255 scale "
                         "this project normalises with (e.g. IMAGENET_MEAN_255)")
    return {
        "input_size": (3, image_size, image_size),
        "interpolation": "bicubic",
        "crop_pct": _crop_pct(image_size, eval_pad),
        "crop_mode": "squash",
        "mean": tuple(m / 255.0 for m in mean),
        "std": tuple(s / 255.0 for s in std),
    }


def save_timm_folder(net: NFNet, folder: str | os.PathLike, *,
                     class_names: Sequence[str] | None = None, image_size: int | None = None,
                     eval_pad: int = EVAL_PAD, mean: Sequence[float] = IMAGENET_MEAN_255,
                     std: Sequence[float] = IMAGENET_STD_255) -> Path:
    """Writes `net` (its variant from `net.variant`) as a timm Hub folder and returns it:
    `model.safetensors` in timm's names and `config.json` with architecture, num_classes,
    label_names, model_args (`timm_model_kwargs`) and pretrained_cfg (eval input size, bicubic,
    mean/std on timm's 0-1 scale, squash crop), plus this project's own record under "nfnet".

    `image_size` (default: the variant's test size), `eval_pad`, `mean` and `std` (0-255 scale)
    are this project's eval settings; see `timm_data_config` for timm's version of them.
    """
    variant = net.variant
    architecture = timm_model_name(variant)  # first: refuses variants timm cannot build
    overrides = model_overrides(net)
    model_args = timm_model_kwargs(variant, **overrides)
    state_dict = to_timm_state_dict(net.state_dict(), variant)
    num_classes = net.num_classes
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a classifier of {num_classes} "
                         "classes; pass one name per class, in class-index order")
    image_size = image_size or variant.test_size
    pretrained_cfg = {
        **timm_data_config(image_size, eval_pad, mean, std),
        "num_classes": num_classes,
        "first_conv": "stem.conv1",
        "classifier": "head.fc",
    }
    if notes := timm_differences(overrides):
        pretrained_cfg["notes"] = notes
    config = {
        "architecture": architecture,
        "num_classes": num_classes,
        "num_features": net.num_features,
        "global_pool": "avg",
        **({"label_names": list(class_names)} if class_names is not None else {}),
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
        _OURS: {"variant": variant.name, "model_kwargs": overrides, "image_size": image_size,
                "eval_pad": eval_pad, "mean": list(mean), "std": list(std)},
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in state_dict.items()}, os.fspath(folder / WEIGHTS_FILE),
              {"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


class TimmFolder(NamedTuple):
    """What `read_timm_folder` returns: a state dict for `create_model(variant, **
    metadata["model_kwargs"])`, the class names (None when the folder has none), and metadata:
    source, architecture, model_args, pretrained_cfg, model_kwargs, image_size, eval_pad,
    mean and std (0-255 scale)."""

    state_dict: dict[str, torch.Tensor]
    variant: str
    class_names: list[str] | None
    metadata: dict[str, Any]


def _hub_files(source: str, cache_dir: str | os.PathLike | None) -> tuple[Path, Path]:
    """config.json and model.safetensors of `hf-hub:<repo_id>[@revision]` from the local Hugging
    Face cache only; a one-line FileNotFoundError says how to fetch what is missing."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        raise ImportError(f"{source}: reading the Hub cache needs huggingface_hub; "
                          "pip install huggingface_hub") from None
    repo_id, _, revision = source[len(_HUB_PREFIX):].partition("@")
    found = []
    for filename in (CONFIG_FILE, WEIGHTS_FILE):
        path = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir,
                                      revision=revision or None)
        if not isinstance(path, str):
            fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
            raise FileNotFoundError(
                f"{source}: {filename} is not in the local Hugging Face cache; fetch it once "
                f"with `{fetch}` (needs the network), then retry")
        found.append(Path(path))
    return found[0], found[1]


def read_timm_folder(source: str | os.PathLike, *,
                     cache_dir: str | os.PathLike | None = None) -> TimmFolder:
    """A timm Hub folder -> (state dict in this project's naming, variant name, class names,
    metadata); see `TimmFolder`.

    `source` is a folder (config.json + model.safetensors), or `hf-hub:<repo_id>[@revision]`
    whose files are already in the local Hugging Face cache (`cache_dir`, default the
    HF_HOME/HF_HUB_CACHE one): nothing is downloaded. Folders written by `save_timm_folder`
    come back with their recorded create_model overrides; other timm dm_nfnet_* folders (such
    as timm's own Hub weights) with the overrides that compute what timm computes.
    """
    if isinstance(source, str) and source.startswith(_HUB_PREFIX):
        config_path, weights_path = _hub_files(source, cache_dir)
    else:
        folder = Path(source)
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; a timm folder holds {CONFIG_FILE} "
                                        f"and {WEIGHTS_FILE} (see save_timm_folder)")
    config = json.loads(config_path.read_text())
    architecture = config.get("architecture")
    if architecture is None:
        raise ValueError(f"{config_path}: no 'architecture' key; not a timm config.json")
    model_args = config.get("model_args", {})
    pretrained_cfg = config.get("pretrained_cfg", {})
    ours = config.get(_OURS)
    variant = ours["variant"] if ours else variant_of_timm_architecture(architecture, model_args)
    state_dict = from_timm_state_dict(load_file(weights_path), variant)
    if ours:
        eval_settings = {k: ours[k] for k in ("model_kwargs", "image_size", "eval_pad", "mean",
                                              "std")}
    else:
        eval_settings = _eval_settings_of(pretrained_cfg, model_args)
    names = config.get("label_names", pretrained_cfg.get("label_names"))
    if isinstance(names, Mapping):  # timm allows {index: name}
        names = [names[k] for k in sorted(names, key=int)]
    metadata = {"source": os.fspath(source), "architecture": architecture,
                "model_args": model_args, "pretrained_cfg": pretrained_cfg, **eval_settings}
    return TimmFolder(state_dict, variant, list(names) if names else None, metadata)


def _eval_settings_of(pretrained_cfg: Mapping[str, Any],
                      model_args: Mapping[str, Any]) -> dict[str, Any]:
    """This project's eval settings and overrides that reproduce a foreign timm folder: timm's
    numerics, its test size, and the pad its (squash) crop_pct implies."""
    # Absent keys take timm's PretrainedCfg defaults: 224 px, crop_pct 0.875, ImageNet mean/std.
    size = (pretrained_cfg.get("test_input_size") or pretrained_cfg.get("input_size")
            or [3, 224, 224])[-1]
    crop_pct = pretrained_cfg.get("test_crop_pct") or pretrained_cfg.get("crop_pct", 0.875)
    mean, std = pretrained_cfg.get("mean"), pretrained_cfg.get("std")
    return {
        "model_kwargs": {**TIMM_NUMERICS, "ws_eps": model_args.get("std_conv_eps", 1e-5),
                         "alpha": model_args.get("alpha", ALPHA)},
        "image_size": size,
        "eval_pad": math.floor(size / crop_pct) - size,
        "mean": [m * 255.0 for m in mean] if mean else list(IMAGENET_MEAN_255),
        "std": [s * 255.0 for s in std] if std else list(IMAGENET_STD_255),
    }


def push_timm_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False,
                     commit_message: str = "Upload NFNet weights (timm layout)") -> str:
    """Uploads a `save_timm_folder` folder to the Hub model repo `repo_id` (created if absent)
    and returns the commit URL. Needs a Hugging Face token (`hf auth login`, or HF_TOKEN)."""
    folder = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing; write the folder with "
                                    "save_timm_folder first")
    try:
        from huggingface_hub import HfApi, get_token
    except ImportError:
        raise ImportError(f"pushing to {repo_id} needs huggingface_hub; "
                          "pip install huggingface_hub") from None
    token = get_token()
    if token is None:
        raise PermissionError(f"cannot push to {repo_id}: no Hugging Face token; log in with "
                              "`hf auth login` or set HF_TOKEN")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return commit.commit_url
