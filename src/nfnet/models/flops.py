"""Multiply-accumulates of an NFNet, counted the way the official `count_flops` does.

NFNET_SPEC.md §2.2 (`nfnet.py` `count_flops`, `base.py` `count_conv_flops`): one MAC per
output element x (in_channels/groups) x kh x kw for every conv (stem, block, shortcut and
final convs), in_features x out_features for every Linear (the SE pair and the classifier),
nothing for activations, pooling, SE's mean or the residual additions. Output sizes are TF
'SAME' sizes, ceil(size / stride), which equal the official size / stride on every official
image size (multiples of 32).
"""

from __future__ import annotations

from torch import nn

from .nfnet import NFBlock, NFNet


def _out_size(size: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int]:
    return -(-size[0] // stride[0]), -(-size[1] // stride[1])


def _conv_macs(conv: nn.Conv2d, out_size: tuple[int, int]) -> int:
    kh, kw = conv.kernel_size
    per_output = (conv.in_channels // conv.groups) * kh * kw
    return conv.out_channels * out_size[0] * out_size[1] * per_output


def _linear_macs(linear: nn.Linear) -> int:
    return linear.in_features * linear.out_features


def _block_macs(block: NFBlock, size: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    # conv0 runs at the input size; conv1 carries the stride; the rest run at the output size.
    macs = _conv_macs(block.conv0, size)
    out = _out_size(size, block.conv1.stride)
    macs += _conv_macs(block.conv1, out) + _conv_macs(block.conv1b, out)
    macs += _conv_macs(block.conv2, out)
    if block.conv_shortcut is not None:
        macs += _conv_macs(block.conv_shortcut, out)
    macs += _linear_macs(block.se.fc0) + _linear_macs(block.se.fc1)
    return macs, out


def count_flops(model: NFNet, image_size: int | tuple[int, int]) -> int:
    """MACs of one forward pass on one image of `image_size` (int: square), as an int.

    Works on the training model and on its folded copy (`fold_weight_standardization`), on
    any device including `meta`: it reads the modules' shapes, never runs them.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    macs = 0
    for conv in (model.stem.conv0, model.stem.conv1, model.stem.conv2, model.stem.conv3):
        size = _out_size(size, conv.stride)
        macs += _conv_macs(conv, size)
    for stage in model.stages:
        for block in stage:
            block_macs, size = _block_macs(block, size)
            macs += block_macs
    macs += _conv_macs(model.final_conv, size)
    macs += _linear_macs(model.classifier)
    return macs
