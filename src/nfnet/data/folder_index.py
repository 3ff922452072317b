"""A folder index: the scan and header checks of an image folder, done once, read by every rank.

Without it every DDP rank's ``setup`` walks the tree and opens every file for the header check
(ImageNet: 1.28M opens per rank per start, on a shared file system). With it:

* ``prepare_data`` (local rank 0 of each node) calls :func:`build_index`: it walks the tree,
  ``stat``s every image file (size, mtime, inode: no open) and digests that listing into a key.
  If ``<root>/.nfnet-index-<key>.json`` exists, it is read and nothing is opened; otherwise
  the headers are checked and the index is written there, atomically (a temporary file, then
  ``os.replace``), so a reader never sees half a file. Builders started together (one per
  node) take turns on a ``flock``: one checks the headers, the others wait and read its index;
  where ``flock`` is not available each builds, and the atomic writes still leave one whole
  file. A root that cannot be written to puts the index in ``cache_dir``
  (``nfnet-index-<root id>-<key>.json``). Indexes of earlier states of the tree are removed.
  An index file is data from the (possibly hostile) tree: it may not name a path outside the
  root, and when the tree was walked its listing must equal the walk's.
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

import contextlib
import fcntl
import hashlib
import json
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Optional

from nfnet.data.folder_files import atomic_write_text, check_header, printable, relative_path
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


def _check_relpath(rel: str) -> None:
    # The data tree may be hostile, and so may an index file found in it: never let one name a
    # file outside the root.
    padded = f"/{rel}/"
    if rel.startswith("/") or "//" in rel or "/../" in padded or "/./" in padded or rel in ("", ".", ".."):
        raise ValueError(f"it names a path that is not plainly inside the root: {printable(rel)!r}")


def _from_json(text: str, root: str, key: str) -> tuple[Listing, dict[str, str]]:
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("version") != _VERSION:
        raise ValueError(f"not a version-{_VERSION} {_FORMAT} file")
    if data["key"] != key:
        raise ValueError("its key does not match its name")
    listing = Listing(root, bool(data["follow_links"]), [str(c) for c in data["classes"]])
    for rel in listing.classes + data["files"]:
        _check_relpath(rel)
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


def _read(path: str, root: str, key: str, walked: Optional[Listing]) -> Optional[tuple[Listing, dict[str, str]]]:
    """The stored listing and bad files, or None (with a warning unless there is no file). A
    listing just walked must match the stored one exactly."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        warnings.warn(f"ignoring the folder index {path} (cannot be read: {e}); it is rebuilt by build_index")
        return None
    try:
        stored, bad = _from_json(text, root, key)
        if walked is not None and (stored.classes, stored.samples) != (walked.classes, walked.samples):
            raise ValueError("its files differ from the folder's")
        return stored, bad
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        warnings.warn(
            f"ignoring the corrupt folder index {path} ({type(e).__name__}: {e}); it is rebuilt by build_index"
        )
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


def _find(
    candidates: list[str], root: str, key: str, walked: Optional[Listing]
) -> Optional[tuple[FolderIndex, Listing]]:
    """The first valid index among ``candidates``, and the listing stored in it."""
    for path in candidates:
        found = _read(path, root, key, walked)
        if found is not None:
            return _index(found[0], key, found[1], path), found[0]
    return None


@contextlib.contextmanager
def _builder_lock(candidates: list[str]) -> Iterator[bool]:
    """An exclusive ``flock`` on a lock file beside the first index location that allows one
    (``.nfnet-index.lock``), so that of builders started together one checks the headers and
    the others wait for its index. Yields whether another builder held it first. Where no lock
    can be taken (nowhere writable, a file system without ``flock``), builders go ahead
    unlocked: each then builds, which is slower but still safe."""
    fd, waited = None, False
    for path in candidates:
        name = os.path.basename(path)
        lock = os.path.join(os.path.dirname(path), name[: name.rindex("-")] + ".lock")
        try:
            os.makedirs(os.path.dirname(lock), exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            break
        except OSError:
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield waited
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock; the file stays, as removing it would race a waiter


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
        raise ValueError(
            f"load_index: key={key!r} is not a folder-index key; pass FolderIndex.key as build_index returned it"
        )
    listing = None
    if key is None:
        listing = walk_image_folder(root, follow_links, with_stats=True)
        report(listing)
        key = listing.key()
    found = _find(_candidates(root, key, cache_dir), root, key, listing)
    if found is None:
        return None
    if listing is None:  # a walk warned already; without one, the stored listing does
        report(found[1])
    return found[0]


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
    found = _find(candidates, root, key, listing)
    if found is not None:
        return found[0]
    with _builder_lock(candidates) as waited:
        found = _find(candidates, root, key, listing) if waited else None
        if found is not None:
            return found[0]
        paths = [p for p, _ in listing.samples]
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            reasons = list(pool.map(check_header, paths))
        bad = {p: why for p, why in zip(paths, reasons) if why is not None}
        return _index(listing, key, bad, _write(_to_json(listing, key, bad), candidates))
