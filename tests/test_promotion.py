"""The promotion gate (nfnet.inference.promotion) on hand-made counts: each rule alone decides."""

from __future__ import annotations

from nfnet.inference.promotion import PREVIOUS_VAL, VAL, Score, decide

CLASSES = ["a", "b", "c"]  # c is new this round: the current model cannot name it
OLD = [0, 1]


def scores(val, previous):
    return {VAL: Score(*val), PREVIOUS_VAL: Score(*previous)}


CURRENT = scores(([9, 8, 0], [10, 10, 10]), ([9, 9, 0], [10, 10, 0]))


def test_a_first_model_is_promoted():
    decision = decide(scores(([1, 1, 1], [2, 2, 2]), ([0, 0, 0], [0, 0, 0])), None, CLASSES, [], 0.01, 0.1)
    assert decision.promote and "no model in service" in decision.reason


def test_better_on_both_sets_is_promoted_and_the_reason_gives_both_top1():
    candidate = scores(([9, 8, 7], [10, 10, 10]), ([9, 9, 0], [10, 10, 0]))
    decision = decide(candidate, CURRENT, CLASSES, OLD, 0.01, 0.1)
    assert decision.promote
    assert "val top-1 0.800 vs 0.567" in decision.reason and "previous round's val top-1 0.900 vs 0.900" in decision.reason


def test_top1_below_the_current_model_by_more_than_the_tolerance_keeps_it_out():
    # Previous set: 17/20 = 0.85 against 0.90, 0.05 below; with tolerance 0.06 it passes.
    candidate = scores(([9, 8, 9], [10, 10, 10]), ([9, 8, 0], [10, 10, 0]))
    assert not decide(candidate, CURRENT, CLASSES, OLD, 0.01, 0.5).promote
    assert decide(candidate, CURRENT, CLASSES, OLD, 0.06, 0.5).promote


def test_one_old_class_falling_too_far_keeps_it_out_even_when_top1_rises():
    # a falls 0.9 -> 0.6 on the val set while the new class lifts the total.
    candidate = scores(([6, 10, 10], [10, 10, 10]), ([9, 9, 0], [10, 10, 0]))
    decision = decide(candidate, CURRENT, CLASSES, OLD, 0.01, 0.25)
    assert not decision.promote
    assert "a -0.30" in decision.reason and "gate.max_class_drop=0.25" in decision.reason
    assert decision.moved[VAL]["a"] == (0.9, 0.6)
    assert decide(candidate, CURRENT, CLASSES, OLD, 0.01, 0.35).promote


def test_a_new_class_never_blocks_a_promotion():
    current = scores(([9, 9, 5], [10, 10, 10]), ([0, 0, 0], [0, 0, 0]))  # the current model "knows" c by chance
    candidate = scores(([9, 9, 0], [10, 10, 10]), ([0, 0, 0], [0, 0, 0]))
    assert not decide(candidate, current, CLASSES, OLD, 0.01, 0.1).promote  # top-1 fell 0.17
    assert decide(candidate, current, CLASSES, OLD, 0.2, 0.1).promote  # but c's own fall is not counted


def test_an_empty_previous_set_is_skipped():
    current = scores(([5, 5, 0], [10, 10, 10]), ([0, 0, 0], [0, 0, 0]))
    candidate = scores(([5, 5, 5], [10, 10, 10]), ([0, 0, 0], [0, 0, 0]))
    decision = decide(candidate, current, CLASSES, OLD, 0.01, 0.1)
    assert decision.promote and "previous" not in decision.reason
