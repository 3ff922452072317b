"""Checkpoints that survive a kill, never hold NaN, and load without running code.

* `AtomicCheckpointIO` writes `<path>.tmp`, fsyncs it, renames it over `<path>` and fsyncs the
  folder: a process killed while saving (preemption, OOM killer, Ctrl-C twice) leaves the
  previous checkpoint whole, never a truncated file that a resume would choke on.
* `FiniteCheckpoints` checks before any checkpoint is written that weights, EMA and optimizer
  state are all finite; otherwise no file is written and the run stops.
* `newest_checkpoint` is what `ckpt_path=last` and a resumed wandb run mean, and
  `find_resume_checkpoint` what `resume=true` means: the newest checkpoint of this run directory,
  or of the newest earlier run of the same task.
* `checkpoint_bytes_estimate` / `check_disk_space`: refuse to start a run whose first
  checkpoint could not be written.

Loading is always `torch.load(..., weights_only=True)` (Lightning's `trainer.fit(weights_only=True)`):
a checkpoint is a user-supplied file, and a pickle that names anything but tensors and
primitives is refused before any of it runs.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from nfnet.data.folder_files import fsync_dir
from nfnet.errors import NonFiniteCheckpointError

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to `path` atomically: a reader sees the old file or the new one, never a part."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + TMP_SUFFIX
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A failed write (disk full, a refused object) must not leave a stray temp file behind.
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(folder)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with local writes made atomic and durable (see module doc)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            # Object stores (s3://, gs://) have their own all-or-nothing uploads: Lightning's path.
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, os.fspath(path))


# --------------------------------------------------------------------------- finiteness
def non_finite_keys(named: dict[str, Any], limit: int = 5) -> list[str]:
    """Names (dotted, up to `limit`) of the tensors in a nested dict that hold NaN or Inf.

    One device round trip for the common all-finite case: per-tensor flags are stacked and read once.
    """
    names, tensors = [], []

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() or obj.is_complex():
                names.append(prefix)
                tensors.append(obj)
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(f"{prefix}.{i}" if prefix else str(i), value)

    walk("", named)
    if not tensors:
        return []
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    bad: list[int] = []
    for device, idx in by_device.items():
        flags = torch.stack([torch.isfinite(tensors[i]).all() for i in idx]).cpu()
        bad += [idx[j] for j in torch.nonzero(~flags).flatten().tolist()]
    return [names[i] for i in sorted(bad)[:limit]]


def check_finite(checkpoint: dict[str, Any], where: str = "checkpoint") -> None:
    """Raise NonFiniteCheckpointError if the weights or optimizer state hold NaN/Inf."""
    parts = {k: checkpoint[k] for k in ("state_dict", "optimizer_states") if k in checkpoint}
    bad = non_finite_keys(parts)
    if bad:
        raise NonFiniteCheckpointError(
            f"refusing to write a {where} with non-finite values (NaN/Inf in {', '.join(bad)}); "
            "the previous checkpoint is kept. Lower the learning rate or check the data."
        )


class FiniteCheckpoints(pl.Callback):
    """Refuses to write weights or optimizer state holding NaN/Inf (every rank checks the same
    values, so all of them stop together); the previous checkpoint stays in place."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        check_finite(checkpoint)


# --------------------------------------------------------------------------- resume=true
def _checkpoints_in(folder: str) -> list[str]:
    return [p for p in glob.glob(os.path.join(folder, "*.ckpt")) if os.path.isfile(p)]


def newest_checkpoint(folder: str) -> str | None:
    """The newest `*.ckpt` of a checkpoint folder (by modification time), or None."""
    found = _checkpoints_in(folder)
    return max(found, key=os.path.getmtime) if found else None


def find_resume_checkpoint(checkpoint_dir: str, runs_root: str | None = None) -> str | None:
    """The newest `*.ckpt` (by modification time) of this run, else of the newest earlier run.

    `checkpoint_dir` is `<run dir>/checkpoints`. The earlier runs are the other run directories
    in `runs_root` (Hydra's `<log_dir>/<task>/runs`), searched only when the run directory is
    one of them: a run placed elsewhere (`hydra.run.dir=...`) must not pick up whatever
    checkpoints happen to lie beside it. Temp files of interrupted saves (`*.ckpt.tmp`) are
    never picked.
    """
    own = newest_checkpoint(checkpoint_dir)
    if own:
        return own
    run_dir = os.path.dirname(os.path.abspath(checkpoint_dir))
    parent = os.path.dirname(run_dir)
    if runs_root is None or parent != os.path.abspath(runs_root):
        return None
    found: list[str] = []
    for sibling in glob.glob(os.path.join(parent, "*")):
        if os.path.abspath(sibling) != run_dir and os.path.isdir(sibling):
            found += _checkpoints_in(os.path.join(sibling, os.path.basename(checkpoint_dir)))
    return max(found, key=os.path.getmtime) if found else None


def remove_stale_temp_files(checkpoint_dir: str) -> list[str]:
    """Delete `*.ckpt.tmp` left by a save that was killed; returns what was removed."""
    removed = []
    for path in glob.glob(os.path.join(checkpoint_dir, "*" + TMP_SUFFIX)):
        try:
            os.remove(path)
            removed.append(path)
        except OSError:
            pass
    return removed


# --------------------------------------------------------------------------- disk space
def checkpoint_bytes_estimate(module: torch.nn.Module) -> int:
    """Bytes of one checkpoint, roughly: the module's parameters and buffers (raw weights and
    EMA copy both live there) plus one momentum buffer per trainable parameter."""
    state = sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))
    momentum = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return state + momentum


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def free_bytes(path: str) -> int | None:
    if "://" in path:
        return None  # object stores: nothing to know ahead
    try:
        return shutil.disk_usage(_existing_ancestor(path)).free
    except OSError:
        return None


def check_disk_space(checkpoint_dir: str, per_checkpoint: int, files: int) -> str | None:
    """Why checkpoints cannot fit under `checkpoint_dir`, or None. `files` checkpoint files can
    exist at once, plus the temp copy of the one being written."""
    free = free_bytes(checkpoint_dir)
    if free is None:
        return None
    needed = per_checkpoint * (files + 1)
    if free >= needed:
        return None
    mb = 1024 * 1024
    return (
        f"not enough disk space for checkpoints in {checkpoint_dir}: about {needed / mb:.0f} MiB needed "
        f"({files} checkpoint file(s) + 1 being written, ~{per_checkpoint / mb:.1f} MiB each: weights, EMA "
        f"and momentum), {free / mb:.0f} MiB free; free some space or point paths.log_dir elsewhere"
    )

