"""Where a training run starts from, which folders it holds, and what a stopped run leaves behind.

* `resolve_checkpoint`: `ckpt_path=<file>` as given, once checked whole; `ckpt_path=last` and
  `resume=true` take the newest whole checkpoint, passing over damaged ones (cut short, a record
  missing, a pickle that would run code) with one log line that names each and why, so that a
  requeued job continues instead of failing on every retry.
* `run_lock`: the run folders are locked against a second live process (nfnet.training.run_lock).
* `stops`: a run that stops on purpose or because its data turned out bad ends in one line
  (TrainingStopped) that says which checkpoint of the run is on disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from omegaconf import DictConfig

from nfnet.app.runs import in_multirun
from nfnet.data.folder import TooManyBadFiles
from nfnet.errors import ConfigError, TrainingStopped
from nfnet.training.checkpoints import (
    checkpoint_damage,
    checkpoints_in,
    newest_whole,
    remove_stale_temp_files,
    resume_candidates,
)
from nfnet.training.run_lock import RunLock, live_holder

log = logging.getLogger(__name__)

# Lightning's own meaning of ckpt_path (SLURM's auto-requeue checkpoint); left to it.
LIGHTNING_KEYWORDS = ("hpc",)


def checkpoint_dir(cfg: DictConfig) -> str:
    node = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
    return str(node.get("dirpath") or os.path.join(str(cfg.paths.output_dir), "checkpoints"))


def checkpoint_dirs(cfg: DictConfig) -> list[str]:
    """Every folder a checkpoint callback of the config writes to."""
    found = {checkpoint_dir(cfg)}
    for node in (cfg.get("callbacks") or {}).values():
        if node and str(node.get("_target_", "")).endswith("ModelCheckpoint") and node.get("dirpath"):
            found.add(str(node.dirpath))
    return sorted(found)


def _passed_over(passed: list[tuple[str, str]]) -> str:
    return "; ".join(f"{path} {why}" for path, why in passed)


def resolve_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint this run starts from (see the module doc); ConfigError when the one asked
    for cannot continue a run."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path == "last":
        path, passed = newest_whole(checkpoints_in(checkpoint_dir(cfg)))
        return _chosen("ckpt_path=last", path, passed) or ("last" if not passed else None)
    if ckpt_path is not None and ckpt_path not in LIGHTNING_KEYWORDS:
        why = checkpoint_damage(os.path.expanduser(str(ckpt_path)))
        if why:
            raise ConfigError(
                f"ckpt_path={str(ckpt_path)!r} {why}; give another checkpoint of the run, or resume=true to take the "
                "newest whole one (to start from its weights alone: model.pretrained=<file>)"
            )
        _continue_from(cfg, os.path.expanduser(str(ckpt_path)))
        return ckpt_path
    if not cfg.get("resume"):
        return ckpt_path
    runs_root = None if in_multirun() else os.path.join(str(cfg.paths.log_dir), str(cfg.task_name), "runs")
    path, passed = newest_whole(resume_candidates(checkpoint_dir(cfg), runs_root))
    if path is None and not passed:
        log.info("resume=true: no checkpoint found, starting a new run")
        return None
    path = _chosen("resume=true", path, passed)
    _continue_from(cfg, path)
    return path


def _continue_from(cfg: DictConfig, path: str) -> None:
    """A run that continues another one in a new folder clears the temp files that a killed
    save left in the other run's checkpoint folder; this run's own are cleared when it starts."""
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in {os.path.abspath(d) for d in checkpoint_dirs(cfg)}:
        _clear_partial_writes(folder)


def _chosen(how: str, path: str | None, passed: list[tuple[str, str]]) -> str | None:
    if path is None and passed:
        raise ConfigError(
            f"{how}: no checkpoint can continue the run: {_passed_over(passed)}; give ckpt_path=<a whole checkpoint>, "
            "or move these files away to start afresh"
        )
    if path is not None:
        note = f" (passed over {len(passed)} damaged: {_passed_over(passed)})" if passed else ""
        log.info("%s: resuming from %s%s", how, path, note)
    return path


def _clear_partial_writes(folder: str) -> None:
    """The temp files a killed save left in the folder of the run this one continues: the next
    start of that run would have removed them, and there may be no such start now. Not while a
    live process still writes there."""
    if live_holder(folder) or live_holder(os.path.dirname(folder)):
        return
    for path in remove_stale_temp_files(folder):
        log.info("removed %s, left by a save that was interrupted", path)


def run_lock(cfg: DictConfig) -> contextlib.AbstractContextManager:
    """The lock of the run folder and of every checkpoint folder outside it, taken by the one
    process of a (DDP, multi-node) run that writes them; the other ranks take none."""
    if not _global_rank_zero():
        return contextlib.nullcontext()
    output_dir = os.path.abspath(str(cfg.paths.output_dir))
    outside = [d for d in checkpoint_dirs(cfg) if not os.path.abspath(d).startswith(output_dir + os.sep)]
    return RunLock([output_dir, *outside])


def _global_rank_zero() -> bool:
    # Set by Lightning's launchers in the processes they start, by torchrun and by SLURM; the
    # process a user starts by hand has none of them (or 0) and writes the run.
    names = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
    return all(os.environ.get(name, "0") == "0" for name in names)


def kept(cfg: DictConfig) -> str:
    """Which checkpoint of this run is on disk, as a sentence for a stop message."""
    for folder in checkpoint_dirs(cfg):
        path, _ = newest_whole(checkpoints_in(folder))
        if path:
            return f"The newest checkpoint of this run is kept: {path}."
    return "No checkpoint of this run had been written."


@contextlib.contextmanager
def stops(cfg: DictConfig) -> Iterator[None]:
    """A stop of the run (non-finite steps, a full disk, too many bad images found while
    training) as one TrainingStopped line that says what is on disk."""
    try:
        yield
    except TooManyBadFiles as error:
        raise TrainingStopped(f"data.root={str(cfg.data.root)!r}: {error}. {kept(cfg)}") from None
    except TrainingStopped as error:
        raise type(error)(f"{error} {kept(cfg)}") from None
