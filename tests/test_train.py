"""The training entry point end to end on CPU: smoke run, learning, checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import open_dict

from conftest import ready_datamodule
from nfnet.app import tasks
from nfnet.training.module import NFNetClassifier

ROOT = Path(__file__).resolve().parents[1]


BATCHES: list[str] = []  # what _CountBatches saw; the config builds it, out of the test's reach


class _CountBatches(pl.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        BATCHES.append("train")

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        BATCHES.append("val")


def test_fast_dev_run(cfg_train, tmp_path):
    BATCHES.clear()
    cfg = cfg_train(["trainer.fast_dev_run=true", "test=false", "+callbacks.count._target_=test_train._CountBatches"])
    metrics = tasks.train(cfg)
    # Lightning's fast_dev_run: one training batch, one validation batch, no checkpoint.
    assert BATCHES == ["train", "val"]
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    # The accuracy of one full validation batch (data.eval_batch_size=32 of 80 images): k/32.
    hits = metrics["val/acc_top1"] * 32
    assert abs(hits - round(hits)) < 1e-4 and 0 <= round(hits) <= 32
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


class _LossRecorder(pl.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_a_short_run_lowers_the_training_loss(cfg_train):
    pl.seed_everything(0)
    cfg = cfg_train(["trainer.max_epochs=6", "callbacks=none", "test=false", "augment=none"])
    datamodule = ready_datamodule(cfg)
    module = tasks.build_module(cfg, datamodule.num_classes)
    recorder = _LossRecorder()
    trainer = pl.Trainer(
        max_epochs=6, accelerator="cpu", logger=False, callbacks=[recorder], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    losses = recorder.losses
    assert len(losses) >= 60  # 240 images / 16 per step * 6 epochs = 90 steps
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.1, (first, last)


@pytest.mark.parametrize("augment", ["official", "basic"])
def test_an_epoch_is_n_training_examples_with_or_without_mixing(cfg_train, tmp_path, augment):
    """240 images in steps of 36 examples: epochs of 6, 7 and 7 steps (the step that straddles
    two epochs' examples belongs to the later), validated at the end of each, 20 steps in all
    (3 * 240 // 36), whether or not MixUp/CutMix reads 2 raw images per example."""
    log = tmp_path / f"epochs-{augment}.log"
    cfg = cfg_train([f"augment={augment}", "data.batch_size=36", "trainer.max_epochs=3", "test=false",
                     "callbacks=none", "model.train_size=32", "model.test_size=32"])
    with open_dict(cfg):
        cfg.callbacks = {"epochs": {"_target_": "reliability_helpers.EpochLog", "path": str(log)}}
    tasks.train(cfg)
    assert [line.split() for line in log.read_text().splitlines()] == [
        ["0", "6", "6"], ["1", "7", "13"], ["2", "7", "20"],
    ]


@pytest.mark.slow
def test_best_checkpoint_reloads_weights_only_with_the_same_val_accuracy(cfg_train):
    cfg = cfg_train(["trainer.max_epochs=2", "test=false"])
    metrics = tasks.train(cfg)
    best = metrics["best_model_path"]
    assert Path(best).exists()
    # torch's default weights_only=True: the hyperparameters must be primitives only.
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    assert any(k.startswith("ema_net.") for k in checkpoint["state_dict"])
    module = NFNetClassifier.load_from_checkpoint(best, weights_only=True)
    datamodule = tasks.build_datamodule(cfg)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    result = trainer.validate(module, datamodule=datamodule)[0]
    assert result["val/acc_top1"] == pytest.approx(checkpoint["callbacks"][_checkpoint_key(checkpoint)]["best_model_score"].item())


def _checkpoint_key(checkpoint):
    return next(k for k in checkpoint["callbacks"] if k.startswith("ModelCheckpoint"))


@pytest.mark.slow
def test_train_py_runs_from_the_command_line(tmp_path, shapes_cache):
    """`python train.py` with overrides, as a user types it, in a fresh process."""
    result = subprocess.run(
        [
            sys.executable, str(ROOT / "train.py"), "trainer.fast_dev_run=true", "test=false",
            "data.num_workers=0", f"data.root={shapes_cache}", "data.shapes.train_per_class=24",
            "data.shapes.val_per_class=8", f"paths.log_dir={tmp_path}",
        ],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model" in result.stdout  # the printed config tree


def test_a_run_with_gpu_decoding_trains_through_the_datamodules_device_stage(cfg_train):
    # On this CPU the device stage runs on the CPU: the wiring (loader -> transfer hook -> module) is what
    # is under test here; the pixels are tested against the CPU pipeline in test_datamodule.py.
    cfg = cfg_train(["augment=official", "data.decode=gpu", "+trainer.max_steps=2", "trainer.max_epochs=1",
                     "test=false", "callbacks=none", "model.train_size=32", "model.test_size=32"])
    metrics = tasks.train(cfg)
    assert metrics["train/loss_step"] > 0 and "train/agc_clip_frac" in metrics
