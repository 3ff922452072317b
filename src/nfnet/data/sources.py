"""Where the images of a `data` config come from, without Lightning: the embedded dataset
generated on first use, ImageNet's train/val folders, or one folder split by a seeded fraction.

`data` is the config's data section as a mapping (nfnet.app.schema.DataConfig); the datamodule
and the eval entry point both read their splits through here, so they always agree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nfnet.data.folder import scan_image_folder, seeded_split
from nfnet.data.shapes import ShapesSpec, ensure_shapes_dataset

Samples = list[tuple[str, int]]


def root_of(data: Mapping[str, Any]) -> str:
    return os.path.expanduser(str(data["root"]))


def shapes_spec(data: Mapping[str, Any]) -> ShapesSpec:
    return ShapesSpec(**data["shapes"])


def prepare(data: Mapping[str, Any]) -> None:
    """Writes what must exist before reading (the embedded dataset, generated once)."""
    if data["source"] == "shapes":
        ensure_shapes_dataset(root_of(data), shapes_spec(data))


def split_samples(data: Mapping[str, Any]) -> tuple[list[str], Samples, Samples]:
    """(classes, train samples, val samples) of the configured source."""
    root = Path(root_of(data))
    if data["source"] == "imagefolder":
        classes, samples = scan_image_folder(str(root))
        train, val = seeded_split(samples, data["val_fraction"], data["split_seed"])
        return classes, train, val
    if data["source"] == "shapes":
        root = root / shapes_spec(data).cache_name()
    classes, train = scan_image_folder(str(root / "train"))
    val_classes, val = scan_image_folder(str(root / "val"))
    if val_classes != classes:
        raise ValueError(
            f"{root}/val has classes {val_classes[:5]}... but {root}/train has {classes[:5]}...: "
            "both splits need the same class folders"
        )
    return classes, train, val


def val_classes_and_samples(data: Mapping[str, Any]) -> tuple[list[str], Samples]:
    """The validation split alone. For ImageNet it skips listing the 1.28M training files (minutes
    on a network file system) only to read the class names back: the val folders name them too."""
    if data["source"] == "imagenet":
        return scan_image_folder(os.path.join(root_of(data), "val"))
    classes, _, val = split_samples(data)
    return classes, val
