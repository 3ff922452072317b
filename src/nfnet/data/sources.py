"""Where the images of a `data` config come from, without Lightning: the embedded dataset
generated on first use, ImageNet's train/val folders, one folder split by a seeded fraction, or
the shards pack.py wrote (data=streaming: no folder at all, nfnet.data.shards).

`data` is the config's data section as a mapping (nfnet.app.schema.DataConfig); the datamodule
and the eval entry point both read their splits through here, so they always agree. Every
image folder is scanned and header-checked once into an index (nfnet.data.folder_index):
`prepare` builds it (one process per node), `splits` reads it, so no rank lists and opens a
large tree again; the index is kept next to the data, or under `data.index_dir`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nfnet.data.folder_index import FolderIndex, build_index, load_index
from nfnet.data.folder_split import seeded_split
from nfnet.data.shapes import ShapesSpec, ensure_shapes_dataset
from nfnet.data.shards import PackInfo, ShardedImageDataset, read_pack_info

Samples = list[tuple[str, int]]
# Where an index goes when the data's own folder cannot be written (a read-only mount).
DEFAULT_INDEX_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "nfnet-lightning",
                                 "folder-index")


@dataclass
class Splits:
    """The classes, the train and val samples, and the bad files the scan found (path -> why)."""

    classes: list[str]
    train: Samples
    val: Samples
    bad: dict[str, str] = field(default_factory=dict)
    # The index keys of the folders read, which other ranks can read them by without a walk.
    keys: dict[str, str] = field(default_factory=dict)


def root_of(data: Mapping[str, Any]) -> str:
    return os.path.expanduser(str(data["root"]))


def shapes_spec(data: Mapping[str, Any]) -> ShapesSpec:
    return ShapesSpec(**data["shapes"])


def folders(data: Mapping[str, Any]) -> dict[str, str]:
    """The image folders of the source: {"all": root} for one folder to split, else train and val."""
    root = Path(root_of(data))
    if data["source"] == "imagefolder":
        return {"all": str(root)}
    if data["source"] == "shapes":
        root = root / shapes_spec(data).cache_name()
    return {"train": str(root / "train"), "val": str(root / "val")}


def val_root(data: Mapping[str, Any]) -> str:
    """The folder the validation files' relative paths are taken from (the root they were split
    from, or the val folder)."""
    found = folders(data)
    return found.get("all") or found["val"]


def _index_dir(data: Mapping[str, Any]) -> str:
    return os.path.expanduser(str(data.get("index_dir") or DEFAULT_INDEX_DIR))


def generate(data: Mapping[str, Any]) -> None:
    """The embedded dataset, generated on first use."""
    if data["source"] == "shapes":
        ensure_shapes_dataset(root_of(data), shapes_spec(data))


def prepare(data: Mapping[str, Any]) -> dict[str, str]:
    """Writes what must exist before reading: the embedded dataset and each folder's index.
    Returns the index keys by folder name."""
    generate(data)
    if data["source"] == "streaming":
        return {}  # shards are read by index: there is no folder to list
    follow = data.get("follow_links", True)
    return {name: build_index(path, _index_dir(data), follow_links=follow).key for name, path in folders(data).items()}


def _read(path: str, data: Mapping[str, Any], key: str | None) -> FolderIndex:
    cache, follow = _index_dir(data), data.get("follow_links", True)
    index = load_index(path, cache, key=key, follow_links=follow) if key else None
    return index or build_index(path, cache, follow_links=follow)


def splits(data: Mapping[str, Any], keys: Mapping[str, str] | None = None) -> Splits:
    """The configured source's splits, from the folders' indexes (read by `keys` when given)."""
    keys = keys or {}
    indexes = {name: _read(path, data, keys.get(name)) for name, path in folders(data).items()}
    bad = {p: why for index in indexes.values() for p, why in index.bad.items()}
    found = {name: index.key for name, index in indexes.items()}
    if "all" in indexes:
        index = indexes["all"]
        train, val = seeded_split(index.samples, data["val_fraction"], data["split_seed"], root=index.root)
        return Splits(index.classes, train, val, bad, found)
    train, val = indexes["train"], indexes["val"]
    if val.classes != train.classes:
        raise ValueError(
            f"{val.root} has classes {val.classes[:5]}... but {train.root} has {train.classes[:5]}...: "
            "both splits need the same class folders"
        )
    return Splits(train.classes, train.samples, val.samples, bad, found)


def val_split(data: Mapping[str, Any]) -> Splits:
    """The validation split alone. For ImageNet it skips the 1.28M training files (minutes on a
    network file system) only to read the class names back: the val folders name them too."""
    if data["source"] != "imagefolder":
        index = _read(folders(data)["val"], data, None)
        return Splits(index.classes, [], index.samples, dict(index.bad))
    return splits(data)


def pack_info(data: Mapping[str, Any]) -> PackInfo:
    """data=streaming: the pack's classes and split sizes (one small file, local or fetched)."""
    return read_pack_info(root_of(data))


def packed_split(data: Mapping[str, Any], info: PackInfo, split: str, transform) -> ShardedImageDataset:
    """data=streaming: one split of the pack, read by index."""
    return ShardedImageDataset(info, split, transform, cache_dir=data.get("cache_dir"))
