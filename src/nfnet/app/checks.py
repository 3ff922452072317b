"""The checks of every entry point's config, run before any work starts.

Each value is first held to the constraint its schema field carries (nfnet.app.schema); what
follows here are the rules that relate several values or the machine: sizes the official
padding allows, folders and files that must exist, the RandAugment level, the trainer. Like the
schema, this module imports neither Lightning nor the model code beyond the variant table, so
that a bad command line is answered in about a second. Checks marked "this machine" are skipped
when a multirun is checked on the submitting machine (its jobs may run elsewhere, where each
job checks again).
"""

from __future__ import annotations

import os

from omegaconf import DictConfig

from nfnet.app.machine import check_trainer
from nfnet.app.schema import ENTRIES, EXPORT_FORMATS, constrained_keys
from nfnet.app.values import is_int, read, require
from nfnet.errors import ConfigError, InputError
from nfnet.models import VARIANTS

IMAGE_SIZE_STEP = 32  # NFNets downsample by 32; the official sizes are all multiples of it


def check_schema_values(cfg: DictConfig, entry: str) -> None:
    """Every value with a constraint in the entry's schema, in the schema's order."""
    for key, constraint in constrained_keys(ENTRIES[entry]):
        constraint.check(key, read(cfg, key))


def check_image_size(key: str, size: int | None) -> None:
    if size is None:
        return
    require(
        size % IMAGE_SIZE_STEP == 0,
        f"{key}={size} breaks the official padding: NFNets downsample by {IMAGE_SIZE_STEP} and the official "
        f"TF-'SAME' padding and pooling assume sizes that are multiples of {IMAGE_SIZE_STEP} "
        f"(e.g. {max(IMAGE_SIZE_STEP, size // IMAGE_SIZE_STEP * IMAGE_SIZE_STEP)} or "
        f"{(size // IMAGE_SIZE_STEP + 1) * IMAGE_SIZE_STEP})",
    )


def check_file(key: str, path, what: str) -> None:
    require(os.path.isfile(os.path.expanduser(str(path))), f"{key}={path!r} is not a file; {what}")


# --------------------------------------------------------------------------- train.py
def _check_data(cfg: DictConfig, this_machine: bool) -> None:
    source = read(cfg, "data.source")
    for key in ("data.train_size", "data.test_size"):
        check_image_size(key, read(cfg, key))
    root = read(cfg, "data.root", None)
    if source == "shapes":
        return
    layout = "<root>/train/<class>/ and <root>/val/<class>/" if source == "imagenet" else "<root>/<class>/<images>"
    require(root is not None, f"data.root is required for data={source}: the folder laid out as {layout}")
    if not this_machine:
        return
    path = os.path.expanduser(str(root))
    require(os.path.isdir(path), f"data.root={str(root)!r} does not exist or is not a folder; data={source} needs {layout}")
    if source == "imagenet":
        for split in ("train", "val"):
            require(
                os.path.isdir(os.path.join(path, split)),
                f"data.root={str(root)!r} has no {split}/ folder; data=imagenet needs {layout}",
            )
    for folder in [os.path.join(path, "train"), os.path.join(path, "val")] if source == "imagenet" else [path]:
        require(
            _has_subfolder(folder),
            f"data.root={str(root)!r}: {folder} is empty (no class folders); data={source} needs {layout}",
        )


def _has_subfolder(path: str) -> bool:
    with os.scandir(path) as entries:
        return any(e.is_dir() and not e.name.startswith(".") for e in entries)


def unwritable_reason(path: str) -> str | None:
    """Why a folder cannot be created or written at `path` (None if it can), without creating it."""
    path = os.path.abspath(os.path.expanduser(path))
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return f"no part of {path} exists"
        probe = parent
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user"
    return None


def _check_ra_level(cfg: DictConfig) -> None:
    from nfnet.data.randaugment_levels import MAX_LEVEL, parse_ra_level

    if read(cfg, "augment.name") != "official":
        return
    level = read(cfg, "augment.ra_level", None)
    if level is None:
        return
    # The official scale tops out at 10 but the F3+ recipes use 15 (extrapolated); far beyond
    # that the ops' arguments stop making sense.
    max_magnitude = 3 * MAX_LEVEL
    ok = is_int(level) and level >= 0
    if ok:
        layers, magnitude = parse_ra_level(level)
        ok = layers >= 1 and 0 <= magnitude <= max_magnitude
    require(
        ok,
        f"augment.ra_level={level!r} is not a RandAugment level: <layers><magnitude as 2 digits> such as "
        f"405 (4 layers at magnitude 5; magnitude <= {max_magnitude:g}), or null for none",
    )


def _check_model(cfg: DictConfig, this_machine: bool) -> None:
    pretrained = read(cfg, "model.pretrained", None)
    if pretrained is None or not this_machine:
        return
    check_file("model.pretrained", pretrained, "give a DeepMind *_haiku.npz, a timm or safetensors weights "
               "file, or a checkpoint written by train.py")
    from nfnet.inference.weights import weights_variant  # torch: only when there are weights to look at

    try:
        variant = weights_variant(os.path.expanduser(str(pretrained)))
    except Exception:  # noqa: BLE001 - a file this cannot read is the loader's to refuse, in its own words
        return
    name = read(cfg, "model.name")
    require(
        variant is None or variant == name,
        f"model.pretrained={str(pretrained)!r} holds {variant} weights, but model.name={name!r}; add model={variant}",
    )


def _check_run(cfg: DictConfig, this_machine: bool) -> None:
    _check_requires(cfg)
    require(
        not read(cfg, "data.class_map", None),
        "data.class_map is read by update.py, whose registry keeps each class's classifier row; train.py "
        "matches a checkpoint's classes by name: rename the class folders as they were, or use update.py",
    )
    ckpt, resume = read(cfg, "ckpt_path", None), read(cfg, "resume", False)
    if ckpt is not None and ckpt not in ("last", "hpc") and this_machine:
        check_file("ckpt_path", ckpt, "give a checkpoint written by train.py, `last` (this run directory's latest) or null")
    require(
        not (resume and ckpt is not None),
        f"resume=true finds the checkpoint by itself, but ckpt_path={ckpt!r} is set too; give one of them",
    )
    _check_outputs(cfg, this_machine)


def _check_requires(cfg: DictConfig) -> None:
    for key in read(cfg, "requires", None) or []:
        require(
            read(cfg, key, None) is not None,
            f"{key} is required by this config (task {cfg.get('task_name')}); set it: {key}=<value>",
        )
    steps, max_steps = read(cfg, "steps", None), read(cfg, "trainer.max_steps", -1)
    require(steps is None or max_steps in (None, -1),
            f"steps={steps} sets trainer.max_steps itself, but trainer.max_steps={max_steps} is set too; give one of them")


def _check_outputs(cfg: DictConfig, this_machine: bool) -> None:
    if this_machine:
        # Checked before Hydra creates the run directory under it, so a bad path costs one line.
        log_dir = read(cfg, "paths.log_dir", None)
        reason = unwritable_reason(str(log_dir)) if log_dir is not None else None
        require(reason is None, f"paths.log_dir={str(log_dir)!r} cannot hold the run's outputs: {reason}")
        if read(cfg, "data.source", None) == "shapes" and read(cfg, "data.root", None) is not None:
            # The embedded dataset is generated into data.root on first use.
            reason = unwritable_reason(str(cfg.data.root))
            require(
                reason is None or os.path.isdir(os.path.expanduser(str(cfg.data.root))),
                f"data.root={str(cfg.data.root)!r} cannot hold the generated shapes dataset: {reason}",
            )


def check_config(cfg: DictConfig, this_machine: bool = True) -> None:
    """Raise ConfigError for the first value of a train config that cannot work."""
    check_schema_values(cfg, "train")
    _check_model(cfg, this_machine)
    _check_data(cfg, this_machine)
    _check_ra_level(cfg)
    check_trainer(cfg, this_machine)
    _check_run(cfg, this_machine)


# --------------------------------------------------------------------------- eval, predict, export
def _check_weights_source(cfg: DictConfig, entry: str, this_machine: bool) -> None:
    check_schema_values(cfg, entry)
    given = {key: read(cfg, key, None) for key in ("ckpt_path", "pretrained", "registry")}
    require(
        sum(value is not None for value in given.values()) == 1,
        "give exactly one of ckpt_path=<checkpoint written by train.py>, pretrained=<weights file> "
        f"(with model_name=<variant>) or registry=<folder written by update.py>; got "
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
    if root is not None and this_machine:
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
        import importlib.util

        absent = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        require(not absent, f"formats=onnx needs {', '.join(absent)}: pip install {' '.join(absent)} "
                             "(onnxruntime runs the check), or leave onnx out: formats=[torch]")


# --------------------------------------------------------------------------- update.py
def check_update_config(cfg: DictConfig, this_machine: bool = True) -> None:
    """update.py: the training run's checks, one growing folder, and a registry this round can continue."""
    check_schema_values(cfg, "update")
    source = read(cfg, "data.source")
    require(source == "imagefolder", f"data.source={source!r}: update.py learns from one folder of class folders that "
                                     "grows, data=imagefolder (its default) with data.root=<folder>")
    _check_model(cfg, this_machine)
    _check_data(cfg, this_machine)
    _check_ra_level(cfg)
    check_trainer(cfg, this_machine)
    _check_requires(cfg)
    _check_outputs(cfg, this_machine)
    if this_machine:
        try:
            _check_registry(cfg)
        except InputError as error:  # the registry's or the class set's own one line
            raise ConfigError(str(error)) from None


def _check_registry(cfg: DictConfig) -> None:
    from nfnet.data.class_set import evolve_classes
    from nfnet.inference.registry import MODEL_INFO, Registry, read_json

    path = os.path.expanduser(str(read(cfg, "registry")))
    reason = unwritable_reason(path)
    require(reason is None, f"registry={path!r} cannot hold the model registry: {reason}")
    registry = Registry(path)
    require(registry.exists() or not os.path.isdir(path) or not os.listdir(path),
            f"registry={path!r} is a folder with other files in it, not a model registry (no versions/ folder); "
            "give a new or empty folder")
    current = registry.current()
    if current is None:
        return
    name, variant = read(cfg, "model.name"), read_json(registry.folder(current) / MODEL_INFO)["model"]["name"]
    require(name == variant, f"model.name={name!r}, but version {current}, in service in registry={path!r}, is a "
                             f"{variant}, which a round continues; add model={variant}")
    pretrained = read(cfg, "model.pretrained", None)
    require(pretrained is None, f"model.pretrained={str(pretrained)!r} starts an empty registry; registry={path!r} has "
                                f"version {current} in service, which this round starts from: drop model.pretrained")
    root = os.path.expanduser(str(read(cfg, "data.root")))
    with os.scandir(root) as entries:
        folders = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    evolve_classes(registry.classes(current), folders, read(cfg, "data.class_map", None))


CHECKS = {"train": check_config, "eval": check_eval_config, "predict": check_predict_config, "export": check_export_config,
          "update": check_update_config}
