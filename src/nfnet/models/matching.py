"""Which variant a state dict (in this model's naming) is, and whether it fits a model."""

from __future__ import annotations

import re
from typing import Mapping

import torch

from .nfnet import NFNet
from .variants import VARIANTS, Variant

_BLOCK_KEY = re.compile(r"^stages\.(\d+)\.(\d+)\.")
# How many differences an error lists before it summarises the rest.
_SHOWN = 5


def infer_variant(state_dict: Mapping[str, torch.Tensor]) -> Variant:
    """The row of `VARIANTS` whose depths, widths, stem and group width the tensors have."""
    try:
        depths = [0, 0, 0, 0]
        for key in state_dict:
            match = _BLOCK_KEY.match(key)
            if match:
                stage, block = int(match[1]), int(match[2])
                depths[stage] = max(depths[stage], block + 1)
        widths = tuple(state_dict[f"stages.{s}.0.conv2.weight"].shape[0] for s in range(4))
        stem = tuple(state_dict[f"stem.conv{i}.weight"].shape[0] for i in range(4))
        # conv1 is grouped with group_width input channels per group.
        group_width = state_dict["stages.0.0.conv1.weight"].shape[1]
    except (KeyError, IndexError) as e:
        raise ValueError(
            f"not an NFNet state dict in this project's naming (missing {e})") from None
    found = {"depths": tuple(depths), "widths": widths, "stem_widths": stem,
             "group_width": group_width}
    for variant in VARIANTS.values():
        if all(getattr(variant, field) == value for field, value in found.items()):
            return variant
    raise ValueError(f"no variant in the table has {found}; name the variant explicitly")


def shape_mismatches(expected: Mapping[str, torch.Size],
                     state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between expected shapes and a state dict: missing and
    unexpected keys, and shape mismatches."""
    problems = [f"missing {k}" for k in expected if k not in state_dict]
    problems += [f"unexpected {k}" for k in state_dict if k not in expected]
    problems += [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k])}"
                 for k, v in state_dict.items() if k in expected and v.shape != expected[k]]
    return problems


def describe(problems: list[str]) -> str:
    shown = "; ".join(problems[:_SHOWN])
    more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    return shown + more


def check_state_dict(state_dict: Mapping[str, torch.Tensor], variant: Variant) -> None:
    """Raises ValueError unless `state_dict` has exactly the keys and shapes of `variant`
    (any number of classes). The reference model is built on the meta device: no memory."""
    head = state_dict.get("classifier.weight")
    classes = {} if head is None else {"num_classes": head.shape[0]}
    with torch.device("meta"):
        reference = NFNet(variant, **classes)
    expected = {k: v.shape for k, v in reference.state_dict().items()}
    problems = shape_mismatches(expected, state_dict)
    if problems:
        raise ValueError(f"state dict does not fit {variant.name}: {describe(problems)}")
