"""What the config asks of the machine: device counts as Lightning reads them, the batch split
over replicas, the trainer's values, and whether a TPU is there.

Checks marked "this machine" (GPUs that must be present, a TPU) are skipped when a multirun is
checked on the submitting machine, since its jobs may run elsewhere; every job runs them again
where it runs.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from omegaconf import DictConfig, ListConfig

from nfnet.app.values import is_int, read, read_choice, read_int, require
from nfnet.errors import ConfigError

# The torch release the torch-xla wheels are built against; the TPU install must pin both
# (scripts/env_xla.sh and docs/TPU.md use the same numbers).
TORCH_XLA_PINS = "torch==2.9.0 torchvision==0.24.0 'torch-xla[tpu]==2.9.0'"
INSTALL_HINT = f"pip install {TORCH_XLA_PINS} -e '.[tpu]'"


# --------------------------------------------------------------------------- is there a TPU?
def tpu_unavailable_reason() -> str | None:
    """None when this machine can run `trainer=tpu`, else one line saying why not and what to do.

    Counts TPU chips on the PCI bus (what Lightning's accelerator ends up counting) without
    asking the GCE metadata server, so on an ordinary machine this answers at once instead of
    waiting on a network request that torch-xla sends without a timeout.
    """
    if importlib.util.find_spec("torch_xla") is None:
        return (
            "trainer=tpu needs torch-xla, which is not installed: on a Cloud TPU VM run "
            f"`{INSTALL_HINT}` (torch-xla only loads into the torch it was built for; docs/TPU.md)"
        )
    # Importing torch_xla picks a PJRT device and logs which ("Defaulting to PJRT_DEVICE=CPU")
    # on the root logger; that line would sit beside, and contradict, the one given here.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        from torch_xla._internal import tpu
    except Exception as error:  # a torch-xla built for another torch fails here, in varied ways
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        return (
            f"torch-xla is installed but does not load with torch {torch.__version__} ({first_line}); "
            f"reinstall with `{INSTALL_HINT}`"
        )
    finally:
        root.setLevel(level)
    if tpu.num_available_chips() == 0:
        return (
            "trainer=tpu found no TPU on this machine (no TPU chip on the PCI bus): run it on a Cloud "
            "TPU VM with PJRT_DEVICE=TPU, or pick trainer=cpu / trainer=gpu here; PJRT_DEVICE=CPU "
            "only serves the XLA tests (`pytest -m xla`, docs/TPU.md)"
        )
    return None



# --------------------------------------------------------------------------- devices
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")
PRECISIONS = (
    "32-true", "32", 32, "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "64", 64,
    "transformer-engine", "transformer-engine-float16", None,
)


def _machine_devices(accelerator: str) -> int | None:
    """What `devices: auto` means on this machine, as Lightning counts it; None if unknown here."""
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



# --------------------------------------------------------------------------- the trainer
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
