"""One trained weight set, ready for inference, with what is needed to feed it.

A train.py checkpoint holds two weight sets, the raw network and its EMA (nfnet.inference.checkpoint);
the EMA is what the paper reports and what is loaded unless `weights="raw"`. Converted
pretrained weights (DeepMind, timm, safetensors) hold one. Either way the result is a plain
`NFNet` in eval mode plus its class names, image size and eval padding. No Lightning, no Hydra.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nfnet.data.transforms import CROP_PADDING
from nfnet.errors import InputError
from nfnet.inference.checkpoint import read_checkpoint, weights
from nfnet.inference.registry import CLASSES, MODEL, MODEL_INFO, read_json, version_folder
from nfnet.inference.weights import read_any_weights
from nfnet.models import VARIANTS, create_model, get_variant
from nfnet.models.matching import describe, shape_mismatches
from nfnet.models.nfnet import NFNet
from nfnet.models.pretrained import fit_state_dict

# The architecture keys of a checkpoint's `model` section (the rest train it or feed it).
ARCHITECTURE = ("drop_rate", "stochdepth_rate", "activation", "gelu_approximate")


@dataclass
class Classifier:
    net: NFNet
    model_name: str
    class_names: list[str]
    image_size: int
    eval_pad: int
    weights: str  # "ema", "raw", "pretrained" or a registry version ("v0003")
    weights_file: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # The datamodule's hyperparameters of a checkpoint: the data it was trained on.
    data_hparams: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_name, "weights": self.weights, "weights_file": self.weights_file,
                "num_classes": len(self.class_names)}

    def to_device(self, device: str) -> torch.device:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        target = torch.device(device)
        self.net.to(target).eval()
        return target


def from_checkpoint(path: str, which: str = "ema", image_size: int | None = None,
                    eval_pad: int | None = None) -> Classifier:
    """A train.py checkpoint's `which` weight set ("ema" or "raw").

    Raises pickle.UnpicklingError for a file that would run code, InputError for one that cannot
    be used."""
    path = os.path.expanduser(path)
    checkpoint = read_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    data_hparams = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    state = weights(checkpoint["state_dict"], which)
    if not state:
        raise InputError(f"{path} holds no EMA weights (trained with optim.ema.decay=null); use weights=raw")
    model = hparams["model"]
    # The stored values are data from a file: checked before they size anything.
    if model.get("name") not in VARIANTS:
        raise InputError(f"{path}: its model name {model.get('name')!r} is not a known NFNet")
    kwargs = {k: model[k] for k in ARCHITECTURE if k in model}
    head = state.get("classifier.weight")
    if not isinstance(head, torch.Tensor) or head.dim() != 2 or head.shape[0] != hparams.get("num_classes"):
        raise InputError(f"{path}: its {which} weights have no classifier for its {hparams.get('num_classes')!r} classes")
    try:
        net = create_model(model["name"], num_classes=head.shape[0], **kwargs)
    except (TypeError, ValueError, KeyError) as error:
        raise InputError(f"{path}: its model settings {kwargs} cannot build {model['name']} ({error})") from None
    problems = shape_mismatches({k: v.shape for k, v in net.state_dict().items()}, state)
    if problems:
        raise InputError(f"{path}: its {which} weights do not fit {model['name']}: {describe(problems)}")
    net.load_state_dict(state)
    names = [str(n) for n in (hparams.get("class_names") or range(head.shape[0]))]
    data = data_hparams.get("data") or {}
    size = image_size or data.get("test_size") or get_variant(model["name"]).test_size
    pad = eval_pad if eval_pad is not None else data.get("eval_pad", CROP_PADDING)
    if not (is_count(size, 1) and is_count(pad, 0)) or len(names) != head.shape[0]:
        raise InputError(f"{path}: its stored test size {size!r}, eval padding {pad!r} or {len(names)} class names "
                         f"do not describe {head.shape[0]} classes at a size of at least 1 pixel")
    return Classifier(net.eval(), model["name"], names, int(size), int(pad), which, path, kwargs, data_hparams)


def is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def from_pretrained(path: str, model_name: str, class_names_file: str | None = None,
                    image_size: int | None = None, eval_pad: int | None = None) -> Classifier:
    """Converted pretrained weights of the variant `model_name` (DeepMind, timm, safetensors)."""
    path = os.path.expanduser(path)
    state = read_any_weights(path)
    head = state.get("classifier.weight")
    if not isinstance(head, torch.Tensor) or head.dim() != 2:
        raise InputError(f"{path} has no classifier.weight matrix: these are not the weights of an NFNet classifier")
    num_classes = head.shape[0]
    net = fit_state_dict(create_model(model_name, num_classes=num_classes), state, path)
    names = class_names(class_names_file, num_classes)
    size = image_size or get_variant(model_name).test_size
    pad = eval_pad if eval_pad is not None else CROP_PADDING
    return Classifier(net.eval(), model_name, names, int(size), int(pad), "pretrained", path)


def from_registry(path: str, image_size: int | None = None, eval_pad: int | None = None) -> Classifier:
    """A model registry's current version (`path` is the registry) or one of its version folders
    (nfnet.inference.registry), with its class names and the size it was evaluated at."""
    folder = version_folder(path)
    info = read_json(folder / MODEL_INFO)
    names = [str(n) for n in read_json(folder / CLASSES)]
    model = info["model"]
    kwargs = {k: model[k] for k in ARCHITECTURE if k in model}
    net = create_model(model["name"], num_classes=len(names), **kwargs)
    net.load_state_dict(read_any_weights(folder / MODEL))
    size = image_size or info["image_size"]
    pad = eval_pad if eval_pad is not None else info["eval_pad"]
    return Classifier(net.eval(), model["name"], names, int(size), int(pad), f"v{folder.name}", str(folder / MODEL),
                      kwargs, {"data": info.get("data") or {}})


def class_names(path: str | None, num_classes: int) -> list[str]:
    """One class name per line of `path`; without a file, the class indices."""
    if not path:
        return [str(i) for i in range(num_classes)]
    names = [line.strip() for line in Path(os.path.expanduser(path)).read_text().splitlines() if line.strip()]
    if len(names) != num_classes:
        raise InputError(f"class_names={path!r} has {len(names)} names but the weights have {num_classes} classes")
    return names
