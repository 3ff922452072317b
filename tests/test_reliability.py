"""Untrusted files and unusable environments: refused before any of them can do harm, each with
one clear line (`config error: ...`, exit status 2) rather than a traceback mid-run."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nfnet.app import tasks
from nfnet.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


class _Exploit:
    """Pickles as a call to `func(*args)`: what a hostile checkpoint would run when unpickled."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _hostile_checkpoint(path: Path, target: Path) -> Path:
    # A real torch zip checkpoint whose pickle would create `target`, hidden among plain values.
    torch.save({"state_dict": {"net.w": torch.zeros(2)}, "epoch": 0, "hook": _Exploit(open, str(target), "w")}, path)
    return path


def _train_py(*overrides: str, log_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "logger=none", "print_config=false", f"paths.log_dir={log_dir}",
         *overrides],
        capture_output=True, text=True, timeout=600,
    )


def _one_config_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("config error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


# --------------------------------------------------------------------------- untrusted files
def test_a_hostile_checkpoint_given_to_train_py_is_refused_and_runs_nothing(tmp_path, shapes_cache):
    target = tmp_path / "created-by-the-pickle"
    evil = _hostile_checkpoint(tmp_path / "evil.ckpt", target)
    result = _train_py(
        f"ckpt_path={evil}", f"data.root={shapes_cache}", "data.shapes.train_per_class=24", "data.shapes.val_per_class=8",
        "data.num_workers=0", "test=false", "trainer.max_epochs=1", log_dir=tmp_path / "logs",
    )
    line = _one_config_error_line(result)
    assert "ckpt_path=" in line and "refused" in line and "run code" in line
    assert not target.exists()


def test_a_hostile_checkpoint_given_to_eval_is_refused_and_runs_nothing(tmp_path):
    from omegaconf import OmegaConf

    from nfnet.app.inference_tasks import load_classifier

    target = tmp_path / "created-by-the-pickle"
    evil = _hostile_checkpoint(tmp_path / "evil.ckpt", target)
    with pytest.raises(ConfigError, match="ckpt_path=.*was refused"):
        load_classifier(OmegaConf.create({"ckpt_path": str(evil), "weights": "ema", "image_size": None, "eval_pad": None}))
    assert not target.exists()


def test_hostile_pretrained_weights_are_refused_and_run_nothing(cfg_train, tmp_path):
    target = tmp_path / "created-by-the-pickle"
    evil = tmp_path / "F0_haiku.npz"  # DeepMind's format is a pickle: read by a restricted unpickler
    with open(evil, "wb") as f:
        pickle.dump({"NFNet/~/linear": {"w": _Exploit(open, str(target), "w")}}, f)
    cfg = cfg_train([f"model.pretrained={evil}", "trainer.fast_dev_run=true", "test=false"])
    with pytest.raises(ConfigError, match="model.pretrained=.*refused"):
        tasks.train(cfg)
    assert not target.exists()


# --------------------------------------------------------------------------- unusable environments
def test_an_output_directory_that_cannot_be_created_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # Under a regular file nothing can be created, even by root (a chmod'ed folder would not do).
    result = _train_py(log_dir=blocker / "logs")
    line = _one_config_error_line(result)
    assert "paths.log_dir=" in line and "is a file" in line


@pytest.mark.parametrize("layout", ["missing", "empty"])
def test_a_dataset_root_that_is_missing_or_empty_is_one_line(tmp_path, layout):
    root = tmp_path / "images"
    if layout == "empty":
        root.mkdir()
    result = _train_py("data=imagefolder", f"data.root={root}", log_dir=tmp_path / "logs")
    line = _one_config_error_line(result)
    assert f"data.root={str(root)!r}" in line
    assert ("does not exist" if layout == "missing" else "is empty") in line


def test_class_folders_without_images_are_a_config_error(cfg_train, tmp_path):
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
    cfg = cfg_train(["data=imagefolder", f"data.root={root}", "trainer.fast_dev_run=true"])
    with pytest.raises(ConfigError, match="no image files") as error:
        tasks.train(cfg)
    assert "\n" not in str(error.value)


def test_too_little_disk_for_a_checkpoint_stops_before_training(cfg_train, monkeypatch):
    import shutil

    from nfnet.training import checkpoints

    cfg = cfg_train(["trainer.max_epochs=1", "test=false"])
    usage = shutil.disk_usage(cfg.paths.output_dir)
    # Room for less than one checkpoint (a ~16 MiB nfnet_tiny one: weights + EMA + momentum).
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: usage._replace(free=4 * 1024 * 1024))
    with pytest.raises(ConfigError, match="not enough disk space for checkpoints"):
        tasks.train(cfg)
    assert not os.path.exists(os.path.join(cfg.paths.output_dir, "checkpoints"))


def test_resume_true_and_ckpt_path_together_are_one_line(tmp_path):
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    line = _one_config_error_line(_train_py("resume=true", f"ckpt_path={ckpt}", log_dir=tmp_path / "logs"))
    assert "resume=true" in line


def test_resume_true_without_any_checkpoint_starts_fresh_and_clears_partial_writes(cfg_train):
    cfg = cfg_train(["resume=true", "trainer.fast_dev_run=true", "test=false"])
    partial = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt.tmp"  # what a killed save leaves
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"half a checkpoint")
    tasks.train(cfg)
    assert cfg.get("ckpt_path") is None  # the partial file was not taken for a checkpoint
    assert not partial.exists()


def test_resume_true_picks_the_newest_checkpoint_of_the_newest_earlier_run(tmp_path):
    from nfnet.training.checkpoints import find_resume_checkpoint

    runs = tmp_path / "train" / "runs"
    for i, (run, name) in enumerate([("a", "last.ckpt"), ("b", "last-step.ckpt"), ("b", "epoch_000.ckpt")]):
        path = runs / run / "checkpoints" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
    (runs / "b" / "checkpoints" / "last.ckpt.tmp").write_bytes(b"partial")  # a killed save: never picked
    os.utime(runs / "b" / "checkpoints" / "last.ckpt.tmp", (2000, 2000))
    new_run = runs / "c" / "checkpoints"
    assert find_resume_checkpoint(str(new_run), str(runs)) == str(runs / "b" / "checkpoints" / "epoch_000.ckpt")
    assert find_resume_checkpoint(str(new_run)) is None  # a multirun job: its own directory only
    assert find_resume_checkpoint(str(runs / "a" / "checkpoints"), str(runs)) == str(runs / "a" / "checkpoints" / "last.ckpt")
    # A run directory outside <log_dir>/<task>/runs (hydra.run.dir=...) never takes its neighbours'.
    assert find_resume_checkpoint(str(tmp_path / "elsewhere" / "checkpoints"), str(runs)) is None
    (tmp_path / "neighbour" / "checkpoints").mkdir(parents=True)
    (tmp_path / "neighbour" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert find_resume_checkpoint(str(tmp_path / "mine" / "checkpoints"), str(runs)) is None
