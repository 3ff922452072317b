"""What Hydra says about the running job: whether it is one job of a multirun, and its name."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


def in_multirun(cfg: DictConfig | None = None) -> bool:
    """Whether this is one job of a multirun: from `cfg`'s hydra node when given (a composed config,
    before Hydra runs anything), else from the running Hydra job."""
    if cfg is not None:
        return str(OmegaConf.select(cfg, "hydra.mode")) == "RunMode.MULTIRUN"
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def multirun_job_name() -> str | None:
    """A multirun job's overrides as one string (wandb names its run after them), else None."""
    if not in_multirun():
        return None
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().job.override_dirname or None
