"""What one file of an image folder is: its name, its kind, its first bytes, its relative path.

Everything here is safe against hostile trees: a name is checked before it is printed, a file's
type is checked (``stat``, which never opens it) before it is opened, and an open never blocks
(a FIFO named ``x.jpg`` would otherwise hang the process forever).
"""

from __future__ import annotations

import os
import stat
import tempfile
import unicodedata
from typing import Optional

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")

# How many names a summary warning spells out; every name is in the log regardless.
NAMES_IN_SUMMARY = 20

# Header checks read this many bytes: enough for every signature below (WebP needs 12).
HEADER_BYTES = 16

_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def signature(head: bytes) -> Optional[str]:
    """Image format from the first bytes of a file, or None if it is not a supported image."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM":
        return "bmp"
    return None


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def kind_of(mode: int) -> str:
    """A file type in words, for messages ("a named pipe (FIFO)", "a regular file", ...)."""
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a folder"
    for test, words in _SPECIAL_KINDS:
        if test(mode):
            return words
    return "a special file"


def name_problem(name: str) -> Optional[str]:
    """Why a file name cannot be used, or None.

    On Linux ``os.scandir`` hands bytes that are not UTF-8 over as lone surrogates; they cannot
    be encoded into a log line, a JSON index or a list of files. Control characters are refused
    as well: a newline in a name would forge log lines and break one-name-per-line lists.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8; rename it"
    # isprintable() is the fast path; it also refuses harmless characters (a no-break space).
    if not name.isprintable() and any(unicodedata.category(ch) == "Cc" for ch in name):
        return "its name contains a control character (a newline, a tab, ...); rename it"
    return None


def printable(path: str) -> str:
    """``path`` safe to print: undecodable bytes as ``\\xff``, control characters escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(ch if unicodedata.category(ch) != "Cc" else repr(ch)[1:-1] for ch in text)


def relative_path(root: str, path: str) -> str:
    """``path`` relative to ``root`` with ``/`` separators: the identity of a file in a dataset,
    the same wherever the dataset is mounted."""
    prefix = root.rstrip(os.sep) + os.sep
    rel = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)
    return rel.replace(os.sep, "/") if os.sep != "/" else rel


def open_regular(path: str):
    """``open(path, "rb")`` for a regular file only; anything else raises ``OSError``.

    ``stat`` first so that a device is never opened (opening some has side effects); the open
    itself is non-blocking so that a FIFO swapped in after the ``stat`` cannot hang the caller,
    and ``fstat`` then checks what was really opened.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{kind_of(st.st_mode)}, not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{kind_of(st.st_mode)}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_file(path: str) -> bytes:
    with open_regular(path) as f:
        return f.read()


def check_header(path: str) -> Optional[str]:
    """Why ``path`` is unusable (cheap checks only: one ``stat``, one open, 16 bytes read), or
    None if it looks like an image."""
    try:
        with open_regular(path) as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if not head:
        return "zero-byte file"
    if signature(head) is None:
        return "not an image (unrecognised file signature)"
    return None


def summary(head: str, names: list[str]) -> str:
    shown = "\n  ".join(names[:NAMES_IN_SUMMARY])
    more = (
        f"\n  ... and {len(names) - NAMES_IN_SUMMARY} more (all are in the log)"
        if len(names) > NAMES_IN_SUMMARY
        else ""
    )
    return f"{head}:\n  {shown}{more}"


def fsync_dir(path: str) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the file system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems cannot open a folder; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the whole new one, never
    a part: a temporary file in the same folder, flushed to disk, then renamed over ``path``.
    Concurrent writers each rename their own complete file; the last one wins."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; an index is for every user of the data
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
