"""WSConv2d, TF-SAME padding, gamma activations, squeeze-excite and stochastic depth, against
NFNET_SPEC.md §1.3, §1.6, §1.7, §1.9, §1.11."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nfnet.models import GAMMAS, GammaAct, SqueezeExcite, StochasticDepth, WSConv2d
from nfnet.models import layers

# NFNET_SPEC.md §1.7, verbatim.
SPEC_GAMMAS = {
    "gelu": 1.7015043497085571, "relu": 1.7139588594436646, "silu": 1.7881293296813965,
    "relu6": 1.7131484746932983, "leaky_relu": 1.70590341091156, "elu": 1.2716004848480225,
    "celu": 1.270926833152771, "selu": 1.0008515119552612, "tanh": 1.5939117670059204,
    "sigmoid": 4.803835391998291, "softplus": 1.9203323125839233,
    "soft_sign": 2.338853120803833, "log_sigmoid": 1.9193484783172607,
    "log_softmax": 1.0002083778381348, "glu": 1.8484294414520264, "identity": 1.0,
}
SPEC_WS_EPS = 1e-4  # §1.6: max(fan_in * var, 1e-4)


def spec_ws(w: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """§1.6 in float64: (w - mean) * gain * rsqrt(max(fan_in * var, 1e-4)), population var
    over (I, kh, kw) per output channel."""
    fan_in = np.prod(w.shape[1:])
    mean = w.mean(axis=(1, 2, 3), keepdims=True)
    var = w.var(axis=(1, 2, 3), keepdims=True)  # ddof=0
    scale = gain.reshape(-1, 1, 1, 1) / np.sqrt(np.maximum(fan_in * var, SPEC_WS_EPS))
    return (w - mean) * scale


def test_ws_matches_spec_formula():
    torch.manual_seed(0)
    conv = WSConv2d(12, 9, 3, groups=3)
    with torch.no_grad():
        conv.weight.mul_(3).add_(0.5)
        conv.gain.uniform_(0.5, 2.0)
    got = conv.standardized_weight().detach().double().numpy()
    ref = spec_ws(conv.weight.detach().double().numpy(), conv.gain.detach().double().numpy())
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    # Standardised rows have zero mean and sum of squares gain^2: fan_in is per group.
    assert conv.fan_in == (12 // 3) * 3 * 3
    np.testing.assert_allclose((ref ** 2).sum(axis=(1, 2, 3)), conv.gain.detach().numpy() ** 2,
                               rtol=1e-5)


def test_ws_eps_is_a_max_on_fan_in_times_population_variance():
    conv = WSConv2d(4, 2, 1)
    fan_in = 4
    # Row 0: values +-d, population variance d^2 (sample variance would be 4/3 d^2);
    # fan_in*var = 4e-6 < 1e-4, so the scale is 1/sqrt(1e-4) = 100 exactly.
    # Row 1: +-1, fan_in*var = 4, scale 1/2 (unaffected by eps).
    d = 1e-3
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[d, -d, d, -d], [1.0, -1.0, 1.0, -1.0]]).view(2, 4, 1, 1))
        conv.gain.fill_(1.0)
    w_hat = conv.standardized_weight().detach().view(2, 4)
    assert fan_in * d * d < SPEC_WS_EPS
    torch.testing.assert_close(w_hat[0], torch.tensor([d, -d, d, -d]) * 100.0)
    torch.testing.assert_close(w_hat[1], torch.tensor([1.0, -1.0, 1.0, -1.0]) * 0.5)
    # A 'var + eps' form would give d / sqrt(4 * (d^2 + 1e-4)) ~ 0.05, not 0.1.
    assert not math.isclose(w_hat[0, 0].item(), d / math.sqrt(fan_in * (d * d + 1e-4)), rel_tol=0.1)


def test_ws_parameters_and_init():
    torch.manual_seed(0)
    conv = WSConv2d(128, 256, 3, groups=1)
    assert dict((n, tuple(p.shape)) for n, p in conv.named_parameters()) == {
        "weight": (256, 128, 3, 3), "bias": (256,), "gain": (256,)}
    assert torch.equal(conv.gain, torch.ones(256)) and torch.equal(conv.bias, torch.zeros(256))
    # §1.9: w ~ N(0, 1/fan_in), untruncated.
    w = conv.weight.detach()
    std = math.sqrt(1.0 / (128 * 9))
    assert abs(w.std().item() / std - 1) < 0.01 and abs(w.mean().item()) < 0.01 * std
    assert (w.abs() > 3 * std).float().mean().item() > 1e-3  # a +-2 sigma truncation has none


def test_ws_gradients_flow_through_the_standardisation():
    conv = WSConv2d(3, 4, 3)
    conv(torch.randn(2, 3, 8, 8)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conv.parameters())


def spec_same_pads(size, kernel, stride):
    """TF 'SAME' (§1.11): out = ceil(size/stride); total pad split with the extra after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


@pytest.mark.parametrize("size", [7, 8, 15, 16])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_pads_like_tf_same(size, stride):
    torch.manual_seed(0)
    conv = WSConv2d(3, 5, 3, stride=stride)
    x = torch.randn(2, 3, size, size + 1)
    t, b = spec_same_pads(size, 3, stride)
    left, right = spec_same_pads(size + 1, 3, stride)
    if stride == 2 and size % 2 == 0:
        assert (t, b) == (0, 1)  # §1.11: 3x3 stride 2 on an even input pads (0, 1)
    ref = F.conv2d(F.pad(x, (left, right, t, b)), conv.standardized_weight(), conv.bias, stride)
    out = conv(x)
    assert out.shape[-2:] == (math.ceil(size / stride), math.ceil((size + 1) / stride))
    torch.testing.assert_close(out, ref)
    cl = conv(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-5, atol=1e-5)


def test_padding_is_static_where_the_size_allows(monkeypatch):
    """Stride-1 3x3: conv padding 1 and no F.pad; stride-2 on an even input: one F.pad
    (0, 1, 0, 1); on an odd input the SAME padding is symmetric, so again no F.pad."""
    calls = []
    real_pad = F.pad
    monkeypatch.setattr(layers.F, "pad", lambda x, pad, *a, **k: calls.append(pad) or
                        real_pad(x, pad, *a, **k))
    WSConv2d(3, 4, 3)(torch.randn(1, 3, 8, 8))
    WSConv2d(3, 4, 1)(torch.randn(1, 3, 8, 8))
    assert calls == []
    WSConv2d(3, 4, 3, stride=2)(torch.randn(1, 3, 8, 8))
    assert calls == [(0, 1, 0, 1)]
    WSConv2d(3, 4, 3, stride=2)(torch.randn(1, 3, 9, 9))
    assert calls == [(0, 1, 0, 1)]


@pytest.mark.parametrize("size", [8, 9])
def test_shortcut_avg_pool_is_tf_same_counting_valid_elements(size):
    x = torch.randn(2, 3, size, size)
    out = layers.same_avg_pool(2)(x)
    assert out.shape[-2:] == (math.ceil(size / 2),) * 2
    # Haiku 'SAME' avg_pool divides by the number of valid elements (§1.11).
    for i in range(out.shape[-2]):
        for j in range(out.shape[-1]):
            window = x[..., 2 * i:2 * i + 2, 2 * j:2 * j + 2]
            torch.testing.assert_close(out[..., i, j], window.mean(dim=(-2, -1)))


def test_gamma_table_is_the_official_one():
    assert GAMMAS == SPEC_GAMMAS


def test_gelu_is_tanh_approximation_by_default_and_exact_on_request():
    x = torch.linspace(-4, 4, 101)
    gamma = SPEC_GAMMAS["gelu"]
    torch.testing.assert_close(GammaAct()(x), F.gelu(x, approximate="tanh") * gamma)
    torch.testing.assert_close(GammaAct("gelu", "none")(x), F.gelu(x) * gamma)
    assert not torch.allclose(GammaAct()(x), GammaAct("gelu", "none")(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,fn", [
    ("relu", F.relu), ("silu", F.silu), ("tanh", torch.tanh), ("identity", lambda x: x),
    ("leaky_relu", lambda x: F.leaky_relu(x, 0.01)), ("elu", F.elu),
])
def test_activation_is_function_times_gamma(name, fn):
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(GammaAct(name)(x), fn(x) * SPEC_GAMMAS[name])


@pytest.mark.parametrize("name", ["gelu", "relu", "silu", "tanh"])
def test_gamma_makes_unit_gaussian_output_unit_std(name):
    # §1.7: the gammas are (empirical) 1/std(act(N(0,1))).
    z = torch.randn(400_000, generator=torch.Generator().manual_seed(0))
    assert abs(GammaAct(name)(z).std().item() - 1.0) < 0.01


def test_glu_halves_channels_and_unknown_activation_is_refused():
    act = GammaAct("glu")
    assert act(torch.randn(2, 8, 3, 3)).shape == (2, 4, 3, 3) and act.out_channels(8) == 4
    with pytest.raises(ValueError, match="swish"):
        GammaAct("swish")


def test_squeeze_excite_is_relu_sigmoid_gate():
    torch.manual_seed(0)
    se = SqueezeExcite(10, 0.5)
    assert (se.fc0.in_features, se.fc0.out_features) == (10, 5)  # max(1, int(10 * 0.5))
    assert (se.fc1.in_features, se.fc1.out_features) == (5, 10)
    assert SqueezeExcite(1, 0.5).fc0.out_features == 1
    with torch.no_grad():
        se.fc0.bias.fill_(-0.3)  # some hidden units negative, where ReLU must give 0
    x = torch.randn(3, 10, 4, 4)
    pooled = x.mean(dim=(2, 3))
    hidden = torch.clamp_min(pooled @ se.fc0.weight.T + se.fc0.bias, 0.0)  # plain ReLU, no gamma
    ref = torch.sigmoid(hidden @ se.fc1.weight.T + se.fc1.bias)[:, :, None, None]
    torch.testing.assert_close(se(x), ref)


def test_squeeze_excite_init_is_haiku_linear_default():
    torch.manual_seed(0)
    se = SqueezeExcite(1024, 0.5)
    w = se.fc0.weight.detach()
    std = 1 / math.sqrt(1024)
    assert w.abs().max().item() <= 2 * std  # truncated at +-2 sigma (§1.9)
    assert w.abs().max().item() > 1.9 * std
    assert torch.equal(se.fc0.bias, torch.zeros(512))
    assert torch.equal(se.fc1.bias, torch.zeros(1024))


def test_stochastic_depth_drops_whole_samples_without_rescaling():
    torch.manual_seed(0)
    sd = StochasticDepth(0.25)
    x = torch.randn(4000, 2, 3, 3)
    y = sd.train()(x)
    kept = (y == x).flatten(1).all(dim=1)
    dropped = (y == 0).flatten(1).all(dim=1)
    assert bool((kept | dropped).all())  # each sample all kept (unscaled) or all dropped
    assert abs(dropped.float().mean().item() - 0.25) < 0.03
    assert torch.equal(sd.eval()(x), x)
