"""SLURM requeue without submitit: `sbatch --signal=USR1@90` makes Lightning save
`hpc_ckpt_N.ckpt` into the run directory's root (trainer.default_root_dir) and requeue the job.
The requeued job is a new Hydra run directory; its `resume=true` must take the newest checkpoint
of all, the hpc ones included (it used to fall back to last-step.ckpt, up to 1000 steps older).

The files are named by Lightning's own `hpc_save_path`, the function its SIGUSR1 handler calls,
so a change in where Lightning puts them shows here.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from omegaconf import open_dict

from damaged_files import write_checkpoint


def _touch(path: Path, when: int) -> Path:
    """A whole training checkpoint at `path`, modified at `when` (resume passes over damaged ones)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_checkpoint(path)
    os.utime(path, (when, when))
    return path


def _hpc_save(run_dir: Path, when: int) -> Path:
    """What Lightning's SIGUSR1 handler writes: the next `hpc_ckpt_N.ckpt` in the run's root."""
    return _touch(Path(_CheckpointConnector.hpc_save_path(str(run_dir))), when)


def test_resume_true_takes_the_newest_hpc_checkpoint_of_the_requeued_run(tmp_path):
    from nfnet.training.checkpoints import newest_whole, resume_candidates

    def find_resume_checkpoint(checkpoint_dir: str, runs_root: str) -> str | None:
        return newest_whole(resume_candidates(checkpoint_dir, runs_root))[0]

    runs = tmp_path / "train" / "runs"
    killed = runs / "2026-01-01_00-00-00"
    _touch(killed / "checkpoints" / "last.ckpt", 1000)
    _touch(killed / "checkpoints" / "last-step.ckpt", 2000)
    first = _hpc_save(killed, 3000)
    second = _hpc_save(killed, 4000)  # a second requeue of the same run directory
    assert (first.name, second.name) == ("hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt")
    requeued = runs / "2026-01-01_01-00-00" / "checkpoints"
    assert find_resume_checkpoint(str(requeued), str(runs)) == str(second)
    # A step checkpoint written after the signal's save is newer, and wins.
    newer = _touch(killed / "checkpoints" / "last-step.ckpt", 5000)
    assert find_resume_checkpoint(str(requeued), str(runs)) == str(newer)


def test_the_run_directory_s_own_hpc_checkpoint_counts_for_ckpt_path_last_and_resume(tmp_path):
    from nfnet.training.checkpoints import checkpoints_in, resume_candidates

    run = tmp_path / "train" / "runs" / "r"
    _touch(run / "checkpoints" / "last-step.ckpt", 1000)
    hpc = _hpc_save(run, 2000)
    assert checkpoints_in(str(run / "checkpoints"))[0] == str(hpc)
    assert resume_candidates(str(run / "checkpoints"), str(tmp_path / "train" / "runs"))[0] == str(hpc)


def test_train_py_resume_true_resolves_to_the_hpc_checkpoint(cfg_train, tmp_path):
    """The config path end to end: the run directories Hydra lays out under paths.log_dir."""
    from nfnet.app import resume

    runs = tmp_path / "train" / "runs"
    killed = runs / "2026-01-01_00-00-00"
    _touch(killed / "checkpoints" / "last-step.ckpt", 1000)
    hpc = _hpc_save(killed, 2000)
    cfg = cfg_train(["resume=true"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(runs / "2026-01-01_01-00-00")
    assert resume.resolve_checkpoint(cfg) == str(hpc)
