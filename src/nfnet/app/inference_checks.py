"""The checks of eval.py, predict.py and export.py: one weight source, the images or input to
read, the output. Like nfnet.app.checks (whose helpers they share), run before any work starts."""

from __future__ import annotations

import importlib.util
import os

from omegaconf import DictConfig

from nfnet.app.checks import IMAGE_SIZE_STEP, check_output_dirs, check_schema_values, check_weights
from nfnet.app.machine import check_trainer
from nfnet.app.schema import EXPORT_FORMATS
from nfnet.app.values import read, require
from nfnet.data.shards import is_remote
from nfnet.errors import ConfigError, InputError
from nfnet.models import VARIANTS


def _check_weights_source(cfg: DictConfig, entry: str, this_machine: bool) -> None:
    check_schema_values(cfg, entry)
    check_output_dirs(cfg, this_machine)
    given = {key: read(cfg, key, None) for key in ("ckpt_path", "pretrained", "registry")}
    require(
        sum(value is not None for value in given.values()) == 1,
        "give exactly one of ckpt_path=<checkpoint written by train.py>, pretrained=<weights file> "
        "(with model_name=<variant>) or registry=<folder written by update.py>; got "
        + ", ".join(f"{key}={value!r}" for key, value in given.items()),
    )
    pretrained = given["pretrained"]
    if pretrained is not None:
        name = read(cfg, "model_name", None)
        require(name in VARIANTS, f"model_name={name!r} must name the variant of pretrained={pretrained!r}; "
                                   f"choose one of: {', '.join(VARIANTS)}")
    key, path = next((key, value) for key, value in given.items() if value is not None)
    if this_machine and key == "registry":
        from nfnet.inference.registry import version_folder

        try:
            version_folder(str(path))
        except InputError as error:
            raise ConfigError(str(error)) from None
    elif this_machine and key == "pretrained":
        check_weights("pretrained", path)
    elif this_machine:
        require(os.path.isfile(os.path.expanduser(str(path))), f"{key}={path!r} is not a file")
    size = read(cfg, "image_size", None)
    require(
        size is None or size % IMAGE_SIZE_STEP == 0,
        f"image_size={size} breaks the official padding: NFNets downsample by {IMAGE_SIZE_STEP}; use a multiple of it",
    )


def check_eval_config(cfg: DictConfig, this_machine: bool = True) -> None:
    """eval.py: what to evaluate, on which images, with which trainer."""
    _check_weights_source(cfg, "eval", this_machine)
    source, root = read(cfg, "source", None), read(cfg, "root", None)
    if read(cfg, "pretrained", None) is not None:
        require(source is not None and root is not None,
                 "pretrained weights carry no dataset: give source=imagenet|imagefolder and root=<folder>")
    if root is not None and this_machine and not is_remote(str(root)):
        require(os.path.isdir(os.path.expanduser(str(root))), f"root={str(root)!r} does not exist or is not a folder")
    check_trainer(cfg, this_machine)


def check_predict_config(cfg: DictConfig, this_machine: bool = True) -> None:
    """predict.py: weights, input, output."""
    _check_weights_source(cfg, "predict", this_machine)
    spec = str(read(cfg, "input"))
    camera = spec == "camera" or spec.startswith("camera:")
    require(
        not camera or spec == "camera" or spec.split(":", 1)[1].isdigit(),
        f"input={spec!r}: a camera is `camera` or `camera:<index>`, e.g. camera:0",
    )
    if not camera and this_machine:
        require(os.path.exists(os.path.expanduser(spec)),
                 f"input={spec!r} does not exist; give an image, a folder of images, a video file or camera[:<index>]")
    device = str(read(cfg, "device"))
    require(device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit()),
             f"device={device!r} is not allowed; choose auto, cpu, cuda, cuda:<index> or mps")
    names = read(cfg, "class_names", None)
    if names is not None and this_machine:
        require(os.path.isfile(os.path.expanduser(str(names))), f"class_names={names!r} is not a file (one class name per line)")


def export_formats(cfg: DictConfig) -> list[str]:
    """`formats=onnx` and `formats=[onnx,torch]` both work."""
    formats = read(cfg, "formats")
    return [formats] if isinstance(formats, str) else list(formats)


def check_export_config(cfg: DictConfig, this_machine: bool = True) -> None:
    """export.py: weights, formats, tolerance."""
    _check_weights_source(cfg, "export", this_machine)
    formats = export_formats(cfg)
    bad = [f for f in formats if f not in EXPORT_FORMATS]
    require(formats and not bad, f"formats={formats!r} may only hold: {', '.join(EXPORT_FORMATS)}")
    if "onnx" in formats:
        absent = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        require(not absent, f"formats=onnx needs {', '.join(absent)}: pip install {' '.join(absent)} "
                             "(onnxruntime runs the check), or leave onnx out: formats=[torch]")
    if "timm" in formats and read(cfg, "check"):
        require(importlib.util.find_spec("timm") is not None,
                "formats=timm is checked by loading the folder in timm: pip install -e '.[timm]', or check=false")
    repo = read(cfg, "hub.repo_id", None)
    require(repo is None or "timm" in formats, f"hub.repo_id={repo!r} uploads the timm folder: add timm to formats")
    require(repo is None or (repo.count("/") == 1 and all(repo.split("/"))),
            f"hub.repo_id={repo!r} is not a Hub repo id; write it as user/name")

