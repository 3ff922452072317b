"""The checks of train.py's config, run before any work starts (see nfnet.config for the rules
every check follows). Like `nfnet.config`, this module imports neither Lightning nor the model
code beyond the variant table, so that a bad command line is answered in about a second.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig

from nfnet.config import (
    AUGMENTS,
    IMAGE_SIZE_STEP,
    SOURCES,
    check_trainer,
    is_int,
    read,
    read_choice,
    read_int,
    read_number,
    require,
)
from nfnet.models import VARIANTS
from nfnet.models.activations import GAMMAS, GELU_APPROXIMATIONS


def _check_model(cfg: DictConfig, this_machine: bool) -> None:
    model_name = read(cfg, "model.name")
    require(
        model_name in VARIANTS,
        f"model.name={model_name!r} is not a known NFNet; choose one of: {', '.join(VARIANTS)}",
    )
    read_number(cfg, "model.drop_rate", 0, 1, high_open=True)
    read_number(cfg, "model.stochdepth_rate", 0, 1, high_open=True)
    read_choice(cfg, "model.activation", sorted(GAMMAS))
    read_choice(cfg, "model.gelu_approximate", GELU_APPROXIMATIONS)
    pretrained = read(cfg, "model.pretrained", None)
    if pretrained is not None and this_machine:
        require(
            os.path.isfile(os.path.expanduser(str(pretrained))),
            f"model.pretrained={pretrained!r} is not a file; give a DeepMind *_haiku.npz, a timm or safetensors "
            "weights file, or a checkpoint written by train.py",
        )


def _check_data(cfg: DictConfig, this_machine: bool) -> None:
    source = read_choice(cfg, "data.source", SOURCES)
    for key in ("data.train_size", "data.test_size"):
        size = read_int(cfg, key)
        require(
            size % IMAGE_SIZE_STEP == 0,
            f"{key}={size} breaks the official padding: NFNets downsample by {IMAGE_SIZE_STEP} and the official "
            f"TF-'SAME' padding and pooling assume sizes that are multiples of {IMAGE_SIZE_STEP} "
            f"(e.g. {max(IMAGE_SIZE_STEP, size // IMAGE_SIZE_STEP * IMAGE_SIZE_STEP)} or "
            f"{(size // IMAGE_SIZE_STEP + 1) * IMAGE_SIZE_STEP})",
        )
    read_int(cfg, "data.eval_pad", minimum=0, note=" (pixels added before the eval centre crop; the official value is 32)")
    read_int(cfg, "data.batch_size", note=" (examples per device)")
    read_int(cfg, "data.eval_batch_size", nullable=True)
    read_int(cfg, "data.global_batch_size", nullable=True, note=" (examples per optimizer step over all devices)")
    read_int(cfg, "data.num_workers", minimum=0)
    read_number(cfg, "data.max_bad_fraction", 0, 1)
    if source == "imagefolder":
        read_number(cfg, "data.val_fraction", 0, 1, low_open=True, high_open=True)
    root = read(cfg, "data.root", None)
    if source == "shapes":
        return
    layout = "<root>/train/<class>/ and <root>/val/<class>/" if source == "imagenet" else "<root>/<class>/<images>"
    require(root is not None, f"data.root is required for data={source}: the folder laid out as {layout}")
    if this_machine:
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


def _unwritable_reason(path: str) -> str | None:
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


def _check_augment(cfg: DictConfig) -> None:
    from nfnet.data.randaugment import MAX_LEVEL, parse_ra_level

    RA_MAX_MAGNITUDE = 3 * MAX_LEVEL

    name = read_choice(cfg, "augment.name", AUGMENTS)
    if name == "basic" and "crop_min_area" in cfg.augment:
        read_number(cfg, "augment.crop_min_area", 0, 1, low_open=True, note=" (the smallest crop, as a fraction of the image)")
    if name != "official":
        return
    level = read(cfg, "augment.ra_level", None)
    if level is not None:
        ok = is_int(level) and level >= 0
        if ok:
            layers, magnitude = parse_ra_level(level)
            # The official scale tops out at 10 but the F3+ recipes use 15 (extrapolated);
            # far beyond that the ops' arguments stop making sense.
            ok = layers >= 1 and 0 <= magnitude <= RA_MAX_MAGNITUDE
        require(
            ok,
            f"augment.ra_level={level!r} is not a RandAugment level: <layers><magnitude as 2 digits> such as "
            f"405 (4 layers at magnitude 5; magnitude <= {RA_MAX_MAGNITUDE:g}), or null for none",
        )
    read_number(cfg, "augment.mixup_alpha", 0, low_open=True)


def _check_optim(cfg: DictConfig) -> None:
    read_number(cfg, "optim.base_lr", 0, low_open=True, note=" (the LR at batch 256; it scales with the global batch)")
    read_int(cfg, "optim.reference_batch")
    read_number(cfg, "optim.momentum", 0, 1, high_open=True)
    read_number(cfg, "optim.weight_decay", 0)
    read_number(cfg, "optim.warmup_epochs", 0)
    read_number(cfg, "optim.end_lr", 0)
    read_number(cfg, "optim.label_smoothing", 0, 1, high_open=True)
    read_number(cfg, "optim.agc.clipping", 0, low_open=True, nullable="to disable AGC", note=" (the AGC lambda)")
    read_number(cfg, "optim.agc.eps", 0, low_open=True)
    read_number(cfg, "optim.ema.decay", 0, 1, low_open=True, high_open=True, nullable="to disable EMA")
    skip = read(cfg, "optim.skip_nonfinite", True)
    require(isinstance(skip, bool), f"optim.skip_nonfinite={skip!r} must be true or false")
    if "max_consecutive_skips" in cfg.optim:
        read_int(cfg, "optim.max_consecutive_skips", nullable=True, note=" (non-finite steps in a row that stop the run)")


def _check_run(cfg: DictConfig, this_machine: bool) -> None:
    # A config that cannot run without a value (experiment=finetune needs weights) lists it in
    # `requires`: a `???` would not do, since merging `???` over a default keeps the default.
    for key in cfg.get("requires") or []:
        require(
            read(cfg, key, None) is not None,
            f"{key} is required by this config (task {cfg.get('task_name')}); set it: {key}=<value>",
        )
    seed = read(cfg, "seed", None)
    require(seed is None or is_int(seed), f"seed={seed!r} must be an integer, or null for an unseeded run")
    ckpt = read(cfg, "ckpt_path", None)
    if ckpt is not None and ckpt not in ("last", "hpc") and this_machine:
        require(
            os.path.isfile(os.path.expanduser(str(ckpt))),
            f"ckpt_path={ckpt!r} is not a file; give a checkpoint written by train.py, `last` (this run "
            "directory's latest) or null",
        )
    resume = read(cfg, "resume", False)
    require(isinstance(resume, bool), f"resume={resume!r} must be true or false")
    require(
        not (resume and ckpt is not None),
        f"resume=true finds the checkpoint by itself, but ckpt_path={ckpt!r} is set too; give one of them",
    )
    if this_machine:
        # Checked before Hydra creates the run directory under it, so a bad path costs one line.
        log_dir = read(cfg, "paths.log_dir", None)
        reason = _unwritable_reason(str(log_dir)) if log_dir is not None else None
        require(reason is None, f"paths.log_dir={str(log_dir)!r} cannot hold the run's outputs: {reason}")
        if read(cfg, "data.source", None) == "shapes" and read(cfg, "data.root", None) is not None:
            # The embedded dataset is generated into data.root on first use.
            reason = _unwritable_reason(str(cfg.data.root))
            require(
                reason is None or os.path.isdir(os.path.expanduser(str(cfg.data.root))),
                f"data.root={str(cfg.data.root)!r} cannot hold the generated shapes dataset: {reason}",
            )


def check_config(cfg: DictConfig, this_machine: bool = True) -> None:
    """Raise ConfigError for the first value of a train config that cannot work."""
    _check_model(cfg, this_machine)
    _check_data(cfg, this_machine)
    _check_augment(cfg)
    _check_optim(cfg)
    check_trainer(cfg, this_machine)
    _check_run(cfg, this_machine)
