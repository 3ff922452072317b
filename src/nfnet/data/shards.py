"""Packed datasets: LitData chunks of the original encoded images, read by index.

``python pack.py`` (nfnet.data.packing) writes, under one folder or object-store prefix::

    nfnet-pack.json     what was packed: format, source, classes, the split sizes, bad files skipped
    classes.txt         the class names, one a line, in label order
    manifest.csv        split,index,label,class,path: which source file is item `index` of a split
    train/ val/         one LitData dataset each (index.json + chunk-*.bin); an item is
                        {"image": the file's bytes as they were, "label": int}

Training reads a split as a map-style dataset (:class:`ShardedImageDataset`): item ``i`` is one
read of LitData's ``StreamingDataset[i]`` (a read at an offset of a chunk file on a local or
shared file system; two small ranged reads from ``s3://``, ``gs://`` or ``azure://``), so the
project's seeded sampler (nfnet.data.sampling) deals each rank its own examples, exactly as it
does for a folder: the same permutations, the same per-example seeds, bit-exact resume. No rank
lists a folder or reads another rank's examples. Decoding is the folder source's
(:func:`nfnet.data.folder.decode_rgb`), kept apart from :meth:`ShardedImageDataset.read`, which
hands over the encoded bytes as stored (for a pipeline that decodes on the device).

LitData is imported only when a pack is opened, so that importing this module stays light.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.utils.data import Dataset

from nfnet.data.folder import decode_rgb

PACK_FILE = "nfnet-pack.json"
CLASSES_FILE = "classes.txt"
MANIFEST_FILE = "manifest.csv"
SPLITS = ("train", "val")
FORMAT = "nfnet-pack"
# Bumped when the layout of a pack changes: a reader refuses other versions.
VERSION = 1
# The object-store prefixes LitData streams from; `local:` is LitData's stand-in for them on a
# local path (the same download and cache code), which is how the tests exercise that path.
REMOTE_PREFIXES = ("s3://", "gs://", "azure://", "r2://", "hf://", "local:")


class NotAPack(FileNotFoundError):
    """A root without a readable, current ``nfnet-pack.json``; the message says what to do."""


def is_remote(root: str) -> bool:
    return str(root).startswith(REMOTE_PREFIXES)


def join(root: str, *parts: str) -> str:
    """A path under a pack's root, which may be an object-store URI (always ``/``-separated)."""
    if is_remote(root):
        return "/".join([str(root).rstrip("/"), *parts])
    return os.path.join(os.path.expanduser(str(root)), *parts)


@dataclass
class PackInfo:
    """A pack's ``nfnet-pack.json``: the classes in label order and the size of each split."""

    root: str
    classes: list[str]
    sizes: dict[str, int]
    source: str = ""
    bad: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def _fetch_text(root: str, name: str, storage_options: Optional[dict] = None) -> str:
    """A small file of a pack, from a local folder or through LitData's downloader for a URI."""
    if not is_remote(root):
        with open(join(root, name), encoding="utf-8") as f:
            return f.read()
    from litdata.streaming.downloader import get_downloader

    scratch = tempfile.mkdtemp(prefix="nfnet-pack-")
    try:
        local = os.path.join(scratch, name)
        get_downloader(str(root), scratch, [], storage_options).download_file(join(root, name), local)
        with open(local, encoding="utf-8") as f:
            return f.read()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def read_pack_info(root: str, storage_options: Optional[dict] = None) -> PackInfo:
    """The pack at ``root``; raises :class:`NotAPack` when there is none (or only a damaged or
    unfinished one: ``nfnet-pack.json`` is written last)."""
    where = join(root, PACK_FILE)
    how = "write one with: python pack.py source=imagefolder root=<image folder> output_dir=<this folder>"
    try:
        text = _fetch_text(root, PACK_FILE, storage_options)
    except (OSError, ValueError, RuntimeError) as error:
        raise NotAPack(f"{where} cannot be read ({type(error).__name__}: {error}): not a packed dataset; {how}") from None
    try:
        meta = json.loads(text)
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"not a version-{VERSION} {FORMAT} file")
        classes = [str(c) for c in meta["classes"]]
        sizes = {split: int(meta["splits"][split]) for split in SPLITS}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise NotAPack(f"{where} is damaged or from another version ({error}); pack the data again: {how}") from None
    return PackInfo(str(root), classes, sizes, str(meta.get("source", "")), dict(meta.get("bad", {})), meta)


class ShardedImageDataset(Dataset):
    """One split of a pack -> (uint8 RGB (3, H, W) after ``transform``, label), by index.

    ``cache_dir``: where LitData keeps what it fetched from an object store (None: its default,
    ``$LITDATA_CACHE_DIR`` or ``~/.lightning/chunks``). The LitData reader is opened lazily in
    each process (a DataLoader worker, a spawned rank) and never pickled.
    """

    def __init__(
        self,
        info: PackInfo,
        split: str,
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        cache_dir: Optional[str] = None,
        storage_options: Optional[dict] = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {SPLITS}")
        if info.sizes[split] == 0:
            raise ValueError(f"{join(info.root, split)}: the {split} split of this pack is empty")
        self.classes = list(info.classes)
        self.url = join(info.root, split)
        self.name = split
        self.transform = transform
        self.cache_dir = cache_dir
        self.storage_options = storage_options
        self._length = info.sizes[split]
        self._stream = None

    def _open(self):
        from litdata import StreamingDataset

        stream = StreamingDataset(self.url, cache_dir=self.cache_dir, storage_options=self.storage_options)
        # len(stream) is one rank's share of LitData's own iteration; indexing is over all items.
        held = sum(end - start for start, end in stream.region_of_interest)
        if held != self._length:
            raise ValueError(
                f"{self.url} holds {held} images but its {PACK_FILE} says {self._length}: "
                "the pack was changed after it was written; pack it again"
            )
        return stream

    def __len__(self) -> int:
        return self._length

    def read(self, index: int) -> tuple[bytes, int]:
        """Item ``index`` as stored: the image file's encoded bytes and its label."""
        if self._stream is None:
            self._stream = self._open()
        item = self._stream[int(index)]
        return bytes(item["image"]), int(item["label"])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        data, label = self.read(index)
        try:
            image = decode_rgb(data)
        except Warning:
            raise  # a warning turned into an error by the user's filters is not a damaged pack
        except Exception as error:  # noqa: BLE001 - pack.py decoded every image it wrote
            raise ValueError(
                f"{self.url}: item {index} does not decode ({error}); pack.py checked every image it wrote, "
                "so the shards were damaged since: pack the data again"
            ) from None
        return (self.transform(image) if self.transform is not None else image), label

    def __getstate__(self) -> dict[str, Any]:
        # A reader holds open files and threads; each process opens its own.
        return {**self.__dict__, "_stream": None}

