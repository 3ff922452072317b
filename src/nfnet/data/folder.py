"""Image-folder sources: scanning, seeded splits, decoding, and bad-file handling.

Layouts: ImageNet-style ``root/train/<class>/...`` + ``root/val/<class>/...`` (scan each split
directory) or one generic ``root/<class>/...`` folder split with :func:`seeded_split`.

Bad files never stop a run. They are caught in two places:

* Up front, when a dataset is built (``verify=True``): zero-byte files and files whose first
  bytes are not a known image signature (a text or HTML page saved as ``.jpg``) are dropped.
  This costs one ``open`` + a 16-byte read per file, done on a thread pool, so it scales to
  ImageNet's 1.28M files; it is what lets a split that is mostly junk fail *before* training.
* Lazily, in ``__getitem__``: corrupt or truncated files have valid headers, and finding them
  would need a full decode of every file up front (minutes on ImageNet), so they are found when
  first decoded. Such a file is warned about once (per process), and the item is replaced by the
  next decodable sample in path order (deterministic, and usually the same class, since samples
  are sorted by path). If the bad files known to this process exceed the allowed fraction, the
  run stops with a clear error rather than silently training on a shrinking dataset.

Each bad file is logged by name at WARNING level (logger ``nfnet.data.folder``); a summary with
the count is also issued through :mod:`warnings` so it shows once in any console.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")

# torchvision 0.29 deprecates its decoders in favour of TorchCodec and says so on first use in
# every worker process. The decoders are what this project is specified to use, and a
# warnings-as-errors setting must not turn every image into a "bad file": silence exactly that.
warnings.filterwarnings(
    "ignore",
    message=r"The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
)

# How many bad-file names a summary warning spells out; every name is in the log regardless.
_NAMES_IN_SUMMARY = 20


def _signature(head: bytes) -> Optional[str]:
    """Image format from the first bytes of a file, or None if it is not a supported image."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM":
        return "bmp"
    return None


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
    if _signature(head) == "bmp":
        return _decode_bmp(bytes(raw.numpy()) if isinstance(data, torch.Tensor) else data)
    img = decode_image(raw, mode=ImageReadMode.RGB)
    if img.ndim == 4:  # animated GIF: (frames, C, H, W)
        img = img[0]
    if img.dtype != torch.uint8:  # 16-bit PNG
        img = F.to_dtype(img, torch.uint8, scale=True)
    return img


def load_rgb(path: str) -> torch.Tensor:
    """Read and decode one file (see :func:`decode_rgb`)."""
    with open(path, "rb") as f:
        return decode_rgb(f.read())


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_image_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted subdirectory names of ``root``) and (path, label) samples sorted by path.

    Images may sit in nested folders below a class folder. Hidden files are ignored silently;
    other files with a non-image extension are ignored with one warning naming them.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"image folder {root!r} does not exist or is not a directory; point the data root "
            "at a folder laid out as <root>/<class_name>/<image files>"
        )
    with os.scandir(root) as it:
        classes = sorted(
            e.name for e in it if e.is_dir(follow_symlinks=True) and not e.name.startswith(".")
        )
    if not classes:
        raise ValueError(
            f"image folder {root!r} has no class subfolders; expected <root>/<class_name>/<images> "
            "(one subfolder per class)"
        )
    samples: list[tuple[str, int]] = []
    foreign: list[str] = []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                (samples.append((path, label)) if _is_image_name(name) else foreign.append(path))
    samples.sort()
    if foreign:
        for path in foreign:
            log.warning("ignoring non-image file (extension not in %s): %s", IMAGE_EXTENSIONS, path)
        warnings.warn(_summary(f"ignored {len(foreign)} non-image file(s) in {root!r}", foreign))
    if not samples:
        raise ValueError(
            f"image folder {root!r} has {len(classes)} class folder(s) ({', '.join(classes[:5])}"
            f"{', ...' if len(classes) > 5 else ''}) but no image files with extensions "
            f"{IMAGE_EXTENSIONS}"
        )
    return classes, samples


def _summary(head: str, names: Sequence[str]) -> str:
    shown = "\n  ".join(names[:_NAMES_IN_SUMMARY])
    more = f"\n  ... and {len(names) - _NAMES_IN_SUMMARY} more (all are in the log)" if len(
        names
    ) > _NAMES_IN_SUMMARY else ""
    return f"{head}:\n  {shown}{more}"


def _split_key(seed: int, path: str, label: int) -> bytes:
    # Keyed on the class and the last two path components, not the absolute path, so the split
    # does not change when the dataset is moved or mounted elsewhere, and a file keeps its rank
    # when new files are added to its class.
    tail = "/".join(os.path.normpath(path).split(os.sep)[-2:])
    return hashlib.blake2b(f"{seed}|{label}|{tail}".encode(), digest_size=8).digest()


def seeded_split(
    samples: Sequence[tuple[str, int]], val_fraction: float, seed: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Deterministic, per-class stratified train/val split of a generic folder.

    Within each class, files are ranked by a seeded hash of their name and the first
    ``round(val_fraction * n)`` go to val (at least one when the class has two or more files and
    ``val_fraction > 0``; never all of them). Hash ranks do not depend on the other files, so
    adding data later moves at most a few boundary files instead of reshuffling the split.
    Both outputs keep the input order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(i)
    val_idx: set[int] = set()
    for label, idx in by_class.items():
        n = len(idx)
        n_val = int(round(val_fraction * n))
        if val_fraction > 0 and n >= 2:
            n_val = max(n_val, 1)
        n_val = min(n_val, n - 1)
        ranked = sorted(idx, key=lambda i: (_split_key(seed, samples[i][0], label), samples[i][0]))
        val_idx.update(ranked[:n_val])
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return train, val


def _check_header(path: str) -> Optional[str]:
    """Why ``path`` is unusable (cheap checks only), or None if it looks like an image."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if not head:
        return "zero-byte file"
    if _signature(head) is None:
        return "not an image (unrecognised file signature)"
    return None


class ImageFolderDataset(Dataset):
    """(path, label) samples -> (uint8 RGB tensor (3, H, W) after ``transform``, label).

    ``samples``/``classes`` usually come from :func:`scan_image_folder` (and
    :func:`seeded_split`). ``name`` labels the split in messages. ``max_bad_fraction`` bounds the
    bad files tolerated in the split (checked up front and again as corrupt files turn up).
    ``verify=False`` skips the up-front header check (then every bad file is found lazily).
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
    ):
        if not samples:
            raise ValueError(f"{name} split is empty: no image files to load")
        self.classes = list(classes)
        self.transform = transform
        self.max_bad_fraction = float(max_bad_fraction)
        self.name = name
        self.num_scanned = len(samples)
        self.bad_files: list[tuple[str, str]] = []  # (path, reason), up front + lazily found
        self._lazy_bad: set[str] = set()
        if verify:
            paths = [p for p, _ in samples]
            with ThreadPoolExecutor(max_workers=max(1, verify_threads)) as pool:
                reasons = list(pool.map(_check_header, paths))
            self.samples = [s for s, r in zip(samples, reasons) if r is None]
            self.bad_files = [(p, r) for p, r in zip(paths, reasons) if r is not None]
        else:
            self.samples = list(samples)
        if self.bad_files:
            for path, reason in self.bad_files:
                log.warning("%s split: skipping bad image file %s (%s)", name, path, reason)
            warnings.warn(
                _summary(
                    f"{name} split: skipped {len(self.bad_files)} of {self.num_scanned} files "
                    "as bad images",
                    [f"{p} ({r})" for p, r in self.bad_files],
                )
            )
        self._check_fraction()
        if not self.samples:
            raise ValueError(f"{name} split: every one of its {self.num_scanned} files is bad")

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
            examples = "\n  ".join(f"{p} ({r})" for p, r in self.bad_files[:5])
            raise ValueError(
                f"{self.name} split: {len(self.bad_files)} of {self.num_scanned} files "
                f"({frac:.2%}) are bad images, more than max_bad_fraction="
                f"{self.max_bad_fraction:.2%}. First ones:\n  {examples}\n"
                "Fix or delete these files, or raise max_bad_fraction if that many is expected."
            )

    def __len__(self) -> int:
        return len(self.samples)

    def _mark_bad(self, path: str, err: Exception) -> None:
        self._lazy_bad.add(path)
        text = str(err).splitlines()[-1] if str(err) else type(err).__name__
        # torchvision prefixes its messages with "function, /path/file.cpp:line, ": drop that.
        text = re.sub(r"^[\w()]+, \S+:\d+, ", "", text)
        reason = f"undecodable: {text}"
        self.bad_files.append((path, reason))
        msg = f"{self.name} split: skipping corrupt image file {path} ({reason}); " \
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
        raise RuntimeError(f"{self.name} split: no decodable image left among {n} files")
