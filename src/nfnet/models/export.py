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
from .nfnet import NFBlock, NFNet

# The lowest ONNX opset the export is checked with (the dynamo-based exporter starts at 18).
ONNX_OPSET = 18


def _folded(conv: WSConv2d, input_scale: float = 1.0) -> SameConv2d:
    plain = SameConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                       conv.groups).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        # conv(w, s * x) = conv(s * w, x): a constant scale on the input moves into the weight.
        plain.weight.copy_(conv.standardized_weight() * input_scale)
        plain.bias.copy_(conv.bias)
    return plain


def _fold_gammas(model: NFNet) -> None:
    """Moves every activation's gamma (and each block's beta) into the weights of the layers
    that consume the activation, in place on a folded copy: every consumer is linear in its
    input (a conv, the shortcut's average pool, the head's mean and classifier), so this is
    exact up to float rounding, and saves one elementwise pass per activation."""
    stem = model.stem
    gamma = stem.act.gamma
    for name in ("conv1", "conv2", "conv3"):
        setattr(stem, name, _scaled(getattr(stem, name), gamma))
    stem.act.gamma = 1.0
    for block in (m for m in model.modules() if isinstance(m, NFBlock)):
        gamma = block.act.gamma
        block.conv0 = _scaled(block.conv0, gamma * block.beta)
        if block.conv_shortcut is not None:
            block.conv_shortcut = _scaled(block.conv_shortcut, gamma * block.beta)
        for name in ("conv1", "conv1b", "conv2"):
            setattr(block, name, _scaled(getattr(block, name), gamma))
        block.act.gamma, block.beta = 1.0, 1.0
    with torch.no_grad():
        model.classifier.weight.mul_(model.final_act.gamma)
    model.final_act.gamma = 1.0


def _scaled(conv: nn.Module, scale: float) -> nn.Module:
    if isinstance(conv, WSConv2d):
        return _folded(conv, scale)
    with torch.no_grad():
        conv.weight.mul_(scale)
    return conv


def fold_weight_standardization(model: nn.Module, fold_gammas: bool = True) -> nn.Module:
    """A copy of `model`, in eval mode, with every WSConv2d replaced by a SameConv2d (an
    nn.Conv2d with the same TF-'SAME' padding) holding the standardised weight and the bias.
    With `fold_gammas` (an NFNet only), the activations' gammas and the blocks' betas are
    moved into those weights too (see `_fold_gammas`). The original is left untouched."""
    folded = copy.deepcopy(model)
    if fold_gammas and isinstance(folded, NFNet):
        _fold_gammas(folded)
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
