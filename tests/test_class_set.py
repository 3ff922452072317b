"""A model's class set as its folder changes (nfnet.data.class_set): new classes are appended
after the old ones, whatever their names; a gone class is one line unless data.class_map says
what it became."""

from __future__ import annotations

import pytest

from nfnet.data.class_set import ClassSetError, evolve_classes

OLD = ["circle", "cross", "star"]


def test_new_classes_are_appended_and_old_rows_keep_their_order():
    # "arrow" sorts before every old class: it still gets the next row, not row 0.
    found = sorted(OLD + ["triangle", "arrow"])
    changed = evolve_classes(OLD, found)
    assert changed.classes == ["circle", "cross", "star", "arrow", "triangle"]
    assert changed.rows == [0, 1, 2, None, None]
    assert changed.added == ["arrow", "triangle"]


def test_a_first_round_takes_the_folder_sorted():
    assert evolve_classes([], ["b", "a"]).classes == ["a", "b"]
    assert evolve_classes([], ["b", "a"]).rows == [None, None]


def test_a_renamed_folder_is_one_line_naming_old_and_new_and_the_fix():
    with pytest.raises(ClassSetError) as caught:
        evolve_classes(OLD, ["circle", "plus", "star"])
    message = str(caught.value)
    assert "\n" not in message
    assert "cross" in message and "plus" in message and "data.class_map={cross: plus}" in message
    assert "data.class_map={cross: null}" in message


def test_a_class_map_keeps_the_row_under_the_new_name():
    changed = evolve_classes(OLD, ["circle", "plus", "star"], {"cross": "plus"})
    assert changed.classes == ["circle", "plus", "star"]
    assert changed.rows == [0, 1, 2]
    assert changed.renamed == {"cross": "plus"}
    assert changed.old_label("cross", {"cross": "plus"}) == 1


def test_a_merge_keeps_the_target_row_and_drops_the_other():
    changed = evolve_classes(OLD, ["circle", "star"], {"cross": "star"})
    assert changed.classes == ["circle", "star"]
    assert changed.rows == [0, 2]
    assert changed.merged == {"cross": "star"}
    assert changed.old_label("cross", {"cross": "star"}) == 1


def test_a_removed_class_loses_its_row():
    changed = evolve_classes(OLD, ["circle", "star"], {"cross": None})
    assert changed.classes == ["circle", "star"] and changed.rows == [0, 2]
    assert changed.removed == ["cross"]
    assert changed.old_label("cross", {"cross": None}) is None


@pytest.mark.parametrize(
    "found, class_map, words",
    [
        (OLD, {"square": "star"}, ["data.class_map names square", "does not have"]),
        (["circle", "star"], {"cross": "plus"}, ["maps classes to plus", "no folder"]),
        (OLD, {"cross": "star"}, ["still has a folder", "cross"]),
    ],
)
def test_a_class_map_that_cannot_be_right_is_one_line(found, class_map, words):
    with pytest.raises(ClassSetError) as caught:
        evolve_classes(OLD, found, class_map)
    assert "\n" not in str(caught.value)
    for word in words:
        assert word in str(caught.value)
