"""Signal propagation at initialization against the beta schedule (NFNET_SPEC.md §1.4).

The schedule assumes every residual branch adds alpha^2 of variance to the stream and every
transition block resets it to 1 + alpha^2. Two facts of the real network limit where that
can be seen:
- SkipInit: the skip gains start at 0, so at initialization the branches are silent and the
  stream keeps the transition's variance. The schedule describes live branches, so the
  schedule test sets every skip gain to 1.
- The 2x2 average pool of the strided shortcuts divides the variance of a spatially white
  signal by ~4, and WS convs keep the variance of spatially white inputs; no image input does
  both. The schedule test therefore feeds the stages a unit-Gaussian residual stream that is
  constant over 8x8 patches (each value N(0, 1)), which the pools leave intact.
"""

import math

import torch
import torch.nn.functional as F

from nfnet.models import NFBlock, NFNet, Variant, create_model, signal_propagation

ALPHA = 0.2  # §1.4

# A narrow variant, deep enough for several blocks per stage, cheap on CPU.
PROBE = Variant(name="spp_probe", depths=(2, 3, 4, 2), widths=(64, 128, 256, 256),
                stem_widths=(16, 32, 32, 32), train_size=64, test_size=64, ra_level=0,
                drop_rate=0.0, group_width=32)
# Measured / expected variance: the pooled share of each stage's white branch output (about
# alpha^2 * depth / (1 + alpha^2 * depth), 5-12% here) is lost at the next transition.
SCHEDULE_TOLERANCE = 0.25
# Within a stage the ratio measured / expected must stay flat: the branches add alpha^2.
WITHIN_STAGE_TOLERANCE = 0.03


def schedule_variances(variant):
    """expected_std^2 after each block (§1.4): reset after the first block of a stage."""
    variances, expected = [], 1.0
    for depth in variant.depths:
        for b in range(depth):
            if b == 0:
                expected = 1.0
            expected = expected + ALPHA ** 2
            variances.append(expected)
    return variances


def test_residual_stream_variance_follows_the_beta_schedule():
    torch.manual_seed(0)
    model = NFNet(PROBE)
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, NFBlock):
                block.skip_gain.fill_(1.0)
    patch, size, batch = 8, 128, 2
    stream = torch.randn(batch, PROBE.stem_widths[-1], size // patch, size // patch)
    stream = F.interpolate(stream, scale_factor=patch, mode="nearest")
    signals = signal_propagation(model.stages, stream)
    expected = schedule_variances(PROBE)
    assert len(signals) == len(expected) == sum(PROBE.depths)
    ratios = [s.var / e for s, e in zip(signals, expected)]
    for s, ratio in zip(signals, ratios):
        assert abs(ratio - 1) < SCHEDULE_TOLERANCE, (s.name, ratio)
        # WS convs zero-mean their weights, so channel means stay small against variances.
        assert s.mean_sq < 0.1 * s.var, s.name
    start = 0
    for depth in PROBE.depths:
        stage = ratios[start:start + depth]
        assert max(stage) / min(stage) - 1 < WITHIN_STAGE_TOLERANCE, stage
        start += depth
    # The variance really grows within a stage, by ~alpha^2 per block.
    stage2 = signals[5:9]  # PROBE's third stage, 4 blocks
    growth = (stage2[-1].var - stage2[0].var) / 3 / (stage2[0].var / expected[5])
    assert math.isclose(growth, ALPHA ** 2, rel_tol=0.1)


def test_at_init_skipinit_makes_identity_blocks_exact_copies():
    torch.manual_seed(0)
    model = create_model("nfnet_tiny")
    images = torch.randn(8, 3, 64, 64)
    signals = signal_propagation(model, images)
    names = [n for n, m in model.named_modules() if isinstance(m, NFBlock)]
    assert [s.name for s in signals] == names
    for previous, current in zip(signals, signals[1:]):
        block = model.get_submodule(current.name)
        if block.conv_shortcut is None:
            assert current.var == previous.var and current.mean_sq == previous.mean_sq


def test_signal_propagation_restores_training_mode():
    model = create_model("nfnet_tiny").train()
    signal_propagation(model, torch.randn(2, 3, 64, 64))
    assert model.training
