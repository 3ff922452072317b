"""Shared fixtures: configs composed from the real conf/ tree, shrunk to CPU-test size."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("NFNET_ROOT", str(ROOT))
# No test may reach the network or a wandb account.
os.environ.setdefault("WANDB_MODE", "disabled")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from nfnet.app.schema import register  # noqa: E402

register()
CONF_DIR = str(ROOT / "conf")

# A shapes dataset small enough to generate in about a second; cached once per session.
SMALL_SHAPES = {"seed": 0, "train_per_class": 24, "val_per_class": 8, "image_size": 64}


def ready_datamodule(cfg):
    """The datamodule of a composed train config, its data generated and its fit splits set up."""
    from nfnet.app import tasks  # Lightning: imported by the tests that train, not at collection

    datamodule = tasks.build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def classifier(num_classes: int = 10, model: dict | None = None, cls=None, **optim):
    """An NFNetClassifier (or subclass `cls`) built from the schema's defaults
    (nfnet.app.schema.section): the tiny variant unless `model` says otherwise, the paper's
    optimizer settings with `optim` over them (nested sections as dicts: `agc={"clipping": 0.02}`,
    `ema={"decay": 0.9}`)."""
    from nfnet.app.schema import section
    from nfnet.training.module import NFNetClassifier

    cls = cls or NFNetClassifier
    return cls(section("model", **{"name": "nfnet_tiny", **(model or {})}), section("optim", **optim), num_classes)


def compose_train(overrides: list[str] | None = None):
    """The train config as `python train.py <overrides>` would compose it (hydra node included)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides or [], return_hydra_config=True)


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shapes-cache")


@pytest.fixture
def cfg_train(tmp_path, shapes_cache):
    """A tiny, quick, CPU-only training config writing into tmp_path."""

    def make(overrides: list[str] | None = None):
        from hydra.core.hydra_config import HydraConfig

        cfg = compose_train(
            [
                "logger=none",
                "trainer.max_epochs=1",
                "data.num_workers=0",
                "data.batch_size=16",
                "data.eval_batch_size=32",
                f"data.root={shapes_cache}",
                "print_config=false",
            ]
            + (overrides or [])
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path)
            cfg.paths.log_dir = str(tmp_path)
            cfg.hydra.runtime.output_dir = str(tmp_path)
            for key, value in SMALL_SHAPES.items():
                if not any(o.startswith(f"data.shapes.{key}=") for o in overrides or []):
                    cfg.data.shapes[key] = value
        HydraConfig().set_config(cfg)
        return cfg

    yield make
    GlobalHydra.instance().clear()
