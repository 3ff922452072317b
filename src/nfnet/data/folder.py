"""Image-folder sources: decoding, and the dataset with its bad-file handling.

Layouts: ImageNet-style ``root/train/<class>/...`` + ``root/val/<class>/...`` (scan each split
directory) or one generic ``root/<class>/...`` folder split with :func:`seeded_split`. Scanning
(safe on hostile trees) is in :mod:`nfnet.data.folder_scan`, splits and manifests in
:mod:`nfnet.data.folder_split`, the index that lets every rank skip the header checks in
:mod:`nfnet.data.folder_index`; their public names are re-exported here.

Bad files never stop a run, up to ``max_bad_fraction``. They are caught in two places:

* Up front, when a dataset is built (``verify=True``): zero-byte files and files whose first
  bytes are not a known image signature (a text or HTML page saved as ``.jpg``) are dropped.
  This costs one ``open`` + a 16-byte read per file, done on a thread pool, so it scales to
  ImageNet's 1.28M files; it is what lets a split that is mostly junk fail *before* training.
  A folder index (``known_bad=index.bad``) carries these results, so no file is opened then.
* Lazily, in ``__getitem__``: corrupt or truncated files have valid headers, and finding them
  would need a full decode of every file up front (minutes on ImageNet), so they are found when
  first decoded. Such a file is warned about once (per process), and the item is replaced by the
  next decodable sample in path order (deterministic, and usually the same class, since samples
  are sorted by path). If the bad files known to this process exceed the allowed fraction, the
  run stops with :class:`TooManyBadFiles` rather than silently training on a shrinking dataset.

Each bad file is logged by name at WARNING level (logger ``nfnet.data.folder``); a summary with
the count is also issued through :mod:`warnings` so it shows once in any console.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from nfnet.data.folder_files import IMAGE_EXTENSIONS, check_header, printable, read_file, signature, summary
from nfnet.data.folder_index import FolderIndex, build_index, load_index
from nfnet.data.folder_scan import EmptyClassFolder, scan_image_folder
from nfnet.data.folder_split import (
    ManifestRow,
    relative_paths,
    seeded_split,
    split_manifest,
    write_file_list,
    write_manifest,
)

__all__ = [
    "IMAGE_EXTENSIONS", "EmptyClassFolder", "FolderIndex", "ImageFolderDataset", "ManifestRow", "TooManyBadFiles",
    "build_index", "decode_rgb", "decoder_message", "load_index", "load_rgb", "relative_paths", "scan_image_folder",
    "seeded_split", "split_manifest", "write_file_list", "write_manifest",
]

log = logging.getLogger(__name__)

# torchvision 0.29 deprecates its decoders in favour of TorchCodec and says so on first use in
# every worker process. The decoders are what this project is specified to use, and a
# warnings-as-errors setting must not turn every image into a "bad file": silence exactly that.
warnings.filterwarnings(
    "ignore",
    message=r"The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
)

def _decode_bmp(data: bytes) -> torch.Tensor:
    # torchvision.io has no BMP decoder; Pillow (already a torchvision dependency) does, and
    # BMP is rare enough in datasets that its speed does not matter.
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
        hwc = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        return hwc.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


def decode_rgb(data: bytes | torch.Tensor) -> torch.Tensor:
    """Decode image bytes to a uint8 RGB tensor (3, H, W).

    Grayscale, gray+alpha, RGBA, palette and CMYK inputs come out as RGB (alpha is dropped, as
    TF's ``decode_jpeg/png(channels=3)`` drops it); an animated GIF gives its first frame; 16-bit
    PNGs are scaled to 8 bits. EXIF orientation is ignored, as TF's decoders ignore it.
    Raises ``RuntimeError``/``ValueError``/``OSError`` on anything undecodable.
    """
    if isinstance(data, torch.Tensor):
        raw = data
        head = bytes(data[:16].tolist())
    else:
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        head = data[:16]
    if len(raw) == 0:
        raise ValueError("empty file")
    if signature(head) == "bmp":
        return _decode_bmp(bytes(raw.numpy()) if isinstance(data, torch.Tensor) else data)
    img = decode_image(raw, mode=ImageReadMode.RGB)
    if img.ndim == 4:  # animated GIF: (frames, C, H, W)
        img = img[0]
    if img.dtype != torch.uint8:  # 16-bit PNG
        img = F.to_dtype(img, torch.uint8, scale=True)
    return img


def decoder_message(error: Exception) -> str:
    """A decoder's error in one line, for naming a bad file."""
    text = str(error).splitlines()[-1] if str(error) else type(error).__name__
    # torchvision prefixes its messages with "function, /path/file.cpp:line, ": drop that.
    return re.sub(r"^[\w()]+, \S+:\d+, ", "", text)


def load_rgb(path: str) -> torch.Tensor:
    """Read and decode one file (see :func:`decode_rgb`); a FIFO, socket or device raises
    ``OSError`` instead of being opened."""
    return decode_rgb(read_file(path))


class TooManyBadFiles(ValueError):
    """More bad files in a split than ``data.max_bad_fraction`` allows; the message is one line.

    Raised inside a DataLoader worker, it reaches the main process rebuilt by PyTorch from
    ``"Caught TooManyBadFiles in DataLoader worker process N.\nOriginal Traceback ..."``; the
    constructor recovers the original line from that text, so ``str(error)`` is the same in
    every process and the app can print it as it is.
    """

    def __init__(self, message: str):
        if message.startswith("Caught ") and "Original Traceback" in message:
            tail = message.rsplit(f"{type(self).__name__}: ", 1)[-1]
            message = tail.strip().splitlines()[0] if tail.strip() else message
        super().__init__(message)


class ImageFolderDataset(Dataset):
    """(path, label) samples -> (uint8 RGB tensor (3, H, W) after ``transform``, label).

    ``samples``/``classes`` usually come from :func:`scan_image_folder` (and
    :func:`seeded_split`). ``name`` labels the split in messages. ``max_bad_fraction`` bounds the
    bad files tolerated in the split (checked up front and again as corrupt files turn up).
    ``verify=False`` skips the up-front header check (then every bad file is found lazily);
    ``known_bad`` (path -> why, e.g. ``FolderIndex.bad``) gives its results from an earlier check
    instead, so that no file is opened here. Too many bad files raise :class:`TooManyBadFiles`.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str],
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        max_bad_fraction: float = 0.01,
        name: str = "train",
        verify: bool = True,
        verify_threads: int = 16,
        known_bad: Optional[Mapping[str, str]] = None,
    ):
        if not samples:
            raise ValueError(f"{name} split is empty: no image files to load")
        self.classes = list(classes)
        self.transform = transform
        self.max_bad_fraction = float(max_bad_fraction)
        self.name = name
        self.num_scanned = len(samples)
        self._lazy_bad: set[str] = set()
        paths = [p for p, _ in samples]
        reasons: list[Optional[str]] = [None] * len(paths)
        if known_bad is not None:
            reasons = [known_bad.get(p) for p in paths]
        elif verify:
            with ThreadPoolExecutor(max_workers=max(1, verify_threads)) as pool:
                reasons = list(pool.map(check_header, paths))
        self.samples = [s for s, r in zip(samples, reasons) if r is None]
        # (path, reason): the up-front ones, then the corrupt ones met while loading.
        self.bad_files: list[tuple[str, str]] = [(p, r) for p, r in zip(paths, reasons) if r is not None]
        if self.bad_files:
            for path, reason in self.bad_files:
                log.warning("%s split: skipping bad image file %s (%s)", name, printable(path), reason)
            warnings.warn(
                summary(
                    f"{name} split: skipped {len(self.bad_files)} of {self.num_scanned} files "
                    "as bad images",
                    [f"{printable(p)} ({r})" for p, r in self.bad_files],
                )
            )
        self._check_fraction()
        if not self.samples:
            raise TooManyBadFiles(
                f"{name} split: every one of its {self.num_scanned} files is a bad image; fix or replace them"
            )

    @property
    def num_bad(self) -> int:
        """Bad files known to this process (up-front ones plus corrupt ones met while loading)."""
        return len(self.bad_files)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def _check_fraction(self) -> None:
        frac = len(self.bad_files) / self.num_scanned
        if frac > self.max_bad_fraction:
            first = "; ".join(f"{printable(p)} ({r})" for p, r in self.bad_files[:3])
            raise TooManyBadFiles(
                f"{self.name} split: {len(self.bad_files)} of {self.num_scanned} files ({frac:.2%}) are bad images, "
                f"more than data.max_bad_fraction={self.max_bad_fraction:g} ({self.max_bad_fraction:.2%}) allows; "
                f"first: {first}; fix or delete these files (every one is named in the log), or raise "
                "data.max_bad_fraction if that many is expected"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def _mark_bad(self, path: str, err: Exception) -> None:
        self._lazy_bad.add(path)
        reason = f"undecodable: {decoder_message(err)}"
        self.bad_files.append((path, reason))
        msg = f"{self.name} split: skipping corrupt image file {printable(path)} ({reason}); " \
              f"{len(self.bad_files)} bad file(s) so far"
        log.warning(msg)
        warnings.warn(msg)
        self._check_fraction()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.samples)
        for step in range(n):
            path, label = self.samples[(index + step) % n]
            if path in self._lazy_bad:
                continue
            try:
                img = load_rgb(path)
            except Warning:
                raise  # a warning turned into an error by the user's filters is not a bad file
            except Exception as err:  # noqa: BLE001 - any decoder failure means a bad file
                self._mark_bad(path, err)
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, label
        raise TooManyBadFiles(f"{self.name} split: no decodable image left among its {n} files; fix or replace them")
