"""Checkpoints that survive a kill, never hold NaN, and load without running code.

* `AtomicCheckpointIO` writes each checkpoint to a temp file of its own (`<name>.<random>.tmp`),
  fsyncs it, renames it over `<name>` and fsyncs the folder: a process killed while saving
  (preemption, OOM killer, Ctrl-C twice) leaves the previous checkpoint whole, and two processes
  saving the same name never write into one file. A full disk stops the run with one line
  (CheckpointWriteError), the previous file kept.
* `FiniteCheckpoints` checks before any checkpoint is written that weights, EMA and optimizer
  state are all finite; otherwise no file is written and the run stops.
* `newest_whole` is what `ckpt_path=last` and `resume=true` take among the candidates
  `checkpoints_in` / `resume_candidates` list: the newest checkpoint that is whole (not cut short,
  not missing a record, holding the full training state), passing over damaged ones. A run's
  checkpoints include the `hpc_ckpt_N.ckpt` that Lightning's SLURM requeue writes into its root.
* `checkpoint_bytes_estimate` / `check_disk_space`: refuse to start a run whose first
  checkpoint could not be written.

Loading is always `torch.load(..., weights_only=True)` (Lightning's `trainer.fit(weights_only=True)`):
a checkpoint is a user-supplied file, and a pickle that names anything but tensors and
primitives is refused before any of it runs.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import pickle
import secrets
import shutil
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from nfnet.data.folder_files import fsync_dir
from nfnet.errors import CheckpointWriteError, NonFiniteCheckpointError
from nfnet.inference.torch_files import TRAINING_STATE, damage

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to `path` atomically: a reader sees the old file or the new one, never a part,
    whatever other processes save to the same path meanwhile.

    Raises CheckpointWriteError when the disk (or the quota) is full; the old file is kept."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # A name of its own per write: two writers of one path (a requeued copy of a job, a restart
    # whose predecessor still runs) would otherwise write into, and rename away, each other's file.
    # Not mkstemp: its 0600 mode would outlive the rename, and the umask's is what users expect.
    tmp = f"{path}.{secrets.token_hex(6)}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        # A failed write (disk full, a refused object) must not leave a stray temp file behind.
        if os.path.exists(tmp):
            os.remove(tmp)
        if _out_of_space(error):
            raise CheckpointWriteError(_no_space_message(path, obj)) from None
        raise
    fsync_dir(folder)


def _out_of_space(error: BaseException | None) -> bool:
    # torch.save reports a failed write as the OSError itself or as a RuntimeError raised while
    # handling it; either way the OSError is in the chain.
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _no_space_message(path: str, obj: Any) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    free = free_bytes(folder)
    mb = 1024 * 1024
    kept = f"the previous {os.path.basename(path)} is kept" if os.path.exists(path) else \
        f"no earlier {os.path.basename(path)} existed"
    return (
        f"no space left on the device to write {path}: it needs about {_tensor_bytes(obj) / mb:.0f} MiB, "
        f"{'an unknown amount' if free is None else f'{free / mb:.0f} MiB'} is free in {folder}; {kept}. "
        "Free some space (or point paths.log_dir elsewhere), then continue with resume=true"
    )


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
            "nothing was written. Lower the learning rate or check the data."
        )


class FiniteCheckpoints(pl.Callback):
    """Refuses to write weights or optimizer state holding NaN/Inf (every rank checks the same
    values, so all of them stop together); the previous checkpoint stays in place."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        check_finite(checkpoint)


# --------------------------------------------------------------------------- resume=true
# Lightning's SLURM requeue (SIGUSR1, e.g. `sbatch --signal=USR1@90`) saves these into
# trainer.default_root_dir, the run directory above its checkpoints/ folder.
HPC_CHECKPOINTS = "hpc_ckpt_*.ckpt"


def checkpoints_in(checkpoint_dir: str) -> list[str]:
    """A run's checkpoints, newest (by modification time) first: the `*.ckpt` files of its
    checkpoint folder and the `hpc_ckpt_N.ckpt` a SLURM requeue wrote into the run directory."""
    run_dir = os.path.dirname(os.path.abspath(checkpoint_dir))
    found = glob.glob(os.path.join(glob.escape(checkpoint_dir), "*.ckpt"))
    found += glob.glob(os.path.join(glob.escape(run_dir), HPC_CHECKPOINTS))
    return sorted((p for p in found if os.path.isfile(p)), key=os.path.getmtime, reverse=True)


def resume_candidates(checkpoint_dir: str, runs_root: str | None = None) -> list[str]:
    """What `resume=true` may continue from, best first: this run's checkpoints, newest first,
    then those of the earlier runs of the same task, newest first.

    `checkpoint_dir` is `<run dir>/checkpoints`. The earlier runs are the other run directories
    in `runs_root` (Hydra's `<log_dir>/<task>/runs`), searched only when the run directory is
    one of them: a run placed elsewhere (`hydra.run.dir=...`) must not pick up whatever
    checkpoints happen to lie beside it. Temp files of interrupted saves are never candidates.
    """
    own = checkpoints_in(checkpoint_dir)
    run_dir = os.path.dirname(os.path.abspath(checkpoint_dir))
    parent = os.path.dirname(run_dir)
    if runs_root is None or parent != os.path.abspath(runs_root):
        return own
    earlier: list[str] = []
    for sibling in glob.glob(os.path.join(glob.escape(parent), "*")):
        if os.path.abspath(sibling) != run_dir and os.path.isdir(sibling):
            earlier += checkpoints_in(os.path.join(sibling, os.path.basename(checkpoint_dir)))
    return own + sorted(earlier, key=os.path.getmtime, reverse=True)


def checkpoint_damage(path: str) -> str | None:
    """Why `path` cannot continue a run (cut short, a record missing, not the full training
    state, a pickle that would run code), or None when it can. Reads no tensor data."""
    try:
        return damage(path, TRAINING_STATE)
    except pickle.UnpicklingError:
        return "was refused: loading it would run code from the file"


def newest_whole(candidates: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """The first candidate that is a whole training checkpoint, and the (path, why) of each
    damaged one passed over on the way."""
    passed: list[tuple[str, str]] = []
    for path in candidates:
        why = checkpoint_damage(path)
        if why is None:
            return path, passed
        passed.append((path, why))
    return None, passed


def remove_stale_temp_files(checkpoint_dir: str) -> list[str]:
    """Delete the temp files (`*.ckpt.<random>.tmp`, and the `*.ckpt.tmp` of earlier versions) of
    saves that were killed; returns what was removed. Only for a folder no live run writes."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(checkpoint_dir), "*.ckpt*" + TMP_SUFFIX)):
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

