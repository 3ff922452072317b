"""Packing an image folder, or ILSVRC-2012 as distributed, into LitData chunks (nfnet.data.shards).

What is stored is each file's bytes exactly as they were (never decoded and encoded again) with
its label, in the order the folder source reads the files (sorted by path, per split), so that a
pack trains on the very batches the folder would. Every file is read and decoded once, on
``workers`` processes, with the folder source's decoder: files that cannot be read, are not
images or do not decode are skipped and named (a log line each and one summary warning), and
more than ``max_bad_fraction`` of them in a split stops the pack with
:class:`nfnet.data.folder.TooManyBadFiles`.

Packing is reproducible: the same files give the same chunk files, byte for byte, and the same
``index.json`` (LitData's ``updated_at``, a time stamp it names its download cache after, is
replaced by a digest of the items, which changes exactly when the content does). Each split is
written into a hidden folder and moved into place when whole, and ``nfnet-pack.json``, which
readers require, is written last: an interrupted pack is never read as a finished one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterator, Optional

from nfnet.data import imagenet_layout
from nfnet.data.folder import TooManyBadFiles, decode_rgb, decoder_message
from nfnet.data.folder_files import HEADER_BYTES, atomic_write_text, printable, read_file, relative_path, signature, summary
from nfnet.data.folder_scan import scan_image_folder
from nfnet.data.folder_split import seeded_split
from nfnet.data.shards import CLASSES_FILE, FORMAT, MANIFEST_FILE, PACK_FILE, SPLITS, VERSION

log = logging.getLogger("nfnet.data.packing")

_PARTIAL = ".{}.partial"
# Files are handed to the reading processes in runs of this many: fewer round trips, and still
# small enough that the progress bar moves smoothly.
_FILES_PER_TASK = 16


@dataclass
class PackPlan:
    """What to pack: the classes, each split's (path, label) samples, the files of each split
    already known to be unusable (path -> why), the source root and how the splits were made."""

    source: str
    root: str
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    unusable: dict[str, dict[str, str]] = field(default_factory=dict)  # split -> {path: why}
    details: dict[str, object] = field(default_factory=dict)


def plan_imagefolder(root: str, val_fraction: float, split_seed: int, follow_links: bool = True) -> PackPlan:
    """One folder of class folders, split as `data=imagefolder` splits it (nfnet.data.folder_split)."""
    root = os.path.abspath(os.path.expanduser(root))
    classes, samples = scan_image_folder(root, follow_links)
    train, val = seeded_split(samples, val_fraction, split_seed, root=root)
    return PackPlan("imagefolder", root, classes, {"train": train, "val": val},
                    details={"val_fraction": val_fraction, "split_seed": split_seed})


def plan_imagenet(root: str, val_labels: Optional[str] = None, follow_links: bool = True) -> PackPlan:
    """``root/train/<wnid>/`` and ``root/val/``: class folders, or the flat folder sorted by its
    ground-truth file (``val_labels``, else found where a download keeps it; nfnet.data.imagenet_layout)."""
    root = os.path.abspath(os.path.expanduser(root))
    classes, train = scan_image_folder(os.path.join(root, "train"), follow_links)
    val_dir = os.path.join(root, "val")
    if not os.path.isdir(val_dir):
        raise FileNotFoundError(f"{val_dir} does not exist; source=imagenet needs root/train/<wnid>/ and root/val/")
    if not imagenet_layout.is_flat(val_dir):
        val_classes, val = scan_image_folder(val_dir, follow_links)
        if val_classes != classes:
            raise ValueError(f"{val_dir} has other class folders than {root}/train; both splits need the same classes")
        return PackPlan("imagenet", root, classes, {"train": train, "val": val}, details={"val_labels": None})
    label_file = val_labels or imagenet_layout.find_label_file(root)
    if label_file is None:
        raise FileNotFoundError(
            f"{val_dir} is one flat folder, and no ground-truth file was found to sort it (looked for "
            f"{', '.join(imagenet_layout.LABEL_FILE_PLACES)} under {root}): give it as imagenet_val_labels=<file>"
        )
    labels = imagenet_layout.read_val_labels(label_file)
    val, unusable = imagenet_layout.flat_val_samples(val_dir, classes, labels, label_file)
    return PackPlan("imagenet", root, classes, {"train": train, "val": val}, {"val": unusable},
                    details={"val_labels": os.path.abspath(label_file)})


def read_checked(path: str) -> tuple[Optional[bytes], Optional[str]]:
    """A file's bytes if it is an image that decodes, else (None, why)."""
    try:
        data = read_file(path)
    except OSError as error:
        return None, f"unreadable ({error.strerror or error})"
    if not data:
        return None, "zero-byte file"
    if signature(data[:HEADER_BYTES]) is None:
        return None, "not an image (unrecognised file signature)"
    try:
        decode_rgb(data)
    except Warning:
        raise
    except Exception as error:  # noqa: BLE001 - any decoder failure means a bad file
        return None, f"undecodable: {decoder_message(error)}"
    return data, None


def _read_checked_run(paths: list[str]) -> list[tuple[Optional[bytes], Optional[str]]]:
    return [read_checked(path) for path in paths]


def _checked(paths: list[str], pool: ProcessPoolExecutor | None, workers: int) -> Iterator[tuple[Optional[bytes], Optional[str]]]:
    """read_checked over `paths`, in order, on the `workers` processes of `pool` (None: here). At
    most a few runs of files per process are read ahead of the writer, so memory stays bounded
    however slow the writing; a process that dies (the OOM killer) raises BrokenProcessPool
    instead of hanging."""
    if pool is None:
        yield from map(read_checked, paths)
        return
    runs = (paths[i:i + _FILES_PER_TASK] for i in range(0, len(paths), _FILES_PER_TASK))
    pending: deque = deque(pool.submit(_read_checked_run, run) for run in itertools.islice(runs, 4 * workers))
    while pending:
        results = pending.popleft().result()
        pending.extend(pool.submit(_read_checked_run, run) for run in itertools.islice(runs, 1))
        yield from results


def _reading_pool(workers: int):
    """The processes that read and check the files, started once for every split (each start
    imports the decoder: seconds). Spawned, not forked: the caller may hold threads, which a fork
    copies in an undefined state."""
    if workers <= 1:
        return nullcontext(None)
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("packing {task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())


def _prepare_output(output_dir: str) -> None:
    """An empty folder, or an earlier pack (finished or not), which is replaced; anything else is refused."""
    ours = {PACK_FILE, CLASSES_FILE, MANIFEST_FILE, *SPLITS, *(_PARTIAL.format(s) for s in SPLITS)}
    os.makedirs(output_dir, exist_ok=True)
    strangers = sorted(set(os.listdir(output_dir)) - ours)
    if strangers:
        raise FileExistsError(
            f"{output_dir} holds other files than a pack ({', '.join(strangers[:3])}, ...): "
            "give an empty or new folder as output_dir"
        )
    if os.path.exists(os.path.join(output_dir, PACK_FILE)):
        os.remove(os.path.join(output_dir, PACK_FILE))  # from here on the old pack is not readable


def _stamp_index(split_dir: str, digest: str) -> None:
    """LitData's index.json with the content digest as its `updated_at` (see the module doc)."""
    path = os.path.join(split_dir, "index.json")
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    index["updated_at"] = digest
    atomic_write_text(path, json.dumps(index, sort_keys=True))


def _write_split(plan: PackPlan, split: str, output_dir: str, pool: ProcessPoolExecutor | None, workers: int,
                 chunk_bytes: int, max_bad_fraction: float, progress) -> tuple[list[tuple[int, int, str]], dict[str, str]]:
    """Writes one split into place; returns its manifest rows (index, label, source path) and its bad files."""
    from litdata.streaming.writer import BinaryWriter

    samples = plan.splits[split]
    final, partial = os.path.join(output_dir, split), os.path.join(output_dir, _PARTIAL.format(split))
    shutil.rmtree(partial, ignore_errors=True)
    writer = BinaryWriter(partial, chunk_bytes=chunk_bytes)
    digest = hashlib.blake2b(digest_size=16, person=b"nfnet-pack")
    rows, bad = [], {}
    task = progress.add_task(split, total=len(samples)) if progress is not None else None
    for (path, label), (data, why) in zip(samples, _checked([p for p, _ in samples], pool, workers)):
        if data is None:
            bad[path] = why
            log.warning("%s split: skipping bad image file %s (%s)", split, printable(path), why)
        else:
            writer.add_item(len(rows), {"image": data, "label": label})
            digest.update(b"%d %d\n" % (label, len(data)) + data)
            rows.append((len(rows), label, path))
        if task is not None:
            progress.advance(task)
    split_bad = {**plan.unusable.get(split, {}), **bad}
    scanned = len(samples) + len(plan.unusable.get(split, {}))
    if split_bad and len(split_bad) / max(1, scanned) > max_bad_fraction:
        shutil.rmtree(partial, ignore_errors=True)
        first = "; ".join(f"{printable(p)} ({w})" for p, w in list(split_bad.items())[:3])
        raise TooManyBadFiles(
            f"{split} split: {len(split_bad)} of {scanned} files are bad images, more than max_bad_fraction="
            f"{max_bad_fraction:g} allows; first: {first}; fix or delete them (every one is named in the log), "
            "or raise max_bad_fraction"
        )
    if not rows:
        shutil.rmtree(partial, ignore_errors=True)
        return rows, split_bad
    writer.done()
    writer.merge()
    _stamp_index(partial, digest.hexdigest())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return rows, split_bad


def pack(plan: PackPlan, output_dir: str, workers: int = 1, chunk_bytes: int = 64 << 20,
         max_bad_fraction: float = 0.01, show_progress: bool = True) -> dict[str, object]:
    """Writes the pack of `plan` into `output_dir` (see the module doc); returns its nfnet-pack.json."""
    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    _prepare_output(output_dir)
    manifest, bad, sizes = [], {}, {}
    with _progress(show_progress) as progress, _reading_pool(workers) as pool:
        for split in SPLITS:
            rows, split_bad = _write_split(plan, split, output_dir, pool, workers, chunk_bytes, max_bad_fraction,
                                           progress)
            sizes[split] = len(rows)
            bad.update(split_bad)
            manifest += [(split, index, label, path) for index, label, path in rows]
    if bad:
        warnings.warn(summary(f"skipped {len(bad)} bad image file(s) while packing {plan.root}",
                              [f"{printable(p)} ({w})" for p, w in bad.items()]))
    atomic_write_text(os.path.join(output_dir, CLASSES_FILE), "".join(f"{name}\n" for name in plan.classes))
    text = io.StringIO()
    out = csv.writer(text, lineterminator="\n")
    out.writerow(["split", "index", "label", "class", "path"])
    out.writerows((split, index, label, plan.classes[label], relative_path(plan.root, path))
                  for split, index, label, path in manifest)
    atomic_write_text(os.path.join(output_dir, MANIFEST_FILE), text.getvalue())
    meta = {
        "format": FORMAT, "version": VERSION, "source": plan.source, "source_root": plan.root,
        "classes": plan.classes, "splits": sizes, **plan.details,
        "bad": {relative_path(plan.root, p): why for p, why in sorted(bad.items())},
    }
    atomic_write_text(os.path.join(output_dir, PACK_FILE), json.dumps(meta, indent=1, sort_keys=True))
    return meta
