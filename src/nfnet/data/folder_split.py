"""Train/val splits of one generic image folder that stay put while the folder grows.

A file is in validation iff ``u(seed, relpath) < val_fraction``, where ``relpath`` is its path
relative to the dataset root (``cat/2024/img1.jpg``) and ``u`` maps a keyed BLAKE2b hash to
[0, 1). Nothing else enters the rule: not the other files, not the class index, not where the
dataset is mounted. So adding files or classes never moves an existing file, and moving the
root moves nothing. A file moved to another class folder (relabelled) or renamed is a new
relative path and draws anew: it lands in validation with probability ``val_fraction``,
whatever it was before.

The trade-off: the split is exact only in expectation. A class of ``n`` files gets
Binomial(n, f) validation files (mean ``f·n``, standard deviation ``sqrt(n·f·(1-f))``); with
probability ``(1-f)^n`` it gets none (35% for n=10, f=0.1; 0.5% for n=50) and with
probability ``f^n`` all of its files are in validation. Forcing a minimum per class would move
files as classes grow, so instead such classes are named in a warning.

For a model registry: :func:`split_manifest` lists (relpath, split, class, size, BLAKE2b of the
bytes) per file, so that a file whose content changed under the same name is found;
:func:`write_file_list` records which files a run validated on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Optional, Sequence

from nfnet.data.folder_files import atomic_write_text, open_regular, printable, relative_path

log = logging.getLogger("nfnet.data.folder")

_UNIT = float(2**64)
# How many class names a split warning spells out.
_CLASSES_SHOWN = 10


def _infer_root(samples: Sequence[tuple[str, int]]) -> str:
    if len({label for _, label in samples}) < 2:
        raise ValueError(
            "seeded_split: the samples span fewer than two classes, so the dataset root cannot be "
            "inferred from their paths; pass root=<the folder scan_image_folder was given>"
        )
    # Paths from scan_image_folder are <root>/<class>/...: with two classes, the common folder is root.
    return os.path.commonpath([os.path.abspath(p) for p, _ in samples])


def split_draw(seed: int, relpath: str, purpose: bytes = b"nfnet-split") -> float:
    """The file's uniform draw in [0, 1): in validation iff it is below ``val_fraction``. Another
    ``purpose`` (at most 16 bytes) gives a draw independent of this one, for other choices by path."""
    digest = hashlib.blake2b(f"{seed}\0{relpath}".encode(), digest_size=8, person=purpose).digest()
    return int.from_bytes(digest, "big") / _UNIT


def seeded_split(
    samples: Sequence[tuple[str, int]],
    val_fraction: float,
    seed: int,
    root: Optional[str] = None,
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Train and val samples (both in input order) of one generic folder; see the module docstring.

    ``root`` is the dataset root the paths lie under; when omitted it is inferred as the folder
    common to all paths, which is exact for the output of ``scan_image_folder`` with two or more
    classes. Classes left without a validation file (among those with two or more files) or
    without a training file are named in one warning each.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not samples or val_fraction == 0.0:
        return list(samples), []
    root = os.path.abspath(os.fspath(root)) if root is not None else _infer_root(samples)
    train, val = [], []
    per_class: dict[str, list[int]] = {}  # class folder -> [files, in val]
    for sample in samples:
        rel = relative_path(root, os.path.abspath(sample[0]))
        in_val = split_draw(seed, rel) < val_fraction
        (val if in_val else train).append(sample)
        counts = per_class.setdefault(rel.split("/", 1)[0], [0, 0])
        counts[0] += 1
        counts[1] += in_val
    _warn_lopsided(per_class, val_fraction)
    return train, val


def _warn_lopsided(per_class: dict[str, list[int]], val_fraction: float) -> None:
    def names(found: list[str]) -> str:
        shown = ", ".join(printable(n) for n in found[:_CLASSES_SHOWN])
        return shown + (f", ... ({len(found)} in all)" if len(found) > _CLASSES_SHOWN else "")

    no_val = sorted(c for c, (n, v) in per_class.items() if n >= 2 and v == 0)
    no_train = sorted(c for c, (n, v) in per_class.items() if v == n)
    if no_val:
        warnings.warn(
            f"seeded_split: {len(no_val)} class(es) with two or more files got no validation file ({names(no_val)}); "
            f"a class of n files has none with probability (1 - {val_fraction})^n, and files are never moved to "
            "even this out so that the split stays the same as the folder grows; their accuracy is not measured"
        )
    if no_train:
        warnings.warn(
            f"seeded_split: {len(no_train)} class(es) have every file in validation and none to train on "
            f"({names(no_train)}); add images to them or lower val_fraction"
        )


class ManifestRow(NamedTuple):
    relpath: str  # relative to the dataset root, "/"-separated
    split: str  # "train" or "val"
    label: str  # the class folder's name
    size: Optional[int]  # bytes; None if the file could not be read
    blake2b: Optional[str]  # 32 hex digits of BLAKE2b-128 over the bytes; None if unreadable


def file_digest(path: str) -> tuple[int, str]:
    """(size, BLAKE2b-128 hex digest) of a regular file's bytes."""
    h = hashlib.blake2b(digest_size=16)
    size = 0
    with open_regular(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def split_manifest(
    root: str, samples: Sequence[tuple[str, int]], split: str, threads: int = 16
) -> list[ManifestRow]:
    """One :class:`ManifestRow` per sample, sorted by relative path. Reads every byte of every
    file (BLAKE2b runs at about 1 GB/s per core and releases the GIL, so ``threads`` files are
    hashed at once); a file that cannot be read gets ``None`` size and digest and a log line."""
    root = os.path.abspath(os.fspath(root))
    rels = [relative_path(root, os.path.abspath(p)) for p, _ in samples]

    def digest(path: str) -> tuple[Optional[int], Optional[str]]:
        try:
            return file_digest(path)
        except OSError as e:
            log.warning("manifest: cannot read %s (%s)", printable(path), e.strerror or e)
            return None, None

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        digests = list(pool.map(digest, [p for p, _ in samples]))
    rows = [ManifestRow(rel, split, rel.split("/", 1)[0], size, hexd) for rel, (size, hexd) in zip(rels, digests)]
    return sorted(rows)


def write_manifest(path: str, rows: Sequence[ManifestRow]) -> None:
    """``rows`` as CSV with a header line (``relpath,split,label,size,blake2b``), written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(ManifestRow._fields)
    writer.writerows(("" if v is None else v for v in row) for row in rows)
    atomic_write_text(path, buf.getvalue())


def read_manifest(path: str) -> list[ManifestRow]:
    """The rows :func:`write_manifest` wrote to ``path``."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != list(ManifestRow._fields):
            raise ValueError(f"{path} is not a file manifest: its header is {header}, not {list(ManifestRow._fields)}")
        return [
            ManifestRow(rel, split, label, int(size) if size else None, digest or None)
            for rel, split, label, size, digest in reader
        ]


def relative_paths(root: str, samples: Sequence[tuple[str, int]]) -> list[str]:
    """The samples' paths relative to ``root``, sorted: e.g. which files a run validated on."""
    root = os.path.abspath(os.fspath(root))
    return sorted(relative_path(root, os.path.abspath(p)) for p, _ in samples)


def write_file_list(path: str, root: str, samples: Sequence[tuple[str, int]]) -> int:
    """:func:`relative_paths` one per line, written atomically; returns how many. (Names with
    control characters, a newline among them, never get this far: the scan skips them.)"""
    rels = relative_paths(root, samples)
    atomic_write_text(path, "".join(f"{rel}\n" for rel in rels))
    return len(rels)
