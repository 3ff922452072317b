"""StepGuard and grads_finite: non-finite steps skipped on the device, against the step
NFNetClassifier makes today (a host read of the finiteness, then AGC, torch.optim.SGD and the
EMA lerp, or nothing), and the whole step under torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nfnet.optim import (SGD, AdaptiveGradClipper, ExponentialMovingAverage, StepGuard,
                         adaptive_clip_grad_, grads_finite)
from nfnet.optim.param_groups import agc_parameters, optimizer_param_groups
from nfnet.optim.schedule import ema_decay

LR, MOMENTUM, WEIGHT_DECAY, CLIPPING, DECAY = 0.2, 0.9, 1e-3, 0.01, 0.99999
BAD = {1: float("nan"), 3: float("inf"), 4: float("-inf")}  # step -> a value in one gradient


class Tiny(nn.Module):
    """Every parameter role of an NFNet: conv weight and gain/bias, a scalar skip gain, an SE
    linear, and a classifier (decayed, exempt from AGC)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gain = nn.Parameter(torch.ones(4))
        self.skip_gain = nn.Parameter(torch.zeros(()))
        self.se = nn.Linear(4, 2)
        self.classifier = nn.Linear(4, 5)


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def bits(t):
    return t.detach().reshape(-1).view(torch.int32)


def same_bits(a, b) -> bool:
    return all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b))


def set_grads(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    if step in BAD:
        # One bad element, in the classifier weight (not clipped) or a conv weight (clipped).
        target = model.classifier.weight if step % 2 else model.conv.weight
        target.grad.view(-1)[1] = BAD[step]


class TodaysStep:
    """NFNetClassifier's step as it is now: finite? (host read) -> AGC -> torch SGD -> EMA."""

    def __init__(self, model: Tiny):
        self.model = model
        self.optimizer = torch.optim.SGD(optimizer_param_groups(model, WEIGHT_DECAY), lr=LR,
                                         momentum=MOMENTUM, nesterov=True)
        self.ema = [p.detach().clone() for p in model.parameters()]
        self.global_step, self.skipped, self.consecutive = 0, 0, 0

    def step(self) -> None:
        grads = [p.grad for p in self.model.parameters()]
        if bool(torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all()):
            adaptive_clip_grad_(agc_parameters(self.model), CLIPPING)
            self.optimizer.step()
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.model.parameters()],
                                 1.0 - ema_decay(self.global_step, DECAY))
            self.consecutive = 0
        else:
            self.skipped += 1
            self.consecutive += 1
        self.global_step += 1


def guarded(model: Tiny, lr: float | torch.Tensor = LR):
    optimizer = SGD(optimizer_param_groups(model, WEIGHT_DECAY), lr=lr, momentum=MOMENTUM,
                    nesterov=True)
    clipper = AdaptiveGradClipper(agc_parameters(model), CLIPPING)
    sources = list(model.parameters())
    ema = ExponentialMovingAverage([p.detach().clone() for p in sources], sources, DECAY)
    return StepGuard(optimizer, clipper, ema), ema


def test_grads_finite_sees_every_nan_and_inf():
    grads = [torch.randn(3, 4), torch.randn(5), torch.randn(()), torch.randn(2, 2, dtype=torch.bfloat16)]
    flag = grads_finite(grads)
    assert flag.dtype == torch.bool and flag.ndim == 0 and bool(flag)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for index in range(len(grads)):
            spoiled = [g.clone() for g in grads]
            spoiled[index].view(-1)[-1] = bad
            assert not bool(grads_finite(spoiled))
    # A max-abs, not a 2-norm: huge but finite gradients are finite.
    assert bool(grads_finite([torch.full((1000,), 3e38)]))


def test_agc_on_non_finite_gradients_raises_nothing_and_returns_a_tensor():
    model = tiny()
    set_grads(model, 1)
    clipper = AdaptiveGradClipper(agc_parameters(model), CLIPPING)
    for _ in range(2):
        fraction = clipper.clip_()
        assert isinstance(fraction, torch.Tensor) and fraction.ndim == 0
    model.conv.weight.grad.fill_(float("inf"))
    assert adaptive_clip_grad_(agc_parameters(model), CLIPPING).ndim == 0


def test_guarded_steps_equal_todays_steps_and_skip_the_same_ones():
    ours, todays = tiny(), TodaysStep(tiny())
    guard, ema = guarded(ours)
    for step in range(7):
        set_grads(ours, step)
        set_grads(todays.model, step)
        guard.step()
        todays.step()
        assert bool(guard.finite) == (step not in BAD)
        assert same_bits(ours.parameters(), todays.model.parameters())
        assert same_bits(ema._buckets[0][0], todays.ema)
        assert guard.counts() == (todays.skipped, todays.consecutive)
    assert guard.counts() == (3, 0) and ema.step.item() == 7


def test_counts_survive_a_checkpoint_round_trip():
    guard, _ = guarded(tiny())
    guard.load_counts(12, 2)
    assert guard.counts() == (12, 2)
    model = guard.optimizer.param_groups[0]["params"][0]
    model.grad = torch.full(model.shape, float("nan"))
    guard.before_step()
    guard.optimizer.step()
    guard.after_step()
    assert guard.counts() == (13, 3)


def test_guard_needs_the_device_side_optimizer_and_its_two_halves_in_order():
    model = tiny()
    with pytest.raises(TypeError, match="nfnet.optim.SGD"):
        StepGuard(torch.optim.SGD(model.parameters(), lr=LR))
    guard, _ = guarded(model)
    set_grads(model, 0)
    guard.step()
    with pytest.raises(RuntimeError, match="before_step"):
        guard.after_step()  # a second EMA update and count on the same flag


def test_whole_step_compiles_fullgraph_and_skips_inside_the_graph():
    """finite flag -> AGC -> SGD (tensor lr) -> EMA -> counters as one graph: no host read
    anywhere (one would break the graph), and the skip works on traced code."""
    torch._dynamo.reset()
    lr = torch.tensor(LR)
    eager_model, compiled_model = tiny(), tiny()
    eager_guard, eager_ema = guarded(eager_model, lr.clone())
    compiled_guard, compiled_ema = guarded(compiled_model, lr)

    def whole_step() -> None:
        compiled_guard.before_step()
        compiled_guard.optimizer.step()
        compiled_guard.after_step()

    compiled_step = torch.compile(whole_step, fullgraph=True)
    for step in range(4):
        set_grads(eager_model, step)
        set_grads(compiled_model, step)
        before = [p.detach().clone() for p in compiled_model.parameters()]
        before_ema = [a.clone() for a in compiled_ema._buckets[0][0]]
        eager_guard.step()
        compiled_step()
        if step in BAD:
            assert same_bits(compiled_model.parameters(), before)
            assert same_bits(compiled_ema._buckets[0][0], before_ema)
        # Generated kernels may fuse the arithmetic differently: equal up to rounding.
        for a, b in zip(compiled_model.parameters(), eager_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(compiled_ema._buckets[0][0], eager_ema._buckets[0][0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert compiled_guard.counts() == eager_guard.counts() == (2, 1)
