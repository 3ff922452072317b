"""A round's data against the previous round's manifest (nfnet.data.rounds): the split never
moves a file, changes are found by content, replay and repeats choose what trains, and the
previous round's validation set is its files with their labels as they were."""

from __future__ import annotations

import os
import shutil

import numpy as np
from PIL import Image

from nfnet.data.class_set import evolve_classes
from nfnet.data.folder import scan_image_folder
from nfnet.data.folder_split import seeded_split
from nfnet.data.rounds import new_files, plan_round, relabel


def _image(path, *seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(list(seed)).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _folder(root, counts, start=0):
    """counts: {class: n}; every file's content is its own (drawn from its class and index)."""
    for name, n in counts.items():
        for i in range(start, start + n):
            _image(os.path.join(root, name, f"{i:03d}.png"), ord(name), i)


def _round(root, old_classes, previous, class_map=None, **kwargs):
    classes, samples = scan_image_folder(str(root))
    train, val = seeded_split(samples, 0.25, 0, root=str(root))
    class_set = evolve_classes(old_classes, classes, class_map)
    train, val = (relabel(s, classes, class_set.classes) for s in (train, val))
    return class_set, plan_round(str(root), train, val, class_set, previous, class_map, **kwargs)


def _splits(manifest):
    return {row.relpath: row.split for row in manifest}


def test_growing_the_folder_moves_no_file_between_train_and_val(tmp_path):
    _folder(tmp_path, {"b": 40, "c": 40})
    first_set, first = _round(tmp_path, [], None)
    # A new class whose name sorts first, and twice the images of an old class.
    _folder(tmp_path, {"a": 30})
    _folder(tmp_path, {"b": 40}, start=40)
    second_set, second = _round(tmp_path, first_set.classes, first.manifest)
    before, after = _splits(first.manifest), _splits(second.manifest)
    assert {rel: after[rel] for rel in before} == before
    assert second_set.classes == ["b", "c", "a"]
    # Labels follow the model's order: every image of "a" is label 2, of "b" label 0.
    labels = {os.path.relpath(p, tmp_path).split(os.sep)[0]: label for p, label in second.val + second.train}
    assert labels == {"b": 0, "c": 1, "a": 2}
    assert len(second.changes.new) == 70 and not second.changes.changed and not second.changes.relabelled


def test_changed_content_relabelled_and_vanished_files_are_reported(tmp_path):
    _folder(tmp_path, {"b": 20, "c": 20})
    class_set, first = _round(tmp_path, [], None)
    _image(tmp_path / "b" / "000.png", 255, 255)  # new bytes under the same name
    shutil.move(tmp_path / "b" / "001.png", tmp_path / "c" / "moved.png")  # same bytes, other class
    os.remove(tmp_path / "c" / "005.png")
    _, second = _round(tmp_path, class_set.classes, first.manifest)
    changes = second.changes
    assert changes.changed == ["b/000.png"]
    assert changes.relabelled == [("c/moved.png", "b", "c")]
    assert changes.vanished == ["c/005.png"]
    report = "\n".join(changes.report())
    assert "b/000.png" in report and "1 b -> c" in report and "c/005.png" in report


def test_replay_keeps_a_stable_share_of_old_images_and_repeats_the_new(tmp_path):
    _folder(tmp_path, {"b": 60, "c": 60})
    class_set, first = _round(tmp_path, [], None)
    _folder(tmp_path, {"c": 20}, start=60)
    old_train = {p for p, _ in first.train}
    _, second = _round(tmp_path, class_set.classes, first.manifest, replay=0.5, new_repeats=3)
    replayed = [p for p, _ in second.train if p in old_train]
    fresh = [p for p, _ in second.train if p not in old_train]
    assert len(set(replayed)) == len(replayed)
    assert 0.3 < len(replayed) / len(old_train) < 0.7
    assert len(fresh) == 3 * len(set(fresh)) and {p for p in fresh} == {p for p, _ in second.train} - old_train
    _, again = _round(tmp_path, class_set.classes, first.manifest, replay=0.5, new_repeats=3)
    assert again.train == second.train


def test_the_previous_validation_set_keeps_its_labels_when_files_move(tmp_path):
    _folder(tmp_path, {"b": 40, "c": 40})
    class_set, first = _round(tmp_path, [], None)
    previous_val = {os.path.relpath(p, tmp_path): label for p, label in first.val}
    # Every b image moves to c: labels shuffled in the folder.
    for name in sorted(os.listdir(tmp_path / "b")):
        shutil.move(tmp_path / "b" / name, tmp_path / "c" / f"b-{name}")
    os.rmdir(tmp_path / "b")
    _image(tmp_path / "b" / "new.png", 1, 1)
    _, second = _round(tmp_path, class_set.classes, first.manifest)
    found = {os.path.relpath(p, tmp_path): label for p, label in second.previous_val}
    assert len(found) == len(previous_val)
    # Found again at their new paths, with their old labels (b = 0).
    assert sorted(found.values()) == sorted(previous_val.values())
    assert all(label == 0 for rel, label in found.items() if rel.startswith("c/b-"))
    assert len(second.changes.relabelled) == 40


def test_a_renamed_class_is_not_a_relabelling(tmp_path):
    _folder(tmp_path, {"b": 20, "c": 20})
    class_set, first = _round(tmp_path, [], None)
    os.rename(tmp_path / "c", tmp_path / "d")
    new_set, second = _round(tmp_path, class_set.classes, first.manifest, {"c": "d"})
    assert new_set.classes == ["b", "d"] and not second.changes.relabelled and not second.changes.new
    assert {label for _, label in second.previous_val} == {0, 1}


def test_new_files_lists_what_a_manifest_does_not_know(tmp_path):
    _folder(tmp_path, {"b": 3})
    assert sorted(new_files(str(tmp_path), {"b/000.png"})) == ["b/001.png", "b/002.png"]
