"""The model registry update.py keeps: a plain folder of plain files, no server.

    MODELS/
      current               the name of the version in service (e.g. 0003); absent while empty
      history.jsonl         one JSON line per round: candidate, current, decision, reason, wall time
      versions/0003/        one folder per round's candidate, promoted or kept out:
        model.safetensors   its weights (the variant and the class names in the metadata)
        classes.json        the class names, in the classifier's row order
        model.json          the variant, its architecture, image size and eval padding, the data section
        metrics.json        top-1, overall and per class, on the round's validation set and the previous one's
        config.yaml         the round's resolved config
        manifest.csv        every file of the folder: split, label, size, content hash (nfnet.data.folder_split)
        round.json          the round's record: its line of history.jsonl
      .round/               the round in progress: its plan and checkpoints, so that a rerun resumes it
      .lock                 held while a round runs

A version folder is written whole under a temporary name and renamed into `versions/`: it exists
complete or not at all, and that rename commits a round. `current` and `history.jsonl` follow,
each replaced atomically (a temporary file in the same folder, fsynced, renamed); a kill between
the rename and them is finished by `complete` at the next round, from the version's own record.
So a kill at any moment leaves the registry as it was before the round or with the round
committed, and readers (predict.py, export.py) never see a half-written version. No Lightning,
no Hydra.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from nfnet.data.folder_files import atomic_write_text, fsync_dir
from nfnet.data.folder_split import ManifestRow, read_manifest, write_manifest
from nfnet.errors import InputError

CURRENT = "current"
HISTORY = "history.jsonl"
VERSIONS = "versions"
WORK = ".round"
LOCK = ".lock"
MODEL = "model.safetensors"
CLASSES = "classes.json"
MODEL_INFO = "model.json"
METRICS = "metrics.json"
CONFIG = "config.yaml"
MANIFEST = "manifest.csv"
RECORD = "round.json"
# A version folder being written: versions/.0003.tmp-<pid>, never read as a version.
STAGING = ".{version}.tmp-{pid}"


def version_name(number: int) -> str:
    return f"{number:04d}"


def write_json(path: Path, payload: Any) -> None:
    atomic_write_text(str(path), json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


class Registry:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(os.path.expanduser(os.fspath(root))).absolute()

    # ----------------------------------------------------------------- reading
    def exists(self) -> bool:
        return (self.root / VERSIONS).is_dir()

    def versions(self) -> list[str]:
        folder = self.root / VERSIONS
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit())

    def current(self) -> str | None:
        """The version in service, or None while the registry holds none."""
        path = self.root / CURRENT
        if not path.exists():
            return None
        version = path.read_text(encoding="utf-8").strip()
        if not (self.root / VERSIONS / version / MODEL).is_file():
            raise InputError(f"{path} names version {version!r}, which {self.root / VERSIONS} does not hold; "
                             f"write one of {', '.join(self.versions()) or '(none)'} into it")
        return version

    def folder(self, version: str) -> Path:
        return self.root / VERSIONS / version

    def classes(self, version: str) -> list[str]:
        return [str(name) for name in read_json(self.folder(version) / CLASSES)]

    def manifest(self, version: str) -> list[ManifestRow]:
        return read_manifest(str(self.folder(version) / MANIFEST))

    def metrics(self, version: str) -> dict[str, Any]:
        return read_json(self.folder(version) / METRICS)

    def history(self) -> list[dict[str, Any]]:
        path = self.root / HISTORY
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def next_version(self) -> str:
        numbers = [int(v) for v in self.versions()] + [int(h["candidate"]) for h in self.history()]
        return version_name(max(numbers, default=0) + 1)

    @property
    def work(self) -> Path:
        """The folder of the round in progress (its plan and checkpoints)."""
        return self.root / WORK

    # ----------------------------------------------------------------- writing
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Held while a round runs: a second update.py on the same registry stops with one line."""
        (self.root / VERSIONS).mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise InputError(f"registry={str(self.root)!r} is in use by {holder}; wait for its round to end") from None
            f.seek(0)
            f.truncate()
            f.write(f"update.py (pid {os.getpid()})\n")
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def staging(self, version: str) -> Path:
        """An empty folder to write version `version` into before `commit`."""
        path = self.root / VERSIONS / STAGING.format(version=version, pid=os.getpid())
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def commit(self, staging: Path, version: str, record: dict[str, Any]) -> None:
        """Makes the version written into `staging` part of the registry, with its record (the
        history line; `decision` "promote" makes it current)."""
        write_json(staging / RECORD, record)
        for path in staging.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(str(staging))
        target = self.folder(version)
        if target.exists():
            raise InputError(f"{target} exists already; the registry's history does not name it: move it away")
        os.replace(staging, target)
        fsync_dir(str(target.parent))
        self.complete()

    def complete(self) -> str | None:
        """Finishes a commit a kill interrupted: the newest version has no history line yet. Its
        record says whether it was promoted; `current` moves to it only if it still names the
        version the round started from (a rollback by hand since is left alone). Returns a line
        saying what was done, or None. Also removes what interrupted writes left behind."""
        for stale in (self.root / VERSIONS).glob(STAGING.format(version="*", pid="*")):
            shutil.rmtree(stale, ignore_errors=True)
        versions = self.versions()
        if not versions or not (self.folder(versions[-1]) / RECORD).is_file():
            return None
        newest = versions[-1]
        history = self.history()
        if any(line["candidate"] == newest for line in history):
            return None
        record = read_json(self.folder(newest) / RECORD)
        if record["decision"] == "promote" and self.current() == record["current"]:
            atomic_write_text(str(self.root / CURRENT), f"{newest}\n")
        lines = "".join(json.dumps(line, sort_keys=True) + "\n" for line in [*history, record])
        atomic_write_text(str(self.root / HISTORY), lines)
        return f"registry: recorded round {newest} ({record['decision']}), whose version was written before a stop"


def write_version_files(folder: Path, classes: Sequence[str], model_info: dict[str, Any], metrics: dict[str, Any],
                        config_yaml: str, manifest: Sequence[ManifestRow]) -> None:
    """Everything of a version but its weights (written by the caller as `folder / MODEL`)."""
    write_json(folder / CLASSES, list(classes))
    write_json(folder / MODEL_INFO, model_info)
    write_json(folder / METRICS, metrics)
    atomic_write_text(str(folder / CONFIG), config_yaml)
    write_manifest(str(folder / MANIFEST), manifest)


def version_folder(path: str | os.PathLike) -> Path:
    """The version a reader means by `path`: a registry (its current version) or a version folder."""
    path = Path(os.path.expanduser(os.fspath(path))).absolute()
    if (path / MODEL).is_file() and (path / CLASSES).is_file():
        return path
    registry = Registry(path)
    if not registry.exists():
        raise InputError(f"registry={str(path)!r} is neither a model registry (no {VERSIONS}/ folder) nor one of its "
                         "version folders; update.py writes one")
    current = registry.current()
    if current is None:
        raise InputError(f"registry={str(path)!r} has no version in service yet: run update.py first")
    return registry.folder(current)
