"""Two processes writing one checkpoint or one run folder: every save is whole and its own, a
reader never sees a part or a mix, and a run refuses a folder that another live run holds."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from damaged_files import write_checkpoint
from nfnet.errors import FolderInUse
from nfnet.training.checkpoints import atomic_torch_save
from nfnet.training.run_lock import LOCK_NAME, STALE_AFTER_S, RunLock, live_holder

SAVES, ELEMENTS = 30, 256 * 1024  # 1 MiB per save


def _writer(path: str, writer: int, errors) -> None:
    for n in range(SAVES):
        try:
            atomic_torch_save({"writer": writer, "n": n, "data": torch.full((ELEMENTS,), float(writer))}, path)
        except BaseException as error:  # noqa: BLE001 - every failure is counted by the test
            errors.put(f"writer {writer} save {n}: {type(error).__name__}: {error}")


def _reader(path: str, stop, errors, reads) -> None:
    count = 0
    while not stop.is_set():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            # One writer's header with the other's data would show here.
            if not torch.equal(saved["data"], torch.full((ELEMENTS,), float(saved["writer"]))):
                errors.put(f"read {count}: writer {saved['writer']}'s save {saved['n']} holds another's data")
        except BaseException as error:  # noqa: BLE001
            errors.put(f"read {count}: {type(error).__name__}: {error}")
        count += 1
    reads.put(count)


def test_two_writers_and_a_reader_of_one_checkpoint_see_only_whole_files_of_one_writer(tmp_path):
    path = str(tmp_path / "last.ckpt")
    atomic_torch_save({"writer": 0, "n": -1, "data": torch.zeros(ELEMENTS)}, path)
    # spawn: a child forked from a process whose torch thread pools already ran may hang in them.
    context = multiprocessing.get_context("spawn")
    errors, reads, stop = context.Queue(), context.Queue(), context.Event()
    reader = context.Process(target=_reader, args=(path, stop, errors, reads))
    writers = [context.Process(target=_writer, args=(path, w, errors)) for w in (1, 2)]
    reader.start()
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=300)
    stop.set()
    reader.join(timeout=60)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert [p.exitcode for p in [*writers, reader]] == [0, 0, 0]
    assert not found, found[:5]
    assert reads.get(timeout=10) > 0
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]  # no temp file left behind
    last = torch.load(path, weights_only=True)
    assert last["n"] == SAVES - 1 and last["writer"] in (1, 2)


# --------------------------------------------------------------------------- the run folder's lock
@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/run, as a live run would."""
    folder = tmp_path / "run"
    code = ("import sys, time\nfrom nfnet.training.run_lock import RunLock\n"
            "RunLock([sys.argv[1]]).acquire()\nprint('held', flush=True)\ntime.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield folder, process
    process.kill()
    process.wait()


def test_a_folder_held_by_a_live_process_is_refused_in_one_line(holder):
    folder, process = holder
    with pytest.raises(FolderInUse) as error:
        RunLock([str(folder)]).acquire()
    message = str(error.value)
    assert f"pid {process.pid} on {socket.gethostname()}" in message and str(folder) in message
    assert "\n" not in message
    assert live_holder(str(folder)).pid == process.pid


def test_the_lock_of_a_killed_process_is_taken_over(holder, caplog):
    folder, process = holder
    process.send_signal(signal.SIGKILL)
    process.wait()
    with caplog.at_level("INFO", logger="nfnet.training.run_lock"), RunLock([str(folder)]) as lock:
        assert live_holder(str(folder)).token == lock.me.token
        assert any(f"from a run that is gone (pid {process.pid}" in r.getMessage() for r in caplog.records)
    assert not (folder / LOCK_NAME).exists()  # released at the end


def _lock_of_another_host(folder: Path, heartbeat_age: float) -> None:
    folder.mkdir(parents=True)
    lock = folder / LOCK_NAME
    lock.write_text(json.dumps({"host": "another-node", "pid": 1, "started": None, "since": 0.0, "token": "t"}))
    beat = time.time() - heartbeat_age
    os.utime(lock, (beat, beat))


def test_a_lock_of_another_host_is_taken_over_only_once_its_heartbeat_stopped(tmp_path):
    fresh, stale = tmp_path / "fresh", tmp_path / "stale"
    _lock_of_another_host(fresh, heartbeat_age=5)
    _lock_of_another_host(stale, heartbeat_age=STALE_AFTER_S + 5)
    with pytest.raises(FolderInUse, match="pid 1 on another-node"):
        RunLock([str(fresh)]).acquire()
    with RunLock([str(stale)]):
        assert json.loads((stale / LOCK_NAME).read_text())["host"] == socket.gethostname()


def test_train_refuses_a_run_folder_another_live_run_holds_before_writing_anything(cfg_train, holder):
    from omegaconf import open_dict

    from nfnet.app import tasks

    folder, process = holder
    cfg = cfg_train(["test=false", "trainer.fast_dev_run=true"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(folder)
    with pytest.raises(FolderInUse, match=f"pid {process.pid}"):
        tasks.train(cfg)
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]


@pytest.mark.parametrize("how", ["resume=true", "ckpt_path=<file>"])
def test_a_run_continued_in_a_new_folder_clears_the_partial_writes_of_the_killed_one(cfg_train, tmp_path, how):
    from omegaconf import open_dict

    from nfnet.app.resume import resolve_checkpoint

    runs = tmp_path / "logs" / "train" / "runs"
    killed = runs / "killed" / "checkpoints"
    write_checkpoint(killed / "last.ckpt")
    partial = killed / "last.ckpt.5e1f0a.tmp"  # a save killed right after it created its file
    partial.write_bytes(b"")
    cfg = cfg_train(["resume=true"] if how == "resume=true" else [f"ckpt_path={killed / 'last.ckpt'}"])
    with open_dict(cfg):
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.output_dir = str(runs / "new")
    with RunLock([str(killed.parent)]):  # still written by a live run: its files are its own
        assert resolve_checkpoint(cfg) == str(killed / "last.ckpt")
        assert partial.exists()
    assert resolve_checkpoint(cfg) == str(killed / "last.ckpt")
    assert sorted(p.name for p in killed.iterdir()) == ["last.ckpt"]
