"""A folder of the embedded shapes that changes as a user's does between update rounds:

    python -m nfnet.data.shapes_rounds shapes-photos --round 1    # 8 classes
    python -m nfnet.data.shapes_rounds shapes-photos --round 2    # 2 new classes, more images of all
    python -m nfnet.data.shapes_rounds shapes-photos --round 3    # every label shuffled (broken data)

Round 1 writes `per_class` images of 8 of the 10 shapes, round 2 adds the two held-back classes
(`arrow`, whose name sorts first, and `triangle`) and grows every class to `grown_per_class`
images, round 3 moves every file into a class folder drawn at random (renamed
`<its class>-<its name>`, so no two collide): what a broken labelling step does. Images are
drawn by nfnet.data.shapes, each from its own seeded stream, so a folder is the same wherever it
is written. Rounds 1 and 2 only add missing files; round 3 needs the folder as round 2 left it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from nfnet.data.shapes import CLASSES, render

# Held back in round 1 and arriving in round 2; `arrow` sorts before every other class.
LATE_CLASSES = ("arrow", "triangle")
# The stream id of these images (the embedded dataset's train and val use 0 and 1).
_STREAM = 2
_SHUFFLE_STREAM = 3


def round_files(round_number: int, per_class: int, grown_per_class: int) -> dict[str, int]:
    """{class: image count} of rounds 1 and 2."""
    if round_number == 1:
        return {name: per_class for name in CLASSES if name not in LATE_CLASSES}
    return {name: grown_per_class for name in CLASSES}


def write_round(folder: str | os.PathLike, round_number: int, per_class: int = 80, grown_per_class: int = 120,
                image_size: int = 64, seed: int = 0) -> int:
    """Brings `folder` to round `round_number` (1, 2 or 3); returns how many files were written or moved."""
    folder = Path(folder)
    if round_number == 3:
        return _shuffle_labels(folder, per_class, grown_per_class, seed)
    if round_number not in (1, 2):
        raise ValueError(f"round {round_number}: the walk has rounds 1, 2 and 3")
    written = 0
    for name, count in round_files(round_number, per_class, grown_per_class).items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            path = folder / name / f"{index:05d}.png"
            if not path.exists():
                rng = np.random.default_rng([seed, _STREAM, CLASSES.index(name), index])
                render(CLASSES.index(name), rng, image_size).save(path)
                written += 1
    return written


def _shuffle_labels(folder: Path, per_class: int, grown_per_class: int, seed: int) -> int:
    expected = [folder / name / f"{index:05d}.png"
                for name, count in round_files(2, per_class, grown_per_class).items() for index in range(count)]
    missing = [p for p in expected if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"round 3 shuffles the folder round 2 wrote, but {len(missing)} of its files are not in "
                                f"{folder} (e.g. {missing[0]}); write rounds 1 and 2 first")
    rng = np.random.default_rng([seed, _SHUFFLE_STREAM])
    for path, target in zip(expected, rng.integers(len(CLASSES), size=len(expected))):
        os.replace(path, folder / CLASSES[target] / f"{path.parent.name}-{path.name}")
    return len(expected)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--round", type=int, choices=(1, 2, 3), required=True)
    parser.add_argument("--per-class", type=int, default=80, help="images per class in round 1")
    parser.add_argument("--grown-per-class", type=int, default=120, help="images per class from round 2")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    count = write_round(args.folder, args.round, args.per_class, args.grown_per_class, args.image_size, args.seed)
    verb = "moved" if args.round == 3 else "wrote"
    print(f"round {args.round}: {verb} {count} images in {args.folder}")


if __name__ == "__main__":
    main()
