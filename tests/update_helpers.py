"""What the update.py tests share: the small, quick settings of a round, the config as update.py
composes it, and update.py run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
# Small and quick: 32 px shapes, a few steps per round, nothing but what is tested.
QUICK = ["print_config=false", "logger=none", "callbacks.rich_progress_bar=null", "callbacks.augmented_images=null",
         "data.num_workers=0", "data.batch_size=16", "data.eval_batch_size=64", "data.train_size=32",
         "data.test_size=32", "data.eval_pad=0", "data.val_fraction=0.2"]


def compose_update(tmp_path: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("update", overrides=[*QUICK, f"paths.log_dir={tmp_path / 'logs'}", *overrides],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig().set_config(cfg)
    return cfg


def update_command(tmp_path: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "update.py"), *QUICK, f"paths.log_dir={tmp_path / 'logs'}", *overrides]


def quiet_env() -> dict[str, str]:
    """The environment of an entry point run as a user runs it: one-line errors, no traceback."""
    return {**os.environ, "HYDRA_FULL_ERROR": "0"}


def update_py(tmp_path: Path, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(update_command(tmp_path, *overrides), capture_output=True, text=True, timeout=timeout,
                          env=quiet_env())
