"""The images a weight set is evaluated on: a split of a data source, through the official eval
transform at the weights' image size (resize to (S + pad)^2, centre-crop S). No Lightning, no Hydra.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.utils.data import Dataset

from nfnet.data import sources
from nfnet.data.folder import ImageFolderDataset
from nfnet.data.transforms import ResizeCropEval
from nfnet.errors import InputError
from nfnet.inference.classifier import Classifier


def eval_dataset(classifier: Classifier, data: Mapping[str, Any], split: str) -> Dataset:
    """`split` ("val" or "train") of the source `data` describes (a data config section:
    source, root, val_fraction, split_seed, max_bad_fraction, shapes), whose classes must be the
    weights' classes (in the same order, for a checkpoint)."""
    transform = ResizeCropEval(classifier.image_size, pad=classifier.eval_pad)
    if data["source"] == "streaming":
        info = sources.pack_info(data)
        _check_classes(info.classes, classifier, data)
        return sources.packed_split(data, info, split, transform)
    sources.generate(data)
    found = sources.val_split(data) if split == "val" else sources.splits(data)
    classes, samples = found.classes, found.val if split == "val" else found.train
    _check_classes(classes, classifier, data)
    return ImageFolderDataset(samples, classes, transform, max_bad_fraction=data["max_bad_fraction"], name=split,
                              known_bad=found.bad)


def _check_classes(classes: list[str], classifier: Classifier, data: Mapping[str, Any]) -> None:
    if len(classes) != len(classifier.class_names) or (
        classifier.weights != "pretrained" and list(classes) != classifier.class_names
    ):
        raise InputError(
            f"the data at {data['root']!r} has {len(classes)} classes ({', '.join(classes[:3])}, ...) but the "
            f"weights were trained on {len(classifier.class_names)} ({', '.join(classifier.class_names[:3])}, ...)"
        )
