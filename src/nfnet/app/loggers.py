"""Loggers from the `logger` config group, with wandb made to work anywhere (nfnet.training.loggers).

Without an API key, or when its server cannot be reached, a wandb run is written offline under
the run directory and one log line says so and how to upload it later. A run resumed from a
checkpoint continues the wandb run that wrote the checkpoint. In a multirun each job is its own
run, named after the job's overrides.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import hydra
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from nfnet.app.runs import multirun_job_name
from nfnet.training.loggers import resumed_run_id, wandb_mode

log = logging.getLogger(__name__)

WANDB_TARGET = "lightning.pytorch.loggers.WandbLogger"


def build_loggers(cfg: DictConfig, resumed_from: str | None = None) -> list[Any]:
    """Instantiate each entry of the `logger` group (one key per logger); `resumed_from` is the
    checkpoint this run resumes from, whose wandb run it continues."""
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if not node or "_target_" not in node:
            continue
        if node._target_ == WANDB_TARGET:
            loggers.append(_wandb_logger(node, resumed_from))
        else:
            loggers.append(hydra.utils.instantiate(node))
    return loggers


def _wandb_logger(node: DictConfig, resumed_from: str | None):
    mode, reason = wandb_mode(node.get("mode"))
    overrides: dict[str, Any] = {"mode": mode}
    # Every DDP process builds its loggers; only rank zero writes the run, so only it says so.
    if reason and rank_zero_only.rank == 0:
        run_dir = os.path.join(str(node.get("save_dir") or "."), "wandb")
        dropped = " (log_model is off: checkpoints cannot be uploaded offline)" if node.get("log_model") else ""
        log.warning(
            "wandb: %s, so this run is logged offline in %s%s; upload it later with: wandb sync %s",
            reason, run_dir, dropped, os.path.join(run_dir, "offline-run-*"),
        )
    if reason:
        overrides["log_model"] = False
    if node.get("id") is None:
        run_id = resumed_run_id(resumed_from)
        if run_id and rank_zero_only.rank == 0:
            log.info("wandb: continuing run %s, which wrote the checkpoint being resumed", run_id)
        if run_id:
            overrides["id"] = run_id
    if node.get("name") is None:
        overrides["name"] = multirun_job_name()
    return hydra.utils.instantiate(node, **overrides)


def loggable_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as loggers show it: one column per top-level group (model.name, ...)."""
    wiring = ("hydra", "module", "datamodule")  # Hydra's own settings, and the groups again
    return {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in cfg
        if key not in wiring
    }
