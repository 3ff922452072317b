"""Trained weights in use: loading one weight set for inference, the eval split, top-k predictions
for images, folders, videos and cameras, and their JSON/CSV output.

A checkpoint holds two weight sets, the raw network (`net.*`) and its EMA (`ema_net.*`); the
EMA is what the paper reports and what is loaded unless `weights=raw`. Converted pretrained
weights (DeepMind, timm, safetensors) hold one. Either way the result is an `NFNetClassifier`
whose `net` is the chosen weight set and which has no EMA of its own, so its test loop measures
exactly that network with the transforms and metrics used during training.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from omegaconf import DictConfig

from nfnet.checkpoints import refused_file_error
from nfnet.config import ConfigError
from nfnet.data.folder import IMAGE_EXTENSIONS, load_rgb
from nfnet.data.transforms import CROP_PADDING, ResizeCropEval, normalize
from nfnet.models import get_variant
from nfnet.module import NFNetClassifier

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
OPENCV_HINT = "pip install -e '.[video]' (it installs opencv-python-headless)"


@dataclass
class Classifier:
    """One weight set, ready for inference, and what is needed to feed it."""

    module: NFNetClassifier
    model_name: str
    class_names: list[str]
    image_size: int
    eval_pad: int
    weights: str  # "ema", "raw" or "pretrained"
    weights_file: str
    data_hparams: dict[str, Any] = field(default_factory=dict)

    @property
    def net(self) -> torch.nn.Module:
        return self.module.net

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_name, "weights": self.weights, "weights_file": self.weights_file,
                "num_classes": len(self.class_names)}

    def to_device(self, device: str) -> torch.device:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        target = torch.device(device)
        self.module.to(target).eval()
        return target


def _split_state(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_classifier(cfg: DictConfig) -> Classifier:
    """`ckpt_path` (a train.py checkpoint; `weights` picks EMA or raw) or `pretrained` + `model_name`."""
    image_size = cfg.get("image_size")
    if cfg.get("ckpt_path"):
        path = os.path.expanduser(str(cfg.ckpt_path))
        # Checkpoints keep primitive hyperparameters only, so the safe loader reads them.
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise refused_file_error("ckpt_path", cfg.ckpt_path, error) from None
        hparams = dict(checkpoint["hyper_parameters"])
        data_hparams = dict(checkpoint.get("datamodule_hyper_parameters") or {})
        prefix = "ema_net." if cfg.weights == "ema" else "net."
        state = _split_state(checkpoint["state_dict"], prefix)
        if not state:
            raise ConfigError(
                f"ckpt_path={cfg.ckpt_path!r} holds no EMA weights (trained with optim.ema.decay=null); use weights=raw"
            )
        # The pretrained file it started from may be gone; the checkpoint has every weight anyway.
        module = NFNetClassifier(**{**hparams, "pretrained": None, "ema_decay": None, "compile": False})
        module.net.load_state_dict(state)
        names = list(hparams.get("class_names") or range(hparams["num_classes"]))
        size = image_size or data_hparams.get("test_size") or get_variant(hparams["model_name"]).test_size
        pad = data_hparams.get("eval_pad", CROP_PADDING)
        weights, model_name = cfg.weights, hparams["model_name"]
    else:
        from nfnet.models.pretrained import read_weights

        path = os.path.expanduser(str(cfg.pretrained))
        try:
            num_classes = read_weights(path)["classifier.weight"].shape[0]
        except pickle.UnpicklingError as error:
            raise refused_file_error("pretrained", cfg.pretrained, error) from None
        names = _class_names_file(cfg.get("class_names"), num_classes)
        module = NFNetClassifier(model_name=cfg.model_name, num_classes=num_classes, pretrained=path,
                                 ema_decay=None, class_names=names)
        size, pad = image_size or get_variant(cfg.model_name).test_size, CROP_PADDING
        weights, model_name, data_hparams = "pretrained", cfg.model_name, {}
    if cfg.get("eval_pad") is not None:
        pad = cfg.eval_pad
    module.eval()
    return Classifier(module, model_name, [str(n) for n in names], int(size), int(pad), weights, path, data_hparams)


def _class_names_file(path: str | None, num_classes: int) -> list[str]:
    if not path:
        return [str(i) for i in range(num_classes)]
    names = [line.strip() for line in Path(os.path.expanduser(path)).read_text().splitlines() if line.strip()]
    if len(names) != num_classes:
        raise ConfigError(f"class_names={path!r} has {len(names)} names but the weights have {num_classes} classes")
    return names


# --------------------------------------------------------------------------- eval split
def eval_dataset(cfg: DictConfig, classifier: Classifier):
    """The split to evaluate, with the official eval transform at the classifier's image size.

    The data source defaults to the one the checkpoint was trained on; `source`/`root` point
    elsewhere (and are needed for pretrained weights).
    """
    from nfnet.data.datamodule import ImageDataModule
    from nfnet.data.folder import ImageFolderDataset

    h = dict(classifier.data_hparams)
    for key in ("source", "root"):
        if cfg.get(key) is not None:
            h[key] = os.path.expanduser(str(cfg[key]))
    if "source" not in h or "root" not in h:
        raise ConfigError("pretrained weights carry no dataset: give source=imagenet|imagefolder and root=<folder>")
    h.update(num_workers=0, persistent_workers=False, augment="none")
    if h["source"] == "imagenet" and cfg.split == "val":
        # Listing ImageNet's 1.28M training files only to read the class names back would cost
        # minutes on a network file system; the val folders name the same classes.
        from nfnet.data.folder import scan_image_folder

        classes, val = scan_image_folder(os.path.join(h["root"], "val"))
        train = []
    else:
        datamodule = ImageDataModule(**h)  # the datamodule's saved hyperparameters are its arguments
        datamodule.prepare_data()
        classes, train, val = datamodule._split_samples()
    if len(classes) != len(classifier.class_names) or (
        classifier.weights != "pretrained" and list(classes) != classifier.class_names
    ):
        raise ConfigError(
            f"the data at {h['root']!r} has {len(classes)} classes ({', '.join(classes[:3])}, ...) but the "
            f"weights were trained on {len(classifier.class_names)} ({', '.join(classifier.class_names[:3])}, ...)"
        )
    samples = val if cfg.split == "val" else train
    transform = ResizeCropEval(classifier.image_size, pad=classifier.eval_pad)
    return ImageFolderDataset(samples, classes, transform, max_bad_fraction=h.get("max_bad_fraction", 0.01),
                              name=cfg.split)


def print_table(title: str, values: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in values.items():
        text = f"{value:.4f}" if isinstance(value, float) else json.dumps(value) if isinstance(value, dict) else str(value)
        table.add_row(key, text)
    Console(stderr=False).print(table)


# --------------------------------------------------------------------------- inputs
def _cv2():
    # A device or file OpenCV cannot open is reported in one line of ours; its own warnings
    # (several lines per backend tried) would bury it.
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    try:
        import cv2
    except ImportError:
        raise ConfigError(f"reading video or a camera needs OpenCV: {OPENCV_HINT}") from None
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
            raise ConfigError(f"input={spec!r}: camera {index} cannot be opened")
        yield from _frames(capture, spec, every_n_frames, max_frames)
        return
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if not files:
            raise ConfigError(f"input={spec!r} is a folder without images ({', '.join(IMAGE_EXTENSIONS)})")
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
            raise ConfigError(f"input={spec!r}: OpenCV cannot open this video")
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
