"""Non-finite losses and gradients: the step is skipped as if it never happened, counted, and
too many in a row stop the run; no checkpoint ever holds NaN or Inf."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from reliability_helpers import CorruptWeightsAtStep, InjectNonFinite

from conftest import classifier, ready_datamodule
from nfnet.app import tasks
from nfnet.errors import NonFiniteCheckpointError, TrainingStopped
from nfnet.training.checkpoints import check_finite
from nfnet.training.module import NFNetClassifier

SKIPPED = 2  # the 0-based optimizer step that goes bad


def _datamodule(cfg_train):
    cfg = cfg_train(["augment=none", "data.shapes.train_per_class=8", "data.shapes.val_per_class=2"])
    return ready_datamodule(cfg)


def _module(**kwargs) -> NFNetClassifier:
    # warmup_epochs=0: every step has a non-zero learning rate, so a step that ran would show.
    return classifier(10, ema={"decay": 0.9}, warmup_epochs=0.0, **kwargs)


def _skipped_steps(trainer: pl.Trainer) -> int:
    """The count kept by the module's NonFiniteGuard callback."""
    from nfnet.training.guard import NonFiniteGuard

    return next(cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard)).skipped_steps


def _trainer(callbacks, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
        **{"max_steps": 4, "enable_checkpointing": False, **kwargs},
    )


class _Snapshots(pl.Callback):
    """The module's and optimizer's full state before and after optimizer step `step`."""

    def __init__(self, step: int):
        self.step = step
        self.before = self.after = None

    @staticmethod
    def _state(trainer, module):
        return copy.deepcopy({"module": module.state_dict(), "optimizer": trainer.optimizers[0].state_dict()})

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.before = self._state(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:
            self.after = self._state(trainer, module)


def _flat(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat(value, f"{prefix}.{key}")


@pytest.mark.parametrize("where", ["batch", "grad"])
def test_a_non_finite_step_changes_no_weight_momentum_or_ema(cfg_train, where):
    datamodule = _datamodule(cfg_train)
    module = _module()
    skipped, normal = _Snapshots(SKIPPED), _Snapshots(SKIPPED + 1)
    trainer = _trainer([InjectNonFinite([SKIPPED], where=where), skipped, normal])
    trainer.fit(module, datamodule=datamodule)

    before, after = dict(_flat(skipped.before)), dict(_flat(skipped.after))
    assert any(k.startswith(".module.ema_net.") for k in before)
    assert any("momentum_buffer" in k for k in before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed  # bit-identical: weights, EMA, momentum buffers
    # The next, healthy step trains as usual.
    moved = [k for k, v in _flat(normal.before) if not torch.equal(v, dict(_flat(normal.after))[k])]
    assert any(k.startswith(".module.net.") for k in moved) and any(k.startswith(".module.ema_net.") for k in moved)
    assert _skipped_steps(trainer) == 1
    assert float(trainer.logged_metrics["train/skipped_steps"]) == 1.0
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_an_infinite_loss_with_finite_gradients_is_skipped_too(cfg_train):
    class InfiniteLoss(NFNetClassifier):
        def loss(self, logits, targets):
            loss = super().loss(logits, targets)
            return loss + float("inf") if self.global_step == SKIPPED else loss

    datamodule = _datamodule(cfg_train)
    module = classifier(10, cls=InfiniteLoss, ema={"decay": 0.9}, warmup_epochs=0.0)
    snapshots = _Snapshots(SKIPPED)
    trainer = _trainer([snapshots])
    trainer.fit(module, datamodule=datamodule)
    before, after = dict(_flat(snapshots.before)), dict(_flat(snapshots.after))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _skipped_steps(trainer) == 1


def test_consecutive_non_finite_steps_stop_the_run_and_keep_a_finite_checkpoint(cfg_train, tmp_path):
    datamodule = _datamodule(cfg_train)
    module = _module(max_consecutive_skips=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last-step", every_n_train_steps=1, save_top_k=1)
    trainer = _trainer([InjectNonFinite(from_step=SKIPPED, where="batch"), checkpoint],
                       max_steps=20, enable_checkpointing=True)
    with pytest.raises(TrainingStopped, match="max_consecutive_skips=3"):
        trainer.fit(module, datamodule=datamodule)
    assert _skipped_steps(trainer) == 3
    saved = torch.load(tmp_path / "last-step.ckpt", map_location="cpu", weights_only=True)
    check_finite(saved)  # raises if anything in it is NaN/Inf
    assert saved["global_step"] == SKIPPED + 2  # written after the 2nd skip, before the 3rd stopped the run


def test_a_checkpoint_holding_nan_is_refused_and_the_previous_one_kept(cfg_train, tmp_path):
    datamodule = _datamodule(cfg_train)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last-step", every_n_train_steps=1, save_top_k=1)
    trainer = _trainer([CorruptWeightsAtStep(2), checkpoint], enable_checkpointing=True)
    with pytest.raises(NonFiniteCheckpointError, match="refusing to write"):
        trainer.fit(_module(), datamodule=datamodule)
    saved = torch.load(tmp_path / "last-step.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 1
    check_finite(saved)
    assert [p.name for p in tmp_path.iterdir()] == ["last-step.ckpt"]  # no temp file left behind


def test_the_stop_reaches_train_py_as_one_line(cfg_train):
    cfg = cfg_train([
        "trainer.max_epochs=1", "test=false", "optim.max_consecutive_skips=2", "callbacks=none",
        "+callbacks.nan._target_=reliability_helpers.InjectNonFinite", "+callbacks.nan.from_step=1",
    ])
    with pytest.raises(TrainingStopped) as error:
        tasks.train(cfg)
    assert "\n" not in str(error.value) and "optim.max_consecutive_skips=2" in str(error.value)
