"""What every entry point's config checks are built from: the one-line error, typed readers of
config values, the device and batch arithmetic, and the trainer check.

A bad override must cost the user one clear line naming the key, the value and what is allowed,
never a traceback from deep inside a training run twenty minutes later. The checks themselves are
in `nfnet.train_checks` (train.py) and `nfnet.entry_checks` (eval, predict, export).
Checks marked "this machine" (files that must exist, GPUs that must be present) are skipped when
a multirun is checked on the submitting machine, since its jobs may run elsewhere; every job
runs them again where it runs.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from nfnet.models import VARIANTS, get_variant


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


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# --------------------------------------------------------------------------- typed values
_ABSENT = object()


def read(cfg: DictConfig, key: str, default: Any = _ABSENT) -> Any:
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


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_int(cfg: DictConfig, key: str, minimum: int = 1, nullable: bool = False, note: str = "") -> int | None:
    value = read(cfg, key, None if nullable else _ABSENT)
    if value is None and nullable:
        return None
    ok = is_int(value) and value >= minimum
    require(ok, f"{key}={value!r} must be an integer >= {minimum}{' or null' if nullable else ''}{note}")
    return value


def read_number(
    cfg: DictConfig, key: str, low: float | None = None, high: float | None = None, *,
    low_open: bool = False, high_open: bool = False, nullable: str = "", note: str = "",
) -> float | None:
    """A number in [low, high] (ends open on request); `nullable` says what null means."""
    value = read(cfg, key, None if nullable else _ABSENT)
    if value is None and nullable:
        return None
    ok = is_number(value)
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


def read_choice(cfg: DictConfig, key: str, options, note: str = "") -> Any:
    value = read(cfg, key)
    require(value in tuple(options), f"{key}={value!r} is not allowed{note}; choose one of: {', '.join(map(str, options))}")
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
    elif is_int(devices):
        count = devices
    else:
        raise ConfigError(f"trainer.devices={devices!r} is not a device count; use an integer >= 1, a list like [0,1], or auto")
    require(count >= 1, f"trainer.devices={devices!r} must ask for at least one device (or auto)")
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


# --------------------------------------------------------------------------- trainer and data shared by all entry points
IMAGE_SIZE_STEP = 32  # NFNets downsample by 32; the official sizes are all multiples of it

# The datamodule's choices, repeated here so that checking a config does not import Lightning
# (seconds at every start); tests/test_validation.py keeps the two equal.
SOURCES = ("shapes", "imagenet", "imagefolder")
AUGMENTS = ("official", "basic", "none")


def check_trainer(cfg: DictConfig, this_machine: bool) -> None:
    accelerator = read_choice(cfg, "trainer.accelerator", ACCELERATORS)
    read_choice(cfg, "trainer.precision", [p for p in PRECISIONS if isinstance(p, str)] + [None])
    max_epochs = read(cfg, "trainer.max_epochs", None)
    require(
        max_epochs is None or (is_int(max_epochs) and (max_epochs >= 1 or max_epochs == -1)),
        f"trainer.max_epochs={max_epochs!r} must be an integer >= 1 (or -1 for no limit)",
    )
    read_int(cfg, "trainer.num_nodes")
    read_int(cfg, "trainer.accumulate_grad_batches")
    read_int(cfg, "trainer.log_every_n_steps")
    per_node = devices_per_node(cfg.trainer)
    if this_machine and accelerator in ("gpu", "cuda"):
        import torch

        available = torch.cuda.device_count()
        require(
            available > 0,
            f"trainer.accelerator={accelerator!r} but this machine has no CUDA GPU visible; use trainer=cpu "
            "(or trainer=ddp_cpu), or run where a GPU is",
        )
        require(
            per_node is None or per_node <= available,
            f"trainer.devices={cfg.trainer.devices!r} asks for {per_node} GPUs but this machine has {available}",
        )
    if this_machine and accelerator == "tpu":
        # Lightning would fail inside Trainer() with a traceback (or, with torch-xla installed
        # but no TPU, first wait on a cloud metadata server): say what is missing in one line.
        from nfnet.xla import tpu_unavailable_reason

        reason = tpu_unavailable_reason()
        require(reason is None, reason or "")
    total = read(cfg, "data.global_batch_size", None)
    # `devices: auto` counts this machine's devices, which say nothing about where a job will run.
    auto = cfg.trainer.get("devices", "auto") in ("auto", "-1", -1)
    replicas = world_size(cfg) if total is not None and (this_machine or not auto) else None
    if replicas:
        require(
            total % replicas == 0,
            f"data.global_batch_size={total} is not divisible by the {replicas} replicas (trainer.devices="
            f"{per_node} x num_nodes={cfg.trainer.num_nodes} x accumulate_grad_batches="
            f"{cfg.trainer.accumulate_grad_batches}); choose a multiple of {replicas}",
        )
