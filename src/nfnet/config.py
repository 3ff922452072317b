"""Config resolvers and the checks that run on a composed config before any work starts.

A bad override must cost the user one clear line naming the key, the value and what is allowed,
never a traceback from deep inside a training run twenty minutes later. `check_config` covers
`train.py`; the eval/predict/export entry points have theirs in `nfnet.entry_checks`.
Checks marked "this machine" (files that must exist, GPUs that must be present) are skipped when
a multirun is checked on the submitting machine, since its jobs may run elsewhere; every job
runs them again where it runs.
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from nfnet.models import VARIANTS, get_variant
from nfnet.models.activations import GAMMAS, GELU_APPROXIMATIONS


class ConfigError(ValueError):
    """A config value that cannot work; the message is the one line shown to the user."""


def _variant_field(name: str, field: str):
    if name not in VARIANTS:
        raise ConfigError(f"model.name={name!r} is not a known NFNet; choose one of: {', '.join(VARIANTS)}")
    known = [f.name for f in fields(get_variant(name))]
    if field not in known:
        raise ConfigError(f"the variant table has no field {field!r}; it has: {', '.join(known)}")
    return getattr(get_variant(name), field)


def register_resolvers() -> None:
    """`${variant:nfnet_f0,train_size}` reads the variant table, the one home of those numbers."""
    if not OmegaConf.has_resolver("variant"):
        OmegaConf.register_new_resolver("variant", _variant_field)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# --------------------------------------------------------------------------- typed values
_ABSENT = object()


def _value(cfg: DictConfig, key: str, default: Any = _ABSENT) -> Any:
    """The resolved value at a dotted key; `???` becomes an error that names the key."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    # `in` is False for a `???` value too, so that case is asked first.
    missing = isinstance(parent, DictConfig) and OmegaConf.is_missing(parent, leaf)
    if not missing and (not isinstance(parent, DictConfig) or leaf not in parent):
        if default is _ABSENT:
            raise ConfigError(f"{key} is missing from the config; add it with +{key}=<value>")
        return default
    if missing:
        raise ConfigError(f"{key} is required here (it is ??? in the config); set it on the command line: {key}=<value>")
    return parent[leaf]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(cfg: DictConfig, key: str, minimum: int = 1, nullable: bool = False, note: str = "") -> int | None:
    value = _value(cfg, key, None if nullable else _ABSENT)
    if value is None and nullable:
        return None
    ok = _is_int(value) and value >= minimum
    _require(ok, f"{key}={value!r} must be an integer >= {minimum}{' or null' if nullable else ''}{note}")
    return value


def _number(
    cfg: DictConfig, key: str, low: float | None = None, high: float | None = None, *,
    low_open: bool = False, high_open: bool = False, nullable: str = "", note: str = "",
) -> float | None:
    """A number in [low, high] (ends open on request); `nullable` says what null means."""
    value = _value(cfg, key, None if nullable else _ABSENT)
    if value is None and nullable:
        return None
    ok = _is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            allowed = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            allowed = f"{'>' if low_open else '>='} {low}"
        else:
            allowed = f"{'<' if high_open else '<='} {high}"
        null = f", or null {nullable}" if nullable else ""
        raise ConfigError(f"{key}={value!r} must be a number {allowed}{note}{null}")
    return value


def _choice(cfg: DictConfig, key: str, options, note: str = "") -> Any:
    value = _value(cfg, key)
    _require(value in tuple(options), f"{key}={value!r} is not allowed{note}; choose one of: {', '.join(map(str, options))}")
    return value


# --------------------------------------------------------------------------- devices
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")
PRECISIONS = (
    "32-true", "32", 32, "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "64", 64,
    "transformer-engine", "transformer-engine-float16", None,
)


def _machine_devices(accelerator: str) -> int | None:
    """What `devices: auto` means on this machine, as Lightning counts it; None if unknown here."""
    import torch

    if accelerator in ("cpu", "mps"):
        return 1
    if accelerator in ("gpu", "cuda"):
        return torch.cuda.device_count()
    if accelerator == "auto":
        return torch.cuda.device_count() or 1
    return None  # a TPU host's device count needs torch-xla, which may not be installed here


def devices_per_node(trainer: DictConfig) -> int | None:
    """Processes per node that `trainer.devices` asks for; None where only the device knows."""
    devices = trainer.get("devices", "auto")
    accelerator = trainer.get("accelerator", "auto")
    if isinstance(devices, (list, ListConfig)):
        count = len(devices)
    elif isinstance(devices, str) and devices.strip() not in ("auto", "-1"):
        parts = [p.strip() for p in devices.split(",") if p.strip()]
        if not all(p.isdigit() for p in parts) or not parts:
            raise ConfigError(
                f"trainer.devices={devices!r} is not a device count or list; use an integer, a list like [0,1], or auto"
            )
        count = len(parts) if "," in devices else int(parts[0])
    elif devices in ("auto", "-1", -1):
        return _machine_devices(accelerator)
    elif _is_int(devices):
        count = devices
    else:
        raise ConfigError(f"trainer.devices={devices!r} is not a device count; use an integer >= 1, a list like [0,1], or auto")
    _require(count >= 1, f"trainer.devices={devices!r} must ask for at least one device (or auto)")
    return count


def world_size(cfg: DictConfig) -> int | None:
    """Replicas that split one optimizer step's batch: devices x nodes x accumulation."""
    per_node = devices_per_node(cfg.trainer)
    if per_node is None:
        return None
    return per_node * cfg.trainer.get("num_nodes", 1) * cfg.trainer.get("accumulate_grad_batches", 1)


def per_device_batch_size(cfg: DictConfig) -> int:
    """data.batch_size, or data.global_batch_size split over the replicas when that is set."""
    total = cfg.data.get("global_batch_size")
    if total is None:
        return cfg.data.batch_size
    replicas = world_size(cfg)
    if replicas is None:
        raise ConfigError(
            f"data.global_batch_size={total} needs the device count, which this machine cannot tell for "
            f"trainer.accelerator={cfg.trainer.accelerator!r} with devices=auto; set trainer.devices to a number"
        )
    return total // replicas


# --------------------------------------------------------------------------- train.py
IMAGE_SIZE_STEP = 32  # NFNets downsample by 32; the official sizes are all multiples of it


def _check_model(cfg: DictConfig, this_machine: bool) -> None:
    model_name = _value(cfg, "model.name")
    _require(
        model_name in VARIANTS,
        f"model.name={model_name!r} is not a known NFNet; choose one of: {', '.join(VARIANTS)}",
    )
    _number(cfg, "model.drop_rate", 0, 1, high_open=True)
    _number(cfg, "model.stochdepth_rate", 0, 1, high_open=True)
    _choice(cfg, "model.activation", sorted(GAMMAS))
    _choice(cfg, "model.gelu_approximate", GELU_APPROXIMATIONS)
    pretrained = _value(cfg, "model.pretrained", None)
    if pretrained is not None and this_machine:
        _require(
            os.path.isfile(os.path.expanduser(str(pretrained))),
            f"model.pretrained={pretrained!r} is not a file; give a DeepMind *_haiku.npz, a timm or safetensors "
            "weights file, or a checkpoint written by train.py",
        )


# The datamodule's choices, repeated here so that checking a config does not import Lightning
# (seconds at every start); tests/test_validation.py keeps the two equal.
SOURCES = ("shapes", "imagenet", "imagefolder")
AUGMENTS = ("official", "basic", "none")


def _check_data(cfg: DictConfig, this_machine: bool) -> None:
    source = _choice(cfg, "data.source", SOURCES)
    for key in ("data.train_size", "data.test_size"):
        size = _int(cfg, key)
        _require(
            size % IMAGE_SIZE_STEP == 0,
            f"{key}={size} breaks the official padding: NFNets downsample by {IMAGE_SIZE_STEP} and the official "
            f"TF-'SAME' padding and pooling assume sizes that are multiples of {IMAGE_SIZE_STEP} "
            f"(e.g. {max(IMAGE_SIZE_STEP, size // IMAGE_SIZE_STEP * IMAGE_SIZE_STEP)} or "
            f"{(size // IMAGE_SIZE_STEP + 1) * IMAGE_SIZE_STEP})",
        )
    _int(cfg, "data.eval_pad", minimum=0, note=" (pixels added before the eval centre crop; the official value is 32)")
    _int(cfg, "data.batch_size", note=" (examples per device)")
    _int(cfg, "data.eval_batch_size", nullable=True)
    _int(cfg, "data.global_batch_size", nullable=True, note=" (examples per optimizer step over all devices)")
    _int(cfg, "data.num_workers", minimum=0)
    _number(cfg, "data.max_bad_fraction", 0, 1)
    if source == "imagefolder":
        _number(cfg, "data.val_fraction", 0, 1, low_open=True, high_open=True)
    root = _value(cfg, "data.root", None)
    if source == "shapes":
        return
    layout = "<root>/train/<class>/ and <root>/val/<class>/" if source == "imagenet" else "<root>/<class>/<images>"
    _require(root is not None, f"data.root is required for data={source}: the folder laid out as {layout}")
    if this_machine:
        path = os.path.expanduser(str(root))
        _require(os.path.isdir(path), f"data.root={str(root)!r} does not exist or is not a folder; data={source} needs {layout}")
        if source == "imagenet":
            for split in ("train", "val"):
                _require(
                    os.path.isdir(os.path.join(path, split)),
                    f"data.root={str(root)!r} has no {split}/ folder; data=imagenet needs {layout}",
                )
        for folder in [os.path.join(path, "train"), os.path.join(path, "val")] if source == "imagenet" else [path]:
            _require(
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

    name = _choice(cfg, "augment.name", AUGMENTS)
    if name == "basic" and "crop_min_area" in cfg.augment:
        _number(cfg, "augment.crop_min_area", 0, 1, low_open=True, note=" (the smallest crop, as a fraction of the image)")
    if name != "official":
        return
    level = _value(cfg, "augment.ra_level", None)
    if level is not None:
        ok = _is_int(level) and level >= 0
        if ok:
            layers, magnitude = parse_ra_level(level)
            # The official scale tops out at 10 but the F3+ recipes use 15 (extrapolated);
            # far beyond that the ops' arguments stop making sense.
            ok = layers >= 1 and 0 <= magnitude <= RA_MAX_MAGNITUDE
        _require(
            ok,
            f"augment.ra_level={level!r} is not a RandAugment level: <layers><magnitude as 2 digits> such as "
            f"405 (4 layers at magnitude 5; magnitude <= {RA_MAX_MAGNITUDE:g}), or null for none",
        )
    _number(cfg, "augment.mixup_alpha", 0, low_open=True)


def _check_optim(cfg: DictConfig) -> None:
    _number(cfg, "optim.base_lr", 0, low_open=True, note=" (the LR at batch 256; it scales with the global batch)")
    _int(cfg, "optim.reference_batch")
    _number(cfg, "optim.momentum", 0, 1, high_open=True)
    _number(cfg, "optim.weight_decay", 0)
    _number(cfg, "optim.warmup_epochs", 0)
    _number(cfg, "optim.end_lr", 0)
    _number(cfg, "optim.label_smoothing", 0, 1, high_open=True)
    _number(cfg, "optim.agc.clipping", 0, low_open=True, nullable="to disable AGC", note=" (the AGC lambda)")
    _number(cfg, "optim.agc.eps", 0, low_open=True)
    _number(cfg, "optim.ema.decay", 0, 1, low_open=True, high_open=True, nullable="to disable EMA")
    skip = _value(cfg, "optim.skip_nonfinite", True)
    _require(isinstance(skip, bool), f"optim.skip_nonfinite={skip!r} must be true or false")
    if "max_consecutive_skips" in cfg.optim:
        _int(cfg, "optim.max_consecutive_skips", nullable=True, note=" (non-finite steps in a row that stop the run)")


def _check_trainer(cfg: DictConfig, this_machine: bool) -> None:
    accelerator = _choice(cfg, "trainer.accelerator", ACCELERATORS)
    _choice(cfg, "trainer.precision", [p for p in PRECISIONS if isinstance(p, str)] + [None])
    max_epochs = _value(cfg, "trainer.max_epochs", None)
    _require(
        max_epochs is None or (_is_int(max_epochs) and (max_epochs >= 1 or max_epochs == -1)),
        f"trainer.max_epochs={max_epochs!r} must be an integer >= 1 (or -1 for no limit)",
    )
    _int(cfg, "trainer.num_nodes")
    _int(cfg, "trainer.accumulate_grad_batches")
    _int(cfg, "trainer.log_every_n_steps")
    per_node = devices_per_node(cfg.trainer)
    if this_machine and accelerator in ("gpu", "cuda"):
        import torch

        available = torch.cuda.device_count()
        _require(
            available > 0,
            f"trainer.accelerator={accelerator!r} but this machine has no CUDA GPU visible; use trainer=cpu "
            "(or trainer=ddp_cpu), or run where a GPU is",
        )
        _require(
            per_node is None or per_node <= available,
            f"trainer.devices={cfg.trainer.devices!r} asks for {per_node} GPUs but this machine has {available}",
        )
    if this_machine and accelerator == "tpu":
        # Lightning would fail inside Trainer() with a traceback (or, with torch-xla installed
        # but no TPU, first wait on a cloud metadata server): say what is missing in one line.
        from nfnet.xla import tpu_unavailable_reason

        reason = tpu_unavailable_reason()
        _require(reason is None, reason or "")
    total = _value(cfg, "data.global_batch_size", None)
    # `devices: auto` counts this machine's devices, which say nothing about where a job will run.
    auto = cfg.trainer.get("devices", "auto") in ("auto", "-1", -1)
    replicas = world_size(cfg) if total is not None and (this_machine or not auto) else None
    if replicas:
        _require(
            total % replicas == 0,
            f"data.global_batch_size={total} is not divisible by the {replicas} replicas (trainer.devices="
            f"{per_node} x num_nodes={cfg.trainer.num_nodes} x accumulate_grad_batches="
            f"{cfg.trainer.accumulate_grad_batches}); choose a multiple of {replicas}",
        )


def _check_run(cfg: DictConfig, this_machine: bool) -> None:
    # A config that cannot run without a value (experiment=finetune needs weights) lists it in
    # `requires`: a `???` would not do, since merging `???` over a default keeps the default.
    for key in cfg.get("requires") or []:
        _require(
            _value(cfg, key, None) is not None,
            f"{key} is required by this config (task {cfg.get('task_name')}); set it: {key}=<value>",
        )
    seed = _value(cfg, "seed", None)
    _require(seed is None or _is_int(seed), f"seed={seed!r} must be an integer, or null for an unseeded run")
    ckpt = _value(cfg, "ckpt_path", None)
    if ckpt is not None and ckpt not in ("last", "hpc") and this_machine:
        _require(
            os.path.isfile(os.path.expanduser(str(ckpt))),
            f"ckpt_path={ckpt!r} is not a file; give a checkpoint written by train.py, `last` (this run "
            "directory's latest) or null",
        )
    resume = _value(cfg, "resume", False)
    _require(isinstance(resume, bool), f"resume={resume!r} must be true or false")
    _require(
        not (resume and ckpt is not None),
        f"resume=true finds the checkpoint by itself, but ckpt_path={ckpt!r} is set too; give one of them",
    )
    if this_machine:
        # Checked before Hydra creates the run directory under it, so a bad path costs one line.
        log_dir = _value(cfg, "paths.log_dir", None)
        reason = _unwritable_reason(str(log_dir)) if log_dir is not None else None
        _require(reason is None, f"paths.log_dir={str(log_dir)!r} cannot hold the run's outputs: {reason}")
        if _value(cfg, "data.source", None) == "shapes" and _value(cfg, "data.root", None) is not None:
            # The embedded dataset is generated into data.root on first use.
            reason = _unwritable_reason(str(cfg.data.root))
            _require(
                reason is None or os.path.isdir(os.path.expanduser(str(cfg.data.root))),
                f"data.root={str(cfg.data.root)!r} cannot hold the generated shapes dataset: {reason}",
            )


def check_config(cfg: DictConfig, this_machine: bool = True) -> None:
    """Raise ConfigError for the first value of a train config that cannot work."""
    _check_model(cfg, this_machine)
    _check_data(cfg, this_machine)
    _check_augment(cfg)
    _check_optim(cfg)
    _check_trainer(cfg, this_machine)
    _check_run(cfg, this_machine)
