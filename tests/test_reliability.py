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

from damaged_files import Exploit, write_checkpoint
from nfnet.app import tasks
from nfnet.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _hostile_checkpoint(path: Path, target: Path) -> Path:
    # A real torch zip checkpoint whose pickle would create `target`, hidden among plain values.
    torch.save({"state_dict": {"net.w": torch.zeros(2)}, "epoch": 0, "hook": Exploit(open, str(target), "w")}, path)
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


def _refused_by_the_command_line(capsys, *overrides: str) -> str:
    """The line train.py's first step (nfnet.app.cli.precheck) answers `overrides` with, run in
    this process: the same check, without an interpreter start that imports torch."""
    from nfnet.app.cli import precheck

    with pytest.raises(SystemExit) as stop:
        precheck(ROOT / "conf", "train", ["logger=none", "print_config=false", *overrides])
    captured = capsys.readouterr()
    assert stop.value.code == 2 and captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: "), captured.err
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
        pickle.dump({"NFNet/~/linear": {"w": Exploit(open, str(target), "w")}}, f)
    cfg = cfg_train([f"model.pretrained={evil}", "trainer.fast_dev_run=true", "test=false"])
    with pytest.raises(ConfigError, match="model.pretrained=.*refused"):
        tasks.train(cfg)
    assert not target.exists()


# --------------------------------------------------------------------------- unusable environments
@pytest.mark.parametrize("key", ["paths.log_dir", "hydra.run.dir"])
def test_an_output_directory_that_cannot_be_created_is_one_line(tmp_path, capsys, key):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # Under a regular file nothing can be created, even by root (a chmod'ed folder would not do).
    line = _refused_by_the_command_line(capsys, f"{key}={blocker / 'out'}", f"paths.data_dir={tmp_path / 'data'}")
    assert line.startswith(f"config error: {key}=") and f"{blocker} is a file, not a folder" in line
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


@pytest.mark.parametrize("layout", ["missing", "empty"])
def test_a_dataset_root_that_is_missing_or_empty_is_one_line(tmp_path, capsys, layout):
    root = tmp_path / "images"
    if layout == "empty":
        root.mkdir()
    line = _refused_by_the_command_line(capsys, "data=imagefolder", f"data.root={root}", f"paths.log_dir={tmp_path / 'logs'}")
    assert f"data.root={str(root)!r}" in line
    assert ("does not exist" if layout == "missing" else "is empty") in line
    assert not (tmp_path / "logs").exists()


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


def test_resume_true_and_ckpt_path_together_are_one_line(tmp_path, capsys):
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    line = _refused_by_the_command_line(capsys, "resume=true", f"ckpt_path={ckpt}", f"paths.log_dir={tmp_path / 'logs'}")
    assert "resume=true" in line and f"ckpt_path='{ckpt}'" in line
    assert not (tmp_path / "logs").exists()


def test_resume_true_without_any_checkpoint_starts_fresh_and_clears_partial_writes(cfg_train):
    cfg = cfg_train(["resume=true", "trainer.fast_dev_run=true", "test=false"])
    partial = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt.tmp"  # what a killed save leaves
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"half a checkpoint")
    tasks.train(cfg)
    assert cfg.get("ckpt_path") is None  # the partial file was not taken for a checkpoint
    assert not partial.exists()


def test_resume_true_picks_the_newest_checkpoint_of_the_newest_earlier_run(tmp_path):
    from nfnet.training.checkpoints import newest_whole, resume_candidates

    def found(checkpoint_dir, runs_root=None):
        return newest_whole(resume_candidates(str(checkpoint_dir), runs_root and str(runs_root)))[0]

    runs = tmp_path / "train" / "runs"
    for i, (run, name) in enumerate([("a", "last.ckpt"), ("b", "last-step.ckpt"), ("b", "epoch_000.ckpt")]):
        write_checkpoint(runs / run / "checkpoints" / name, mtime=1000 + i)
    partial = runs / "b" / "checkpoints" / "last.ckpt.8c1d2e.tmp"  # a killed save: never picked
    partial.write_bytes(b"partial")
    os.utime(partial, (2000, 2000))
    new_run = runs / "c" / "checkpoints"
    assert found(new_run, runs) == str(runs / "b" / "checkpoints" / "epoch_000.ckpt")
    assert found(new_run) is None  # a multirun job: its own directory only
    assert found(runs / "a" / "checkpoints", runs) == str(runs / "a" / "checkpoints" / "last.ckpt")
    # A run directory outside <log_dir>/<task>/runs (hydra.run.dir=...) never takes its neighbours'.
    assert found(tmp_path / "elsewhere" / "checkpoints", runs) is None
    write_checkpoint(tmp_path / "neighbour" / "checkpoints" / "last.ckpt")
    assert found(tmp_path / "mine" / "checkpoints", runs) is None


# --------------------------------------------------------------------------- stops during training
TINY_RUN = ["model.train_size=32", "model.test_size=32", "data.batch_size=4", "data.eval_batch_size=8", "test=false",
            "trainer.max_epochs=1", "~callbacks.augmented_images", "~callbacks.rich_progress_bar"]


def _one_stop_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("training stopped: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def _with_helpers() -> dict:
    tests = str(Path(__file__).resolve().parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}


def test_too_many_bad_images_found_while_training_stop_train_py_in_one_line(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (32, 32), (20 * i, 100 * c, 50)).save(root / name / f"{i:02d}.png")
    for name in ("cat/03.png", "dog/07.png"):  # a PNG signature, then nothing: found only when decoded
        (root / name).write_bytes((root / name).read_bytes()[:40])
    run = tmp_path / "logs" / "train" / "runs" / "bad-images"
    result = _train_py("data=imagefolder", f"data.root={root}", "data.num_workers=2", "data.val_fraction=0.25",
                       f"hydra.run.dir={run}", *TINY_RUN, log_dir=tmp_path / "logs")
    line = _one_stop_line(result)
    assert line.startswith(f"training stopped: data.root={str(root)!r}: ")
    assert "are bad images, more than data.max_bad_fraction=0.01" in line and "/0" in line and ".png (undecodable" in line
    assert line.endswith("No checkpoint of this run had been written.")


def test_a_full_disk_while_saving_stops_train_py_in_one_line_and_keeps_the_previous_checkpoint(tmp_path, shapes_cache):
    run = tmp_path / "logs" / "train" / "runs" / "disk-full"
    checkpoints = run / "checkpoints"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "logger=none", "print_config=false", f"paths.log_dir={tmp_path / 'logs'}",
         f"hydra.run.dir={run}", f"data.root={shapes_cache}", "data.shapes.train_per_class=24", "data.shapes.val_per_class=8",
         "data.num_workers=0", "callbacks.step_checkpoint.every_n_train_steps=2", *TINY_RUN,
         "+callbacks.full._target_=reliability_helpers.DiskFullAtSave", "+callbacks.full.nth=2"],
        capture_output=True, text=True, timeout=600, env=_with_helpers(),
    )
    line = _one_stop_line(result)
    # The 2nd write is last-step.ckpt at step 4, over step 2's.
    assert line.startswith(f"training stopped: no space left on the device to write {checkpoints / 'last-step.ckpt'}: ")
    assert "MiB is free in" in line and "the previous last-step.ckpt is kept" in line and "resume=true" in line
    assert line.endswith(f"The newest checkpoint of this run is kept: {checkpoints / 'last-step.ckpt'}.")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last-step.ckpt"]  # no temp file left
    assert torch.load(checkpoints / "last-step.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2
