"""Bad overrides are refused before any work starts, each with one line naming key, value and
what is allowed, and no traceback; good values pass the same checks.

Every case runs in this process through the command line's own check (nfnet.app.cli.precheck,
the first thing train.py does); a few also run as `python train.py`, as typed, to show the whole
entry point answers the same way (each such process spends seconds importing torch)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import compose_train
from nfnet.app.cli import precheck
from nfnet.app.machine import devices_per_node, per_device_batch_size
from nfnet.data.options import AUGMENTS, SOURCES
from nfnet.errors import ConfigError
from nfnet.app.checks import check_config

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/nfnet-test"

# (overrides, what the one line must say), as typed after `python train.py`.
CASES = {
    "unknown model option": (["model=nfnet_f9"], ["model=nfnet_f9", "choose one of", "nfnet_f0", "nfnet_tiny"]),
    "unknown model name": (["model.name=nfnet_f9"], ["model.name='nfnet_f9'", "nfnet_f7plus"]),
    "zero lambda": (["optim.agc.clipping=0"], ["optim.agc.clipping=0", "> 0", "null to disable AGC"]),
    "negative lambda": (["optim.agc.clipping=-0.01"], ["optim.agc.clipping=-0.01", "> 0"]),
    "wrong type": (["data.batch_size=abc"], ["data.batch_size='abc'", "integer >= 1"]),
    "wrong type of a float": (["optim.base_lr=fast"], ["optim.base_lr='fast'", "number > 0"]),
    "batch not divisible by devices": (
        ["trainer=ddp_cpu", "data.global_batch_size=101"],
        ["data.global_batch_size=101", "not divisible", "2 replicas", "multiple of 2"],
    ),
    "size breaks the official padding": (["data.train_size=100"], ["data.train_size=100", "padding", "96 or 128"]),
    "test size breaks the official padding": (["data.test_size=250"], ["data.test_size=250", "multiples of 32"]),
    "dataset root not given": (["data=imagefolder"], ["data.root is required", "data=imagefolder"]),
    "dataset root missing": (["data=imagenet", f"data.root={MISSING}"], [f"data.root='{MISSING}'", "does not exist"]),
    "unknown augment option": (["augment=fancy"], ["augment=fancy", "choose one of: basic", "official"]),
    "unknown augment name": (["augment.name=fancy"], ["augment.name='fancy'", "official, basic, none"]),
    "bad RandAugment level": (["augment=official", "augment.ra_level=-5"], ["augment.ra_level=-5", "405"]),
    "unknown trainer option": (["trainer=tpu_v9"], ["trainer=tpu_v9", "ddp_cpu", "gpu"]),
    "unknown accelerator": (["trainer.accelerator=quantum"], ["trainer.accelerator='quantum'", "cpu, gpu"]),
    "unknown precision": (["trainer.precision=fp8"], ["trainer.precision='fp8'", "bf16-mixed"]),
    "unknown key of the schema": (
        ["optim.agc.clip=0.1"], ["optim.agc.clip", "did you mean optim.agc.clipping", "only the keys of AGCConfig"],
    ),
    "unknown key of a library's config": (
        ["trainer.max_epoch=3"], ["trainer.max_epoch", "did you mean trainer.max_epochs", "+trainer.max_epoch=3"],
    ),
    "label smoothing out of range": (["optim.label_smoothing=1.5"], ["optim.label_smoothing=1.5", "[0, 1)"]),
    "EMA decay out of range": (["optim.ema.decay=1.0"], ["optim.ema.decay=1.0", "(0, 1)", "null to disable EMA"]),
    "seed not an integer": (["seed=abc"], ["seed='abc'", "integer"]),
    "checkpoint missing": ([f"ckpt_path={MISSING}.ckpt"], [f"ckpt_path='{MISSING}.ckpt'", "not a file"]),
    "finetune without weights": (
        ["experiment=finetune", f"data.root={ROOT}"],
        ["model.pretrained is required", "model.pretrained=<value>"],
    ),
    "one bad job of a sweep": (["-m", "optim.agc.clipping=0.01,-1"], ["optim.agc.clipping=-1", "> 0"]),
    "unknown logger option": (["logger=wandbb"], ["logger=wandbb", "did you mean wandb"]),
    "home directory as ~": (
        ["data=imagefolder", "data.root=~/photos"], ["data.root=~/photos", "does not expand ~", "$HOME/"],
    ),
    # Values that used to pass the checks and fail later, or write where they should not.
    "negative seed": (["seed=-1"], ["seed=-1", "[0, 4294967295]", "null"]),
    "seed beyond 32 bits": (["seed=4294967296"], ["seed=4294967296", "[0, 4294967295]"]),
    "task name of 300 characters": (["task_name=" + "t" * 300], ["task_name=", "(302 characters)", "1 to 100 characters"]),
    "task name outside the log folder": (["task_name=../../x"], ["task_name='../../x'", "without /"]),
    "a 5,000-digit integer": (["trainer.max_epochs=" + "9" * 5000], ["trainer.max_epochs", "number too long to read"]),
    "negative checkpoint interval": (
        ["callbacks.step_checkpoint.every_n_train_steps=-1"],
        ["callbacks.step_checkpoint.every_n_train_steps=-1", "integer >= 0", "never"],
    ),
    "a mapping as the data folder": (["data.root={a: 1}"], ["data.root='{a: 1}'", "must be a folder"]),
    "no images per class": (["data.shapes.train_per_class=0"], ["data.shapes.train_per_class=0", "integer >= 1"]),
    "infinite learning rate": (["optim.base_lr=inf"], ["optim.base_lr=inf", "finite number > 0"]),
    "infinite weight decay": (["optim.weight_decay=inf"], ["optim.weight_decay=inf", "finite number >= 0"]),
    "warmup longer than the run": (
        ["optim.warmup_epochs=1e30", "trainer.max_epochs=3"],
        ["optim.warmup_epochs=1e+30", "longer than the run", "trainer.max_epochs=3"],
    ),
}
if shutil.which("srun") is None:
    CASES["SLURM sweep where there is no SLURM"] = (
        ["-m", "launcher=slurm", "trainer=gpu", "hydra.launcher.gpus_per_node=1", "optim.agc.clipping=0.01,0.02"],
        ["launcher=slurm", "no `srun`", "hydra/launcher=submitit_local"],
    )
if not torch.cuda.is_available():
    CASES["GPU trainer without a GPU"] = (["trainer=gpu"], ["trainer.accelerator='gpu'", "no CUDA GPU", "trainer=cpu"])


# Enough to show `python train.py` itself answers in one line (a sweep, a type error, a group
# option, a name check), without paying an interpreter start for every case.
AS_PROCESSES = ["unknown model option", "wrong type", "one bad job of a sweep", "task name outside the log folder"]


def _outputs(folder: Path) -> list[str]:
    """Where a run would write: the log folder and the data cache, both inside `folder`."""
    return [f"paths.log_dir={folder / 'logs'}", f"paths.data_dir={folder / 'data'}"]


def _assert_one_line(case: str, code, stderr: str, stdout: str, folder: Path) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("config error: "), stderr
    for needle in CASES[case][1]:
        assert needle in lines[0]
    # Refused before any work: no run directory, no data cache, no output at all.
    assert not any(folder.iterdir())
    assert stdout == ""


@pytest.mark.parametrize("case", list(CASES))
def test_bad_override_is_one_clear_line(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a value taken for a relative folder would be created here
    with pytest.raises(SystemExit) as stop:
        precheck(ROOT / "conf", "train", [*CASES[case][0], *_outputs(tmp_path)])
    captured = capsys.readouterr()
    _assert_one_line(case, stop.value.code, captured.err, captured.out, tmp_path)


def _run(overrides: list[str], folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides, *_outputs(folder)],
        capture_output=True, text=True, timeout=300, env=env, cwd=folder,
    )


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """Each process case run once, two at a time (most of each run is importing torch)."""
    folders = {name: tmp_path_factory.mktemp("outputs") for name in AS_PROCESSES}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, CASES[name][0], folders[name]) for name in AS_PROCESSES}
        return {name: (future.result(), folders[name]) for name, future in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", AS_PROCESSES)
def test_train_py_itself_answers_in_one_line(case, refused):
    result, folder = refused[case]
    _assert_one_line(case, result.returncode, result.stderr, result.stdout, folder)


def test_at_least_fifteen_cases():
    assert len(CASES) >= 15 and set(AS_PROCESSES) <= set(CASES)


def test_validation_constants_match_the_datamodule():
    from nfnet.data import datamodule

    assert SOURCES == datamodule.SOURCES and AUGMENTS == datamodule.AUGMENTS


def test_global_batch_is_split_over_devices_nodes_and_accumulation():
    cfg = compose_train(["trainer=ddp_cpu", "data.global_batch_size=64", "trainer.accumulate_grad_batches=4"])
    assert per_device_batch_size(cfg) == 64 // (2 * 4)
    check_config(cfg)
    cfg = compose_train(["trainer=ddp_cpu", "trainer.num_nodes=3", "data.global_batch_size=64"])
    with pytest.raises(ConfigError, match="6 replicas"):
        check_config(cfg)
    # Without a global batch, data.batch_size is per device.
    assert per_device_batch_size(compose_train(["data.batch_size=24"])) == 24


@pytest.mark.parametrize(
    "devices,count", [(1, 1), (3, 3), ("2", 2), ("0,1", 2), ([0, 2, 3], 3), ("auto", 1), (-1, 1)]
)
def test_device_count_as_lightning_reads_it(devices, count):
    cfg = compose_train([f"trainer.devices={devices!r}" if isinstance(devices, str) else f"trainer.devices={devices}"])
    assert devices_per_node(cfg.trainer) == count


def test_a_sweep_on_gpus_is_checked_portably_on_a_machine_without_them():
    # On a SLURM login node `devices: auto` counts no GPU; the jobs will count theirs.
    cfg = compose_train(["trainer=ddp", "data.global_batch_size=4096"])
    check_config(cfg, this_machine=False)


def test_missing_files_are_only_checked_on_the_machine_that_runs_the_job():
    cfg = compose_train(["data=imagenet", f"data.root={MISSING}", f"model.pretrained={MISSING}.npz"])
    check_config(cfg, this_machine=False)
    with pytest.raises(ConfigError, match="model.pretrained"):
        check_config(cfg)
