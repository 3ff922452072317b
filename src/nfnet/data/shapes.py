"""The embedded default dataset: procedurally drawn shapes, written once as an image folder.

`python train.py` with no arguments must show the whole pipeline working in minutes on a CPU with
no download, so the data is generated. It is written to disk as an ordinary image-folder tree
(`train/<class>/*.png`, `val/<class>/*.png`) and read back through the same folder code path as
ImageNet, so the default run exercises decoding, transforms and loaders for real.

The task is learnable but not trivial: colours, position, scale and rotation are random and
independent of the class, and every image has background clutter and noise, so the class is
carried by shape alone. A linear classifier on raw pixels stays far below a small convnet
(a test checks it stays at or below 60%).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = (
    "arrow",
    "circle",
    "crescent",
    "cross",
    "hourglass",
    "ring",
    "square",
    "star",
    "stripes",
    "triangle",
)

# Shapes are drawn at this multiple of the output size and downsampled, which anti-aliases
# their edges; without it, rotation leaves staircase edges that a model could key on.
SUPERSAMPLE = 2
# Bumped whenever the drawing code changes, so an old cache is never mistaken for a new one.
GENERATOR_VERSION = 3
COMPLETE_MARKER = ".complete"
# Channel value ranges (low inclusive, high exclusive) of the background and the shape.
BACKGROUND_RANGE = (0, 110)
SHAPE_RANGE = (145, 256)


@dataclass(frozen=True)
class ShapesSpec:
    """Everything that determines the generated files; equal specs give byte-identical trees."""

    seed: int = 0
    train_per_class: int = 500
    val_per_class: int = 100
    image_size: int = 64

    def cache_name(self) -> str:
        digest = hashlib.sha1(
            json.dumps({"v": GENERATOR_VERSION, **asdict(self)}, sort_keys=True).encode()
        ).hexdigest()[:10]
        return f"shapes-v{GENERATOR_VERSION}-{digest}"


def _polygon(cx: float, cy: float, radius: float, angle: float, points) -> list[tuple]:
    """Points given in a unit frame (x right, y down), rotated by `angle` and scaled."""
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in points]


def _regular(n: int, inner: float | None = None) -> list[tuple]:
    """A regular n-gon, or an n-pointed star when `inner` (the inner radius ratio) is given."""
    if inner is None:
        return [(math.cos(2 * math.pi * k / n), math.sin(2 * math.pi * k / n)) for k in range(n)]
    pts = []
    for k in range(2 * n):
        r = 1.0 if k % 2 == 0 else inner
        a = math.pi * k / n
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


_ARROW = [(-1, -0.25), (0.2, -0.25), (0.2, -0.65), (1, 0), (0.2, 0.65), (0.2, 0.25), (-1, 0.25)]
_CROSS = [
    (-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3),
    (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3),
]  # fmt: skip
_HOURGLASS = [(-0.8, -1), (0.8, -1), (0.08, 0), (0.8, 1), (-0.8, 1), (-0.08, 0)]
_SQUARE = [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
_STAR = _regular(5, inner=0.42)
_TRIANGLE = _regular(3)


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, cx, cy, r, angle, colour, background):
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        inner = 0.55 * r
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=background)
    elif name == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        ox, oy = cx + 0.45 * r * math.cos(angle), cy + 0.45 * r * math.sin(angle)
        draw.ellipse([ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r], fill=background)
    elif name == "stripes":
        # Three parallel bars: a texture-like class that no single blob matches.
        for offset in (-0.66, 0.0, 0.66):
            bar = [(-1, offset - 0.17), (1, offset - 0.17), (1, offset + 0.17), (-1, offset + 0.17)]
            draw.polygon(_polygon(cx, cy, r, angle, bar), fill=colour)
    else:
        points = {
            "arrow": _ARROW,
            "cross": _CROSS,
            "hourglass": _HOURGLASS,
            "square": _SQUARE,
            "star": _STAR,
            "triangle": _TRIANGLE,
        }[name]
        draw.polygon(_polygon(cx, cy, r, angle, points), fill=colour)


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def _colour(rng: np.random.Generator, low: int, high: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(low, high, size=3))


def render(class_index: int, rng: np.random.Generator, image_size: int) -> Image.Image:
    """One image of class `class_index`: background, clutter, the shape, then pixel noise."""
    big = image_size * SUPERSAMPLE
    # Random colours, but a dark background and a bright shape: the shape's edges always have
    # the same polarity, which a small network picks up in a few hundred steps, while colour
    # alone still says nothing about the class.
    background = _colour(rng, *BACKGROUND_RANGE)
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    # Clutter: thin lines and small dots in random colours, drawn under the shape. Kept light:
    # the default run must learn this in a few hundred CPU steps.
    for _ in range(int(rng.integers(0, 3))):
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, big, size=4))
        draw.line([(x0, y0), (x1, y1)], fill=_random_colour(rng), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(0, 4))):
        x, y = (float(v) for v in rng.uniform(0, big, size=2))
        d = float(rng.uniform(1, 3)) * SUPERSAMPLE
        draw.ellipse([x - d, y - d, x + d, y + d], fill=_random_colour(rng))
    radius = float(rng.uniform(0.28, 0.42)) * big
    margin = 0.8 * radius
    cx, cy = (float(v) for v in rng.uniform(margin, big - margin, size=2))
    angle = float(rng.uniform(0, 2 * math.pi))
    colour = _colour(rng, *SHAPE_RANGE)
    _draw_shape(draw, CLASSES[class_index], cx, cy, radius, angle, colour, background)
    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.int16)
    noise = rng.normal(0.0, 6.0, size=pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def _write_split(root: Path, split: str, per_class: int, spec: ShapesSpec) -> None:
    split_id = {"train": 0, "val": 1}[split]
    for class_index, name in enumerate(CLASSES):
        folder = root / split / name
        folder.mkdir(parents=True)
        for index in range(per_class):
            # One independent stream per image: a file's content depends only on its own
            # (seed, split, class, index), never on generation order or on the other counts.
            rng = np.random.default_rng([spec.seed, split_id, class_index, index])
            render(class_index, rng, spec.image_size).save(folder / f"{index:05d}.png", optimize=False)


def ensure_shapes_dataset(cache_dir: str | os.PathLike, spec: ShapesSpec = ShapesSpec()) -> Path:
    """Return the dataset root for `spec` under `cache_dir`, generating it on first use.

    Generation writes into a temporary sibling directory and renames it into place, so an
    interrupted generation never leaves a half-written tree that a later run would trust.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / spec.cache_name()
    if (target / COMPLETE_MARKER).exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".shapes-", dir=cache_dir))
    try:
        _write_split(staging, "train", spec.train_per_class, spec)
        _write_split(staging, "val", spec.val_per_class, spec)
        (staging / COMPLETE_MARKER).write_text(json.dumps(asdict(spec), sort_keys=True))
        if target.exists():  # a stale, incomplete tree from an interrupted older run
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished the same spec first; theirs is identical by construction.
            if not (target / COMPLETE_MARKER).exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
