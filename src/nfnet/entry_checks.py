"""Checks for eval.py, predict.py and export.py, run before any work starts (see nfnet.config).

Like `nfnet.config`, this module imports neither Lightning nor the model code beyond the variant
table, so that a bad command line is answered in about a second.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig

from nfnet.config import (
    IMAGE_SIZE_STEP,
    SOURCES,
    check_trainer,
    read,
    read_choice,
    read_int,
    read_number,
    require,
)
from nfnet.models import VARIANTS

WEIGHT_SETS = ("ema", "raw")


def _check_weights_source(cfg: DictConfig, this_machine: bool) -> None:
    ckpt, pretrained = read(cfg, "ckpt_path", None), read(cfg, "pretrained", None)
    require(
        (ckpt is None) != (pretrained is None),
        "give exactly one of ckpt_path=<checkpoint written by train.py> or pretrained=<weights file> "
        f"(with model_name=<variant>); got ckpt_path={ckpt!r}, pretrained={pretrained!r}",
    )
    read_choice(cfg, "weights", WEIGHT_SETS, note=" (a checkpoint's EMA or raw weights)")
    if pretrained is not None:
        name = read(cfg, "model_name", None)
        require(name in VARIANTS, f"model_name={name!r} must name the variant of pretrained={pretrained!r}; "
                                   f"choose one of: {', '.join(VARIANTS)}")
    key, path = ("ckpt_path", ckpt) if ckpt is not None else ("pretrained", pretrained)
    if this_machine:
        require(os.path.isfile(os.path.expanduser(str(path))), f"{key}={path!r} is not a file")
    size = read_int(cfg, "image_size", nullable=True, note=" (null: the size the weights were evaluated at)")
    require(
        size is None or size % IMAGE_SIZE_STEP == 0,
        f"image_size={size} breaks the official padding: NFNets downsample by {IMAGE_SIZE_STEP}; use a multiple of it",
    )
    read_int(cfg, "eval_pad", minimum=0, nullable=True)


def check_eval_config(cfg: DictConfig, this_machine: bool = True) -> None:
    """eval.py: what to evaluate, on which images, with which trainer."""
    _check_weights_source(cfg, this_machine)
    read_choice(cfg, "split", ("val", "train"))
    source = read(cfg, "source", None)
    require(source is None or source in SOURCES, f"source={source!r} is not allowed; choose one of: {', '.join(SOURCES)}")
    if read(cfg, "pretrained", None) is not None:
        require(source is not None and read(cfg, "root", None) is not None,
                 "pretrained weights carry no dataset: give source=imagenet|imagefolder and root=<folder>")
    root = read(cfg, "root", None)
    if root is not None and this_machine:
        require(os.path.isdir(os.path.expanduser(str(root))), f"root={str(root)!r} does not exist or is not a folder")
    read_int(cfg, "batch_size")
    read_int(cfg, "num_workers", minimum=0)
    check_trainer(cfg, this_machine)


def check_predict_config(cfg: DictConfig, this_machine: bool = True) -> None:
    """predict.py: weights, input, output."""
    _check_weights_source(cfg, this_machine)
    spec = str(read(cfg, "input"))
    camera = spec == "camera" or spec.startswith("camera:")
    require(
        not camera or spec == "camera" or spec.split(":", 1)[1].isdigit(),
        f"input={spec!r}: a camera is `camera` or `camera:<index>`, e.g. camera:0",
    )
    if not camera and this_machine:
        require(os.path.exists(os.path.expanduser(spec)),
                 f"input={spec!r} does not exist; give an image, a folder of images, a video file or camera[:<index>]")
    read_int(cfg, "top_k")
    read_choice(cfg, "format", ("json", "csv"))
    read_int(cfg, "batch_size")
    device = str(read(cfg, "device"))
    require(device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit()),
             f"device={device!r} is not allowed; choose auto, cpu, cuda, cuda:<index> or mps")
    read_int(cfg, "video.every_n_frames")
    read_int(cfg, "video.max_frames", nullable=True, note=" (null: the whole video; a camera runs until Ctrl-C)")
    names = read(cfg, "class_names", None)
    if names is not None and this_machine:
        require(os.path.isfile(os.path.expanduser(str(names))), f"class_names={names!r} is not a file (one class name per line)")


EXPORT_FORMATS = ("onnx", "torch", "safetensors")


def export_formats(cfg: DictConfig) -> list[str]:
    """`formats=onnx` and `formats=[onnx,torch]` both work."""
    formats = read(cfg, "formats")
    return [formats] if isinstance(formats, str) else list(formats)


def check_export_config(cfg: DictConfig, this_machine: bool = True) -> None:
    """export.py: weights, formats, tolerance."""
    _check_weights_source(cfg, this_machine)
    formats = export_formats(cfg)
    bad = [f for f in formats if f not in EXPORT_FORMATS]
    require(formats and not bad, f"formats={formats!r} may only hold: {', '.join(EXPORT_FORMATS)}")
    if "onnx" in formats:
        import importlib.util

        absent = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        require(not absent, f"formats=onnx needs {', '.join(absent)}: pip install {' '.join(absent)} "
                             "(onnxruntime runs the check), or leave onnx out: formats=[torch]")
    read_number(cfg, "tolerance", 0, low_open=True, note=" (allowed logit difference, relative to the largest logit)")
