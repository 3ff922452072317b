"""ILSVRC-2012 as it is distributed: class folders for training, one flat folder of validation
images, and a ground-truth file that says which class each validation image is.

Two ground-truth files are read, whichever the download brought:

* ``LOC_val_solution.csv`` (the Kaggle "ImageNet Object Localization Challenge" layout,
  ``ILSVRC/Data/CLS-LOC/{train,val}``): ``ImageId,PredictionString``, the class being the first
  WordNet id of the prediction string (every box of an image has the same class);
* ``ILSVRC2012_validation_ground_truth.txt`` from the development kit (``ILSVRC2012_devkit_t12``):
  line ``k`` is the ILSVRC2012 id of ``ILSVRC2012_val_<k:08d>.JPEG``; the ids are not in WordNet
  order, so the kit's ``meta.mat`` (beside it, or in ``data/``) maps them to WordNet ids (read
  with SciPy).

A ``val/`` folder already sorted into class folders is read as such.
"""

from __future__ import annotations

import csv
import os
from typing import Optional

from nfnet.data.folder_files import is_image_name, name_problem, printable

KAGGLE_LABELS = "LOC_val_solution.csv"
DEVKIT_LABELS = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
# Where a download keeps the ground truth, relative to the dataset root, in the order looked at.
LABEL_FILE_PLACES = (
    KAGGLE_LABELS,
    os.path.join("..", "..", "..", KAGGLE_LABELS),  # root = ILSVRC/Data/CLS-LOC, the csv beside ILSVRC/
    DEVKIT_LABELS,
    os.path.join("ILSVRC2012_devkit_t12", "data", DEVKIT_LABELS),
)


def find_label_file(root: str) -> Optional[str]:
    """The first ground-truth file found in the places a download keeps it, or None."""
    for place in LABEL_FILE_PLACES:
        path = os.path.normpath(os.path.join(root, place))
        if os.path.isfile(path):
            return path
    return None


def _stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


def _kaggle(path: str) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise ValueError(f"{path}: expected the header ImageId,PredictionString ({KAGGLE_LABELS})")
        labels = {}
        for number, row in enumerate(rows, start=2):
            if len(row) < 2 or not row[1].split():
                raise ValueError(f"{path}, line {number}: no class in {row!r}")
            labels[row[0].strip()] = row[1].split()[0]
    return labels


def _devkit_ids(meta: str) -> dict[int, str]:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ValueError(
            f"reading the development kit's {meta} needs SciPy: pip install scipy (or give the Kaggle "
            f"{KAGGLE_LABELS} as imagenet_val_labels=...)"
        ) from None
    synsets = loadmat(meta, squeeze_me=True)["synsets"]
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}


def _devkit(path: str) -> dict[str, str]:
    folder = os.path.dirname(path)
    meta = next((p for p in (os.path.join(folder, DEVKIT_META), os.path.join(folder, "data", DEVKIT_META))
                 if os.path.isfile(p)), None)
    if meta is None:
        raise ValueError(f"{path} gives ILSVRC2012 ids; their WordNet ids are in the kit's {DEVKIT_META}, "
                         f"which is not beside it: keep the development kit's data/ folder whole")
    wnids = _devkit_ids(meta)
    labels = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            ilsvrc_id = int(line)
            if ilsvrc_id not in wnids:
                raise ValueError(f"{path}, line {number}: id {ilsvrc_id} is not a class of {meta}")
            labels[f"ILSVRC2012_val_{number:08d}"] = wnids[ilsvrc_id]
    return labels


def read_val_labels(path: str) -> dict[str, str]:
    """Validation image name (without extension) -> WordNet id, from either ground-truth file."""
    if os.path.basename(path).endswith(".csv"):
        return _kaggle(path)
    return _devkit(path)


def flat_val_samples(
    val_dir: str, classes: list[str], labels: dict[str, str], label_file: str
) -> tuple[list[tuple[str, int]], dict[str, str]]:
    """The flat validation folder's images as (path, label) sorted by path, and the files that
    cannot be used (path -> why: an unusable name, or no ground truth for it). A ground-truth
    class that the training folders do not have is an error."""
    index = {name: i for i, name in enumerate(classes)}
    strangers = sorted({wnid for wnid in labels.values() if wnid not in index})
    if strangers:
        raise ValueError(f"{label_file} names classes that {os.path.dirname(val_dir)}/train has no folder for: "
                         f"{', '.join(strangers[:5])}; the training folders and the ground truth must be one release")
    samples, unusable = [], {}
    with os.scandir(val_dir) as entries:
        files = [e for e in entries if not e.name.startswith(".") and is_image_name(e.name) and e.is_file()]
    for entry in sorted(files, key=lambda e: e.name):
        problem = name_problem(entry.name)
        if problem is None and _stem(entry.name) not in labels:
            problem = f"no ground truth for it in {label_file}"
        if problem is not None:
            unusable[entry.path] = problem
            continue
        samples.append((entry.path, index[labels[_stem(entry.name)]]))
    if not samples:
        raise ValueError(f"{printable(val_dir)} has no image that {label_file} labels")
    return samples, unusable


def is_flat(val_dir: str) -> bool:
    """Whether ``val_dir`` holds images itself rather than class folders."""
    with os.scandir(val_dir) as entries:
        return any(e.is_file() and is_image_name(e.name) for e in entries)
