"""Every option of every config group composes, resolves and is checked before work starts."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf, open_dict

from conftest import CONF_DIR, compose_train
from nfnet.config import ConfigError, check_config

# Groups whose options are plain `<group>/<option>.yaml` files; `model/base.yaml` is the shared
# part of every model option, not an option of its own.
GROUPS = ["model", "data", "augment", "optim", "trainer", "callbacks", "logger", "debug", "experiment"]
NOT_OPTIONS = {("model", "base")}


def _options():
    from pathlib import Path

    for group in GROUPS:
        for path in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
            if (group, path.stem) not in NOT_OPTIONS:
                yield group, path.stem


@pytest.mark.parametrize("group,option", list(_options()))
def test_every_option_composes_and_resolves(group, option):
    cfg = compose_train([f"{group}={option}"])
    cfg.paths.output_dir = "/tmp/out"  # hydra's runtime dir only exists inside a real run
    with open_dict(cfg):
        del cfg["hydra"]
    # throw_on_missing=False: `???` values (a dataset root to supply) are legitimate here.
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    if group in ("model", "augment", "optim"):
        check_config(cfg)


def test_model_option_reads_sizes_from_the_variant_table():
    cfg = compose_train(["model=nfnet_f3"])
    # NFNET_SPEC §1.10: F3 trains at 320, tests at 416, RA 415, dropout 0.4.
    assert (cfg.data.train_size, cfg.data.test_size) == (320, 416)
    assert cfg.augment.get("ra_level") is None  # the default augment is basic
    cfg = compose_train(["model=nfnet_f3", "augment=official"])
    assert cfg.augment.ra_level == 415
    assert cfg.model.drop_rate == 0.4


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model.name=nfnet_f9", "model.name='nfnet_f9'"),
        ("optim.agc.clipping=-0.1", "optim.agc.clipping=-0.1"),
        ("optim.agc.clipping=0", "optim.agc.clipping=0"),
        ("optim.label_smoothing=1.5", "optim.label_smoothing=1.5"),
        ("data.batch_size=0", "data.batch_size=0"),
        ("optim.ema.decay=1.0", "optim.ema.decay=1.0"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(override, needle):
    cfg = compose_train([override])
    with pytest.raises(ConfigError, match=re.escape(needle)):
        check_config(cfg)
