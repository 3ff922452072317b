"""Hostile image folders: link loops, FIFOs, undecodable names, empty classes, bad files in workers."""

import gc
import os
import pickle
import warnings

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from nfnet.data.folder import (
    EmptyClassFolder,
    ImageFolderDataset,
    TooManyBadFiles,
    build_index,
    load_rgb,
    scan_image_folder,
    seeded_split,
)
from nfnet.data.folder_files import check_header

JPEG_HEAD = b"\xff\xd8\xff\xe0" + bytes(12)  # a valid signature: enough for the scan and header check


def _touch(path, data=JPEG_HEAD):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _scan(root, **kw):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        classes, samples = scan_image_folder(root, **kw)
    rels = [(os.path.relpath(p, root), classes[label]) for p, label in samples]
    return classes, rels, "\n".join(str(r.message) for r in rec)


@pytest.fixture
def linked(tmp_path):
    """cat/sub/loop -> cat (a loop), dog/to_cat -> cat (another class), cat/ext -> a folder
    outside the root that links back to itself, cat/to_dog_sub -> dog/sub (a real folder)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for rel in ("cat/a.jpg", "cat/sub/c.jpg", "dog/d.jpg", "dog/sub/x.jpg"):
        _touch(root / rel)
    _touch(outside / "e.jpg")
    os.symlink(root / "cat", root / "cat" / "sub" / "loop")
    os.symlink("../cat", root / "dog" / "to_cat")
    os.symlink(outside, root / "cat" / "ext")
    os.symlink(outside, outside / "back")
    os.symlink(root / "dog" / "sub", root / "cat" / "to_dog_sub")
    return root


@pytest.mark.timeout(60)
def test_links_are_followed_once_and_never_in_a_loop(linked):
    classes, rels, text = _scan(linked)
    assert classes == ["cat", "dog"]
    # The outside folder is entered once; no folder is listed twice, and dog/sub stays dog's.
    assert rels == [
        ("cat/a.jpg", "cat"), ("cat/ext/e.jpg", "cat"), ("cat/sub/c.jpg", "cat"),
        ("dog/d.jpg", "dog"), ("dog/sub/x.jpg", "dog"),
    ]  # fmt: skip
    lines = {line.split(" (")[0].strip(): line for line in text.splitlines()}
    assert "loop back" in lines["cat/sub/loop"]
    assert "loop back" in lines["cat/ext/back"]
    assert "already scanned as 'cat'" in lines["dog/to_cat"]
    assert "already scanned as 'dog/sub'" in lines["cat/to_dog_sub"]
    assert "skipped 4 entries" in text


def test_links_not_followed_when_asked(linked):
    classes, rels, text = _scan(linked, follow_links=False)
    assert [r for r, _ in rels] == ["cat/a.jpg", "cat/sub/c.jpg", "dog/d.jpg", "dog/sub/x.jpg"]
    for link in ("cat/sub/loop", "dog/to_cat", "cat/ext", "cat/to_dog_sub"):
        assert f"{link} (symbolic link not followed (follow_links=False))" in text


@pytest.mark.timeout(60)
def test_special_files_are_never_opened(tmp_path):
    root = tmp_path / "root"
    _touch(root / "cat" / "a.jpg")
    _touch(root / "dog" / "b.jpg")
    os.mkfifo(root / "cat" / "x.jpg")
    os.symlink("x.jpg", root / "cat" / "y.jpg")
    classes, rels, text = _scan(root)
    assert [r for r, _ in rels] == ["cat/a.jpg", "dog/b.jpg"]
    assert "cat/x.jpg (a named pipe (FIFO), never opened)" in text
    assert "cat/y.jpg (symbolic link to a named pipe (FIFO), never opened)" in text
    # A FIFO handed over directly (or swapped in after the scan) is refused, not waited on.
    fifo = str(root / "cat" / "x.jpg")
    assert "not a regular file" in check_header(fifo)
    with pytest.raises(OSError, match="named pipe"):
        load_rgb(fifo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = ImageFolderDataset([(fifo, 0), (str(root / "cat" / "a.jpg"), 0)], classes, max_bad_fraction=0.5)
    assert ds.num_bad == 1 and "named pipe" in ds.bad_files[0][1]


def test_names_that_are_not_utf8_are_skipped_and_named(tmp_path):
    root = tmp_path / "root"
    _touch(root / "cat" / "a.jpg")
    _touch(root / "dog" / "b.jpg")
    raw_root = os.fsencode(root)
    _touch(os.path.join(raw_root, b"cat", b"bad\xff.jpg"))
    _touch(os.path.join(raw_root, b"\xfeclass", b"c.jpg"))
    _touch(os.path.join(raw_root, b"dog", b"forged\nWARNING all fine.jpg"))
    classes, rels, text = _scan(root)
    assert classes == ["cat", "dog"]
    assert [r for r, _ in rels] == ["cat/a.jpg", "dog/b.jpg"]
    assert "cat/bad\\xff.jpg (its name is not valid UTF-8; rename it)" in text
    assert "\\xfeclass (class folder skipped: its name is not valid UTF-8" in text
    assert "dog/forged\\nWARNING all fine.jpg (its name contains a control character" in text
    # Every later step works on what is left.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, samples = scan_image_folder(root)
        seeded_split(samples, 0.5, seed=0)
        assert len(build_index(root).samples) == 2


def test_an_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = tmp_path / "root"
    _touch(root / "cat" / "a.jpg")
    (root / "empty").mkdir()
    _touch(root / "notes" / "readme.txt", b"text")
    os.makedirs(root / "pipes")
    os.mkfifo(root / "pipes" / "x.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(EmptyClassFolder) as error:
            scan_image_folder(root)
    message = str(error.value)
    assert isinstance(error.value, ValueError) and "\n" not in message
    assert "3 of 4 class folder(s) have no image files ('empty', 'notes', 'pipes')" in message
    assert "delete those folders or add images" in message


def _jpeg(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 6), (value, 2 * value, 3 * value)).save(path, quality=95)


def test_too_many_bad_files_in_a_worker_is_one_exception_of_one_line(tmp_path, monkeypatch):
    root = tmp_path / "root"
    for i in range(10):
        _jpeg(root / "cat" / f"{i}.jpg", 10 * i)
    for i in range(4):  # valid headers, truncated bodies: found only when decoded, in a worker
        path = root / "cat" / f"{i}.jpg"
        path.write_bytes(path.read_bytes()[:40])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classes, samples = scan_image_folder(root)
        ds = ImageFolderDataset(samples, classes, max_bad_fraction=0.05)
        assert ds.num_bad == 0
        batches = iter(DataLoader(ds, batch_size=1, num_workers=2))
        with pytest.raises(TooManyBadFiles) as error:
            for _ in batches:
                pass
    message, copy = str(error.value), pickle.loads(pickle.dumps(error.value))
    # PyTorch waits MP_STATUS_CHECK_INTERVAL (5 s) per worker before it terminates one that saw an
    # error; shorten that and shut the workers down here, not whenever the iterator is collected.
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.1)
    del batches, error
    gc.collect()
    assert "\n" not in message and "Traceback" not in message and "worker" not in message
    assert message.startswith("train split: 1 of 10 files (10.00%) are bad images")
    assert "data.max_bad_fraction=0.05" in message and f"{root}/cat/" in message
    assert type(copy) is TooManyBadFiles and str(copy) == message


def test_too_many_bad_files_up_front_is_the_same_exception(tmp_path):
    root = tmp_path / "root"
    _touch(root / "cat" / "a.jpg")
    _touch(root / "cat" / "b.jpg", b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classes, samples = scan_image_folder(root)
        with pytest.raises(TooManyBadFiles, match=r"^train split: 1 of 2 files .*b\.jpg \(zero-byte file\)"):
            ImageFolderDataset(samples, classes)
