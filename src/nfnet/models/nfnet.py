"""The NFNet: stem, NF blocks with the alpha/beta schedule, head (NFNET_SPEC.md §1).

Module names follow the official ones (`stem.conv0`, `conv1b`, `conv_shortcut`, `skip_gain`,
`final_conv`), so the mapping to DeepMind's checkpoints stays a renaming, and parameters
group by stage from their names: `stem.*`, `stages.{s}.{b}.*`, `final_conv.*`, `classifier.*`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .activations import GammaAct
from .layers import WS_EPS, SqueezeExcite, StochasticDepth, WSConv2d, same_avg_pool
from .variants import Variant, get_variant

# NFNET_SPEC.md §1.10, `NFNet.__init__` defaults.
ALPHA = 0.2
SE_RATIO = 0.5
# The model default; the training config (`exp_nf.py`) passes 0.25 (§1.5).
STOCHDEPTH_RATE = 0.1
FINAL_CONV_MULT = 2.0
# §1.3: only the first block of a stage is strided, by these strides.
STAGE_STRIDES = (1, 2, 2, 2)
# §1.2: stem_conv0..3 strides; total stem stride 4.
STEM_STRIDES = (2, 1, 1, 2)
# §1.3 step 7: `(2 * se(out)) * out`, "Multiply by 2 for rescaling".
SE_GAIN = 2.0
# §1.8: `fc` weight ~ Normal(0, 0.01) (haiku RandomNormal(stddev=0.01)), bias zeros.
CLASSIFIER_INIT_STD = 0.01
# Activation checkpointing of the trunk (not in the official code, NFNET_SPEC.md §5): off, per
# stage, or per block (True means "block"). The stem is one more segment either way.
GRAD_CHECKPOINTING = (False, "stage", "block")


class Stem(nn.Module):
    """Four 3x3 WS convs, strides 2,1,1,2; an activation after all but the last (§1.2)."""

    def __init__(self, widths: tuple[int, ...], act: Callable[[], GammaAct],
                 conv: Callable[..., WSConv2d], in_channels: int = 3):
        super().__init__()
        self.act = act()
        c0, c1, c2, c3 = widths
        s0, s1, s2, s3 = STEM_STRIDES
        half = self.act.out_channels
        self.conv0 = conv(in_channels, c0, 3, stride=s0)
        self.conv1 = conv(half(c0), c1, 3, stride=s1)
        self.conv2 = conv(half(c1), c2, 3, stride=s2)
        self.conv3 = conv(half(c2), c3, 3, stride=s3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv0(x))
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        # No activation here: every block starts with its own (§1.2).
        return self.conv3(x)


class NFBlock(nn.Module):
    """Normalizer-free bottleneck block, NFNET_SPEC.md §1.3.

    out = act(x)*beta -> conv0 1x1 -> act -> conv1 3x3 grouped (strided) -> act -> conv1b 3x3
    grouped -> act -> conv2 1x1 -> 2*SE(out)*out -> stochastic depth -> *skip_gain; returns
    out*alpha + shortcut. The identity shortcut is the raw x; the projection shortcut is
    (avg-pool when strided, then) a 1x1 WS conv of act(x)*beta.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, beta: float,
                 alpha: float, group_width: int, expansion: float, big_width: bool,
                 se_ratio: float, stochdepth_rate: float, act: Callable[[], GammaAct],
                 conv: Callable[..., WSConv2d]):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.beta, self.alpha = beta, alpha
        # Bottleneck width rounded down to whole groups of group_width channels (§1.3).
        groups = int((out_channels if big_width else in_channels) * expansion) // group_width
        if groups < 1:
            raise ValueError(
                f"block {in_channels}->{out_channels}: bottleneck int(width*{expansion}) is "
                f"narrower than one group of {group_width} channels; lower group_width"
            )
        width = group_width * groups
        self.act = act()
        half = self.act.out_channels
        self.conv0 = conv(half(in_channels), width, 1)
        self.conv1 = conv(half(width), width, 3, stride=stride, groups=groups)
        self.conv1b = conv(half(width), width, 3, groups=groups)
        self.conv2 = conv(half(width), out_channels, 1)
        if stride > 1 or in_channels != out_channels:
            self.pool = same_avg_pool(stride) if stride > 1 else nn.Identity()
            self.conv_shortcut = conv(half(in_channels), out_channels, 1)
        else:
            self.pool = None
            self.conv_shortcut = None
        self.se = SqueezeExcite(out_channels, se_ratio)
        # The official block builds StochDepth only for 0 < rate < 1 (§1.5): block 0 has none.
        self.stochastic_depth = (
            StochasticDepth(stochdepth_rate) if 0.0 < stochdepth_rate < 1.0 else nn.Identity()
        )
        # SkipInit: a scalar gain on the residual branch, initialised to 0 (§1.3 step 9).
        self.skip_gain = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(x, self.beta)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(self.pool(out))
        out = self.conv0(out)
        out = self.conv1(self.act(out))
        out = self.conv1b(self.act(out))
        out = self.conv2(self.act(out))
        # 2*SE(out)*out, the stochastic-depth mask, skip_gain and alpha all scale `out` per
        # (sample, channel): they are multiplied together on the small (B, C, 1, 1) gate and
        # applied with the residual add in one pass over the feature map; the constant 2*alpha
        # rides on that add rather than costing an op of its own.
        gate = self.se(out) * self.skip_gain
        if isinstance(self.stochastic_depth, StochasticDepth):
            mask = self.stochastic_depth.keep_mask(out)
            if mask is not None:
                gate = gate * mask
        if gate.dtype != out.dtype:  # under autocast the residual stream stays bf16
            gate = gate.to(out.dtype)
        return torch.addcmul(shortcut, out, gate, value=SE_GAIN * self.alpha)

    def extra_repr(self) -> str:
        return f"beta={self.beta:.6f}, alpha={self.alpha}"


class NFNet(nn.Module):
    """NFNet-F* of NFNET_SPEC.md §1, NCHW, on already-normalized float images.

    stem -> stages of NFBlocks -> final_conv 1x1 (final_conv_mult x) -> act -> mean over H,W
    -> dropout -> classifier. Returns logits. `variant` stays the table row: keyword
    overrides such as `width` change the network, not the row.
    """

    def __init__(self, variant: Variant, num_classes: int = 1000, *, width: float = 1.0,
                 se_ratio: float = SE_RATIO, alpha: float = ALPHA,
                 stochdepth_rate: float = STOCHDEPTH_RATE, drop_rate: float | None = None,
                 activation: str = "gelu", gelu_approximate: str = "tanh",
                 final_conv_mult: float = FINAL_CONV_MULT, ws_eps: float = WS_EPS,
                 ws_eps_mode: str = "max", grad_checkpointing: bool | str = False):
        super().__init__()
        self.variant = variant
        act = partial(GammaAct, activation, gelu_approximate)
        conv = partial(WSConv2d, eps=ws_eps, eps_mode=ws_eps_mode)
        # The width multiplier scales block widths only, never the stem (§1.2).
        self.stem = Stem(variant.stem_widths, act, conv)
        ch = variant.stem_widths[-1]

        # §1.4: beta = 1/expected_std; the std accumulated through a stage is reset only
        # after the stage's first (transition) block; every block then adds alpha^2.
        num_blocks = sum(variant.depths)
        expected_std, index, stages = 1.0, 0, []
        for stage_width, depth, stride in zip(variant.widths, variant.depths, STAGE_STRIDES):
            out_ch = int(stage_width * width)
            blocks = []
            for block_index in range(depth):
                blocks.append(NFBlock(
                    ch, out_ch, stride=stride if block_index == 0 else 1,
                    beta=1.0 / expected_std, alpha=alpha, group_width=variant.group_width,
                    expansion=variant.expansion, big_width=variant.big_width,
                    se_ratio=se_ratio, stochdepth_rate=stochdepth_rate * index / num_blocks,
                    act=act, conv=conv,
                ))
                ch, index = out_ch, index + 1
                if block_index == 0:
                    expected_std = 1.0
                expected_std = math.sqrt(expected_std ** 2 + alpha ** 2)
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)

        self.final_conv = conv(ch, int(final_conv_mult * ch), 1)
        self.final_act = act()
        self.num_features = self.final_act.out_channels(self.final_conv.out_channels)
        self.drop_rate = variant.drop_rate if drop_rate is None else drop_rate
        # hk.dropout is inverted dropout, like nn.Dropout (§1.8).
        self.dropout = nn.Dropout(self.drop_rate)
        self.classifier = nn.Linear(self.num_features, num_classes)
        self.reset_classifier(num_classes)
        self.set_grad_checkpointing(grad_checkpointing)

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh classifier for `num_classes`, initialised as the official `fc` (§1.8)."""
        old = self.classifier
        self.classifier = nn.Linear(self.num_features, num_classes, device=old.weight.device,
                                    dtype=old.weight.dtype)
        nn.init.normal_(self.classifier.weight, std=CLASSIFIER_INIT_STD)
        nn.init.zeros_(self.classifier.bias)

    def set_grad_checkpointing(self, mode: bool | str = True) -> None:
        """Recompute the trunk's activations in backward instead of keeping them: per "block"
        (True), per "stage", or not (False). Acts only while training with grad enabled.

        Non-reentrant torch.utils.checkpoint with the RNG state preserved: the recomputed
        forward draws the same stochastic-depth masks, and the RNG stream the rest of the step
        sees is unchanged, so outputs, gradients and resumed runs equal those without it.
        """
        mode = "block" if mode is True else mode
        if mode not in GRAD_CHECKPOINTING:
            raise ValueError(f"grad_checkpointing={mode!r}; choose one of {GRAD_CHECKPOINTING} "
                             "(True means 'block')")
        self.grad_checkpointing = mode

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The activated final feature map, (B, num_features, H/32, W/32)."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            if self.grad_checkpointing == "stage":
                segments = [self.stem, *self.stages]
            else:
                segments = [self.stem, *(block for stage in self.stages for block in stage)]
            for segment in segments:
                x = checkpoint(segment, x, use_reentrant=False)
        else:
            x = self.stages(self.stem(x))
        return self.final_act(self.final_conv(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(features.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def create_model(name: str, num_classes: int = 1000, **overrides) -> NFNet:
    """An NFNet of the variant table row `name` (see `VARIANTS`), freshly initialised.

    `overrides` are NFNet's keyword arguments: width, se_ratio, alpha, stochdepth_rate,
    drop_rate (None: the variant's), activation (a key of `GAMMAS`), gelu_approximate ('tanh'
    as the official model, 'none' for timm's exact GELU), final_conv_mult, ws_eps, ws_eps_mode,
    grad_checkpointing (False, 'stage' or 'block'; see `NFNet.set_grad_checkpointing`).
    """
    return NFNet(get_variant(name), num_classes, **overrides)
