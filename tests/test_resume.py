"""A run SIGKILLed at any step and resumed ends bit-identical to one that never stopped.

Every run here is `python train.py` in its own process. The faults are injected by test-only
callbacks (tests/reliability_helpers.py) at a given step, never after a given time. The run:
80 shapes images at 32 px, the official augmentation (MixUp/CutMix + RandAugment in the collate:
2 raw images per example), dropout and stochastic depth on, batches of 12 examples, so epochs of
80 examples are 6 and 7 steps long (one step straddles the two epochs' examples), 2 epochs, a
step checkpoint every 2 steps.
The comparison covers every tensor of the final checkpoint (weights, EMA weights, momentum
buffers), the LR scheduler, the loop counters and the data position, plus a log of the hash of
every training batch (data order and augmentation).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from damaged_files import damage as damage_file

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

EXAMPLES, BATCH = 80, 12


def steps_after(epochs: int) -> int:
    """Optimizer steps in `epochs` epochs of EXAMPLES examples (nfnet.data.sampling.epoch_steps)."""
    return epochs * EXAMPLES // BATCH


RUN = [
    "logger=none", "print_config=false", "test=false",
    "data.shapes.train_per_class=8", "data.shapes.val_per_class=2", "data.shapes.image_size=32",
    "model.train_size=32", "model.test_size=32", f"data.batch_size={BATCH}", "data.eval_batch_size=32",
    "data.num_workers=0", "augment=official", "model.stochdepth_rate=0.1", "model.drop_rate=0.2",
    "trainer.max_epochs=2", "trainer.deterministic=true", "trainer.log_every_n_steps=1",
    "callbacks.step_checkpoint.every_n_train_steps=2",
    "~callbacks.augmented_images", "~callbacks.rich_progress_bar",
]


def train_py(run_dir: Path, data_root: Path, *overrides: str, batch_log: Path | None = None) -> subprocess.CompletedProcess:
    args = [*RUN, f"data.root={data_root}", f"paths.log_dir={run_dir.parent.parent.parent}", f"hydra.run.dir={run_dir}"]
    if batch_log is not None:
        args += ["+callbacks.batch_log._target_=reliability_helpers.BatchLog", f"+callbacks.batch_log.path={batch_log}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args, *overrides],
        capture_output=True, text=True, timeout=600, env=env,
    )


def kill_at(step: int, when: str = "start") -> list[str]:
    return [
        "+callbacks.kill._target_=reliability_helpers.KillAtStep", f"+callbacks.kill.step={step}",
        f"+callbacks.kill.when={when}",
    ]


def run_dir(base: Path, name: str) -> Path:
    # <log_dir>/train/runs/<name>: the layout Hydra gives runs, which `resume=true` searches.
    return base / "logs" / "train" / "runs" / name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its final checkpoint and its batch log."""
    base = tmp_path_factory.mktemp("resume-reference")
    data = tmp_path_factory.getbasetemp() / "resume-data"
    directory = run_dir(base, "full")
    log = base / "batches.log"
    result = train_py(directory, data, batch_log=log)
    assert result.returncode == 0, result.stderr[-3000:]
    return directory / "checkpoints" / "last.ckpt", _batches(log), data


def _batches(path: Path) -> dict[int, tuple[str, ...]]:
    """global_step -> (epoch, batch_idx, batch hash, weights hash) as logged at the batch's start."""
    out = {}
    for line in path.read_text().splitlines():
        epoch, batch_idx, step, batch, weights, _rng = line.split()
        out[int(step)] = (epoch, batch_idx, batch, weights)
    return out


def differences(a, b, path: str = "") -> list[str]:
    """Every place two checkpoint trees differ; tensors must match in dtype, shape and bits."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [path]
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [f"{path}: keys differ"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [f"{path}: lengths differ"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}.{i}")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


COMPARED = ("state_dict", "optimizer_states", "lr_schedulers", "global_step", "epoch", "loops", "ImageDataModule")


def assert_same_run(final: Path, reference_ckpt: Path) -> None:
    got = torch.load(final, map_location="cpu", weights_only=True)
    want = torch.load(reference_ckpt, map_location="cpu", weights_only=True)
    assert any(k.startswith("ema_net.") for k in want["state_dict"])  # the EMA weights are compared too
    assert want["optimizer_states"][0]["state"]  # and the momentum buffers
    diffs = [d for key in COMPARED for d in differences(want[key], got[key], key)]
    assert not diffs, diffs[:10]


def _kill_and_resume(tmp_path, reference, step, when, resume_args, workers=0, after_kill=None):
    reference_ckpt, reference_batches, data = reference
    log = tmp_path / "batches.log"
    killed_dir = run_dir(tmp_path, "killed")
    killed = train_py(killed_dir, data, *kill_at(step, when), batch_log=log)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL: no cleanup ran
    if after_kill is not None:
        after_kill(killed_dir / "checkpoints")
    resumed_dir = killed_dir if "ckpt_path=last" in resume_args else run_dir(tmp_path, "resumed")
    resumed = train_py(resumed_dir, data, *resume_args, f"data.num_workers={workers}", batch_log=log)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(resumed_dir / "checkpoints" / "last.ckpt", reference_ckpt)
    # Every batch either process trained on (the resumed one redoes the steps after its
    # checkpoint) is the batch the uninterrupted run had at that step, on the same weights.
    for line in log.read_text().splitlines():
        epoch, batch_idx, gstep, batch, weights, _rng = line.split()
        assert reference_batches[int(gstep)] == (epoch, batch_idx, batch, weights), line
    return killed, resumed


@pytest.mark.slow
def test_killed_mid_epoch_resumes_bit_exactly_with_ckpt_path_last(tmp_path, reference):
    # Killed before step 3 runs; the newest checkpoint is step 2's, mid-epoch 0.
    _kill_and_resume(tmp_path, reference, step=3, when="start", resume_args=["ckpt_path=last"])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_killed_at_an_epoch_boundary_resumes_bit_exactly_with_resume_true(tmp_path, reference, workers):
    # Killed right after epoch 0's last step, its validation and its end-of-epoch checkpoint;
    # resumed in a new run directory, which finds that checkpoint by itself. With persistent
    # loader workers Lightning starts the loader before it moves the sampler to epoch 1: a
    # sampler still in the finished epoch 0 used to make epoch 1 train on nothing.
    _, resumed = _kill_and_resume(tmp_path, reference, step=steps_after(1), when="start", resume_args=["resume=true"],
                                  workers=workers)
    assert "resume=true: resuming from" in resumed.stderr and "killed" in resumed.stderr


@pytest.mark.slow
def test_a_damaged_newest_last_ckpt_is_passed_over_and_the_run_resumes_bit_exactly(tmp_path, reference):
    # Killed before step 11 (epoch 1): last-step.ckpt holds step 10, last.ckpt and epoch_000.ckpt
    # step 6. Then last.ckpt is found cut in half and newest of all (a copy back from a backup,
    # say, interrupted): resume=true passes over it to last-step.ckpt and says so in one line.
    def cut_last(checkpoints: Path) -> None:
        damage_file(checkpoints / "last.ckpt", "cut in half")
        os.utime(checkpoints / "last.ckpt")

    _, resumed = _kill_and_resume(tmp_path, reference, step=10, when="start", resume_args=["resume=true"],
                                  after_kill=cut_last)
    checkpoints = run_dir(tmp_path, "killed") / "checkpoints"
    lines = [line for line in (resumed.stdout + resumed.stderr).splitlines() if "resume=true: resuming from" in line]
    assert len(lines) == 1, resumed.stderr[-3000:]
    assert f"resuming from {checkpoints / 'last-step.ckpt'} (passed over 1 damaged: {checkpoints / 'last.ckpt'} is cut short" \
        in lines[0]


@pytest.mark.slow
def test_killed_inside_a_step_resumes_bit_exactly_with_other_worker_count(tmp_path, reference):
    # Killed inside step 9 (epoch 1) before its checkpoint: the work since step 8 is redone, this
    # time by 2 loader workers instead of none, which must not change a bit.
    _kill_and_resume(tmp_path, reference, step=9, when="end", resume_args=["ckpt_path=last"], workers=2)


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_whole(tmp_path, shapes_cache):
    from nfnet.inference.torch_files import TRAINING_STATE, damage
    from nfnet.training.checkpoints import checkpoints_in, newest_whole

    directory = run_dir(tmp_path, "killed-while-saving")
    checkpoints = directory / "checkpoints"
    # The 2nd write is last-step.ckpt at step 4, over step 2's: killed halfway through the file.
    killed = train_py(
        directory, shapes_cache, "+callbacks.kill._target_=reliability_helpers.KillDuringSave", "+callbacks.kill.nth=2",
        "trainer.max_epochs=1",
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    [partial] = checkpoints.glob("last-step.ckpt.*.tmp")
    assert 0 < partial.stat().st_size  # the interrupted write went to a temp file of its own...
    assert "is cut short" in damage(partial, TRAINING_STATE)
    previous = torch.load(checkpoints / "last-step.ckpt", map_location="cpu", weights_only=True)
    assert previous["global_step"] == 2  # ...and the previous checkpoint is whole and loadable
    assert newest_whole(checkpoints_in(str(checkpoints)))[0] == str(checkpoints / "last-step.ckpt")


def test_resuming_in_process_from_a_mid_epoch_checkpoint_is_bit_exact(cfg_train, tmp_path):
    """The same guarantee without a kill, fast: resume from every step checkpoint of a run."""
    from omegaconf import open_dict

    from nfnet.app import tasks

    overrides = [o for o in RUN if not o.startswith(("logger=", "print_config", "data.num_workers", "trainer.deterministic"))]
    overrides += ["callbacks.step_checkpoint.save_top_k=-1", "trainer.max_epochs=1"]

    def run(directory: Path, ckpt_path=None) -> Path:
        cfg = cfg_train(overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(directory)  # the checkpoint folders follow it
            cfg.callbacks.step_checkpoint.filename = "step-{step}"  # keep every one
            cfg.ckpt_path = ckpt_path
        tasks.train(cfg)
        return directory / "checkpoints"

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "from-2", str(full / "step-step=2.ckpt"))  # mid-epoch: 6 steps in epoch 0
    assert_same_run(resumed / "last.ckpt", full / "last.ckpt")


def test_resuming_with_more_epochs_stretches_the_schedule_instead_of_training_at_lr_0(cfg_train, tmp_path):
    """`resume=true trainer.max_epochs=N+1` after an N-epoch run: the schedule is the config's.

    The checkpoint's schedule ended at LR 0; kept, the added epoch would not move a weight.
    Also with 2 persistent loader workers, which once made the added epoch train on no batch.
    """
    from omegaconf import open_dict

    from nfnet.app import tasks
    from nfnet.optim.schedule import scale_lr, warmup_cosine

    overrides = [o for o in RUN if not o.startswith(("logger=", "print_config", "data.num_workers", "trainer.max_epochs"))]
    overrides += ["data.num_workers=2"]
    lr_log = tmp_path / "lr.log"

    def run(directory: Path, epochs: int, ckpt_path=None):
        cfg = cfg_train([*overrides, f"trainer.max_epochs={epochs}"])
        with open_dict(cfg):
            cfg.paths.output_dir = str(directory)
            cfg.ckpt_path = ckpt_path
            cfg.callbacks.lr_log = {"_target_": "reliability_helpers.LearningRateLog", "path": str(lr_log)}
        tasks.train(cfg)
        return torch.load(directory / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)

    first = run(tmp_path / "two", 2)
    assert first["global_step"] == steps_after(2) and first["optimizer_states"][0]["param_groups"][0]["lr"] == 0.0
    lr_log.unlink()
    longer = run(tmp_path / "three", 3, str(tmp_path / "two" / "checkpoints" / "last.ckpt"))
    assert longer["global_step"] == steps_after(3)  # the added epoch trained all its batches
    rates = {int(step): float(lr) for step, lr in (line.split() for line in lr_log.read_text().splitlines())}
    assert sorted(rates) == list(range(steps_after(2), steps_after(3)))
    cfg = cfg_train(overrides)
    peak = scale_lr(cfg.optim.base_lr, cfg.data.batch_size)
    total = steps_after(3)
    warmup = cfg.optim.warmup_epochs * EXAMPLES / BATCH
    for step, lr in rates.items():
        assert lr == pytest.approx(warmup_cosine(step, peak, warmup, total)) and lr > 0
    assert longer["lr_schedulers"][0]["lr_lambdas"][0]["total_steps"] == total
    moved = [k for k in first["state_dict"] if not torch.equal(first["state_dict"][k], longer["state_dict"][k])]
    assert moved
