"""A model's class set as the folder it learns from changes: new class folders are appended, the
old classes keep their rows and their order, and a class whose folder is gone is an error unless
a class map says what it became.

The classifier's row i is class i, so the order is the model's, not the folder's sorted listing:
a new class named `aardvark` gets the next row, it does not shift every other class down one.
A folder renamed from `circle` to `round` looks like a class that vanished and a new one; only the
user knows it is the same class, and says so with `{circle: round}` (the row is kept under the new
name). `{circle: square}`, with `square` a class of the model too, merges: the images of both
train `square`'s row and `circle`'s row goes. `{circle: null}` removes the class and its row.
No Lightning, no Hydra.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from nfnet.errors import InputError

# How many class names an error spells out.
_SHOWN = 8


class ClassSetError(InputError):
    """The folder's classes and the model's disagree in a way only the user can resolve; one line."""


@dataclass(frozen=True)
class ClassSet:
    """The model's classes after a change of the folder, and where each one's row comes from."""

    classes: list[str]
    # rows[i]: the old model's row that class i keeps, or None for a new class.
    rows: list[int | None]
    added: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    merged: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)

    def old_label(self, old_class: str, class_map: Mapping[str, str | None]) -> int | None:
        """The label index an image of the old model's class `old_class` has now (None: removed)."""
        target = class_map.get(old_class, old_class)
        return None if target is None else self.classes.index(target)

    def describe(self) -> str:
        parts = [f"{len(self.classes)} classes"]
        if self.added:
            parts.append(f"new: {', '.join(self.added)}")
        parts += [f"{old} renamed {new}" for old, new in self.renamed.items()]
        parts += [f"{old} merged into {new}" for old, new in self.merged.items()]
        if self.removed:
            parts.append(f"removed: {', '.join(self.removed)}")
        return "; ".join(parts)


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "")


def evolve_classes(old: Sequence[str], found: Sequence[str], class_map: Mapping[str, str | None] | None = None) -> ClassSet:
    """The class set a model of classes `old` (in row order) has after training on class folders
    `found`, with `class_map` ({old class: the folder it became, or None for removed}) applied."""
    class_map = dict(class_map or {})
    found_set = set(found)
    unknown = sorted(k for k in class_map if k not in old)
    if unknown:
        raise ClassSetError(f"data.class_map names {_names(unknown)}, which the model does not have (its classes: "
                            f"{_names(list(old))})")
    missing = sorted({v for v in class_map.values() if v is not None and v not in found_set})
    if missing:
        raise ClassSetError(f"data.class_map maps classes to {_names(missing)}, which data.root has no folder for")
    still = sorted(k for k, v in class_map.items() if k in found_set and v != k)
    if still:
        raise ClassSetError(f"data.class_map says what {_names(still)} became, but data.root still has a folder of that "
                            "name; move its images to where the map says, or drop it from the map")
    target = {name: class_map.get(name, name) for name in old}
    gone = [name for name in old if target[name] is not None and target[name] not in found_set]
    if gone:
        fresh = sorted(found_set - {t for t in target.values() if t is not None})
        example = f"{gone[0]}: {fresh[0]}" if fresh else f"{gone[0]}: <folder>"
        raise ClassSetError(
            f"the class folder(s) {_names(gone)} of the model are gone from data.root"
            f"{f' and {_names(fresh)} are new' if fresh else ''}; say what each became: data.class_map={{{example}}} "
            f"(renamed, or merged into an existing class) or data.class_map={{{gone[0]}: null}} (removed)"
        )
    # The row a target class keeps: its own, if it was an old class that stays; else the first
    # old class (in row order) that maps to it.
    owner: dict[str, int] = {}
    for row, name in enumerate(old):
        if target[name] == name:
            owner[name] = row
    for row, name in enumerate(old):
        if target[name] is not None:
            owner.setdefault(target[name], row)
    classes, rows = [], []
    for row, name in enumerate(old):
        if target[name] is not None and owner[target[name]] == row:
            classes.append(target[name])
            rows.append(row)
    added = sorted(found_set - set(classes))
    return ClassSet(
        classes=classes + added,
        rows=rows + [None] * len(added),
        added=added,
        renamed={n: t for n, t in target.items() if t is not None and t != n and owner[t] == old.index(n)},
        merged={n: t for n, t in target.items() if t is not None and owner[t] != old.index(n)},
        removed=[n for n in old if target[n] is None],
    )
