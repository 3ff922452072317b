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
    VARIANTS,
    _check_trainer,
    _choice,
    _int,
    _number,
    _require,
    _value,
)

WEIGHT_SETS = ("ema", "raw")


def _check_weights_source(cfg: DictConfig, this_machine: bool) -> None:
    ckpt, pretrained = _value(cfg, "ckpt_path", None), _value(cfg, "pretrained", None)
    _require(
        (ckpt is None) != (pretrained is None),
        "give exactly one of ckpt_path=<checkpoint written by train.py> or pretrained=<weights file> "
        f"(with model_name=<variant>); got ckpt_path={ckpt!r}, pretrained={pretrained!r}",
    )
    _choice(cfg, "weights", WEIGHT_SETS, note=" (a checkpoint's EMA or raw weights)")
    if pretrained is not None:
        name = _value(cfg, "model_name", None)
        _require(name in VARIANTS, f"model_name={name!r} must name the variant of pretrained={pretrained!r}; "
                                   f"choose one of: {', '.join(VARIANTS)}")
    key, path = ("ckpt_path", ckpt) if ckpt is not None else ("pretrained", pretrained)
    if this_machine:
        _require(os.path.isfile(os.path.expanduser(str(path))), f"{key}={path!r} is not a file")
    size = _int(cfg, "image_size", nullable=True, note=" (null: the size the weights were evaluated at)")
    _require(
        size is None or size % IMAGE_SIZE_STEP == 0,
        f"image_size={size} breaks the official padding: NFNets downsample by {IMAGE_SIZE_STEP}; use a multiple of it",
    )
    _int(cfg, "eval_pad", minimum=0, nullable=True)


def check_eval_config(cfg: DictConfig, this_machine: bool = True) -> None:
    """eval.py: what to evaluate, on which images, with which trainer."""
    _check_weights_source(cfg, this_machine)
    _choice(cfg, "split", ("val", "train"))
    source = _value(cfg, "source", None)
    _require(source is None or source in SOURCES, f"source={source!r} is not allowed; choose one of: {', '.join(SOURCES)}")
    if _value(cfg, "pretrained", None) is not None:
        _require(source is not None and _value(cfg, "root", None) is not None,
                 "pretrained weights carry no dataset: give source=imagenet|imagefolder and root=<folder>")
    root = _value(cfg, "root", None)
    if root is not None and this_machine:
        _require(os.path.isdir(os.path.expanduser(str(root))), f"root={str(root)!r} does not exist or is not a folder")
    _int(cfg, "batch_size")
    _int(cfg, "num_workers", minimum=0)
    _check_trainer(cfg, this_machine)


def check_predict_config(cfg: DictConfig, this_machine: bool = True) -> None:
    """predict.py: weights, input, output."""
    _check_weights_source(cfg, this_machine)
    spec = str(_value(cfg, "input"))
    camera = spec == "camera" or spec.startswith("camera:")
    _require(
        not camera or spec == "camera" or spec.split(":", 1)[1].isdigit(),
        f"input={spec!r}: a camera is `camera` or `camera:<index>`, e.g. camera:0",
    )
    if not camera and this_machine:
        _require(os.path.exists(os.path.expanduser(spec)),
                 f"input={spec!r} does not exist; give an image, a folder of images, a video file or camera[:<index>]")
    _int(cfg, "top_k")
    _choice(cfg, "format", ("json", "csv"))
    _int(cfg, "batch_size")
    device = str(_value(cfg, "device"))
    _require(device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit()),
             f"device={device!r} is not allowed; choose auto, cpu, cuda, cuda:<index> or mps")
    _int(cfg, "video.every_n_frames")
    _int(cfg, "video.max_frames", nullable=True, note=" (null: the whole video; a camera runs until Ctrl-C)")
    names = _value(cfg, "class_names", None)
    if names is not None and this_machine:
        _require(os.path.isfile(os.path.expanduser(str(names))), f"class_names={names!r} is not a file (one class name per line)")


EXPORT_FORMATS = ("onnx", "torch", "safetensors")


def export_formats(cfg: DictConfig) -> list[str]:
    """`formats=onnx` and `formats=[onnx,torch]` both work."""
    formats = _value(cfg, "formats")
    return [formats] if isinstance(formats, str) else list(formats)


def check_export_config(cfg: DictConfig, this_machine: bool = True) -> None:
    """export.py: weights, formats, tolerance."""
    _check_weights_source(cfg, this_machine)
    formats = export_formats(cfg)
    bad = [f for f in formats if f not in EXPORT_FORMATS]
    _require(formats and not bad, f"formats={formats!r} may only hold: {', '.join(EXPORT_FORMATS)}")
    if "onnx" in formats:
        import importlib.util

        absent = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        _require(not absent, f"formats=onnx needs {', '.join(absent)}: pip install {' '.join(absent)} "
                             "(onnxruntime runs the check), or leave onnx out: formats=[torch]")
    _number(cfg, "tolerance", 0, low_open=True, note=" (allowed logit difference, relative to the largest logit)")
