"""Adaptive gradient clipping against closed-form cases computed by hand (NFNET_SPEC §3).

Numbers are chosen so that the arithmetic is exact in float32 (3-4-5 triangles, powers of two),
which lets most checks be exact equalities rather than tolerances.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nfnet.optim.agc import AdaptiveGradClipper, adaptive_clip_grad_


def param(values, grad, dtype=torch.float32) -> nn.Parameter:
    p = nn.Parameter(torch.tensor(values, dtype=dtype))
    p.grad = torch.tensor(grad, dtype=dtype)
    return p


def conv_case() -> tuple[nn.Parameter, torch.Tensor]:
    """Conv weight (O=2, I=2, kh=1, kw=2): channel 0 clipped, channel 1 not (clipping 0.1).

    ||w0|| = ||(1,1,1,1)|| = 2 -> max 0.2; ||g0|| = ||(0.6, 0.8, 0, 0)|| = 1 -> g0 * 0.2.
    ||w1|| = ||(3,0,4,0)|| = 5 -> max 0.5; ||g1|| = ||(0.1, 0.2, 0.2, 0)|| = 0.3 -> unchanged.
    A whole-tensor norm would clip channel 1 too (||g|| ~ 1.04 > 0.1 * sqrt(29) ~ 0.54).
    """
    w = [[[[1.0, 1.0]], [[1.0, 1.0]]], [[[3.0, 0.0]], [[4.0, 0.0]]]]
    g = [[[[0.6, 0.8]], [[0.0, 0.0]]], [[[0.1, 0.2]], [[0.2, 0.0]]]]
    expected = torch.tensor([[[[0.12, 0.16]], [[0.0, 0.0]]], [[[0.1, 0.2]], [[0.2, 0.0]]]])
    return param(w, g), expected


def test_conv_weight_is_clipped_per_output_channel():
    w, expected = conv_case()
    frac = adaptive_clip_grad_([w], clipping=0.1)
    torch.testing.assert_close(w.grad, expected, rtol=1e-6, atol=0)
    assert frac.item() == 0.5


def test_linear_weight_is_clipped_per_output_row_with_strict_threshold():
    # clipping 0.5: rows ||w|| = 5, 1, 10 -> max 2.5, 0.5, 5.
    # row 0: ||(6,8)|| = 10 > 2.5 -> scaled by 2.5/10 = (1.5, 2);
    # row 1: ||(0,0.25)|| = 0.25 < 0.5 -> unchanged;
    # row 2: ||(3,4)|| = 5 == max -> unchanged (the rule clips only where ||g|| > max_norm).
    w = param([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]], [[6.0, 8.0], [0.0, 0.25], [3.0, 4.0]])
    frac = adaptive_clip_grad_(w, clipping=0.5)
    assert torch.equal(w.grad, torch.tensor([[1.5, 2.0], [0.0, 0.25], [3.0, 4.0]]))
    assert frac.item() == pytest.approx(1 / 3)


def test_zero_initialised_bias_is_capped_at_clipping_times_eps():
    # ||b|| = 0 -> floor eps = 1e-3 -> max_norm = 0.01 * 1e-3 = 1e-5.
    b = param([0.0, 0.0, 0.0, 0.0], [0.6, 0.0, 0.8, 0.0])  # ||g|| = 1
    adaptive_clip_grad_([b], clipping=0.01)
    torch.testing.assert_close(b.grad, torch.tensor([6e-6, 0.0, 8e-6, 0.0]), rtol=1e-6, atol=0)
    # A gradient already below the cap is left exactly as it is.
    small = param([0.0, 0.0], [3e-6, 4e-6])  # ||g|| = 5e-6 < 1e-5
    adaptive_clip_grad_([small], clipping=0.01)
    assert torch.equal(small.grad, torch.tensor([3e-6, 4e-6]))


def test_eps_argument_sets_the_floor():
    b = param([0.0, 0.0], [3.0, 4.0])  # ||g|| = 5; max = 0.5 * 0.25 = 0.125
    adaptive_clip_grad_([b], clipping=0.5, eps=0.25)
    torch.testing.assert_close(b.grad, torch.tensor([0.075, 0.1]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(4,), (4, 1, 1, 1)])
def test_gain_is_clipped_as_one_whole_vector(shape):
    # ||gain|| = ||ones(4)|| = 2 -> max 0.02. Whole-vector: ||(0.03,0,0,0)|| = 0.03 -> 0.02.
    # Per element it would be capped at 0.01 * 1 = 0.01 instead; a timm-style (O,1,1,1) gain
    # has only one non-singleton dim and is one unit too (NFNET_SPEC §3, squeeze rule).
    gain = param([1.0, 1.0, 1.0, 1.0], [0.03, 0.0, 0.0, 0.0])
    gain.data = gain.data.reshape(shape)
    gain.grad = gain.grad.reshape(shape)
    frac = adaptive_clip_grad_([gain], clipping=0.01)
    torch.testing.assert_close(
        gain.grad.flatten(), torch.tensor([0.02, 0.0, 0.0, 0.0]), rtol=1e-6, atol=0
    )
    assert frac.item() == 1.0


def test_scalar_skip_gain():
    # skip_gain initialised to 0: max = 1e-5; g = -2 -> -1e-5.
    s = param(0.0, -2.0)
    adaptive_clip_grad_([s], clipping=0.01)
    torch.testing.assert_close(s.grad, torch.tensor(-1e-5), rtol=1e-6, atol=0)


def test_zero_gradients_and_zero_parameters_are_safe():
    w = param([[3.0, 4.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]])
    z = param([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    frac = adaptive_clip_grad_([w, z], clipping=0.01)
    assert torch.equal(w.grad, torch.zeros(2, 2))
    assert torch.equal(z.grad, torch.zeros(3))
    assert frac.item() == 0.0


def test_tiny_gradient_uses_the_denominator_guard():
    # clipping 1e-4 with ||w|| floored at eps: max = 1e-7. ||g|| = 5e-7 > max, and below the
    # 1e-6 guard, so the factor is max / 1e-6 = 0.1 (not max / ||g|| = 0.2).
    b = param([0.0, 0.0], [3e-7, 4e-7])
    adaptive_clip_grad_([b], clipping=1e-4)
    torch.testing.assert_close(b.grad, torch.tensor([3e-8, 4e-8]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_keep_their_dtype(dtype):
    # Linear case of above in bf16/fp16 (bf16-true / fp16-true training); (1.5, 2) is exact.
    w = param([[3.0, 4.0], [6.0, 8.0]], [[6.0, 8.0], [3.0, 4.0]], dtype=dtype)
    grad_before = w.grad
    adaptive_clip_grad_([w], clipping=0.5)
    assert w.grad is grad_before and w.grad.dtype == dtype
    assert torch.equal(w.grad, torch.tensor([[1.5, 2.0], [3.0, 4.0]], dtype=dtype))


def test_bf16_parameters_and_gradients():
    # ||w|| = 5 -> max 0.5 (clipping 0.1); g = (3, 4) -> (0.3, 0.4), rounded once to bf16.
    w = param([[3.0, 4.0]], [[3.0, 4.0]], dtype=torch.bfloat16)
    adaptive_clip_grad_([w], clipping=0.1)
    assert torch.equal(w.grad, torch.tensor([[0.3, 0.4]]).to(torch.bfloat16))


def test_fp16_norms_are_computed_in_float32():
    # ||g|| = ||(40000, 30000)|| = 50000 fits fp16, but its square (and, with more elements, the
    # norm itself: here ||(40000, 30000, 40000, 30000)|| = 70711 > 65504) does not. In float32
    # the factor is 0.01 / 70710.68 and the gradient survives; an fp16 norm would be inf and
    # zero the gradient.
    w = param([1.0, 0.0, 0.0, 0.0], [40000.0, 30000.0, 40000.0, 30000.0], dtype=torch.float16)
    adaptive_clip_grad_([w], clipping=0.01)
    expected = torch.tensor([40000.0, 30000.0, 40000.0, 30000.0]) * (0.01 / 70710.678)
    torch.testing.assert_close(w.grad.float(), expected, rtol=2e-3, atol=0)


def test_parameters_without_gradient_are_skipped_and_not_counted():
    w, expected = conv_case()
    frozen = nn.Parameter(torch.ones(3))  # .grad is None
    frac = adaptive_clip_grad_([frozen, w], clipping=0.1)
    assert frozen.grad is None
    torch.testing.assert_close(w.grad, expected, rtol=1e-6, atol=0)
    assert frac.item() == 0.5


def mixed_parameters() -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    """4 tensors, 7 units, 3 clipped at clipping 0.1 (conv: 1 of 2, linear: 1 of 3, bias: 1,
    gain: 0), with their expected gradients."""
    conv, conv_expected = conv_case()
    # clipping 0.1: rows ||w|| = 5, 10, 1 -> max 0.5, 1, 0.1; ||g|| = 5, 0.5, 0.05.
    linear = param([[3.0, 4.0], [6.0, 8.0], [1.0, 0.0]], [[3.0, 4.0], [0.3, 0.4], [0.03, 0.04]])
    linear_expected = torch.tensor([[0.3, 0.4], [0.3, 0.4], [0.03, 0.04]])
    bias = param([0.0, 0.0], [0.3, 0.4])  # max 1e-4 -> (6e-5, 8e-5)
    bias_expected = torch.tensor([6e-5, 8e-5])
    gain = param([1.0, 1.0, 1.0, 1.0], [0.05, 0.05, 0.05, 0.05])  # 0.1 < 0.2: unchanged
    gain_expected = torch.tensor([0.05, 0.05, 0.05, 0.05])
    return [conv, linear, bias, gain], [conv_expected, linear_expected, bias_expected, gain_expected]


def test_fraction_clipped_over_several_tensors_is_exact():
    params, expected = mixed_parameters()
    frac = adaptive_clip_grad_(params, clipping=0.1)
    assert frac.shape == () and frac.dtype == torch.float32
    torch.testing.assert_close(frac, torch.tensor(3 / 7))
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=0)


def test_only_grad_is_written_in_place():
    params, _ = mixed_parameters()
    data = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    pointers = [g.data_ptr() for g in grads]
    adaptive_clip_grad_(params, clipping=0.1)
    for p, d, g, ptr in zip(params, data, grads, pointers):
        assert torch.equal(p.detach(), d)
        assert p.grad is g and p.grad.data_ptr() == ptr
        assert p.grad.grad_fn is None


def test_no_parameters_returns_zero():
    assert adaptive_clip_grad_([], clipping=0.01).item() == 0.0
    assert adaptive_clip_grad_([nn.Parameter(torch.ones(2))], clipping=0.01).item() == 0.0


def test_sparse_gradient_is_refused_with_a_clear_error():
    p = nn.Parameter(torch.ones(3, 2))
    p.grad = torch.ones(3, 2).to_sparse()
    with pytest.raises(ValueError, match="only dense gradients"):
        adaptive_clip_grad_([p], clipping=0.01)


def test_clipper_matches_closed_form_and_reports_per_group_fractions():
    params, expected = mixed_parameters()
    stage = {"stem.conv0.weight": "stem", "stages.0.0.se.fc0.weight": "stage0",
             "stages.0.0.conv0.bias": "stage0", "stages.1.0.conv0.gain": "stage1"}
    clipper = AdaptiveGradClipper(list(zip(stage, params)), clipping=0.1, group_fn=stage.get)
    frac = clipper.clip_()
    torch.testing.assert_close(frac, torch.tensor(3 / 7))
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=0)
    # stem: 1 of 2 units; stage 0: linear 1 of 3 plus bias 1 of 1 -> 2 of 4; stage 1: 0 of 1.
    fractions = clipper.group_fractions()
    assert list(fractions) == ["stem", "stage0", "stage1"]
    assert [f.item() for f in fractions.values()] == [0.5, 0.5, 0.0]


def test_clipper_follows_gradients_that_come_and_go():
    params, _ = mixed_parameters()
    clipper = AdaptiveGradClipper(params, clipping=0.1)
    params[1].grad = None  # e.g. a layer unused on this step: the 3 linear units drop out
    torch.testing.assert_close(clipper.clip_(), torch.tensor(2 / 4))
    assert params[1].grad is None
    fresh, expected = mixed_parameters()
    for p, f in zip(params, fresh):
        p.grad = f.grad
    torch.testing.assert_close(clipper.clip_(), torch.tensor(3 / 7))
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=0)


def _random_set(dtype=torch.float32) -> list[tuple[str, nn.Parameter]]:
    """Conv, linear, gain, bias and scalar tensors with gradients around the threshold."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"stem.conv.weight": (8, 3, 3, 3), "stem.conv.gain": (8, 1, 1, 1), "stem.conv.bias": (8,),
              "stages.0.0.conv.weight": (16, 8, 1, 1), "stages.0.0.skip_gain": (),
              "stages.0.0.se.fc0.weight": (4, 16), "stages.0.0.se.fc0.bias": (4,), "stages.1.0.gain": (16,)}
    out = []
    for name, shape in shapes.items():
        weight = torch.randn(shape, generator=gen)
        # ||g_unit|| = s * 0.01 * ||w_unit|| (plus noise), s in [0.5, 1.5): about half clip.
        units = shape[0] if len(shape) > 1 and sum(d != 1 for d in shape) > 1 else 1
        s = (0.5 + torch.rand(units, generator=gen)).view((units,) + (1,) * (len(shape) - 1) if units > 1 else ())
        grad = 0.01 * s * (weight + 0.01 * torch.randn(shape, generator=gen))
        p = nn.Parameter(weight.to(dtype))
        p.grad = grad.to(dtype)
        out.append((name, p))
    return out


@pytest.mark.parametrize("keep", ["all", "rows only", "wholes only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_tensor_by_tensor_order_equals_the_batched_order_bit_for_bit(monkeypatch, keep, dtype):
    """On CPU each weight tensor is scaled right after its norms; on CUDA/XLA all factors are
    batched. Same arithmetic in another order: the results must be identical, not just close."""
    from nfnet.optim import agc
    from nfnet.optim.param_groups import stage_of

    def run(interleave: bool):
        monkeypatch.setattr(agc, "_INTERLEAVE_DEVICES", frozenset({"cpu"} if interleave else ()))
        named = _random_set(dtype)
        if keep != "all":
            named = [(n, p) for n, p in named if (agc.unit_dims(p.shape) is None) == (keep == "wholes only")]
        clipper = AdaptiveGradClipper(named, clipping=0.01, group_fn=stage_of)
        assert clipper._plan_for(tuple([True] * len(named)), [p for _, p in named])[0][0].interleave is interleave
        frac = clipper.clip_()
        functional = _random_set(dtype)
        functional = [p for n, p in functional if n in dict(named)]
        functional_frac = adaptive_clip_grad_(functional, clipping=0.01)
        return frac, clipper.last_group_fractions, [p.grad for _, p in named], functional_frac, [p.grad for p in functional]

    interleaved, batched = run(True), run(False)
    assert 0 < batched[0].item() < 1  # both branches of the rule are exercised
    torch.testing.assert_close(interleaved[0], batched[0], rtol=0, atol=0)
    torch.testing.assert_close(interleaved[1], batched[1], rtol=0, atol=0)
    torch.testing.assert_close(interleaved[3], batched[3], rtol=0, atol=0)
    for a, b in zip(interleaved[2] + interleaved[4], batched[2] + batched[4]):
        assert a.dtype == dtype and torch.equal(a, b)


def test_clipper_group_fn_needs_names():
    with pytest.raises(ValueError, match="named parameters"):
        AdaptiveGradClipper([nn.Parameter(torch.ones(2))], group_fn=str)


@pytest.mark.parametrize("interleave", [True, False], ids=["cpu-order", "batched-order"])
@pytest.mark.parametrize("backend", ["aot_eager"])
def test_traces_as_one_graph_without_host_sync(backend, interleave, monkeypatch):
    """fullgraph=True fails on any graph break: .item(), `if tensor:`, data-dependent shapes.
    Both orders are traced: tensor by tensor (CPU) and batched (CUDA/XLA)."""
    from nfnet.optim import agc

    monkeypatch.setattr(agc, "_INTERLEAVE_DEVICES", frozenset({"cpu"} if interleave else ()))
    torch._dynamo.reset()
    params, expected = mixed_parameters()

    def clip(ps):
        return adaptive_clip_grad_(ps, 0.1)

    frac = torch.compile(clip, fullgraph=True, backend=backend)(params)
    torch.testing.assert_close(frac, torch.tensor(3 / 7))
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=0)


def test_clipper_compiles_with_inductor_fullgraph():
    torch._dynamo.reset()
    params, expected = mixed_parameters()
    names = ["stem.a.weight", "stem.b.weight", "head.bias", "head.gain"]
    clipper = AdaptiveGradClipper(list(zip(names, params)), 0.1, group_fn=lambda n: n[:4])
    frac = torch.compile(clipper.clip_, fullgraph=True)()
    torch.testing.assert_close(frac, torch.tensor(3 / 7))
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=0)
    torch.testing.assert_close(clipper.last_group_fractions, torch.tensor([2 / 5, 1 / 2]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_on_cuda():
    params, expected = mixed_parameters()
    for p in params:
        p.data = p.data.cuda()
        p.grad = p.grad.cuda()
    clipper = AdaptiveGradClipper(params, 0.1)
    clipper.clip_()  # plans and index tensors are built on the first call
    fresh, expected = mixed_parameters()
    for p, f in zip(params, fresh):
        p.grad = f.grad.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        frac = clipper.clip_()
        adaptive_clip_grad_(params, 0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(frac.cpu(), torch.tensor(3 / 7))
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad.cpu(), e, rtol=1e-6, atol=0)
