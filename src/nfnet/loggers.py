"""Loggers from the `logger` config group, with wandb made to work anywhere.

wandb: without an API key, or when its server cannot be reached, the run is written offline under
the run directory and one log line says so and how to upload it later; nobody is prompted and
nothing hangs on the network. A run resumed from a checkpoint continues the wandb run that wrote
the checkpoint. In a multirun each job is its own run, named after the job's overrides.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import socket
from typing import Any
from urllib.parse import urlparse

import hydra
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from nfnet.callbacks import WANDB_RUN_KEY

log = logging.getLogger(__name__)

# Long enough for a slow link, short enough that an offline laptop does not notice.
REACHABILITY_TIMEOUT_S = 3.0


def build_loggers(cfg: DictConfig) -> list[Any]:
    """Instantiate each entry of the `logger` group (one key per logger)."""
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if not node or "_target_" not in node:
            continue
        if node._target_.rsplit(".", 1)[-1] == "WandbLogger":
            loggers.append(_wandb_logger(cfg, node))
        else:
            loggers.append(hydra.utils.instantiate(node))
    return loggers


def continue_csv_files(loggers: list[Any]) -> None:
    """Let this process's CSV writers append to a metrics.csv that other processes wrote.

    Lightning's CSV writer rewrites the file under a header of the columns it has seen itself.
    After a `ddp_spawn` fit the training columns were seen only by the spawned processes, so the
    test that follows in a new spawn failed on the rows it read back ("dict contains fields not
    in fieldnames"). Starting the writer from the file's own header keeps every column.
    """
    from lightning.pytorch.loggers import CSVLogger

    for logger in loggers:
        if not isinstance(logger, CSVLogger) or not os.path.isfile(logger.experiment.metrics_file_path):
            continue
        with open(logger.experiment.metrics_file_path, newline="") as file:
            header = next(csv.reader(file), [])
        writer = logger.experiment
        writer.metrics_keys = sorted(set(writer.metrics_keys) | set(header))


def wandb_mode(requested: str | None) -> tuple[str, str | None]:
    """(mode, why it is offline) for `requested`; an explicit mode or WANDB_MODE wins."""
    if requested:
        return requested, None
    env = os.environ.get("WANDB_MODE")
    if env:
        return ("offline" if env == "dryrun" else env), None
    import wandb

    # verify=False: only whether a key is configured; checking it would need the network.
    if not wandb.login(prompt=False, verify=False):
        return "offline", "no wandb API key is configured (not logged in)"
    url = urlparse(wandb.setup().settings.base_url)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=REACHABILITY_TIMEOUT_S).close()
    except OSError:
        return "offline", f"the wandb server {host} cannot be reached"
    return "online", None


def resumed_run_id(cfg: DictConfig) -> str | None:
    """The wandb run id stored in the checkpoint this run resumes from, if any."""
    path = cfg.get("ckpt_path")
    if path == "last":
        dirpath = cfg.get("callbacks", {}).get("model_checkpoint", {}).get("dirpath")
        candidates = glob.glob(os.path.join(str(dirpath), "last*.ckpt")) if dirpath else []
        path = max(candidates, key=os.path.getmtime) if candidates else None
    if not path or not os.path.isfile(os.path.expanduser(str(path))):
        return None
    import torch

    try:
        # mmap: only the few bytes of this key are read, not the weights.
        checkpoint = torch.load(os.path.expanduser(str(path)), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an unreadable checkpoint is Lightning's to report when it loads it
        return None
    return checkpoint.get(WANDB_RUN_KEY)


def _multirun_job_name() -> str | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return hydra_cfg.job.override_dirname or None


def _wandb_logger(cfg: DictConfig, node: DictConfig):
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
        run_id = resumed_run_id(cfg)
        if run_id and rank_zero_only.rank == 0:
            log.info("wandb: continuing run %s, which wrote the checkpoint being resumed", run_id)
        if run_id:
            overrides["id"] = run_id
    if node.get("name") is None:
        overrides["name"] = _multirun_job_name()
    return hydra.utils.instantiate(node, **overrides)
