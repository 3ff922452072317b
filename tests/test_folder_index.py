"""The folder index: built once (header checks included), then read without opening any image."""

import glob
import json
import multiprocessing
import os
import re
import warnings

import pytest

from nfnet.data import folder_files, folder_index
from nfnet.data.folder import ImageFolderDataset, build_index, load_index, scan_image_folder

JPEG_HEAD = b"\xff\xd8\xff\xe0" + bytes(12)


def _tree(root, n=12):
    """n images over two classes, plus a zero-byte file and an HTML page saved as .jpg."""
    for i in range(n):
        path = root / ("cat" if i % 2 else "dog") / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(JPEG_HEAD + i.to_bytes(2, "big"))
    (root / "cat" / "zero.jpg").write_bytes(b"")
    (root / "dog" / "page.jpg").write_bytes(b"<html>")
    return root


@pytest.fixture
def opens(monkeypatch):
    """Counts every file the index or the dataset opens for reading (header checks included)."""
    calls = []
    real = folder_files.open_regular

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(folder_files, "open_regular", counting)
    return calls


def _index_files(root):
    return glob.glob(os.path.join(root, ".nfnet-index-*"))


def test_a_second_build_or_load_opens_no_image_file(tmp_path, opens):
    root = _tree(tmp_path / "photos")
    first = build_index(root)
    assert len(opens) == 14 and first.path in _index_files(root) and len(_index_files(root)) == 1
    assert first.classes == ["cat", "dog"] and len(first.samples) == 14
    assert first.bad == {str(root / "cat" / "zero.jpg"): "zero-byte file",
                         str(root / "dog" / "page.jpg"): "not an image (unrecognised file signature)"}
    assert (first.classes, first.samples) == scan_image_folder(root)
    opens.clear()
    for again in (build_index(root), load_index(root), load_index(root, key=first.key)):
        assert (again.key, again.classes, again.samples) == (first.key, first.classes, first.samples)
        assert again.bad == first.bad
    with pytest.warns(UserWarning, match="skipped 2 of 14 files as bad images"):
        ds = ImageFolderDataset(first.samples, first.classes, known_bad=first.bad, max_bad_fraction=0.5)
    assert opens == [] and len(ds) == 12 and ds.num_bad == 2


def _changes(root):
    """Each changes the tree in a way the header-check results may depend on."""
    cat = root / "cat"

    def add():
        (cat / "new.jpg").write_bytes(JPEG_HEAD)

    def remove():
        (cat / "001.jpg").unlink()

    def touch():
        st = os.stat(cat / "003.jpg")
        os.utime(cat / "003.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 1))

    def replace_keeping_size_and_mtime():  # what `rsync -t` or an atomic save does
        st = os.stat(cat / "zero.jpg")
        (cat / "fixed.tmp").write_bytes(b"")
        os.utime(cat / "fixed.tmp", ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(cat / "fixed.tmp", cat / "zero.jpg")

    def rewrite_in_place():  # same size, new mtime
        with open(cat / "005.jpg", "r+b") as f:
            f.write(b"<html>")

    return [add, remove, touch, replace_keeping_size_and_mtime, rewrite_in_place]


def test_a_changed_tree_is_rebuilt(tmp_path, opens):
    root = _tree(tmp_path / "photos")
    previous = build_index(root)
    for change in _changes(root):
        change()
        assert load_index(root) is None, change.__name__
        opens.clear()
        index = build_index(root)
        assert index.key != previous.key and len(opens) == len(index.samples), change.__name__
        assert _index_files(root) == [index.path], change.__name__  # the stale one is gone
        previous = index
    assert index.bad[str(root / "cat" / "005.jpg")] == "not an image (unrecognised file signature)"


def test_a_corrupt_or_partial_index_is_ignored_and_rebuilt(tmp_path, opens):
    root = _tree(tmp_path / "photos")
    index = build_index(root)
    text = open(index.path).read()
    for damaged in (text[: len(text) // 2], "", json.dumps({"format": "something else"}),
                    text.replace('"files":["cat/', '"files":["nope/', 1)):
        with open(index.path, "w") as f:
            f.write(damaged)
        with pytest.warns(UserWarning, match=f"ignoring the corrupt folder index {re.escape(index.path)}"):
            assert load_index(root) is None
        opens.clear()
        with pytest.warns(UserWarning, match="corrupt folder index"):
            rebuilt = build_index(root)
        assert len(opens) == 14 and rebuilt.samples == index.samples and rebuilt.bad == index.bad
        assert load_index(root) is not None


def test_an_unwritable_root_puts_the_index_in_the_cache_dir(tmp_path, monkeypatch):
    root, cache = _tree(tmp_path / "photos"), tmp_path / "cache"
    real = folder_index.atomic_write_text

    def read_only_root(path, text):  # tests run as root, for whom chmod does not forbid writing
        if os.path.dirname(path) == str(root):
            raise PermissionError(13, "Permission denied", path)
        real(path, text)

    monkeypatch.setattr(folder_index, "atomic_write_text", read_only_root)
    index = build_index(root, cache_dir=cache)
    assert os.path.dirname(index.path) == str(cache) and _index_files(root) == []
    assert load_index(root, cache_dir=cache).samples == index.samples
    assert load_index(root) is None
    with pytest.warns(UserWarning, match="could not be written .*Permission denied.*pass a writable cache_dir"):
        assert build_index(tmp_path / "photos").path is None


def test_load_with_a_key_reads_without_walking(tmp_path, monkeypatch):
    root = _tree(tmp_path / "photos")
    index = build_index(root)
    monkeypatch.setattr(folder_index, "walk_image_folder", lambda *a, **k: pytest.fail("walked the tree"))
    assert load_index(root, key=index.key).samples == index.samples
    with pytest.raises(ValueError, match="not a folder-index key"):
        load_index(root, key="../../etc/passwd")


def _build_at_once(root, barrier, results):
    barrier.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = build_index(root)
    results.put((index.key, index.samples, index.bad))


@pytest.mark.timeout(120)
def test_two_processes_building_at_once_both_end_with_a_valid_index(tmp_path):
    root = _tree(tmp_path / "photos", n=600)
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_at_once, args=(str(root), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=100) for _ in procs]
    for p in procs:
        p.join(timeout=100)
        assert p.exitcode == 0
    assert got[0] == got[1]
    # One whole index and the builders' lock file; no temporary file is left behind.
    hidden = sorted(p for p in os.listdir(root) if p.startswith("."))
    assert hidden == [f".nfnet-index-{got[0][0]}.json", ".nfnet-index.lock"]
    loaded = load_index(root)
    assert (loaded.key, loaded.samples, loaded.bad) == got[0]


def test_an_index_planted_in_the_tree_cannot_add_files(tmp_path):
    root = _tree(tmp_path / "photos")
    index = build_index(root)
    text = open(index.path).read()
    for planted in ('"files":["../../etc/passwd",', '"files":["/etc/passwd",', '"files":["cat/../../x.jpg",'):
        with open(index.path, "w") as f:
            f.write(text.replace('"files":[', planted, 1))
        with pytest.warns(UserWarning, match="not plainly inside the root"):
            assert load_index(root, key=index.key) is None
    # A well-formed file list that is not the tree's: refused whenever the tree is walked.
    with open(index.path, "w") as f:
        f.write(text.replace('"files":[', '"files":["dog/planted.jpg",', 1))
    with pytest.warns(UserWarning, match="its files differ from the folder's"):
        assert load_index(root) is None


def _build_counting(root, go, results):
    go.wait()
    calls = []
    real = folder_index.check_header
    folder_index.check_header = lambda path: calls.append(path) or real(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = build_index(root)
    results.put((len(calls), index.key))


def _blocked_on(lock_path):
    """Whether some process waits for a flock on lock_path (Linux lists waiters with '->')."""
    inode = os.stat(lock_path).st_ino
    with open("/proc/locks") as f:
        return any("->" in line and line.split()[-3].endswith(f":{inode}") for line in f)


@pytest.mark.timeout(120)
@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs Linux's /proc/locks to see a waiting builder")
def test_a_builder_that_finds_another_one_building_waits_and_reads_its_index(tmp_path):
    import fcntl

    root = _tree(tmp_path / "photos")
    index = build_index(root)
    text = open(index.path).read()
    os.unlink(index.path)
    lock = root / ".nfnet-index.lock"
    ctx = multiprocessing.get_context("fork")
    go, results = ctx.Event(), ctx.Queue()
    # Forked before the lock is taken: a child would inherit the locked descriptor, and the lock.
    child = ctx.Process(target=_build_counting, args=(str(root), go, results))
    child.start()
    with open(lock, "a") as held:  # this test is the builder that got there first
        fcntl.flock(held, fcntl.LOCK_EX)
        go.set()
        while not _blocked_on(lock):
            child.join(timeout=0.01)
            assert child.exitcode is None, "the second builder did not wait for the lock"
        with open(index.path, "w") as f:  # the first builder's index lands, then it lets go
            f.write(text)
    checks, key = results.get(timeout=100)
    child.join(timeout=100)
    assert (checks, key) == (0, index.key)
