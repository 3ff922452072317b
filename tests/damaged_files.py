"""Damaged and foreign files, made on the spot: what a kill, a full disk, a partial copy or a
mistaken download leaves where a checkpoint or weights file should be."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch


def training_state(step: int = 3) -> dict:
    """A small checkpoint with every part of Lightning's training state (weights, momentum,
    schedule, loops, counters), as train.py's hold them."""
    weight = torch.full((4, 3), float(step))
    return {
        "state_dict": {"net.weight": weight, "ema_net.weight": weight.clone()},
        "optimizer_states": [{"state": {0: {"momentum_buffer": torch.ones(4, 3)}}, "param_groups": [{"lr": 0.1}]}],
        "lr_schedulers": [{"last_epoch": step}],
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 0}}}},
        "epoch": 0,
        "global_step": step,
    }


def write_checkpoint(path: Path, step: int = 3, mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(training_state(step), path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _rewrite(path: Path, keep=lambda name, data: data) -> None:
    """Rewrites the zip at `path` record by record through `keep` (None drops a record)."""
    with zipfile.ZipFile(path) as archive:
        records = [(info, archive.read(info.filename)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for info, data in records:
            data = keep(info.filename, data)
            if data is not None:
                archive.writestr(info, data)


def _largest_record(path: Path) -> str:
    with zipfile.ZipFile(path) as archive:
        return max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size).filename


def damage(path: Path, kind: str) -> Path:
    """Turns the checkpoint at `path` into one of the damaged files a resume may meet."""
    data = path.read_bytes()
    if kind == "cut in half":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif kind == "no data.pkl":
        _rewrite(path, lambda name, d: None if name.endswith("/data.pkl") else d)
    elif kind == "a tensor record missing":
        victim = _largest_record(path)
        _rewrite(path, lambda name, d: None if name == victim else d)
    elif kind == "a tensor record cut short":
        victim = _largest_record(path)
        _rewrite(path, lambda name, d: d[: len(d) // 2] if name == victim else d)
    else:
        raise ValueError(kind)
    return path


DAMAGE = {  # kind -> what the one line must say
    "cut in half": "is cut short",
    "empty": "is empty (0 bytes)",
    "random bytes": "not a zip archive",
    "no data.pkl": "without the data.pkl record",
    "a tensor record missing": "failed locating file data/",
    "a tensor record cut short": "a record cut short",
}


def npz_weights(path: Path) -> Path:
    np.savez(path, **{"stem.conv0.weight": np.zeros((16, 3, 3, 3), np.float32)})
    return path


def pickle_named_safetensors(path: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"stem.conv0.weight": np.zeros(3)}, f)
    return path


class Exploit:
    """Pickles as a call to `func(*args)`: what a hostile file would run when unpickled."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args
