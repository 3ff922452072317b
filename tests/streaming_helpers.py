"""Test-only pieces for runs of train.py in their own processes (tests/ is on PYTHONPATH there, and
spawned DDP ranks import this module again when they unpickle what refers to it).

* a generated image folder with some bad files;
* `ReadLog`: which training images each rank read, as the SHA-1 of the bytes it got;
* `RankBatchLog`: `<epoch> <batch_idx> <global_step> <batch hash>` per rank;
* `KillJobAtStep`: SIGKILLs the whole job (every rank and the launching process) at a step, as a
  preemption does;
* `ScanCountingDataModule`: counts the header checks of image files, in every process, into the
  file named by $NFNET_TEST_SCAN_LOG.
"""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import torch
from torchvision.io import encode_jpeg, encode_png

from nfnet.data import folder_index
from nfnet.data.datamodule import ImageDataModule


def make_image_folder(root: Path, classes: int, per_class: int, size: int = 32, bad: bool = True) -> Path:
    """`classes` folders of `per_class` distinct random images (JPEG and PNG), plus, with `bad`,
    a text file, an empty file and a truncated JPEG under image names."""
    generator = torch.Generator().manual_seed(0)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = torch.randint(0, 256, (3, size + i % 5, size), dtype=torch.uint8, generator=generator)
            encoded = encode_jpeg(image, quality=90) if i % 2 else encode_png(image)
            (folder / f"{i:04d}.{'jpg' if i % 2 else 'png'}").write_bytes(encoded.numpy().tobytes())
    if bad:
        (root / "class_0" / "notes.jpg").write_text("not an image")
        (root / "class_1" / "empty.png").write_bytes(b"")
        whole = (root / "class_2" / "0001.jpg").read_bytes()
        (root / "class_2" / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    return root


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


class ReadLog(pl.Callback):
    """Appends `<sha1 of the bytes> <label>` for every training image this rank reads to
    `<path>.rank<global rank>` (loader workers must be 0: the reads happen in the rank)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        dataset = trainer.datamodule.train_set
        read, path = dataset.read, f"{self.path}.rank{trainer.global_rank}"

        def logged(index: int):
            data, label = read(index)
            with open(path, "a") as f:
                f.write(f"{sha1(data)} {label}\n")
            return data, label

        dataset.read = logged


class RankBatchLog(pl.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        digest = hashlib.sha1()
        for t in batch:
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(f"{trainer.current_epoch} {batch_idx} {trainer.global_step} {digest.hexdigest()}\n")


class KillJobAtStep(pl.Callback):
    """At the start of the batch after `step` optimizer steps (its checkpoints written), global
    rank 0 SIGKILLs its process group: the launching process and every rank."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == 0:
            os.killpg(os.getpgid(0), signal.SIGKILL)


_check_header = folder_index.check_header


def _counted_check_header(path: str):
    with open(os.environ["NFNET_TEST_SCAN_LOG"], "a") as f:
        f.write(f"{os.getpid()} {path}\n")
    return _check_header(path)


if "NFNET_TEST_SCAN_LOG" in os.environ:  # only in the processes of a counted run
    folder_index.check_header = _counted_check_header


class ScanCountingDataModule(ImageDataModule):
    """The datamodule itself; importing this module (as every process that builds or unpickles it
    does) counts each header check into $NFNET_TEST_SCAN_LOG."""
