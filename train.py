"""Train an NFNet: `python train.py [group=option ...] [key=value ...]` (see README.md)."""

import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("NFNET_ROOT", str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from nfnet.config import ConfigError, register_resolvers  # noqa: E402

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from nfnet import tasks

    # Lightning installs its own console handler when imported before logging is configured;
    # hand its records to the handlers Hydra set up, so each line appears once, in the run's
    # log file too.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True

    from nfnet.checkpoints import TrainingStopped

    try:
        metrics = tasks.train(cfg)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as error:  # non-finite steps in a row, a checkpoint refused: said in one line
        print(f"training stopped: {error}", file=sys.stderr)
        sys.exit(1)
    value = metrics.get(cfg.get("optimized_metric"))
    return float(value) if value is not None else None


if __name__ == "__main__":
    from nfnet.cli import precheck
    from nfnet.train_checks import check_config

    # Bad overrides are reported in one line before Hydra creates a run directory.
    precheck(ROOT / "conf", "train", check_config)
    main()
