"""Loggers in use, as Lightning sees them: wandb made to work anywhere, CSV files written by
several processes, a resumed run continuing its wandb run, and every logger finished.

wandb: without an API key, or when its server cannot be reached, the run is written offline under
the run directory (nfnet.app.loggers says so once, with the command that uploads it later);
nobody is prompted and nothing hangs on the network. A run resumed from a checkpoint continues
the wandb run that wrote the checkpoint: `WandbRunInCheckpoint` stores its id there.
"""

from __future__ import annotations

import csv
import logging
import os
import socket
import sys
from typing import Any
from urllib.parse import urlparse

import lightning.pytorch as pl

log = logging.getLogger(__name__)

# Long enough for a slow link, short enough that an offline laptop does not notice.
REACHABILITY_TIMEOUT_S = 3.0
WANDB_RUN_KEY = "wandb_run_id"


def is_wandb(logger: Any) -> bool:
    from lightning.pytorch.loggers import WandbLogger

    return isinstance(logger, WandbLogger)


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


def finish_loggers(loggers: list[Any], status: str) -> None:
    """Finalize every logger, and close the wandb run, so that a multirun never merges two jobs
    into one wandb run; a failed job shows as failed."""
    for logger in loggers:
        try:
            logger.finalize(status)
        except Exception:  # a logger that cannot flush must not hide the run's own error
            log.exception("could not finalize logger %s", type(logger).__name__)
    wandb = sys.modules.get("wandb")  # only a run that imported wandb can have a run open
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=0 if status == "success" else 1)


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


def resumed_run_id(path: str | None) -> str | None:
    """The wandb run id stored in the checkpoint at `path` (the one a run resumes from), if any."""
    if not path or not os.path.isfile(os.path.expanduser(str(path))):
        return None
    import torch

    try:
        # mmap: only the few bytes of this key are read, not the weights.
        checkpoint = torch.load(os.path.expanduser(str(path)), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an unreadable checkpoint is Lightning's to report when it loads it
        return None
    return checkpoint.get(WANDB_RUN_KEY)


class WandbRunInCheckpoint(pl.Callback):
    """Stores the wandb run id in each checkpoint; `resumed_run_id` reads it back on resume."""

    def __init__(self, logger) -> None:
        self.logger = logger

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # `version` is the run id once the run exists, without starting one on other ranks.
        run_id = self.logger.version
        if run_id:
            checkpoint[WANDB_RUN_KEY] = str(run_id)
