"""Stable splits: a file's split depends only on (seed, its path relative to the dataset root)."""

import csv
import hashlib
import math
import os
import warnings

import pytest

from nfnet.data.folder import (
    ManifestRow,
    relative_paths,
    scan_image_folder,
    seeded_split,
    split_manifest,
    write_file_list,
    write_manifest,
)


def _samples(root, sizes):
    """(path, label) as scan_image_folder lists them: classes sorted, labels by that order."""
    classes = sorted(sizes)
    return [
        (f"{root}/{name}/img{i:04d}.jpg", label)
        for label, name in enumerate(classes)
        for i in range(sizes[name])
    ]


def _val_set(base, samples, fraction, seed=0, **kw):
    """The validation files' paths relative to ``base``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, val = seeded_split(samples, fraction, seed, **kw)
    return {os.path.relpath(p, base) for p, _ in val}


def test_split_is_deterministic_disjoint_and_keeps_order():
    samples = _samples("/data", {"c0": 30, "c1": 40, "c2": 50})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, val = seeded_split(samples, 0.2, seed=0)
        assert seeded_split(samples, 0.2, seed=0) == (train, val)
        assert seeded_split(samples, 0.2, seed=1)[1] != val
    assert sorted(train + val) == sorted(samples) and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)
    assert seeded_split(samples, 0.0, seed=0) == (samples, [])
    with pytest.raises(ValueError, match="val_fraction"):
        seeded_split(samples, 1.0, seed=0)
    with pytest.raises(ValueError, match="pass root="):
        seeded_split(samples[:30], 0.2, seed=0)  # one class: the root cannot be inferred


def test_adding_files_and_a_class_that_sorts_first_moves_no_file():
    before = _samples("/data", {"birds": 100, "cats": 100, "dogs": 100})
    # 100 more cats, and a new class whose name sorts first: every label index shifts by one.
    after = _samples("/data", {"aardvarks": 50, "birds": 100, "cats": 200, "dogs": 100})
    val_before, val_after = _val_set("/data", before, 0.2), _val_set("/data", after, 0.2)
    old = {os.path.relpath(p, "/data") for p, _ in before}
    assert val_after & old == val_before  # no old file entered or left validation
    assert val_after - old  # and the new files are split too


def test_split_fraction_within_statistical_bounds():
    n_class, per_class, f = 20, 1000, 0.1
    samples = _samples("/data", {f"c{k:02d}": per_class for k in range(n_class)})
    for seed in (0, 1):
        val = _val_set("/data", samples, f, seed=seed)
        n = n_class * per_class
        # Every file is an independent Bernoulli(f): 5 standard deviations either side.
        assert abs(len(val) - f * n) <= 5 * math.sqrt(n * f * (1 - f))
        for k in range(n_class):
            in_class = sum(1 for rel in val if rel.startswith(f"c{k:02d}/"))
            assert abs(in_class - f * per_class) <= 5 * math.sqrt(per_class * f * (1 - f))


def test_split_keys_on_relative_paths_not_where_the_data_is():
    sizes = {"cats": 60, "dogs": 60}
    here, there = _samples("/data/photos", sizes), _samples("/mnt/nfs/archive/photos", sizes)
    val = _val_set("/data/photos", here, 0.25)
    assert _val_set("/mnt/nfs/archive/photos", there, 0.25) == val
    assert _val_set("/data/photos", here, 0.25, root="/data/photos") == val
    # With the root given, one class alone splits exactly as it does among others.
    cats = [s for s in here if "/cats/" in s[0]]
    assert _val_set("/data/photos", cats, 0.25, root="/data/photos") == {r for r in val if r.startswith("cats/")}


def test_lopsided_small_classes_are_named_not_evened_out():
    samples = _samples("/data", {f"tiny{k:02d}": 2 for k in range(40)} | {"big": 400})
    with pytest.warns(UserWarning) as rec:
        _, val = seeded_split(samples, 0.3, seed=0)
    text = "\n".join(str(r.message) for r in rec)
    per_class = {f"tiny{k:02d}": 0 for k in range(40)}
    for p, _ in val:
        name = p.split("/")[2]
        if name in per_class:
            per_class[name] += 1
    no_val = sorted(c for c, v in per_class.items() if v == 0)
    all_val = sorted(c for c, v in per_class.items() if v == 2)
    # (0.7^2 = 49% of 40 classes get no val file, 0.3^2 = 9% only val files.)
    assert no_val and all_val
    assert f"{len(no_val)} class(es) with two or more files got no validation file ({', '.join(no_val[:10])}" in text
    assert f"{len(all_val)} class(es) have every file in validation" in text and all_val[0] in text


def test_manifest_and_file_list(tmp_path):
    root = tmp_path / "photos"
    contents = {
        "cats/a.jpg": b"\xff\xd8\xffcat-a", "cats/sub/b.png": b"\x89PNG\r\n\x1a\nb", "dogs/c.jpg": b"\xff\xd8\xffdog",
    }
    for rel, data in contents.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    _, samples = scan_image_folder(root)
    rows = split_manifest(root, samples, "train")
    assert rows == [
        ManifestRow(rel, "train", rel.split("/")[0], len(data), hashlib.blake2b(data, digest_size=16).hexdigest())
        for rel, data in sorted(contents.items())
    ]
    # The same name with other bytes: only its digest changes.
    (root / "dogs" / "c.jpg").write_bytes(b"\xff\xd8\xffDOG")
    changed = [a.relpath for a, b in zip(rows, split_manifest(root, samples, "train")) if a != b]
    assert changed == ["dogs/c.jpg"]
    write_manifest(tmp_path / "manifest.csv", rows)
    with open(tmp_path / "manifest.csv", newline="") as f:
        read = list(csv.reader(f))
    assert read[0] == ["relpath", "split", "label", "size", "blake2b"]
    assert read[1] == ["cats/a.jpg", "train", "cats", "8", rows[0].blake2b]
    # The list a run writes next to its checkpoints: relative paths, one per line.
    assert write_file_list(tmp_path / "val_files.txt", root, samples[::-1]) == 3
    assert (tmp_path / "val_files.txt").read_text() == "".join(f"{rel}\n" for rel in sorted(contents))
    assert relative_paths(root, samples) == sorted(contents)
