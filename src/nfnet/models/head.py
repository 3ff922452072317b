"""The classifier's rows as the class set evolves: rows of known classes are kept, new classes get
new rows initialised as the official classifier (NFNET_SPEC §1.8: N(0, 0.01) weights, zero bias).

A row of the final linear layer is everything the network learned about one class beyond the
shared trunk, so re-initialising the whole classifier when one class arrives throws away what
the others learned. `arrange_rows` builds a classifier whose row i is an old row, or a fresh one
where the class is new; `rows_by_name` says which old row each class keeps when both class
lists are known by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .nfnet import CLASSIFIER_INIT_STD

CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")


def arrange_rows(weight: torch.Tensor, bias: torch.Tensor, rows: Sequence[int | None],
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A classifier (weight (len(rows), F), bias (len(rows),)) whose row i is the old row
    `rows[i]`, or, where `rows[i]` is None, a new row: N(0, 0.01) weights and a zero bias."""
    new_weight = torch.empty(len(rows), weight.shape[1], dtype=weight.dtype)
    new_weight.normal_(0.0, CLASSIFIER_INIT_STD, generator=generator)
    new_bias = torch.zeros(len(rows), dtype=bias.dtype)
    for index, row in enumerate(rows):
        if row is not None:
            new_weight[index] = weight[row]
            new_bias[index] = bias[row]
    return new_weight, new_bias


def rows_by_name(weights_classes: Sequence[str], model_classes: Sequence[str]) -> list[int | None]:
    """For each of the model's classes, the row the weights have for the class of that name (None
    for a class the weights do not know)."""
    position = {name: row for row, name in enumerate(weights_classes)}
    return [position.get(name) for name in model_classes]


def with_rows(state_dict: Mapping[str, torch.Tensor], rows: Sequence[int | None],
              generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """`state_dict` with its classifier arranged by `arrange_rows`."""
    arranged = dict(state_dict)
    weight, bias = arrange_rows(state_dict[CLASSIFIER_KEYS[0]], state_dict[CLASSIFIER_KEYS[1]], rows, generator)
    arranged[CLASSIFIER_KEYS[0]], arranged[CLASSIFIER_KEYS[1]] = weight, bias
    return arranged
