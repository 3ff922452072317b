"""Multirun as users type it: a basic grid, an Optuna study, a submitit launcher, a SLURM config."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import SMALL_SHAPES, compose_train

ROOT = Path(__file__).resolve().parents[1]


def _train(args: list[str], sweep_dir: Path, shapes_cache: Path) -> subprocess.CompletedProcess:
    """`python train.py <args>` with the smallest real run: one train and one val batch per job."""
    tiny = ["trainer.fast_dev_run=true", "test=false", "logger=csv", "data.num_workers=0", "data.batch_size=8",
            f"data.root={shapes_cache}", "print_config=false", f"hydra.sweep.dir={sweep_dir}",
            f"paths.log_dir={sweep_dir.parent / 'logs'}"]
    tiny += [f"data.shapes.{k}={v}" for k, v in SMALL_SHAPES.items()]
    # The tests' folder on the path: a job may add a test-only callback (reliability_helpers).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, *tiny],
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def _jobs(sweep_dir: Path) -> list[dict]:
    """Each job directory with the overrides Hydra recorded for it and the metrics it wrote."""
    jobs = []
    for job_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
        metrics = json.loads((job_dir / "metrics.json").read_text())
        jobs.append({"dir": job_dir, "overrides": overrides, "metrics": metrics})
    return jobs


@pytest.mark.slow
def test_basic_multirun_runs_every_combination_in_its_own_directory(tmp_path, shapes_cache):
    sweep = tmp_path / "sweep"
    _train(["-m", "optim.agc.clipping=0.01,0.04", "optim.base_lr=0.2,0.4"], sweep, shapes_cache)
    jobs = _jobs(sweep)
    assert len(jobs) == 4 and len({job["dir"] for job in jobs}) == 4
    combos = {
        tuple(o for o in job["overrides"] if o.startswith(("optim.agc.clipping=", "optim.base_lr="))) for job in jobs
    }
    assert combos == set(itertools.product(["optim.agc.clipping=0.01", "optim.agc.clipping=0.04"],
                                           ["optim.base_lr=0.2", "optim.base_lr=0.4"]))
    # Each job really ran with its own values (its checkpoint-free run still logged metrics).
    for job in jobs:
        assert "val/acc_top1" in job["metrics"]
        composed = yaml.safe_load((job["dir"] / ".hydra" / "config.yaml").read_text())
        values = dict(o.split("=") for o in job["overrides"] if o.startswith("optim."))
        assert composed["optim"]["agc"]["clipping"] == float(values["optim.agc.clipping"])
        assert composed["optim"]["base_lr"] == float(values["optim.base_lr"])
    # The summary is a lambda x LR grid of the jobs' own metrics.
    from nfnet.sweeps import summarize

    lines = summarize(sweep).splitlines()
    assert lines[0] == "val/acc_top1 by optim.agc.clipping (rows) and optim.base_lr (columns)"
    assert lines[1].split() == ["0.2", "0.4"] and [line.split()[0] for line in lines[2:]] == ["0.01", "0.04"]
    for job in jobs:
        values = dict(o.split("=") for o in job["overrides"] if o.startswith("optim."))
        row = next(line.split() for line in lines[2:] if line.split()[0] == values["optim.agc.clipping"])
        assert row[1 + ["0.2", "0.4"].index(values["optim.base_lr"])] == f"{job['metrics']['val/acc_top1']:.4f}"


@pytest.mark.slow
def test_a_job_that_diverges_is_a_result_and_the_sweep_goes_on(tmp_path, shapes_cache):
    # Job 0 gets NaN batches from its first step and stops (1 non-finite step in a row is the
    # limit here); job 1 trains normally. Divergence at large lambda x batch is what the AGC
    # sweep measures, so it must not end the sweep or lose the other jobs.
    sweep = tmp_path / "diverging"
    result = _train(["-m", "optim.max_consecutive_skips=1", "+callbacks.nan._target_=reliability_helpers.InjectNonFinite",
                     "+callbacks.nan.from_step=0,1000"], sweep, shapes_cache)
    jobs = {next(o for o in job["overrides"] if "from_step" in o): job["metrics"] for job in _jobs(sweep)}
    stopped, trained = jobs["+callbacks.nan.from_step=0"], jobs["+callbacks.nan.from_step=1000"]
    assert "optim.max_consecutive_skips=1" in stopped["stopped"] and "stopped" not in trained
    # The stopped job's last good weights were validated: a measured value, not a placeholder.
    assert 0.0 <= stopped["val/acc_top1"] <= 1.0 and "val/loss" in stopped
    assert "this job stopped" in result.stderr
    from nfnet.sweeps import STOPPED_NOTE, summarize

    lines = summarize(sweep).splitlines()
    assert lines[-1] == STOPPED_NOTE
    assert any(line.startswith(f"{stopped['val/acc_top1']:.4f}*".rjust(len("val/acc_top1"))) for line in lines)


@pytest.mark.slow
def test_optuna_search_over_lr_and_lambda(tmp_path, shapes_cache):
    sweep = tmp_path / "optuna"
    _train(["hparams_search=lr_agc", "hydra.sweeper.n_trials=3"], sweep, shapes_cache)
    jobs = _jobs(sweep)
    assert len(jobs) == 3
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"optim.base_lr", "optim.agc.clipping"}
    # The objective is each trial's val/acc_top1 as train.py returned it; the best is the max.
    assert results["best_value"] == pytest.approx(max(job["metrics"]["val/acc_top1"] for job in jobs))
    for job in jobs:
        values = dict(o.split("=") for o in job["overrides"])
        assert 0.05 <= float(values["optim.base_lr"]) <= 3.2
        assert 0.005 <= float(values["optim.agc.clipping"]) <= 0.64


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path, shapes_cache):
    sweep = tmp_path / "submitit"
    _train(["-m", "hydra/launcher=submitit_local", "optim.agc.clipping=0.01,0.02", "hydra.launcher.timeout_min=10"],
           sweep, shapes_cache)
    jobs = _jobs(sweep)
    assert sorted(o for job in jobs for o in job["overrides"] if o.startswith("optim.agc.clipping=")) == [
        "optim.agc.clipping=0.01", "optim.agc.clipping=0.02"]
    # Each job ran in its own submitit process, with its own log files.
    assert len(list((sweep / ".submitit").glob("*/*_log.out"))) == 2


def test_launcher_slurm_composes_a_submitit_slurm_launcher():
    from hydra.core.hydra_config import HydraConfig

    from nfnet.app.checks import check_config

    cfg = compose_train(["launcher=slurm", "trainer=ddp", "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2"])
    HydraConfig().set_config(cfg)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.nodes == 2
    # Lightning sees the layout SLURM gives it: one task per GPU, as many nodes.
    assert launcher.tasks_per_node == launcher.gpus_per_node == cfg.trainer.devices == 8
    assert cfg.trainer.num_nodes == 2
    assert cfg.trainer.plugins[0].auto_requeue is False
    # A resubmitted job resumes from its own last checkpoint.
    assert launcher.max_num_timeout > 0 and cfg.ckpt_path == "last"
    check_config(cfg, this_machine=False)


def test_agc_sweep_experiment_is_a_lambda_by_batch_size_grid():
    cfg = compose_train(["experiment=agc_sweep"])
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = cfg.hydra.sweeper.params
    lambdas = [float(v) for v in params["optim.agc.clipping"].split(",")]
    batches = [int(v) for v in params["data.batch_size"].split(",")]
    assert len(lambdas) >= 3 and len(batches) >= 3
    assert cfg.model.name == "nfnet_tiny" and cfg.data.source == "shapes"
