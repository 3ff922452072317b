"""Scanning an image folder (``root/<class>/...``) that may be hostile.

The walk never opens a file: each entry's kind comes from ``os.scandir`` (``d_type``) or a
``stat``. The rules, each skipped entry named in one log line and in a summary warning:

* hidden entries (``.name``) are ignored silently, files with other extensions with a warning;
* FIFOs, sockets and devices are skipped, never opened;
* names that are not valid UTF-8 or hold control characters are skipped (shown escaped);
* symbolic links are followed (``follow_links=True``, the default) unless they lead to a folder
  already scanned, identified by ``(st_dev, st_ino)``: that stops link loops and keeps a file
  from being listed twice under two classes. Real folders are walked before any linked one, so
  a link never takes a folder away from the class it really sits in. A link may point outside
  the root. ``follow_links=False`` skips every link;
* a class folder left without image files is an error (:class:`EmptyClassFolder`).

With ``with_stats=True`` the walk also ``stat``s every image file (size, mtime, inode) and
digests the listing into a key: what :mod:`nfnet.data.folder_index` uses to know, without
opening any file, whether the tree changed since its index was built.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import os
import stat
import warnings
from dataclasses import dataclass, field

from nfnet.data.folder_files import IMAGE_EXTENSIONS, is_image_name, kind_of, name_problem, printable, summary

log = logging.getLogger("nfnet.data.folder")

# Bumped whenever the walk's rules change, so that an index built under other rules is not read.
SCAN_RULES_VERSION = 1


class EmptyClassFolder(ValueError):
    """Class folders without a single image file: the message names them and says what to do."""


@dataclass
class Listing:
    """What a walk found. Paths in ``samples`` are ``root`` joined with a relative path."""

    root: str
    follow_links: bool
    classes: list[str] = field(default_factory=list)
    samples: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (printable relpath, why)
    ignored: list[str] = field(default_factory=list)  # non-image files (relpaths)
    stats: list[tuple[str, int, int, int]] = field(default_factory=list)  # relpath, size, mtime_ns, ino

    def key(self) -> str:
        """A digest of the listing: changes when an image file is added, removed, renamed,
        replaced (new inode) or touched (new mtime), and when entries are skipped or ignored."""
        h = hashlib.blake2b(digest_size=16, person=b"nfnet-tree")
        h.update(repr((SCAN_RULES_VERSION, IMAGE_EXTENSIONS, self.follow_links, self.classes)).encode())
        for record in sorted(self.stats):
            h.update(("%s\0%d\0%d\0%d\n" % record).encode())
        for rel, why in self.skipped:
            h.update(f"skip\0{rel}\0{why}\n".encode())
        for rel in self.ignored:
            h.update(f"ignore\0{rel}\n".encode())
        return h.hexdigest()


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class _Walk:
    def __init__(self, root: str, follow_links: bool, with_stats: bool):
        self.out = Listing(root, follow_links)
        self.with_stats = with_stats
        self.visited: dict[tuple[int, int], str] = {}  # folder identity -> relpath where first met
        self.links: list[tuple[str, str, int]] = []  # heap of (relpath, abspath, label) to follow

    def skip(self, rel: str, why: str) -> None:
        self.out.skipped.append((printable(rel), why))

    def enter(self, rel: str, path: str, st: os.stat_result) -> bool:
        """Registers a folder; False (and a skip) if it was scanned already."""
        first = self.visited.setdefault(_identity(st), rel)
        if first == rel:
            return True
        loop = rel.startswith(first + "/") or first == "."
        target = os.path.realpath(path)
        self.skip(rel, f"symbolic link or mount to {printable(target)} not followed: "
                       + (f"a loop back to its own parent folder {printable(first)!r}" if loop
                          else f"that folder is already scanned as {printable(first)!r}"))
        return False

    def link_target(self, rel: str, path: str) -> os.stat_result | None:
        if not self.out.follow_links:
            self.skip(rel, "symbolic link not followed (follow_links=False)")
            return None
        try:
            return os.stat(path)
        except OSError as e:  # a dangling link, or one that loops on itself (ELOOP)
            self.skip(rel, f"broken symbolic link to {printable(os.readlink(path))!r} ({e.strerror or e})")
            return None

    def add_file(self, rel: str, path: str, label: int, name: str, st: os.stat_result | None) -> None:
        if not is_image_name(name):
            self.out.ignored.append(rel)
            return
        self.out.samples.append((path, label))
        if st is not None:
            self.out.stats.append((rel, st.st_size, st.st_mtime_ns, st.st_ino))

    def walk_dir(self, rel: str, path: str, label: int) -> None:
        """One folder's entries; real subfolders now (depth first), links later."""
        stack = [(rel, path)]
        while stack:
            rel_dir, dir_path = stack.pop()
            try:
                with os.scandir(dir_path) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as e:
                self.skip(rel_dir, f"folder cannot be listed ({e.strerror or e})")
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                rel_entry = f"{rel_dir}/{entry.name}"
                try:
                    self.add_entry(rel_entry, entry, label, stack)
                except OSError as e:  # it vanished or changed while the tree was walked
                    self.skip(rel_entry, f"cannot be read ({e.strerror or e})")

    def add_entry(self, rel: str, entry: os.DirEntry, label: int, stack: list[tuple[str, str]]) -> None:
        why = name_problem(entry.name)
        if why:
            self.skip(rel, why)
        elif entry.is_symlink():
            heapq.heappush(self.links, (rel, entry.path, label))
        elif entry.is_dir(follow_symlinks=False):
            if self.enter(rel, entry.path, entry.stat(follow_symlinks=False)):
                stack.append((rel, entry.path))
        elif entry.is_file(follow_symlinks=False):
            self.add_file(rel, entry.path, label, entry.name, entry.stat() if self.with_stats else None)
        else:
            self.skip(rel, f"{kind_of(entry.stat(follow_symlinks=False).st_mode)}, never opened")

    def follow_links(self) -> None:
        while self.links:
            rel, path, label = heapq.heappop(self.links)
            st = self.link_target(rel, path)
            if st is None:
                continue
            if stat.S_ISDIR(st.st_mode):
                if self.enter(rel, path, st):
                    self.walk_dir(rel, path, label)
            elif stat.S_ISREG(st.st_mode):
                self.add_file(rel, path, label, os.path.basename(path), st if self.with_stats else None)
            else:
                self.skip(rel, f"symbolic link to {kind_of(st.st_mode)}, never opened")


def walk_image_folder(root: str, follow_links: bool = True, with_stats: bool = False) -> Listing:
    """The raw walk (no warnings, no errors beyond a missing root): see the module docstring."""
    root = os.path.abspath(os.fspath(root))
    try:
        root_st = os.stat(root)
        with os.scandir(root) as it:
            top = list(it)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(
            f"image folder {root!r} does not exist or is not a directory; point the data root "
            "at a folder laid out as <root>/<class_name>/<image files>"
        ) from None
    w = _Walk(root, follow_links, with_stats)
    w.visited[_identity(root_st)] = "."
    # Every class folder is registered before any is walked, so that a link inside one class can
    # never claim another; real ones first, so that a linked class never claims a real one.
    candidates = []
    for entry in sorted(top, key=lambda e: (e.is_symlink(), e.name)):
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=True):
            continue
        why = name_problem(entry.name)
        if why:
            w.skip(entry.name, f"class folder skipped: {why}")
            continue
        st = w.link_target(entry.name, entry.path) if entry.is_symlink() else entry.stat()
        if st is not None and w.enter(entry.name, entry.path, st):
            candidates.append(entry)
    for label, entry in enumerate(sorted(candidates, key=lambda e: e.name)):
        w.out.classes.append(entry.name)
        w.walk_dir(entry.name, entry.path, label)
    w.follow_links()
    w.out.samples.sort()
    w.out.skipped.sort()
    return w.out


def report(listing: Listing) -> None:
    """Warns about what the walk skipped or ignored, and raises on a tree that cannot be used."""
    root = listing.root
    for rel, why in listing.skipped:
        log.warning("%s: skipping %s (%s)", root, rel, why)
    if listing.skipped:
        warnings.warn(summary(f"skipped {len(listing.skipped)} entries in {root!r}",
                              [f"{rel} ({why})" for rel, why in listing.skipped]))
    for rel in listing.ignored:
        log.warning("ignoring non-image file (extension not in %s): %s", IMAGE_EXTENSIONS, os.path.join(root, rel))
    if listing.ignored:
        warnings.warn(summary(f"ignored {len(listing.ignored)} non-image file(s) in {root!r}",
                              [os.path.join(root, rel) for rel in listing.ignored]))
    if not listing.classes:
        raise ValueError(
            f"image folder {root!r} has no class subfolders; expected <root>/<class_name>/<images> "
            "(one subfolder per class)"
        )
    counts = [0] * len(listing.classes)
    for _, label in listing.samples:
        counts[label] += 1
    empty = [name for name, n in zip(listing.classes, counts) if n == 0]
    if empty:
        shown = ", ".join(repr(name) for name in empty[:10]) + (", ..." if len(empty) > 10 else "")
        raise EmptyClassFolder(
            f"image folder {root!r}: {len(empty)} of {len(listing.classes)} class folder(s) have no image files "
            f"({shown}); delete those folders or add images to them (files with extensions {IMAGE_EXTENSIONS} "
            "count; skipped entries are in the warnings above)"
        )


def scan_image_folder(root: str, follow_links: bool = True) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted subfolder names of ``root``) and (path, label) samples sorted by path.

    Images may sit in nested folders below a class folder. See the module docstring for what is
    skipped; raises ``FileNotFoundError`` for a missing root, ``ValueError`` for a root without
    class folders and :class:`EmptyClassFolder` (a ``ValueError``) for classes without images.
    """
    listing = walk_image_folder(root, follow_links)
    report(listing)
    return listing.classes, listing.samples
