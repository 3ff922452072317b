"""The device-side step on CUDA: bit-exact with torch's CUDA paths, no host synchronisation, and
one CUDA graph holding the whole step (finite flag, AGC, SGD with a tensor lr, EMA, counters).
Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch

from test_sgd_step import SHAPES, buffers, groups, make_params, random_grads, same_bits
from test_step_guard import BAD, guarded, set_grads, tiny

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
LR, MOMENTUM = 0.37, 0.9


def cuda_params():
    return [torch.nn.Parameter(p.detach().cuda()) for p in make_params()]


def set_cuda_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g.cuda().contiguous(memory_format=torch.channels_last) if g.ndim == 4 else g.cuda()


def test_sgd_equals_torch_foreach_sgd_on_cuda_and_skips_bitwise():
    from nfnet.optim import SGD

    ours_p, ref_p = cuda_params(), cuda_params()
    ours = SGD(groups(ours_p), lr=LR, momentum=MOMENTUM, nesterov=True)
    ref = torch.optim.SGD(groups(ref_p), lr=LR, momentum=MOMENTUM, nesterov=True, foreach=True)
    for step in range(5):
        grads = random_grads(step)
        skip = step == 2
        if skip:
            for g in grads:
                g.view(-1)[-1] = float("nan")
        set_cuda_grads(ours_p, grads)
        before = [p.detach().clone() for p in ours_p]
        ours.apply_step = torch.tensor(not skip, device="cuda")
        ours.step()
        if skip:
            assert same_bits(ours_p, before)
            continue
        set_cuda_grads(ref_p, grads)
        ref.step()
        assert same_bits(ours_p, ref_p)
        assert same_bits(buffers(ours, ours_p), buffers(ref, ref_p))


def test_ema_fused_form_equals_todays_lerp_on_cuda():
    from nfnet.optim import ExponentialMovingAverage
    from nfnet.optim.schedule import ema_decay

    sources = [torch.randn(s, device="cuda") for s in SHAPES]
    todays = [s.clone() + 0.5 for s in sources]
    averages = [t.clone() for t in todays]
    ema = ExponentialMovingAverage(averages, sources, 0.99999)
    for step in range(20):
        torch._foreach_add_(sources, 0.01)
        torch._foreach_lerp_(todays, sources, 1.0 - ema_decay(step, 0.99999))
        ema.update_(torch.tensor(True, device="cuda"))
        assert same_bits(averages, todays)


def set_model_grads(model, step: int) -> None:
    """test_step_guard's gradients for `step` (NaN/Inf on the BAD steps), on the GPU."""
    twin = tiny()
    set_grads(twin, step)
    for p, q in zip(model.parameters(), twin.parameters()):
        p.grad = q.grad.cuda()


def _cuda_guarded(lr: torch.Tensor):
    model = tiny().cuda()
    guard, ema = guarded(model, lr)
    return model, guard, ema


def test_whole_step_never_synchronises_with_the_host():
    model, guard, _ = _cuda_guarded(torch.tensor(LR, device="cuda"))
    set_model_grads(model, 0)
    guard.step()  # plans, scratch and buffers are made on the first step
    set_model_grads(model, 1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        guard.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert guard.counts() == (1, 1)


def test_whole_step_replays_as_one_cuda_graph():
    lr = torch.tensor(LR, device="cuda")
    model, guard, ema = _cuda_guarded(lr)
    eager_model, eager_guard, eager_ema = _cuda_guarded(torch.tensor(LR, device="cuda"))
    set_model_grads(model, 0)
    static_grads = [p.grad for p in model.parameters()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up, as CUDA graph capture requires
        guard.step()
    torch.cuda.current_stream().wait_stream(side)
    set_model_grads(eager_model, 0)
    eager_guard.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        guard.step()
    for step in range(1, 6):
        set_model_grads(eager_model, step)
        for static, fresh in zip(static_grads, (p.grad for p in eager_model.parameters())):
            static.copy_(fresh)
        new_lr = LR / (step + 1)
        lr.fill_(new_lr)  # what LambdaLR does to a tensor lr (one tensor, every group)
        eager_guard.optimizer.param_groups[0]["lr"].fill_(new_lr)
        graph.replay()
        eager_guard.step()
        assert bool(guard.finite) == (step not in BAD)
        assert same_bits(list(model.parameters()), list(eager_model.parameters()))
        assert same_bits(ema._buckets[0][0], eager_ema._buckets[0][0])
    assert guard.counts() == eager_guard.counts()
