"""logger=wandb with no account and no network: offline by itself, and what reaches the run files.

The offline run files (`run-<id>.wandb`) are read back directly: a LevelDB-style log of
protobuf `Record`s (7-byte file header, 32 KiB blocks, each chunk with a 7-byte header of CRC,
length and type FULL/FIRST/MIDDLE/LAST).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import wandb
from omegaconf import open_dict, read_write
from wandb.proto import wandb_internal_pb2

from conftest import SMALL_SHAPES, compose_train

BLOCK = 32768


def read_records(path: Path) -> list:
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, chunks = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
    return [wandb_internal_pb2.Record.FromString(c) for c in chunks]


def _items(items) -> dict:
    """Record items -> a dict; media are stored as nested keys (key, field) and come back nested."""
    out: dict = {}
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


class OfflineRun:
    def __init__(self, run_dir: Path):
        (self.file,) = run_dir.glob("run-*.wandb")
        self.dir = run_dir
        self.id = self.file.stem[len("run-"):]
        self.history, self.config, self.exit_codes = [], {}, []
        for record in read_records(self.file):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                self.history.append(_items(record.history.item))
            elif kind == "config":
                self.config.update(_items(record.config.update))
            elif kind == "exit":
                self.exit_codes.append(record.exit.exit_code)

    def logged(self, key: str) -> list:
        return [row[key] for row in self.history if key in row]


def offline_runs(output_dir: Path, patience_s: float = 120.0) -> list[OfflineRun]:
    """The finished offline runs under output_dir. wandb's service process writes the run file
    asynchronously, and on a loaded machine the exit record can land after `wandb.finish`
    returns, so this waits (bounded) for every run's exit record before reading."""
    import time

    deadline = time.monotonic() + patience_s
    while True:
        runs = [OfflineRun(d) for d in sorted((output_dir / "wandb").glob("offline-run-*"))]
        if (runs and all(run.exit_codes for run in runs)) or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


@pytest.fixture
def no_wandb_account(monkeypatch, tmp_path):
    """No API key anywhere wandb looks, no WANDB_MODE: what a fresh laptop has."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    wandb.teardown()
    yield
    wandb.teardown()


def _cfg(output_dir: Path, data_root: Path, overrides: list[str]):
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_train(
        ["logger=wandb", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
         "trainer.log_every_n_steps=1", "data.num_workers=0", "data.batch_size=8", f"data.root={data_root}",
         "print_config=false", "test=false", "callbacks.augmented_images.num_images=8"]
        + [f"data.shapes.{k}={v}" for k, v in SMALL_SHAPES.items()] + overrides
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig().set_config(cfg)
    return cfg


@pytest.mark.slow
def test_wandb_offline_by_itself_logs_everything_and_a_resume_continues_the_run(
    no_wandb_account, tmp_path, shapes_cache, caplog
):
    from nfnet.app import tasks
    from nfnet.models import create_model

    first_dir, resumed_dir, other_dir = tmp_path / "first", tmp_path / "resumed", tmp_path / "other"
    with caplog.at_level(logging.INFO, logger="nfnet.app.loggers"):
        tasks.train(_cfg(first_dir, shapes_cache, []))
    assert wandb.run is None  # finished in train(), so the next job in this process gets its own run
    notices = [r.getMessage() for r in caplog.records if r.name == "nfnet.app.loggers" and r.levelno == logging.WARNING]
    assert len(notices) == 1 and "\n" not in notices[0]
    assert "offline" in notices[0] and "wandb sync" in notices[0] and str(first_dir / "wandb") in notices[0]

    (run,) = offline_runs(first_dir)
    assert run.exit_codes == [0]
    # Metrics, LR and AGC telemetry, every step (log_every_n_steps=1).
    for key in ("train/loss_step", "train/lr", "train/agc_clip_frac"):
        assert len(run.logged(key)) == 2, key
    assert all(0.0 <= v <= 1.0 for v in run.logged("train/agc_clip_frac"))
    for key in ("val/acc_top1", "val/ema_acc_top1", "val/loss"):
        assert len(run.logged(key)) == 1, key
    # The resolved config, one entry per group, and the parameter count.
    assert run.config["model"]["name"] == "nfnet_tiny"
    assert run.config["optim"]["agc"]["clipping"] == 0.01
    assert run.config["data"]["batch_size"] == 8
    expected_params = sum(p.numel() for p in create_model("nfnet_tiny", num_classes=10).parameters())
    assert run.config["params/total"] == expected_params
    # The grid of augmented training images: 8 images with their class names as captions.
    (grid,) = run.logged("train/augmented_images")
    assert grid["count"] == 8 and len(grid["captions"]) == 8
    assert all(caption in run.config["class_names"] for caption in grid["captions"])
    assert len(list((run.dir / "files" / "media" / "images" / "train").glob("augmented_images_*.png"))) == 8

    # Resuming from the checkpoint continues the same wandb run, at the next step.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nfnet.app.loggers"):
        tasks.train(_cfg(resumed_dir, shapes_cache,
                         [f"ckpt_path={first_dir}/checkpoints/last.ckpt", "trainer.max_epochs=2"]))
    (resumed,) = offline_runs(resumed_dir)
    assert resumed.id == run.id
    assert any(f"continuing run {run.id}" in r.getMessage() for r in caplog.records)
    assert min(resumed.logged("trainer/global_step")) > max(run.logged("trainer/global_step"))

    # A new training in the same process (the next job of a multirun) is a new run.
    tasks.train(_cfg(other_dir, shapes_cache, []))
    (other,) = offline_runs(other_dir)
    assert other.id != run.id and other.exit_codes == [0]


def test_mode_detection(no_wandb_account, monkeypatch):
    from nfnet.training.loggers import wandb_mode

    assert wandb_mode("disabled") == ("disabled", None)
    mode, reason = wandb_mode(None)
    assert mode == "offline" and "no wandb API key" in reason
    # A key but no server: port 9 (discard) on this machine refuses the connection at once.
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    wandb.teardown()
    mode, reason = wandb_mode(None)
    assert mode == "offline" and "cannot be reached" in reason
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert wandb_mode(None) == ("offline", None)


def test_a_multirun_job_is_named_after_its_overrides():
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from nfnet.app.runs import multirun_job_name

    cfg = compose_train(["optim.agc.clipping=0.02"])
    with read_write(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.job.override_dirname = "data.batch_size=32,optim.agc.clipping=0.02"
    HydraConfig().set_config(cfg)
    assert multirun_job_name() == "data.batch_size=32,optim.agc.clipping=0.02"
    with read_write(cfg.hydra):
        cfg.hydra.mode = RunMode.RUN
    HydraConfig().set_config(cfg)
    assert multirun_job_name() is None
