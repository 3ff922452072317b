"""Whether a round's candidate replaces the model in service: the promotion gate.

Both models are scored on two sets: this round's validation split (every class of today), and
the previous round's validation set, its files and labels as they were when the model in service
was chosen (nfnet.data.rounds finds them again). The candidate is promoted when, on each set,

* its top-1 is not below the current model's by more than `tolerance`, and
* no class the current model knows falls by more than `max_class_drop`.

The previous round's set is what makes broken data visible. A round trained on shuffled labels
is measured on a split shuffled the same way, where the current model does no better; on the
labels as they were, it has forgotten what the current model knows. New classes count in this
round's top-1 (the current model cannot name them, so it scores none of their images) but are
never "old", so they cannot block a promotion by falling. No Lightning, no Hydra.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

VAL = "val"
PREVIOUS_VAL = "previous_val"
SET_NAMES = {VAL: "val", PREVIOUS_VAL: "previous round's val"}
# How many moved classes the one-line reason names (metrics.json has them all).
CLASSES_NAMED = 5


@dataclass
class Score:
    """Top-1 counts per class index of one model on one set."""

    correct: list[int]
    total: list[int]

    @property
    def images(self) -> int:
        return sum(self.total)

    @property
    def top1(self) -> float:
        return sum(self.correct) / self.images if self.images else 0.0

    def class_top1(self, index: int) -> float | None:
        total = self.total[index] if index < len(self.total) else 0
        return self.correct[index] / total if total else None

    def to_json(self, classes: Sequence[str]) -> dict[str, Any]:
        per_class = {name: {"top1": self.class_top1(i), "images": self.total[i]}
                     for i, name in enumerate(classes) if self.total[i]}
        return {"top1": self.top1, "images": self.images, "per_class": per_class}


@dataclass
class Decision:
    promote: bool
    reason: str
    # set -> class -> (current model's top-1, candidate's), for the classes that moved.
    moved: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)


def _moved(candidate: Score, current: Score, classes: Sequence[str], old: Sequence[int],
           threshold: float) -> dict[str, tuple[float, float]]:
    changes = {}
    for index in old:
        before, after = current.class_top1(index), candidate.class_top1(index)
        if before is not None and after is not None and abs(after - before) >= threshold:
            changes[classes[index]] = (before, after)
    return dict(sorted(changes.items(), key=lambda item: item[1][1] - item[1][0]))


def _named(changes: Mapping[str, tuple[float, float]]) -> str:
    shown = [f"{name} {after - before:+.2f}" for name, (before, after) in list(changes.items())[:CLASSES_NAMED]]
    return ", ".join(shown) + (f" and {len(changes) - CLASSES_NAMED} more" if len(changes) > CLASSES_NAMED else "")


def decide(candidate: Mapping[str, Score], current: Mapping[str, Score] | None, classes: Sequence[str],
           old: Sequence[int], tolerance: float, max_class_drop: float) -> Decision:
    """The gate on the sets both models were scored on (VAL, PREVIOUS_VAL; an empty set is
    skipped). `classes` names the candidate's label indices; `old` are the indices of the
    classes the current model knows. Without a current model the candidate is promoted."""
    if current is None:
        return Decision(True, f"the registry had no model in service; val top-1 {candidate[VAL].top1:.3f}")
    failures, moved, summary = [], {}, []
    for key, name in SET_NAMES.items():
        if key not in candidate or not candidate[key].images:
            continue
        new, old_score = candidate[key], current[key]
        summary.append(f"{name} top-1 {new.top1:.3f} vs {old_score.top1:.3f}")
        if new.top1 < old_score.top1 - tolerance:
            failures.append(f"{name} top-1 {new.top1:.3f} is {old_score.top1 - new.top1:.3f} below the current "
                            f"model's {old_score.top1:.3f} (gate.tolerance={tolerance:g})")
        # Classes that moved by half the allowed drop are named, so a report shows what is coming.
        moved[key] = _moved(new, old_score, classes, old, max_class_drop / 2)
        fell = {c: (b, a) for c, (b, a) in moved[key].items() if a < b - max_class_drop}
        if fell:
            failures.append(f"on the {name} set {len(fell)} old class(es) fell by more than "
                            f"gate.max_class_drop={max_class_drop:g}: {_named(fell)}")
    moved = {key: changes for key, changes in moved.items() if changes}
    if failures:
        return Decision(False, "; ".join(failures), moved)
    named = "; ".join(f"{SET_NAMES[key]}: {_named(changes)}" for key, changes in moved.items())
    return Decision(True, ", ".join(summary) + (f"; classes that moved: {named}" if named else "; no old class moved"
                                                  f" by {max_class_drop / 2:g} or more"), moved)
