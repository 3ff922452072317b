"""Files written by torch.save, read as files from anywhere: whole or named as damaged, never run.

A checkpoint may be cut short (a kill or a full disk while it was copied, a quota), empty, a zip
missing a record, random bytes, or a pickle that would run code. `load_torch_file` turns each of
these into an InputError naming the file and what is wrong with it, except the pickle that would
run code: that one stays a `pickle.UnpicklingError` (nothing of it ran), so that callers can say
"refused" rather than "damaged". `damage` finds the same problems without reading the tensors
(the pickle is read, the tensor records are only mapped and measured), so a resume can pass over
a damaged newest checkpoint to the next whole one in a moment even for an F7's gigabytes.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from nfnet.errors import InputError

# What Lightning restores to continue a run where it stopped, beyond the weights.
TRAINING_STATE = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "epoch", "global_step")
# A zip archive starts with a local file header; one without its central directory was cut short.
_ZIP_MAGIC = b"PK\x03\x04"


def would_run_code(error: BaseException) -> bool:
    """Whether a load failed because the pickle names a callable that a weights-only load refuses
    (torch's weights-only unpickler, or the restricted Haiku unpickler), not because it is broken."""
    text = str(error)
    return isinstance(error, pickle.UnpicklingError) and ("Unsupported global" in text or "refus" in text)


def _first_sentence(error: BaseException) -> str:
    """torch's messages run on for lines of advice; the first sentence says what happened."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = text.split(" This is an internal miniz error")[0]
    return text.removeprefix("[enforce fail at inline_container.cc:180] . ").rstrip(".")


def zip_problem(path: str) -> str | None:
    """What is wrong with a file that should be, or starts like, a torch.save zip archive: empty,
    cut short, without data.pkl, records past its end. None for a whole archive and for a file
    of another format (a safetensors or pickle file)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(len(_ZIP_MAGIC))
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    if size == 0:
        return "is empty (0 bytes)"
    if not zipfile.is_zipfile(path):
        if head == _ZIP_MAGIC:
            return f"is cut short: a zip archive of {size} bytes without its closing directory (a partial write or copy)"
        return None
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        end = max((i.header_offset + i.compress_size for i in archive.infolist()), default=0)
    if not any(n.endswith("/data.pkl") for n in names):
        return "is a zip archive without the data.pkl record torch.save writes (an np.savez file, or a damaged one)"
    if end > size:
        return f"is cut short: its records reach byte {end} of a {size}-byte file"
    return None


def load_torch_file(path: str | os.PathLike, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` onto the CPU.

    Raises InputError (naming the file and the problem) for a file that is missing, empty, cut
    short, damaged or not written by torch.save, and pickle.UnpicklingError for a pickle that
    would run code (see `would_run_code`)."""
    path = os.path.expanduser(os.fspath(path))
    problem = zip_problem(path)
    if problem is None and not zipfile.is_zipfile(path):
        problem = "is not a file torch.save writes (not a zip archive)"
    if problem:
        raise InputError(f"{path} {problem}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if would_run_code(error):
            raise
        raise InputError(f"{path} is damaged: its pickle cannot be read ({_first_sentence(error)})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise InputError(f"{path} is damaged: {_first_sentence(error)}") from None


def _storage_sizes(contents: Any) -> list[int]:
    """The byte size of every distinct non-empty tensor storage in a loaded object."""
    sizes: dict[int, int] = {}

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.nbytes():
                sizes[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, Mapping):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value)

    walk(contents)
    return sorted(sizes.values())


def _record_sizes(path: str) -> list[int]:
    with zipfile.ZipFile(path) as archive:
        return sorted(i.file_size for i in archive.infolist() if "/data/" in i.filename and i.file_size)


def damage(path: str | os.PathLike, required: Iterable[str] = ()) -> str | None:
    """Why `path` is not a whole torch.save file holding the top-level keys `required` (None
    when it is), as a phrase that follows the file's name ("is cut short: ...").

    Reads the pickle and maps the tensor records without reading them: a missing record, one
    shorter than its tensor, a missing data.pkl and a truncated archive are all found. Raises
    pickle.UnpicklingError for a pickle that would run code."""
    path = os.path.expanduser(os.fspath(path))
    try:
        contents = load_torch_file(path, mmap=True)
    except InputError as error:
        return str(error).removeprefix(f"{path} ")
    try:
        if not isinstance(contents, Mapping):
            return f"holds a {type(contents).__name__}, not a checkpoint's dict"
        missing = [key for key in required if key not in contents]
        if missing:
            return f"holds no {', '.join(missing)}: not a full training checkpoint"
        # Under mmap torch does not compare a record with its tensor's size; a record cut short
        # would be read past its end into the next one.
        if _storage_sizes(contents) != _record_sizes(path):
            return "is damaged: its tensor records do not have the sizes its index declares (a record cut short)"
        return None
    finally:
        del contents
