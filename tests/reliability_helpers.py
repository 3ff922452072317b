"""Test-only callbacks that inject faults into a real run, added from the command line as
`+callbacks.<name>._target_=reliability_helpers.<Class>` (tests/ is on PYTHONPATH).

Every fault fires at a given step, never after a given time, so the tests are deterministic.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal

import lightning.pytorch as pl
import torch


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(pl.Callback):
    """SIGKILLs the process once `step` optimizer steps are done: at the start of the next batch
    (`when="start"`, after the step's checkpoints are written) or in the step's own
    `on_train_batch_end`, before any checkpoint of that step (`when="end"`)."""

    def __init__(self, step: int, when: str = "start") -> None:
        self.step, self.when = int(step), when

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.when == "start" and trainer.global_step == self.step:
            _die()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.when == "end" and trainer.global_step == self.step:
            _die()


class _AtSave(pl.Callback):
    """Replaces the `nth` checkpoint write (1-based) to an open file, and every later one, by
    `self.fail(obj, f, save)`, where `save` is the real torch.save."""

    def __init__(self, nth: int = 2) -> None:
        self.nth = int(nth)

    def setup(self, trainer, pl_module, stage) -> None:
        original = torch.save
        calls = {"n": 0}

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)):
                return original(obj, f, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] < self.nth:
                return original(obj, f, *args, **kwargs)
            return self.fail(obj, f, lambda o, target: original(o, target, *args, **kwargs))

        torch.save = save

    def fail(self, obj, f, save) -> None:
        raise NotImplementedError


class KillDuringSave(_AtSave):
    """Makes the `nth` checkpoint write stop halfway through the file with SIGKILL."""

    def fail(self, obj, f, save) -> None:
        buffer = io.BytesIO()
        save(obj, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        _die()


class DiskFullAtSave(_AtSave):
    """Makes the `nth` checkpoint write, and every later one, fail as on a full disk: the bytes
    go to /dev/full, whose writes fail with ENOSPC as a full file system's do."""

    def fail(self, obj, f, save) -> None:
        with open("/dev/full", "wb") as full:
            save(obj, full)


class BatchLog(pl.Callback):
    """Appends `<epoch> <batch_idx> <global_step> <sha1 of the batch>` per training batch to `path`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        images, targets = batch
        digest = hashlib.sha1()
        for t in (images, targets):
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        weights = hashlib.sha1()
        for t in pl_module.state_dict().values():
            weights.update(t.detach().cpu().contiguous().numpy().tobytes())
        with open(self.path, "a") as f:
            f.write(f"{trainer.current_epoch} {batch_idx} {trainer.global_step} {digest.hexdigest()} "
                    f"{weights.hexdigest()[:12]} {torch.get_rng_state().sum().item()}\n")
            f.flush()


class LearningRateLog(pl.Callback):
    """Appends `<global_step> <lr of the first parameter group>` per training batch to `path`:
    the LR that batch's optimizer step uses."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {trainer.optimizers[0].param_groups[0]['lr']!r}\n")


class InjectNonFinite(pl.Callback):
    """At the given optimizer steps (0-based global_step), makes the batch NaN (`where="batch"`)
    or one gradient entry Inf (`where="grad"`); `from_step` does it on every step from there on."""

    def __init__(self, steps: list[int] | None = None, where: str = "batch", from_step: int | None = None) -> None:
        self.steps = set(steps or [])
        self.where, self.from_step = where, from_step

    def _due(self, trainer) -> bool:
        step = trainer.global_step
        return step in self.steps or (self.from_step is not None and step >= self.from_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.where == "batch" and self._due(trainer):
            batch[0].fill_(float("nan"))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.where == "grad" and self._due(trainer):
            grad = next(p.grad for p in pl_module.net.parameters() if p.grad is not None)
            grad.view(-1)[0] = float("inf")


class CorruptWeightsAtStep(pl.Callback):
    """Writes a NaN into the weights after `step` steps, behind the optimizer's back, so that the
    next checkpoint would hold it."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.net.parameters()).view(-1)[0] = float("nan")


class EpochLog(pl.Callback):
    """Appends `<epoch> <batches trained in it> <global_step>` to `path` at every validation of a
    fit (sanity checks excluded): where each epoch ended and that validation ran there."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._batches = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        with open(self.path, "a") as f:
            f.write(f"{trainer.current_epoch} {self._batches} {trainer.global_step}\n")
