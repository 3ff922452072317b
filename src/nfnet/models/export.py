"""Inference folding and export.

Weight standardisation depends on the weights only, so for inference it can be computed once
and stored as plain conv weights (NFNET_SPEC.md §5, "Re-standardisation cost"): the folded
model computes the same function without the per-call mean/var/rsqrt, and exports as plain
convolutions.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from .layers import SameConv2d, WSConv2d

# The lowest ONNX opset the export is checked with (the dynamo-based exporter starts at 18).
ONNX_OPSET = 18


def _folded(conv: WSConv2d) -> SameConv2d:
    plain = SameConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                       conv.groups).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(conv.standardized_weight())
        plain.bias.copy_(conv.bias)
    return plain


def fold_weight_standardization(model: nn.Module) -> nn.Module:
    """A copy of `model`, in eval mode, with every WSConv2d replaced by a SameConv2d (an
    nn.Conv2d with the same TF-'SAME' padding) holding the standardised weight and the bias.
    The original is left untouched."""
    folded = copy.deepcopy(model)
    for parent in list(folded.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, WSConv2d):
                setattr(parent, name, _folded(child))
    return folded.eval()


def export_onnx(model: nn.Module, path: str | os.PathLike, image_size: int,
                opset: int = ONNX_OPSET) -> None:
    """Folds `model` and writes it as ONNX with input 'images' (B, 3, S, S), any batch size,
    and output 'logits'."""
    folded = fold_weight_standardization(model)
    example = torch.zeros(2, 3, image_size, image_size, device=next(folded.parameters()).device)
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        folded, (example,), os.fspath(path), opset_version=opset, dynamo=True,
        input_names=["images"], output_names=["logits"],
        dynamic_shapes={"x": {0: batch}}, verbose=False,
    )
