"""One update round's data: what trains, what validates, what the previous round validated on,
and what changed in the folder since then.

The previous round left a manifest: every file's relative path, split, class and content hash
(nfnet.data.folder_split). Against it, each file of the folder now is

* unchanged: the same bytes at the same path, or at another path in the same class (a renamed
  file, a renamed class folder); it was trained or validated on before;
* new: a path and bytes the manifest does not have;
* changed: the same path with other bytes (a file overwritten);
* relabelled: bytes the manifest has under another class (moved to another class folder);

and a file of the manifest found nowhere has vanished. Changed and relabelled files are reported:
a few are corrections, many are a broken labelling step.

The split is the folder's stable one (a file's split is a hash of its path), so no file of the
previous training set moves into validation. Training takes the new, changed and relabelled
files (each `new_repeats` times per epoch) and a `replay` share of the unchanged training files
(a seeded choice by path, so a resumed round chooses the same). The previous round's validation
set is its files as they were: found again by path, or by content where a file moved, and
labelled as the manifest says (through the class map), so that a round whose new labels are
wrong is measured against the old, right ones. No Lightning, no Hydra.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from nfnet.data.class_set import ClassSet
from nfnet.data.folder_files import relative_path
from nfnet.data.folder_scan import walk_image_folder
from nfnet.data.folder_split import ManifestRow, split_draw, split_manifest

Samples = list[tuple[str, int]]
# How many paths a change report spells out per kind.
_SHOWN = 3


@dataclass
class FileChanges:
    """How the folder differs from the previous round's manifest (relative paths)."""

    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    # (path now, class before, class now)
    relabelled: list[tuple[str, str, str]] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)

    @property
    def fresh(self) -> int:
        """Files a round has not trained or validated on as they are now."""
        return len(self.new) + len(self.changed) + len(self.relabelled)

    def report(self) -> list[str]:
        """One line per kind of change that needs a look (changed content, new labels, vanished)."""
        lines = []
        if self.changed:
            lines.append(f"{len(self.changed)} file(s) have new content under the same name: "
                         f"{', '.join(self.changed[:_SHOWN])}{', ...' if len(self.changed) > _SHOWN else ''}")
        if self.relabelled:
            pairs: dict[tuple[str, str], int] = {}
            for _, before, now in self.relabelled:
                pairs[before, now] = pairs.get((before, now), 0) + 1
            common = sorted(pairs.items(), key=lambda item: -item[1])[:_SHOWN]
            lines.append(f"{len(self.relabelled)} file(s) moved to another class since the last round ("
                         + ", ".join(f"{n} {b} -> {a}" for (b, a), n in common)
                         + (", ..." if len(pairs) > _SHOWN else "") + ")")
        if self.vanished:
            lines.append(f"{len(self.vanished)} file(s) of the last round are gone: "
                         f"{', '.join(self.vanished[:_SHOWN])}{', ...' if len(self.vanished) > _SHOWN else ''}")
        return lines

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> FileChanges:
        return cls(payload["new"], payload["changed"], [tuple(r) for r in payload["relabelled"]], payload["vanished"])


@dataclass
class RoundData:
    """A round's samples ((path, label in the class set's order)) and what it found."""

    train: Samples
    val: Samples
    previous_val: Samples
    manifest: list[ManifestRow]
    changes: FileChanges

    def to_json(self, root: str) -> dict[str, Any]:
        root = os.path.abspath(root)

        def rel(samples: Samples) -> list[list[Any]]:
            return [[relative_path(root, path), label] for path, label in samples]

        return {"root": root, "train": rel(self.train), "val": rel(self.val), "previous_val": rel(self.previous_val),
                "changes": self.changes.to_json()}

    @classmethod
    def from_json(cls, payload: Mapping[str, Any], manifest: list[ManifestRow]) -> RoundData:
        def absolute(rows) -> Samples:
            return [(os.path.join(payload["root"], rel), int(label)) for rel, label in rows]

        return cls(absolute(payload["train"]), absolute(payload["val"]), absolute(payload["previous_val"]), manifest,
                   FileChanges.from_json(payload["changes"]))


def relabel(samples: Samples, folder_classes: Sequence[str], classes: Sequence[str]) -> Samples:
    """Samples labelled by the folder's sorted classes -> labelled in the model's class order."""
    index = {name: i for i, name in enumerate(classes)}
    return [(path, index[folder_classes[label]]) for path, label in samples]


def plan_round(root: str, train: Samples, val: Samples, class_set: ClassSet, previous: Sequence[ManifestRow] | None,
               class_map: Mapping[str, str | None] | None = None, replay: float = 1.0, new_repeats: int = 1,
               seed: int = 0) -> RoundData:
    """The round's data from the folder's stable split (`train`, `val`, labelled in
    `class_set.classes` order) and the previous round's manifest (None for a first round)."""
    root = os.path.abspath(root)
    manifest = sorted(split_manifest(root, train, "train") + split_manifest(root, val, "val"))
    if previous is None:
        return RoundData(list(train), list(val), [], manifest, FileChanges(new=[row.relpath for row in manifest]))
    class_map = dict(class_map or {})

    def then(row: ManifestRow) -> str | None:
        """A previous row's class as it is called now (None: a removed class)."""
        return class_map.get(row.label, row.label)

    before = {row.relpath: row for row in previous}
    before_by_bytes = {row.blake2b: row for row in previous if row.blake2b}
    now_by_bytes = {row.blake2b: row for row in manifest if row.blake2b}
    changes, known = FileChanges(), set()
    for row in manifest:
        old = before.get(row.relpath)
        if old is not None and old.blake2b == row.blake2b:
            known.add(row.relpath)
        elif old is not None:
            changes.changed.append(row.relpath)
        elif row.blake2b in before_by_bytes:
            label_then = then(before_by_bytes[row.blake2b])
            if label_then == row.label:
                known.add(row.relpath)
            else:
                changes.relabelled.append((row.relpath, str(label_then), row.label))
        else:
            changes.new.append(row.relpath)
    here = {row.relpath: row.blake2b for row in manifest}
    changes.vanished = [row.relpath for row in previous if row.relpath not in here and row.blake2b not in now_by_bytes]

    chosen = []
    for path, label in train:
        rel = relative_path(root, os.path.abspath(path))
        if rel not in known:
            chosen += [(path, label)] * new_repeats
        elif replay >= 1.0 or split_draw(seed, rel, purpose=b"nfnet-replay") < replay:
            chosen.append((path, label))
    previous_val = []
    for row in previous:
        label_now = then(row)
        if row.split != "val" or label_now is None:
            continue
        if here.get(row.relpath) == row.blake2b:
            found = row.relpath
        elif row.blake2b in now_by_bytes:
            found = now_by_bytes[row.blake2b].relpath
        else:
            continue
        previous_val.append((os.path.join(root, found), class_set.classes.index(label_now)))
    return RoundData(chosen, list(val), previous_val, manifest, changes)


def new_files(root: str, known: set[str], follow_links: bool = True) -> list[str]:
    """Image files under `root` whose relative paths are not in `known`, by a listing alone (no
    file is opened): what a watching update.py counts between rounds."""
    listing = walk_image_folder(root, follow_links)
    return [rel for rel in (relative_path(listing.root, path) for path, _ in listing.samples) if rel not in known]
