"""One short training run shared by the eval, predict and export tests (trained once per session)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import open_dict

from conftest import SMALL_SHAPES, compose_train

OVERRIDES = [
    "logger=none", "trainer.max_epochs=2", "trainer.limit_train_batches=4", "data.num_workers=0",
    "data.batch_size=8", "data.eval_batch_size=32", "print_config=false", "test=false",
    "callbacks.augmented_images.num_images=8",
]


def trained_run(tmp_path_factory) -> Path:
    """The run directory of a 2-epoch nfnet_tiny run on the small shapes data: checkpoints/last.ckpt
    and metrics.json (the metrics of its last validation, which last.ckpt was saved after)."""
    from hydra.core.hydra_config import HydraConfig

    from nfnet.app import tasks

    run_dir = tmp_path_factory.getbasetemp() / "trained-run"
    if (run_dir / "metrics.json").exists():
        return run_dir
    data_root = data_cache(run_dir)
    shapes = [f"data.shapes.{k}={v}" for k, v in SMALL_SHAPES.items()]
    cfg = compose_train(OVERRIDES + shapes + [f"data.root={data_root}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig().set_config(cfg)
    tasks.train(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # Accuracies of a real validation: fractions, top-5 never below top-1.
    assert 0 <= metrics["val/acc_top1"] <= metrics["val/acc_top5"] <= 1
    assert 0 <= metrics["val/ema_acc_top1"] <= metrics["val/ema_acc_top5"] <= 1
    return run_dir


def data_cache(run_dir: Path) -> Path:
    """The run's data.root: the cache its shapes dataset was generated in (eval's root=)."""
    return run_dir.parent / "trained-run-data"


def shapes_root(run_dir: Path) -> Path:
    """The generated shapes dataset the run trained on (train/ and val/ class folders)."""
    return next(data_cache(run_dir).glob("shapes-*"))
