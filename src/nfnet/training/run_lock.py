"""One live run per run folder: a lock file naming its holder, taken over when the holder is gone.

Two processes writing one run folder (two requeued copies of a job, a restart whose
predecessor still runs, `hydra.run.dir=` given twice) would overwrite each other's checkpoints
and metrics. A run therefore holds `<folder>/.nfnet-run.lock` while it writes there: the file
names the holder's host, pid and start time, is created exclusively (`O_EXCL`), and is touched
every `HEARTBEAT_S` seconds while the run lives.

A lock left by a process that is gone (SIGKILL, a node that died) is taken over: on the same
host when its pid no longer runs (or now runs another program, by its start time), from another
host when its heartbeat is older than `STALE_AFTER_S` (a pid there cannot be asked). Anything
else refuses to start with FolderInUse, one line naming the holder.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass

from nfnet.errors import FolderInUse

log = logging.getLogger(__name__)

LOCK_NAME = ".nfnet-run.lock"
HEARTBEAT_S = 30.0
# Several missed heartbeats: a live holder on a loaded machine or a slow file system still makes it.
STALE_AFTER_S = 4 * HEARTBEAT_S


def _process_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (Linux), which tells a pid reused by a
    new process from the one that wrote a lock; None where /proc cannot say."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name (field 2) may hold spaces and parentheses: count from its end.
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str | None  # the process's start (see _process_start)
    since: float  # when it took the lock (seconds since the epoch)
    token: str

    @classmethod
    def me(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()), time.time(), secrets.token_hex(8))

    def describe(self) -> str:
        if not self.host:
            return "a process that is writing the lock file this moment"
        return f"pid {self.pid} on {self.host}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))}"

    def alive(self, heartbeat_age: float) -> bool:
        if self.host != socket.gethostname():
            return heartbeat_age < STALE_AFTER_S
        if not _pid_runs(self.pid):
            return False
        started = _process_start(self.pid)
        return started is None or self.started is None or started == self.started


def read_holder(folder: str) -> tuple[Holder | None, float]:
    """The holder recorded in `folder`'s lock (None when there is no lock or it is unreadable)
    and the age of its heartbeat in seconds."""
    return _read(os.path.join(folder, LOCK_NAME))


def _read(path: str) -> tuple[Holder | None, float]:
    try:
        age = time.time() - os.path.getmtime(path)
        with open(path) as f:
            return Holder(**json.load(f)), age
    except FileNotFoundError:
        return None, 0.0
    except (OSError, ValueError, TypeError):
        # Half-written by a holder killed while creating it, or not ours: stale once it is old.
        return (None, age) if age >= STALE_AFTER_S else (Holder("", 0, None, 0.0, ""), age)


def live_holder(folder: str) -> Holder | None:
    """Who holds `folder` now, if that process still lives."""
    holder, age = read_holder(folder)
    return holder if holder is not None and holder.alive(age) else None


class RunLock:
    """Holds the lock of each of `folders` (created if missing) from `acquire` to `release`;
    also a context manager. `acquire` raises FolderInUse when a live process holds one."""

    def __init__(self, folders: list[str]) -> None:
        self.folders = sorted({os.path.abspath(f) for f in folders})
        self.me = Holder.me()
        self._held: list[str] = []
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            for folder in self.folders:
                self._take(folder)
        except BaseException:
            self.release()
            raise
        self._beat = threading.Thread(target=self._heartbeat, name="nfnet-run-lock", daemon=True)
        self._beat.start()

    def _take(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, LOCK_NAME)
        # A second round only after a stale lock was moved aside; a third means another process
        # is taking over at the same moment, and it may have it.
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder, age = read_holder(folder)
                if holder is not None and holder.alive(age):
                    raise FolderInUse(
                        f"{folder} is in use by another run ({holder.describe()}; lock file {path}): two runs "
                        "writing one folder would overwrite each other's checkpoints. Wait for it to end or stop "
                        "it, or give this run another folder (hydra.run.dir=...)"
                    ) from None
                self._move_aside(path, holder)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(self.me), f)
            self._held.append(path)
            return
        raise FolderInUse(f"{folder}: another run took its lock ({path}) at the same moment; start this one again")

    @staticmethod
    def _move_aside(path: str, holder: Holder | None) -> None:
        # Renamed, not deleted, and checked: of two processes taking over the same stale lock, the
        # second may find the first one's fresh lock in its place; it puts that back (a link
        # never replaces a file) and goes round again, to meet it as a live holder.
        aside = f"{path}.stale-{secrets.token_hex(4)}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        moved, _ = _read(aside)
        if holder is not None and moved is not None and moved.token != holder.token:
            try:
                os.link(aside, path)
            except OSError:
                pass
            os.remove(aside)
            return
        os.remove(aside)
        who = holder.describe() if holder is not None else "an unreadable lock"
        log.info("took over %s from a run that is gone (%s)", path, who)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            for path in self._held:
                try:
                    os.utime(path)
                except OSError:
                    pass

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        for path in self._held:
            holder, _ = read_holder(os.path.dirname(path))
            if holder is not None and holder.token == self.me.token:
                try:
                    os.remove(path)
                except OSError:
                    pass
        self._held = []
