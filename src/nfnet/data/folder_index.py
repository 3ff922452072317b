"""A folder index: the scan and header checks of an image folder, done once, read by every rank.

Without it every DDP rank's ``setup`` walks the tree and opens every file for the header check
(ImageNet: 1.28M opens per rank per start, on a shared file system). With it:

* ``prepare_data`` (local rank 0 of each node) calls :func:`build_index`: it walks the tree,
  ``stat``s every image file (size, mtime, inode: no open) and digests that listing into a key.
  If ``<root>/.nfnet-index-<key>.json`` exists, it is read and nothing is opened; otherwise
  the headers are checked and the index is written there, atomically (a temporary file, then
  ``os.replace``), so a reader never sees half a file and two builders at once both leave a
  whole, identical file. A root that cannot be written to puts the index in ``cache_dir``
  (``nfnet-index-<root id>-<key>.json``). Indexes of earlier states of the tree are removed.
* ``setup`` (every rank) calls :func:`load_index`: the same walk and key, then a read. Given
  the ``key`` that rank 0 built (``FolderIndex.key``, broadcast), it skips even the walk and
  pays one file read.

The key costs one ``stat`` per image file. A listing alone (``scandir`` without ``stat``, which
gives names and inode numbers for free) would notice files added, removed, renamed or replaced
by a rename, but not a file rewritten in place or touched: its header-check result could be
stale, so the key pays for the ``stat``. Stored paths are relative to the root, so a moved
dataset keeps its index (``mv`` keeps mtimes and inodes; a copy rebuilds it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from nfnet.data.folder_files import atomic_write_text, check_header, relative_path
from nfnet.data.folder_scan import Listing, report, walk_image_folder

_FORMAT = "nfnet-folder-index"
# Bumped when the file's layout or the header check changes: older files are then not read.
_VERSION = 1
_ROOT_PREFIX = ".nfnet-index-"


@dataclass
class FolderIndex:
    """A scanned, header-checked image folder. ``samples`` are (absolute path, label) sorted by
    path, bad files included; ``bad`` maps each bad one's path to why (pass it to
    ``ImageFolderDataset(known_bad=...)``). ``path`` is the index file (None if none could be
    written)."""

    root: str
    key: str
    classes: list[str]
    samples: list[tuple[str, int]]
    bad: dict[str, str]
    path: Optional[str]


def _root_id(root: str) -> str:
    return hashlib.blake2b(os.path.realpath(root).encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


def _candidates(root: str, key: str, cache_dir: Optional[str]) -> list[str]:
    paths = [os.path.join(root, f"{_ROOT_PREFIX}{key}.json")]
    if cache_dir is not None:
        paths.append(os.path.join(os.fspath(cache_dir), f"nfnet-index-{_root_id(root)}-{key}.json"))
    return paths


def _to_json(listing: Listing, key: str, bad: dict[str, str]) -> str:
    root = listing.root
    files = [relative_path(root, p) for p, _ in listing.samples]
    return json.dumps({
        "format": _FORMAT, "version": _VERSION, "key": key, "follow_links": listing.follow_links,
        "classes": listing.classes, "files": files,
        "bad": {relative_path(root, p): why for p, why in bad.items()},
        "skipped": listing.skipped, "ignored": listing.ignored,
    }, separators=(",", ":"))


def _from_json(text: str, root: str, key: str) -> tuple[Listing, dict[str, str]]:
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("version") != _VERSION:
        raise ValueError(f"not a version-{_VERSION} {_FORMAT} file")
    if data["key"] != key:
        raise ValueError("its key does not match its name")
    listing = Listing(root, bool(data["follow_links"]), [str(c) for c in data["classes"]])
    label = {name: i for i, name in enumerate(listing.classes)}
    sep = "" if root.endswith(os.sep) else os.sep
    listing.samples = [(root + sep + rel.replace("/", os.sep), label[rel.split("/", 1)[0]]) for rel in data["files"]]
    listing.skipped = [(str(rel), str(why)) for rel, why in data["skipped"]]
    listing.ignored = [str(rel) for rel in data["ignored"]]
    known = set(data["files"])
    if not set(data["bad"]) <= known:
        raise ValueError("it lists bad files that are not among its files")
    bad = {root + sep + rel.replace("/", os.sep): str(why) for rel, why in data["bad"].items()}
    return listing, bad


def _read(path: str, root: str, key: str) -> Optional[tuple[Listing, dict[str, str]]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        warnings.warn(f"ignoring the folder index {path} (cannot be read: {e}); it is rebuilt by build_index")
        return None
    try:
        return _from_json(text, root, key)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        warnings.warn(f"ignoring the corrupt folder index {path} ({type(e).__name__}: {e}); it is rebuilt by build_index")
        return None


def _remove_stale(written: str) -> None:
    """Indexes of earlier states of the same tree, next to the one just written."""
    folder, name = os.path.split(written)
    prefix = name[: name.rindex("-") + 1]  # everything up to the key
    for other in os.listdir(folder):
        if other != name and other.startswith(prefix) and other.endswith(".json"):
            try:
                os.unlink(os.path.join(folder, other))
            except OSError:
                pass  # another builder removed it first, or the folder is shared read-only


def _write(text: str, candidates: list[str]) -> Optional[str]:
    errors = []
    for i, path in enumerate(candidates):
        try:
            if i > 0:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write_text(path, text)
        except OSError as e:
            errors.append(f"{os.path.dirname(path)}: {e.strerror or e}")
            continue
        _remove_stale(path)
        return path
    warnings.warn(
        f"the folder index could not be written ({'; '.join(errors)}); every start will check all headers "
        "again: pass a writable cache_dir to build_index"
    )
    return None


def _index(listing: Listing, key: str, bad: dict[str, str], path: Optional[str]) -> FolderIndex:
    return FolderIndex(listing.root, key, listing.classes, listing.samples, bad, path)


def load_index(
    root: str, cache_dir: Optional[str] = None, *, key: Optional[str] = None, follow_links: bool = True
) -> Optional[FolderIndex]:
    """The index of ``root`` as the tree is now, or None if there is none (or only a corrupt
    one, with a warning). Never opens an image file.

    Without ``key`` the tree is walked and ``stat``ed to compute it (raising as
    ``scan_image_folder`` does on an unusable tree); with ``key`` (``build_index(...).key`` from
    another rank) the index file is read without any walk, trusting that the tree has not
    changed since. Warnings about skipped entries are issued as a scan issues them.
    """
    root = os.path.abspath(os.fspath(root))
    if key is not None and not re.fullmatch(r"[0-9a-f]{32}", key):
        raise ValueError(f"load_index: key={key!r} is not a folder-index key; pass FolderIndex.key as build_index returned it")
    walked = key is None
    if walked:
        listing = walk_image_folder(root, follow_links, with_stats=True)
        report(listing)
        key = listing.key()
    for path in _candidates(root, key, cache_dir):
        found = _read(path, root, key)
        if found is not None:
            stored, bad = found
            if not walked:  # the walk warned already; without it, the stored listing does
                report(stored)
            return _index(stored, key, bad, path)
    return None


def build_index(
    root: str, cache_dir: Optional[str] = None, *, follow_links: bool = True, threads: int = 16
) -> FolderIndex:
    """The index of ``root`` as the tree is now: read if a valid one exists (no file is opened),
    else built (one header check per image file, on ``threads`` threads) and written. Raises as
    ``scan_image_folder`` does on an unusable tree."""
    root = os.path.abspath(os.fspath(root))
    listing = walk_image_folder(root, follow_links, with_stats=True)
    report(listing)
    key = listing.key()
    candidates = _candidates(root, key, cache_dir)
    for path in candidates:
        found = _read(path, root, key)
        if found is not None:
            return _index(found[0], key, found[1], path)
    paths = [p for p, _ in listing.samples]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        reasons = list(pool.map(check_header, paths))
    bad = {p: why for p, why in zip(paths, reasons) if why is not None}
    return _index(listing, key, bad, _write(_to_json(listing, key, bad), candidates))
