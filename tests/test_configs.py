"""Every option of every config group composes, resolves, passes the checks and instantiates; the
paper recipes hold the paper's numbers (NFNET_SPEC §1.10, §4)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import open_dict

from conftest import CONF_DIR, compose_train
from nfnet.app.machine import per_device_batch_size
from nfnet.errors import ConfigError
from nfnet.app.checks import check_config

# Every group in conf/ with its options; `model/base.yaml` is the shared part of every model
# option, not an option of its own. (tpu has its own tests; it needs torch-xla to instantiate.)
GROUPS = ["model", "data", "augment", "optim", "trainer", "callbacks", "logger", "debug", "experiment",
          "hparams_search", "launcher", "paths", "hydra"]
NOT_OPTIONS = {("model", "base")}
# Values a user must supply for some options; given here so that the rest can be checked.
SUPPLIED = {
    ("data", "imagenet"): ["data.root=/data/imagenet"],
    ("data", "imagefolder"): ["data.root=/data/photos"],
    ("data", "streaming"): ["data.root=/data/shards"],
    ("experiment", "finetune"): ["data.root=/data/photos", "model.pretrained=/weights/F0_haiku.npz"],
}
PORTABLE_TRAINERS = {"default", "cpu", "ddp_cpu"}  # instantiable without a GPU or TPU


def _options():
    for group in GROUPS:
        for path in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
            if (group, path.stem) not in NOT_OPTIONS:
                yield group, path.stem


def _supplied(group, option):
    if group == "experiment" and option.startswith("imagenet"):
        return ["data.root=/data/imagenet"]
    return SUPPLIED.get((group, option), [])


@pytest.mark.parametrize("group,option", list(_options()))
def test_every_option_composes_resolves_and_passes_the_portable_checks(group, option, tmp_path):
    from hydra.core.hydra_config import HydraConfig

    from nfnet.app.loggers import loggable_config

    cfg = compose_train([f"{group}={option}", *_supplied(group, option)])
    HydraConfig().set_config(cfg)  # launcher=slurm reads `${hydra:launcher...}`
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    resolved = loggable_config(cfg)  # every value resolved, as the loggers receive it
    assert resolved["model"]["name"] and "???" not in str(resolved)
    # Portable checks: what does not depend on this machine's files and devices.
    check_config(cfg, this_machine=False)


@pytest.mark.parametrize("option", sorted(PORTABLE_TRAINERS))
def test_cpu_trainers_instantiate(option, tmp_path):
    import hydra

    cfg = compose_train([f"trainer={option}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.world_size == (2 if option == "ddp_cpu" else 1)
    if option == "ddp_cpu":  # spawned processes: a pytest or Hydra run is never re-executed
        assert type(trainer.strategy.launcher).__name__ == "_MultiProcessingLauncher"


@pytest.mark.parametrize("option", ["default", "none"])
def test_callback_options_instantiate(option, tmp_path):
    from nfnet.app.tasks import _instantiate_all

    cfg = compose_train([f"callbacks={option}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    names = sorted(type(c).__name__ for c in _instantiate_all(cfg.callbacks))
    if option == "none":
        assert names == []
    else:
        # best + last + mid-epoch step checkpoints, progress bar, augmented-image grid; no LR
        # monitor, no EMA callback
        assert names == ["AugmentedImageGrid", "ModelCheckpoint", "ModelCheckpoint", "ModelCheckpoint", "RichProgressBar"]
        best, last = (cfg.callbacks.model_checkpoint, cfg.callbacks.last_checkpoint)
        assert (best.monitor, best.mode) == ("val/acc_top1", "max") and last.filename == "last"


@pytest.mark.parametrize("option", ["csv", "tensorboard", "wandb", "many", "none"])
def test_logger_options_instantiate(option, tmp_path):
    from nfnet.app.loggers import build_loggers

    cfg = compose_train([f"logger={option}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    names = sorted(type(logger).__name__ for logger in build_loggers(cfg))  # WANDB_MODE=disabled (conftest)
    expected = {"csv": ["CSVLogger"], "tensorboard": ["TensorBoardLogger"], "wandb": ["WandbLogger"],
                "many": ["CSVLogger", "TensorBoardLogger", "WandbLogger"], "none": []}[option]
    assert names == expected


def test_model_option_reads_sizes_from_the_variant_table():
    cfg = compose_train(["model=nfnet_f3"])
    # NFNET_SPEC §1.10: F3 trains at 320, tests at 416, RA 415, dropout 0.4.
    assert (cfg.data.train_size, cfg.data.test_size) == (320, 416)
    assert cfg.augment.get("ra_level") is None  # the default augment is not the official one
    cfg = compose_train(["model=nfnet_f3", "augment=official"])
    assert cfg.augment.ra_level == 415
    assert cfg.model.drop_rate == 0.4


# NFNET_SPEC §1.10: (train size, test size, RandAugment level, dropout) per F variant.
PAPER_VARIANTS = {
    0: (192, 256, 405, 0.2), 1: (224, 320, 410, 0.3), 2: (256, 352, 410, 0.4), 3: (320, 416, 415, 0.4),
    4: (384, 512, 415, 0.5), 5: (416, 544, 415, 0.5), 6: (448, 576, 415, 0.5), 7: (480, 608, 415, 0.5),
}


@pytest.mark.parametrize("index", sorted(PAPER_VARIANTS))
def test_imagenet_experiments_are_the_paper_recipe(index):
    from nfnet.optim.schedule import scale_lr

    cfg = compose_train([f"experiment=imagenet_f{index}", "data.root=/data/imagenet"])
    train_size, test_size, ra_level, drop_rate = PAPER_VARIANTS[index]
    assert cfg.model.name == f"nfnet_f{index}"
    assert (cfg.data.train_size, cfg.data.test_size, cfg.augment.ra_level, cfg.model.drop_rate) == (
        train_size, test_size, ra_level, drop_rate)
    assert (cfg.data.source, cfg.augment.name, cfg.data.eval_pad) == ("imagenet", "official", 32)
    # NFNET_SPEC §4: global batch 4096, base LR 0.1 scaled by batch/256 (peak 1.6), 360 epochs,
    # 5 warmup epochs, AGC lambda 0.01, weight decay 2e-5, label smoothing 0.1, EMA 0.99999,
    # Nesterov momentum 0.9, stochastic depth 0.25, seed 0.
    optim = cfg.optim
    assert cfg.data.global_batch_size == 4096 and cfg.trainer.max_epochs == 360
    assert scale_lr(optim.base_lr, cfg.data.global_batch_size, optim.reference_batch) == pytest.approx(1.6)
    assert (optim.base_lr, optim.warmup_epochs, optim.agc.clipping, optim.weight_decay) == (0.1, 5, 0.01, 2e-5)
    assert (optim.label_smoothing, optim.ema.decay, optim.momentum, optim.nesterov) == (0.1, 0.99999, 0.9, True)
    assert cfg.model.stochdepth_rate == 0.25 and cfg.seed == 0
    # Multi-GPU bf16; on 8 GPUs each takes 512, on 8 GPUs x 2 accumulation steps 256.
    assert (cfg.trainer.strategy, cfg.trainer.precision) == ("ddp", "bf16-mixed")
    for devices, accumulate, per_device in ((8, 1, 512), (8, 2, 256)):
        cfg_n = compose_train([f"experiment=imagenet_f{index}", "data.root=/data/imagenet",
                               f"trainer.devices={devices}", f"trainer.accumulate_grad_batches={accumulate}"])
        assert per_device_batch_size(cfg_n) == per_device


def test_finetune_experiment_starts_from_weights_on_a_folder():
    cfg = compose_train(["experiment=finetune", "data.root=/data/photos", "model.pretrained=/w/F0_haiku.npz"])
    assert cfg.data.source == "imagefolder" and cfg.model.pretrained == "/w/F0_haiku.npz"
    assert cfg.optim.base_lr < 0.1  # a trained trunk takes smaller steps than training from scratch
    with pytest.raises(ConfigError, match="model.pretrained is required"):
        check_config(compose_train(["experiment=finetune", "data.root=/data/photos"]), this_machine=False)


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
