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
import tempfile

from omegaconf import DictConfig

from nfnet.app.machine import check_trainer
from nfnet.app.schema import ENTRIES, EXPORT_FORMATS, constrained_keys
from nfnet.app.values import Integer, is_int, read, require, shown
from nfnet.data.shards import PACK_FILE, is_remote
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


def check_weights(key: str, path) -> None:
    """A weights file, a timm Hub folder, or an `hf-hub:` id (read from the local cache)."""
    path = str(path)
    if path.startswith("hf-hub:") or os.path.isdir(os.path.expanduser(path)):
        return
    check_file(key, path, "give a DeepMind *_haiku.npz, a timm or safetensors weights file, a checkpoint "
               "written by train.py, a timm Hub folder or hf-hub:<repo id>")


# --------------------------------------------------------------------------- train.py
def _check_data(cfg: DictConfig, this_machine: bool) -> None:
    source = read(cfg, "data.source")
    for key in ("data.train_size", "data.test_size"):
        check_image_size(key, read(cfg, key))
    root = read(cfg, "data.root", None)
    if source == "shapes":
        return
    if source == "streaming":
        _check_pack_root(root, this_machine)
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


def _check_pack_root(root, this_machine: bool) -> None:
    how = "write one with: python pack.py source=imagefolder root=<image folder> output_dir=<shards>"
    require(root is not None, f"data.root is required for data=streaming: the output_dir of pack.py, a folder or "
                              f"an s3://, gs:// or azure:// URI; {how}")
    if not this_machine or is_remote(str(root)):
        return  # an object store is asked when the data is opened
    path = os.path.expanduser(str(root))
    require(os.path.isfile(os.path.join(path, PACK_FILE)),
            f"data.root={str(root)!r} is not a packed dataset (it has no {PACK_FILE}); {how}")


def _has_subfolder(path: str) -> bool:
    with os.scandir(path) as entries:
        return any(e.is_dir() and not e.name.startswith(".") for e in entries)


def unwritable_reason(path: str) -> str | None:
    """Why a folder cannot be created or written at `path` (None if it can), leaving nothing
    behind: a folder is created and removed again in the deepest part of `path` that exists.
    (Asking `os.access` is not enough: it says yes to root under /proc or on a read-only mount.)"""
    path = os.path.abspath(os.path.expanduser(path))
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return f"no part of {path} exists"
        probe = parent
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".nfnet-write-test-", dir=probe))
    except OSError as error:
        return f"{probe} cannot be written ({error.strerror or error})"
    return None


def _check_decode(cfg: DictConfig) -> None:
    if read(cfg, "data.decode") == "cpu":
        return
    augment, accelerator = read(cfg, "augment.name"), read(cfg, "trainer.accelerator", "auto")
    require(augment == "official", f"data.decode=gpu runs the official augmentation on the device; it needs "
                                    f"augment=official (got augment={augment}), or data.decode=cpu")
    require(accelerator != "tpu", "data.decode=gpu decodes with nvjpeg on a CUDA device (or the CPU); on a TPU "
                                  "use data.decode=cpu")
    require(read(cfg, "augment.hflip", True), "data.decode=gpu always flips half the images, as the official "
                                              "pipeline does; augment.hflip=false needs data.decode=cpu")
    source = read(cfg, "data.source")
    require(source != "streaming", "data.decode=gpu reads image folders; data=streaming decodes in the loader's "
                                   "workers: use data.decode=cpu")


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
    check_weights("model.pretrained", pretrained)
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
    # Checked before Hydra creates the run directory under it, so a bad path costs one line.
    check_output_dirs(cfg, this_machine)
    if this_machine:
        root = read(cfg, "data.root", None)
        if read(cfg, "data.source", None) == "shapes" and root is not None and not os.path.isdir(os.path.expanduser(str(root))):
            # The embedded dataset is generated into data.root on first use.
            reason = unwritable_reason(str(root))
            require(reason is None, f"data.root={str(root)!r} cannot hold the generated shapes dataset: {reason}")


def check_output_dirs(cfg: DictConfig, this_machine: bool = True) -> None:
    """paths.log_dir, and Hydra's run or sweep folder when the config has its hydra node (the
    command line's check, before Hydra creates them). A sweep's folder is created where the
    sweep is started; its jobs' folders on the machines that run them."""
    # The command line checks a sweep portably (not on this machine) and a single run here.
    for key in ("paths.log_dir", "hydra.run.dir") if this_machine else ("hydra.sweep.dir",):
        folder = read(cfg, key, None)
        reason = unwritable_reason(str(folder)) if folder is not None else None
        require(reason is None, f"{key}={shown(str(folder))} cannot hold the run's outputs: {reason}")


def _check_callbacks(cfg: DictConfig) -> None:
    """The checkpoint callbacks' intervals and counts: Lightning would refuse them only when it
    builds the trainer, after the run folder and the data exist."""
    for name, node in (read(cfg, "callbacks", None) or {}).items():
        if not node or not str(node.get("_target_", "")).endswith("ModelCheckpoint"):
            continue
        for key in ("every_n_train_steps", "every_n_epochs"):
            if key in node:
                Integer(0, nullable=True, note=" (0 or null: never)").check(f"callbacks.{name}.{key}", node[key])
        if "save_top_k" in node:
            Integer(-1, note=" (-1: keep all)").check(f"callbacks.{name}.save_top_k", node["save_top_k"])


def _check_schedule(cfg: DictConfig) -> None:
    warmup, epochs = read(cfg, "optim.warmup_epochs"), read(cfg, "trainer.max_epochs", None)
    if is_int(epochs) and epochs > 0:
        require(
            warmup <= epochs,
            f"optim.warmup_epochs={shown(warmup)} is longer than the run (trainer.max_epochs={epochs}): the learning "
            "rate would never reach its peak; use at most the run's length (the paper warms up 5 of 360 epochs)",
        )


def check_config(cfg: DictConfig, this_machine: bool = True) -> None:
    """Raise ConfigError for the first value of a train config that cannot work."""
    check_schema_values(cfg, "train")
    _check_model(cfg, this_machine)
    _check_data(cfg, this_machine)
    _check_decode(cfg)
    _check_ra_level(cfg)
    check_trainer(cfg, this_machine)
    _check_schedule(cfg)
    _check_callbacks(cfg)
    _check_run(cfg, this_machine)


# --------------------------------------------------------------------------- eval, predict, export
def _check_weights_source(cfg: DictConfig, entry: str, this_machine: bool) -> None:
    check_schema_values(cfg, entry)
    check_output_dirs(cfg, this_machine)
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
    import importlib.util

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


# --------------------------------------------------------------------------- pack.py
def check_pack_config(cfg: DictConfig, this_machine: bool = True) -> None:
    """pack.py: the folder to pack, its layout, and where the shards go."""
    check_schema_values(cfg, "pack")
    if not this_machine:
        return
    source, root = read(cfg, "source"), os.path.expanduser(str(read(cfg, "root")))
    layout = "<root>/train/<wnid>/ and <root>/val/" if source == "imagenet" else "<root>/<class>/<images>"
    require(os.path.isdir(root), f"root={str(cfg.root)!r} does not exist or is not a folder; source={source} needs {layout}")
    for split in ("train", "val") if source == "imagenet" else ():
        require(os.path.isdir(os.path.join(root, split)), f"root={str(cfg.root)!r} has no {split}/ folder; source=imagenet needs {layout}")
    labels = read(cfg, "imagenet_val_labels", None)
    if labels is not None:
        check_file("imagenet_val_labels", labels, "give LOC_val_solution.csv or the devkit's ILSVRC2012_validation_ground_truth.txt")
    output = str(read(cfg, "output_dir"))
    require("://" not in output, f"output_dir={output!r}: pack.py writes to a local or shared folder; copy it to "
                                 "the object store afterwards (aws s3 sync, gcloud storage rsync, azcopy)")
    reason = unwritable_reason(output)
    require(reason is None, f"output_dir={output!r} cannot hold the shards: {reason}")


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
          "pack": check_pack_config, "update": check_update_config}
