"""ImageDataModule: image folders -> uint8 batches, with the official or a basic augmentation.

Batches leave the workers as uint8 (3, H, W) images, 4x fewer bytes than float, and the
LightningModule normalizes them on the device. With `augment="official"` each loader batch holds
2B raw images (float, as the official resize leaves them) that the collate function mixes into
B examples (half MixUp, half CutMix), truncates to uint8 and then RandAugments, as DeepMind's
pipeline does; targets are then soft (B, K) float distributions. Otherwise targets are integer
labels. An epoch is N training examples whatever the mixing (2N raw reads with it), so a run
takes the official number of steps (nfnet.data.sampling).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from nfnet.data import sources
from nfnet.data.folder import ImageFolderDataset
from nfnet.data.device_pipeline import DeviceAugment
from nfnet.data.mixing import OfficialCollate
from nfnet.data.plans import EncodedBatch, EncodedImageDataset, PlanCollate
from nfnet.data.options import AUGMENTS, SOURCES
from nfnet.data.randaugment import RandAugment
from nfnet.data.randaugment_levels import parse_ra_level
from nfnet.data.sampling import ResumableSampler, SeededCollate, SeededDataset
from nfnet.data.transforms import BasicTrainTransform, InceptionCrop, ResizeCropEval
from nfnet.data.workers import usable_workers

# Lightning warns on a mid-epoch resume unless the DataLoader object itself is stateful; here the
# sampler is resumed through this datamodule's state_dict instead (nfnet.data.sampling).
warnings.filterwarnings("ignore", message=r".*ended before the epoch ended and your dataloader is not resumable.*")


class ImageDataModule(pl.LightningDataModule):
    """`data` and `augment` are the config's sections as plain mappings (their schema and defaults:
    nfnet.app.schema.DataConfig / AugmentConfig), so the hyperparameters stay checkpoint-safe.

    batch_size:
        examples per device per step, after mixing (the loader reads twice as many raw images when
        the official augmentation mixes them); the app derives it from data.batch_size or
        data.global_batch_size.
    """

    def __init__(self, data: Mapping[str, Any], augment: Mapping[str, Any], batch_size: int) -> None:
        super().__init__()
        if data["source"] not in SOURCES:
            raise ValueError(f"data.source={data['source']!r} is not one of {SOURCES}")
        if augment["name"] not in AUGMENTS:
            raise ValueError(f"augment.name={augment['name']!r} is not one of {AUGMENTS}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.classes: list[str] | None = None
        self.train_set = self.val_set = None
        # The folder indexes' keys, from prepare_data on the process that built them.
        self.index_keys: dict[str, str] | None = None
        # data.decode=gpu: the batched device stage, built on the first batch.
        self._device_augment: DeviceAugment | None = None

    def prepare_data(self) -> None:
        # Runs once per node before setup: the only place that writes to disk (the embedded
        # dataset, the folder indexes).
        self.index_keys = sources.prepare(self.hparams.data)

    @property
    def num_classes(self) -> int:
        if self.classes is None:
            raise RuntimeError("call prepare_data() and setup() before asking for num_classes")
        return len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data, keys = self.hparams.data, self.index_keys
        if data["source"] == "streaming":
            self._setup_streaming(data)
            return
        if self.trainer is not None:
            # Every rank reads the indexes global rank 0 prepared, by key: no rank walks the tree.
            keys = self.trainer.strategy.broadcast(keys)
        found = self.read_splits(keys)
        self.classes = found.classes
        if self._decode_on_device:
            # The workers read bytes and draw the crops; the device decodes and crops (transfer_batch_to_device).
            self.train_set = EncodedImageDataset(
                found.train, self.classes, data["train_size"], max_bad_fraction=data["max_bad_fraction"],
                name="train", known_bad=found.bad,
            )
        else:
            self.train_set = ImageFolderDataset(
                found.train, self.classes, self._train_transform(), max_bad_fraction=data["max_bad_fraction"],
                name="train", known_bad=found.bad,
            )
        self.val_set = ImageFolderDataset(
            found.val, self.classes, ResizeCropEval(data["test_size"], pad=data["eval_pad"]),
            max_bad_fraction=data["max_bad_fraction"], name="val", known_bad=found.bad,
        )

    def _setup_streaming(self, data) -> None:
        # Shards need no index and no walk: each rank reads the pack's metadata and then only
        # the examples its sampler deals it, by index (nfnet.data.shards).
        info = sources.pack_info(data)
        self.classes = info.classes
        self.train_set = sources.packed_split(data, info, "train", self._train_transform())
        self.val_set = sources.packed_split(data, info, "val", ResizeCropEval(data["test_size"], pad=data["eval_pad"]))

    def read_splits(self, keys: dict[str, str] | None) -> sources.Splits:
        """The classes and the samples of each split; an update round (nfnet.app.rounds) chooses
        its own from the folder and the model registry."""
        return sources.splits(self.hparams.data, keys)

    # ----------------------------------------------------------------- transforms
    def _train_transform(self):
        data, augment = self.hparams.data, self.hparams.augment
        if augment["name"] == "official":
            return InceptionCrop(data["train_size"], flip=augment["hflip"], dtype=torch.float32)
        if augment["name"] == "basic":
            # RandAugment here acts on each image (the official one acts on mixed images, in the collate).
            return BasicTrainTransform(data["train_size"], scale=(augment["crop_min_area"], 1.0), flip=augment["hflip"],
                                       randaugment=self._randaugment())
        return ResizeCropEval(data["train_size"], pad=data["eval_pad"])

    @property
    def _decode_on_device(self) -> bool:
        return self.hparams.data.get("decode", "cpu") == "gpu"

    def _randaugment(self) -> RandAugment | None:
        level = self.hparams.augment["ra_level"]
        return RandAugment(*parse_ra_level(level)) if level else None

    def _train_collate(self) -> OfficialCollate | None:
        augment = self.hparams.augment
        if augment["name"] != "official":
            return None
        # With GPU decoding the collate only draws (PlanCollate); the same draws, the same pixels.
        collate = PlanCollate if self._decode_on_device else OfficialCollate
        extra = {"size": self.hparams.data["train_size"]} if self._decode_on_device else {}
        return collate(
            self.num_classes, randaugment=self._randaugment(), mixup_alpha=augment["mixup_alpha"],
            mixup=augment["mixup"], cutmix=augment["cutmix"], **extra,
        )

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        if isinstance(batch, EncodedBatch):
            # nvjpeg reads the bytes from host memory: the whole device stage runs here, and the
            # module's normalisation then gets the uint8 images it always gets.
            if self._device_augment is None:
                self._device_augment = DeviceAugment(self.hparams.data["train_size"], self._randaugment())
            return self._device_augment(batch, device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ----------------------------------------------------------------- loaders
    def _loader(self, dataset, batch_size: int, shuffle: bool, drop_last: bool, collate_fn=None, sampler=None) -> DataLoader:
        data = self.hparams.data
        workers = usable_workers(data["num_workers"])
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=data["pin_memory"],
            persistent_workers=data["persistent_workers"] and workers > 0,
            collate_fn=collate_fn,
        )

    @property
    def num_train_examples(self) -> int:
        """N, the training examples of one epoch (the train split's images, whatever the mixing)."""
        if self.train_set is None:
            raise RuntimeError("call prepare_data() and setup() before asking for num_train_examples")
        return len(self.train_set)

    def train_dataloader(self) -> DataLoader:
        collate = self._train_collate()
        # Every loader batch is whole (XLA and compile never recompile). Order and augmentation
        # draws are functions of (seed, position in the stream), and the sampler starts where a
        # resumed checkpoint stopped (nfnet.data.sampling; state_dict below).
        resume = getattr(self, "_resume_position", None) or {}
        self._data_seed = resume.get("seed", getattr(self, "_data_seed", None))
        if self._data_seed is None:
            self._data_seed = torch.initial_seed()  # seed_everything's seed, or the process's random one
        trainer = self.trainer
        sampler = ResumableSampler(
            len(self.train_set), self.batch_size, self._data_seed,
            num_replicas=trainer.world_size if trainer else 1, rank=trainer.global_rank if trainer else 0,
            epoch=resume.get("epoch", 0), start_batch=resume.get("batches", 0),
            # Mixing turns 2 raw images into 1 example, so the loader reads twice the batch.
            reads_per_example=collate.reads_per_example if collate is not None else 1,
            accumulate=trainer.accumulate_grad_batches if trainer else 1,
        )
        self._resume_position = None
        return self._loader(
            SeededDataset(self.train_set), sampler.raw_batch, shuffle=False, drop_last=True,
            collate_fn=SeededCollate(collate), sampler=sampler,
        )

    # ----------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, int]:
        """Where the training data stands: the data seed, the epoch and its batches already trained."""
        trainer = self.trainer
        if trainer is None or getattr(self, "_data_seed", None) is None:
            return {}
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"seed": int(self._data_seed), "epoch": int(trainer.current_epoch), "batches": int(batches)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        # Read by the next train_dataloader(), which Lightning builds after restoring this.
        self._resume_position = dict(state_dict)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.hparams.data["eval_batch_size"] or self.batch_size, False, False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
