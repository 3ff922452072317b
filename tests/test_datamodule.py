"""ImageDataModule built from the composed configs: the first training batch is a function of
the seed alone (images and soft targets bit-identical for the same seed, different otherwise),
with loader worker processes and with the official augmentation (crop, MixUp/CutMix, RandAugment).
"""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function

from nfnet.data.datamodule import ImageDataModule
from nfnet.app.tasks import build_datamodule


def first_train_batch(cfg, seed: int, lightning_worker_init: bool = False):
    """Seed as `python train.py seed=<seed>` does, build the datamodule as tasks.py does, and
    take the first batch of a fresh train loader (optionally with the worker_init_fn that the
    Trainer adds after `seed_everything(workers=True)`)."""
    pl.seed_everything(seed, workers=True)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    if lightning_worker_init:
        assert loader.worker_init_fn is None  # the Trainer only adds its own to a loader without
        loader.worker_init_fn = partial(pl_worker_init_function, rank=0)
    it = iter(loader)
    try:
        return next(it)
    finally:
        del it  # shuts the worker processes down


@pytest.mark.parametrize(
    "augment, workers, lightning_init",
    [("official", 0, False), ("official", 2, False), ("official", 2, True), ("light", 2, False)],
)
def test_first_batch_depends_on_the_seed_only(cfg_train, augment, workers, lightning_init):
    cfg = cfg_train(
        [
            f"augment={augment}",
            f"data.num_workers={workers}",
            "data.persistent_workers=false",
            "data.batch_size=8",
        ]
    )
    x1, y1 = first_train_batch(cfg, 3, lightning_init)
    x2, y2 = first_train_batch(cfg, 3, lightning_init)
    x3, y3 = first_train_batch(cfg, 4, lightning_init)
    assert x1.dtype == torch.uint8 and x1.shape[0] == 8
    if augment == "official":
        # 16 raw images mixed into 8 examples with soft targets.
        assert y1.dtype == torch.float32 and y1.shape[0] == 8
        assert torch.allclose(y1.sum(1), torch.ones(8))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    if augment == "official":
        assert not torch.equal(y1, y3)


def test_worker_count_does_not_change_seeded_file_order(cfg_train):
    # The shuffle order is drawn in the main process: the same files in the same order with or
    # without workers (the random augmentation itself may differ, as workers have their own RNG).
    labels = []
    for workers in (0, 2):
        cfg = cfg_train(
            [
                "augment=none",
                f"data.num_workers={workers}",
                "data.persistent_workers=false",
                "data.batch_size=8",
            ]
        )
        x, y = first_train_batch(cfg, 5)
        labels.append((x, y))
    assert torch.equal(labels[0][0], labels[1][0]) and torch.equal(labels[0][1], labels[1][1])


def test_official_loader_reads_two_raw_images_per_example(cfg_train):
    cfg = cfg_train(["augment=official", "data.num_workers=0", "data.batch_size=4"])
    dm = build_datamodule(cfg)
    assert isinstance(dm, ImageDataModule)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.batch_size == 8 and loader.drop_last


def test_gpu_decoding_gives_the_cpu_pipelines_batch(cfg_train):
    """data.decode=gpu: the workers only read bytes and draw; the datamodule's transfer hook runs
    the device stage (here on the CPU). Same seed, same first batch, bit for bit."""
    batches = {}
    for decode in ("cpu", "gpu"):
        cfg = cfg_train(["augment=official", "data.num_workers=0", "data.batch_size=6", f"data.decode={decode}"])
        pl.seed_everything(3, workers=True)
        dm = build_datamodule(cfg)
        dm.prepare_data()
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        batches[decode] = dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    (cpu_images, cpu_targets), (gpu_images, gpu_targets) = batches["cpu"], batches["gpu"]
    assert gpu_images.dtype == torch.uint8 and gpu_images.shape == cpu_images.shape
    assert torch.equal(gpu_images, cpu_images) and torch.equal(gpu_targets, cpu_targets)


def test_gpu_decoding_needs_the_official_augmentation(cfg_train):
    from nfnet.app.checks import check_config
    from nfnet.errors import ConfigError

    with pytest.raises(ConfigError, match="data.decode=gpu .* augment=official"):
        check_config(cfg_train(["augment=basic", "data.decode=gpu"]), this_machine=False)
