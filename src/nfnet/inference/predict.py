"""Top-k predictions for images, folders, videos and cameras, written as JSON or CSV as they come.

No Lightning, no Hydra: a loaded Classifier (nfnet.inference.classifier) and its inputs.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import torch

from nfnet.data.folder import IMAGE_EXTENSIONS, load_rgb
from nfnet.data.transforms import ResizeCropEval, normalize
from nfnet.errors import InputError
from nfnet.inference.classifier import Classifier

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
OPENCV_HINT = "pip install -e '.[video]' (it installs opencv-python-headless)"


# --------------------------------------------------------------------------- inputs
def _cv2():
    # A device or file OpenCV cannot open is reported in one line of ours; its own warnings
    # (several lines per backend tried) would bury it.
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    try:
        import cv2
    except ImportError:
        raise InputError(f"reading video or a camera needs OpenCV: {OPENCV_HINT}") from None
    return cv2


def _frames(capture, name: str, every_n: int, max_frames: int | None) -> Iterator[tuple[str, int, torch.Tensor]]:
    index = kept = 0
    try:
        while max_frames is None or kept < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            if index % every_n == 0:
                # OpenCV decodes to BGR, height x width x channel.
                yield name, index, torch.from_numpy(frame[..., ::-1].copy()).permute(2, 0, 1)
                kept += 1
            index += 1
    finally:
        capture.release()


def iter_inputs(spec: str, every_n_frames: int = 1, max_frames: int | None = None) -> Iterator[tuple[str, int | None, torch.Tensor]]:
    """(input name, frame index or None, uint8 RGB (3, H, W)) for an image, a folder of images
    (recursively, sorted), a video file, or `camera` / `camera:<index>`."""
    if spec == "camera" or spec.startswith("camera:"):
        cv2 = _cv2()
        index = int(spec.split(":", 1)[1]) if ":" in spec else 0
        capture = cv2.VideoCapture(index)
        if not capture.isOpened():
            raise InputError(f"input={spec!r}: camera {index} cannot be opened")
        yield from _frames(capture, spec, every_n_frames, max_frames)
        return
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if not files:
            raise InputError(f"input={spec!r} is a folder without images ({', '.join(IMAGE_EXTENSIONS)})")
        for file in files:
            try:
                image = load_rgb(str(file))
            except Exception as error:  # noqa: BLE001 - one unreadable file must not stop a folder
                log.warning("skipping %s: %s", file, str(error).splitlines()[-1] if str(error) else error)
                continue
            yield str(file), None, image
    elif path.suffix.lower() in VIDEO_EXTENSIONS:
        cv2 = _cv2()
        capture = cv2.VideoCapture(str(path))
        if not capture.isOpened():
            raise InputError(f"input={spec!r}: OpenCV cannot open this video")
        yield from _frames(capture, str(path), every_n_frames, max_frames)
    else:
        yield str(path), None, load_rgb(str(path))


# --------------------------------------------------------------------------- predictions
@torch.no_grad()
def _top_k(classifier: Classifier, batch: list, k: int, device: torch.device) -> Iterator[dict[str, Any]]:
    images = normalize(torch.stack([image for _, _, image in batch]).to(device))
    probabilities = torch.softmax(classifier.net(images).float(), dim=-1).cpu()
    values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
    for (name, frame, _), probs, idxs in zip(batch, values, indices):
        yield {
            "input": name,
            "frame": frame,
            "top_k": [
                {"rank": rank + 1, "class": classifier.class_names[int(i)], "index": int(i), "probability": float(p)}
                for rank, (p, i) in enumerate(zip(probs, idxs))
            ],
        }


def predict_rows(classifier: Classifier, items: Iterable, top_k: int, batch_size: int, device: torch.device) -> Iterator[dict[str, Any]]:
    """One row per image or frame, produced as the inputs are read (a camera never ends)."""
    transform = ResizeCropEval(classifier.image_size, pad=classifier.eval_pad)
    batch: list = []
    for name, frame, image in items:
        batch.append((name, frame, transform(image)))
        if len(batch) == batch_size:
            yield from _top_k(classifier, batch, top_k, device)
            batch = []
    if batch:
        yield from _top_k(classifier, batch, top_k, device)


CSV_COLUMNS = ("input", "frame", "rank", "class", "index", "probability")


def write_rows(rows: Iterable[dict[str, Any]], fmt: str, stream: TextIO) -> int:
    """Streams rows as a JSON list or as CSV (one line per input and rank); Ctrl-C ends the
    input (a camera) but still closes the output properly. Returns the number of inputs."""
    count = 0
    writer = csv.writer(stream) if fmt == "csv" else None
    if writer:
        writer.writerow(CSV_COLUMNS)
    else:
        stream.write("[")
    try:
        for row in rows:
            if writer:
                for entry in row["top_k"]:
                    writer.writerow([row["input"], "" if row["frame"] is None else row["frame"], entry["rank"],
                                     entry["class"], entry["index"], f"{entry['probability']:.6f}"])
            else:
                stream.write(("," if count else "") + "\n  " + json.dumps(row))
            stream.flush()
            count += 1
    except KeyboardInterrupt:
        log.info("stopped after %d inputs", count)
    if not writer:
        stream.write("\n]\n")
    return count
