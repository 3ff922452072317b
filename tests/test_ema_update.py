"""nfnet.optim.ExponentialMovingAverage: the TF1 EMA of NFNET_SPEC §4 with its step and skip
flag on the device, against the update NFNetClassifier makes today (``torch._foreach_lerp_``
with the Python-float weight ``1 - ema_decay(t)``) and the closed form."""

from __future__ import annotations

import pytest
import torch

from nfnet.optim import ExponentialMovingAverage, ema as ema_module
from nfnet.optim.schedule import ema_decay

DECAY = 0.99999
SHAPES = [(6, 4, 3, 3), (6,), (5, 7), ()]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.int32)


def same_bits(a, b) -> bool:
    return all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b))


def tensors(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(shape, generator=gen) for shape in SHAPES]
    out[0] = out[0].contiguous(memory_format=torch.channels_last)
    return out


def nudge(sources, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for s in sources:
        s.add_(torch.randn(s.shape, generator=gen) * 0.01)


@pytest.fixture(params=["broadcast weight", "filled weight"])
def weight_form(request, monkeypatch):
    """Both forms of the weight list (the CPU one and the one every other device uses), run on
    CPU: the arithmetic is the same lerp."""
    if request.param == "filled weight":
        monkeypatch.setattr(ema_module, "_BROADCAST_WEIGHT_DEVICES", frozenset())
    return request.param


def test_updates_equal_todays_lerp_bit_for_bit(weight_form):
    sources = tensors(0)
    todays = [s.clone() + 0.5 for s in sources]
    averages = [t.clone() for t in todays]
    ema = ExponentialMovingAverage(averages, sources, DECAY)
    # t = 0..40 crosses the weight's 0.5 point (t = 8), where lerp changes formula.
    for step in range(41):
        nudge(sources, step)
        torch._foreach_lerp_(todays, sources, 1.0 - ema_decay(step, DECAY))
        ema.update_(torch.tensor(True) if step % 2 else None)
        assert same_bits(averages, todays)
    assert ema.step.item() == 41


def test_weight_is_the_closed_form_and_starts_where_told():
    ema = ExponentialMovingAverage(tensors(0), tensors(1), DECAY, step=5)
    # min(decay, (1 + t) / (10 + t)) at t = 5 is 6 / 15: the weight 1 - 0.4, rounded once.
    assert ema.weight().dtype == torch.float32
    assert ema.weight().item() == torch.tensor(1.0 - 6.0 / 15.0, dtype=torch.float32).item()
    ema.step.fill_(10 ** 7)  # late in training the decay is capped
    assert ema.weight().item() == torch.tensor(1.0 - DECAY, dtype=torch.float32).item()


def test_a_skipped_update_changes_no_bit_but_counts(weight_form):
    sources = tensors(0)
    averages = [s.clone() + 0.5 for s in sources]
    todays = [a.clone() for a in averages]
    ema = ExponentialMovingAverage(averages, sources, DECAY)
    todays_step = 0
    for step, skip in enumerate([False, True, True, False, False]):
        if not skip:
            nudge(sources, step)  # a skipped optimizer step does not move the weights
        before = [a.clone() for a in averages]
        ema.update_(torch.tensor(not skip))
        if skip:
            assert same_bits(averages, before)
        else:
            torch._foreach_lerp_(todays, sources, 1.0 - ema_decay(step, DECAY))
            todays_step += 1
            assert same_bits(averages, todays)
    # The schedule's t counts the skipped updates too, as global_step counts skipped steps.
    assert ema.step.item() == 5 and todays_step == 3


def test_mismatched_pairs_are_refused():
    with pytest.raises(ValueError, match="pair 1"):
        ExponentialMovingAverage(tensors(0), tensors(0)[:1] + [torch.zeros(3)] + tensors(0)[2:])
    with pytest.raises(ValueError, match="as many"):
        ExponentialMovingAverage(tensors(0), tensors(0)[:2])
