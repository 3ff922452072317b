"""The images a weight set is evaluated on: a split of a data source, through the official eval
transform at the weights' image size (resize to (S + pad)^2, centre-crop S); and per-class top-1
counts of a network on such a dataset. No Lightning, no Hydra.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from nfnet.data import sources
from nfnet.data.folder import ImageFolderDataset
from nfnet.data.transforms import ResizeCropEval, normalize
from nfnet.errors import InputError
from nfnet.inference.classifier import Classifier


def eval_dataset(classifier: Classifier, data: Mapping[str, Any], split: str) -> Dataset:
    """`split` ("val" or "train") of the source `data` describes (a data config section:
    source, root, val_fraction, split_seed, max_bad_fraction, shapes), whose classes must be the
    weights' classes (labelled in the weights' order, for a folder and weights that name their
    classes; in the same order, for shards)."""
    transform = ResizeCropEval(classifier.image_size, pad=classifier.eval_pad)
    if data["source"] == "streaming":
        info = sources.pack_info(data)
        _check_classes(info.classes, classifier, data)
        return sources.packed_split(data, info, split, transform)
    sources.generate(data)
    found = sources.val_split(data) if split == "val" else sources.splits(data)
    classes, samples = found.classes, found.val if split == "val" else found.train
    names = classifier.class_names
    if classifier.weights != "pretrained" and sorted(classes) == sorted(names) and list(classes) != names:
        # A registry's classes are in the order they arrived; a folder's are sorted.
        row = {name: index for index, name in enumerate(names)}
        samples, classes = [(path, row[classes[label]]) for path, label in samples], list(names)
    _check_classes(classes, classifier, data)
    return ImageFolderDataset(samples, classes, transform, max_bad_fraction=data["max_bad_fraction"], name=split,
                              known_bad=found.bad)


def _check_classes(classes: list[str], classifier: Classifier, data: Mapping[str, Any]) -> None:
    names = classifier.class_names
    if len(classes) != len(names) or (classifier.weights != "pretrained" and list(classes) != names):
        raise InputError(
            f"the data at {data['root']!r} has {len(classes)} classes ({', '.join(classes[:3])}, ...) but the "
            f"weights were trained on {len(names)} ({', '.join(names[:3])}, ...)"
        )


@torch.no_grad()
def class_hits(net: torch.nn.Module, dataset: Dataset, num_classes: int, rows: Sequence[int] | None = None,
               batch_size: int = 64, num_workers: int = 0) -> tuple[list[int], list[int]]:
    """(correct, total) top-1 counts per class of `net` (in eval mode, on its device) on `dataset`
    (uint8 images, integer labels in [0, num_classes)). `rows[j]` is the label the net's output j
    stands for (-1: none; an older model's rows, after its classes were renamed or removed);
    by default output j is label j."""
    device = next(net.parameters()).device
    mapping = torch.as_tensor(list(rows) if rows is not None else range(num_classes), device=device)
    correct, total = torch.zeros(num_classes, dtype=torch.long), torch.zeros(num_classes, dtype=torch.long)
    was_training = net.training
    net.eval()
    for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        predicted = mapping[net(normalize(images.to(device))).argmax(dim=-1)].cpu()
        total += torch.bincount(labels, minlength=num_classes)
        correct += torch.bincount(labels[predicted == labels], minlength=num_classes)
    net.train(was_training)
    return correct.tolist(), total.tolist()
