"""nfnet.optim.SGD against torch.optim.SGD (the reference: NFNET_SPEC §3-4, "this matches
torch.optim.SGD semantics"), and its device-side skip.

Bitwise comparisons view float tensors as integers, so that NaN == NaN and -0.0 != +0.0.
"""

from __future__ import annotations

import io

import pytest
import torch

from nfnet.optim import SGD

LR, MOMENTUM, WEIGHT_DECAY = 0.37, 0.9, 2e-5
SHAPES = [(8, 4, 3, 3), (8,), (10, 12), ()]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.int32)


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b))


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in SHAPES]
    # A channels_last conv weight, as with model.channels_last=true.
    params[0].data = params[0].data.contiguous(memory_format=torch.channels_last)
    return params


def groups(params):
    """The recipe's layout: a decayed group and one without decay (gains, biases)."""
    return [{"params": params[:1] + params[2:3], "weight_decay": WEIGHT_DECAY},
            {"params": params[1:2] + params[3:], "weight_decay": 0.0}]


def random_grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=gen) for shape in SHAPES]


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone().contiguous(memory_format=torch.channels_last) if g.ndim == 4 else g.clone()


def buffers(optimizer, params):
    return [optimizer.state[p]["momentum_buffer"] for p in params]


def lr_at(step: int) -> float:
    return LR * (step + 1) / 4


@pytest.mark.parametrize("guarded", [False, True], ids=["plain", "guarded"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_steps_equal_torch_sgd_bit_for_bit(guarded, nesterov):
    ours_p, ref_p = make_params(), make_params()
    ours = SGD(groups(ours_p), lr=LR, momentum=MOMENTUM, nesterov=nesterov)
    ref = torch.optim.SGD(groups(ref_p), lr=LR, momentum=MOMENTUM, nesterov=nesterov)
    for step in range(5):
        grads = random_grads(step)
        set_grads(ours_p, grads)
        set_grads(ref_p, grads)
        for optimizer in (ours, ref):
            for group in optimizer.param_groups:  # a schedule changing lr every step
                group["lr"] = lr_at(step)
        ours.apply_step = torch.tensor(True) if guarded else None
        ours.step()
        ref.step()
        assert same_bits(ours_p, ref_p)
        assert same_bits(buffers(ours, ours_p), buffers(ref, ref_p))


def test_gradients_are_left_as_they_were():
    params = make_params()
    optimizer = SGD(groups(params), lr=LR, momentum=MOMENTUM, nesterov=True)
    for guarded in (False, True, False):
        grads = random_grads(0)
        set_grads(params, grads)
        optimizer.apply_step = torch.tensor(True) if guarded else None
        optimizer.step()
        assert same_bits([p.grad for p in params], grads)


def test_without_momentum_and_with_dampening_as_torch():
    for kwargs in ({"momentum": 0.0}, {"momentum": MOMENTUM, "dampening": 0.3}):
        ours_p, ref_p = make_params(), make_params()
        ours = SGD(groups(ours_p), lr=LR, **kwargs)
        ref = torch.optim.SGD(groups(ref_p), lr=LR, **kwargs)
        for step in range(3):
            set_grads(ours_p, random_grads(step))
            set_grads(ref_p, random_grads(step))
            ours.step()
            ref.step()
        assert same_bits(ours_p, ref_p)


def test_parameters_without_gradient_are_untouched_as_in_torch():
    ours_p, ref_p = make_params(), make_params()
    ours = SGD(groups(ours_p), lr=LR, momentum=MOMENTUM, nesterov=True)
    ref = torch.optim.SGD(groups(ref_p), lr=LR, momentum=MOMENTUM, nesterov=True)
    for step in range(4):
        grads = random_grads(step)
        for params in (ours_p, ref_p):
            set_grads(params, grads)
            if step % 2 == 0:
                params[2].grad = None  # the classifier weight, say, on alternate steps
        ours.apply_step = torch.tensor(True) if step >= 2 else None
        ours.step()
        ref.step()
        assert same_bits(ours_p, ref_p)
    assert same_bits(buffers(ours, ours_p), buffers(ref, ref_p))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("nesterov", [True, False])
def test_a_skipped_step_changes_no_bit_and_is_as_if_it_never_happened(bad, nesterov):
    ours_p, ref_p = make_params(), make_params()
    ours = SGD(groups(ours_p), lr=LR, momentum=MOMENTUM, nesterov=nesterov)
    ref = torch.optim.SGD(groups(ref_p), lr=LR, momentum=MOMENTUM, nesterov=nesterov)
    ref_step = 0
    for step, skip in enumerate([False, True, False, True, True, False]):
        grads = random_grads(step)
        if skip:
            for g in grads:
                g.view(-1)[-1] = bad  # one bad element per tensor, the rest finite
            # Zeros of both signs in weights and momentum, which a careless mask turns into +0.
            with torch.no_grad():
                for t in ours_p + ref_p + buffers(ours, ours_p) + buffers(ref, ref_p):
                    t[(0,) * t.ndim] = -0.0
        set_grads(ours_p, grads)
        before = [p.detach().clone() for p in ours_p]
        before_bufs = [b.clone() for b in buffers(ours, ours_p)] if step else []
        ours.apply_step = torch.tensor(not skip)
        ours.step()
        if skip:
            assert same_bits(ours_p, before)
            assert same_bits(buffers(ours, ours_p), before_bufs)
            continue
        set_grads(ref_p, grads)
        for group in ref.param_groups:
            group["lr"] = LR
        ref.step()
        ref_step += 1
        assert same_bits(ours_p, ref_p)
        assert same_bits(buffers(ours, ours_p), buffers(ref, ref_p))
    assert ref_step == 3


def test_a_skipped_first_step_leaves_the_first_applied_one_torchs_first_step():
    ours_p, ref_p = make_params(), make_params()
    ours = SGD(groups(ours_p), lr=LR, momentum=MOMENTUM, nesterov=True)
    ref = torch.optim.SGD(groups(ref_p), lr=LR, momentum=MOMENTUM, nesterov=True)
    set_grads(ours_p, [torch.full(s, float("nan")) for s in SHAPES])
    ours.apply_step = torch.tensor(False)
    ours.step()
    assert same_bits(ours_p, make_params())
    grads = random_grads(1)
    # Zeros of both signs in the first gradient: torch copies them into the buffers as they are.
    grads[1][:2] = torch.tensor([0.0, -0.0])
    set_grads(ours_p, grads)
    set_grads(ref_p, grads)
    ours.apply_step = torch.tensor(True)
    ours.step()
    ref.step()
    assert same_bits(ours_p, ref_p)
    assert same_bits(buffers(ours, ours_p), buffers(ref, ref_p))


def test_tensor_lr_is_torchs_compiled_update_and_filled_in_place_by_a_scheduler():
    """A 0-dim lr tensor gives p - (lr * d), what torch.optim.SGD computes for a tensor lr under
    torch.compile: the reference here is torch's own d with that last line written out, and
    torch's float-lr step within one rounding."""
    lr = torch.tensor(LR)
    ours_p, ref_p = make_params(), make_params()
    ours = SGD(groups(ours_p), lr=lr, momentum=MOMENTUM, nesterov=True)
    # torch.optim.SGD with lr 0 leaves the weights and gives the buffers; d is then rebuilt.
    ref = torch.optim.SGD(groups(ref_p), lr=0.0, momentum=MOMENTUM, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(ours, lambda step: 1.0 / (step + 1))
    expected = [p.detach().clone() for p in ref_p]
    for step in range(3):
        grads = random_grads(step)
        set_grads(ours_p, grads)
        set_grads(ref_p, grads)
        ours.apply_step = torch.tensor(True) if step else None
        ours.step()
        ref.step()
        for group in ref.param_groups:
            for p in group["params"]:
                d = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                d = d.add(ref.state[p]["momentum_buffer"], alpha=MOMENTUM)
                i = next(i for i, q in enumerate(ref_p) if q is p)
                expected[i] = expected[i] - (lr * d)
        with torch.no_grad():
            for p, e in zip(ref_p, expected):
                p.copy_(e)
        scheduler.step()
        assert ours.param_groups[0]["lr"] is lr  # filled in place: a CUDA graph stays valid
        assert same_bits(ours_p, ref_p)
    assert lr.item() == pytest.approx(LR / 4)


def test_state_dict_round_trip_resumes_bit_exactly():
    params, resumed_p = make_params(), make_params()
    optimizer = SGD(groups(params), lr=LR, momentum=MOMENTUM, nesterov=True)
    for step in range(2):
        set_grads(params, random_grads(step))
        optimizer.apply_step = torch.tensor(True)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    with torch.no_grad():
        for p, q in zip(resumed_p, params):
            p.copy_(q)
    resumed = SGD(groups(resumed_p), lr=LR, momentum=MOMENTUM, nesterov=True)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for step in range(2, 4):
        for params_, opt in ((params, optimizer), (resumed_p, resumed)):
            set_grads(params_, random_grads(step))
            opt.apply_step = torch.tensor(step != 2)
            opt.step()
    assert same_bits(resumed_p, params)
    assert same_bits(buffers(resumed, resumed_p), buffers(optimizer, params))


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_layout_is_torch_sgds(direction):
    """Checkpoints written with torch.optim.SGD (today's) load here, and back."""
    writer_p, reader_p, ref_p = make_params(), make_params(), make_params()
    writer_cls, reader_cls = (torch.optim.SGD, SGD) if direction == "torch_to_ours" else (SGD, torch.optim.SGD)
    writer = writer_cls(groups(writer_p), lr=LR, momentum=MOMENTUM, nesterov=True)
    ref = torch.optim.SGD(groups(ref_p), lr=LR, momentum=MOMENTUM, nesterov=True)
    for step in range(2):
        for params, opt in ((writer_p, writer), (ref_p, ref)):
            set_grads(params, random_grads(step))
            opt.step()
    with torch.no_grad():
        for p, q in zip(reader_p, writer_p):
            p.copy_(q)
    reader = reader_cls(groups(reader_p), lr=LR, momentum=MOMENTUM, nesterov=True)
    reader.load_state_dict(writer.state_dict())
    for params, opt in ((reader_p, reader), (ref_p, ref)):
        set_grads(params, random_grads(2))
        opt.step()
    assert same_bits(reader_p, ref_p)


def test_invalid_settings_are_refused():
    params = make_params()
    with pytest.raises(ValueError, match="Nesterov"):
        SGD(params, lr=LR, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="0-dim"):
        SGD(params, lr=torch.tensor([LR]))
    optimizer = SGD(params, lr=LR, momentum=MOMENTUM, dampening=0.1)
    set_grads(params, random_grads(0))
    optimizer.apply_step = torch.tensor(True)
    with pytest.raises(ValueError, match="dampening 0"):
        optimizer.step()
    optimizer.apply_step = torch.tensor(1.0)
    with pytest.raises(ValueError, match="bool"):
        optimizer.step()
