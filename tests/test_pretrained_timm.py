"""timm's dm_nfnet_* -> this model: every key maps, and the same random weights give the same
logits under the documented numerics switches (NFNET_SPEC.md §5, timm differences)."""

import pytest
import timm
import torch

from nfnet.models import create_model, from_timm_state_dict
from nfnet.models.pretrained import TIMM_NUMERICS

PARITY_RTOL = 1e-4  # the issue: logits equal to timm's within 1e-4 relative


def randomize_(model, seed=0):
    """Random values everywhere, including gains and skip gains (initialised to 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("skipinit_gain"):
                p.copy_(torch.rand((), generator=g) + 0.5)
            elif name.endswith("gain"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return model


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


SIZES = (64, 72)  # 72: odd maps from the second stage on, asymmetric SAME padding


@pytest.fixture(scope="module")
def timm_f0_and_logits():
    torch.manual_seed(0)
    model = randomize_(timm.create_model("dm_nfnet_f0", pretrained=False)).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {size: torch.randn(2, 3, size, size, generator=g) for size in SIZES}
    with torch.no_grad():
        return model.state_dict(), {size: (x, model(x)) for size, x in inputs.items()}


@pytest.fixture(scope="module")
def ours_with_timm_weights(timm_f0_and_logits):
    state_dict, _ = timm_f0_and_logits
    model = create_model("nfnet_f0", **TIMM_NUMERICS).eval()
    model.load_state_dict(from_timm_state_dict(state_dict, "nfnet_f0"))
    return model


@pytest.mark.parametrize("size", SIZES)
def test_logits_match_timm(timm_f0_and_logits, ours_with_timm_weights, size):
    x, expected = timm_f0_and_logits[1][size]
    with torch.no_grad():
        got = ours_with_timm_weights(x)
    assert relative_error(got, expected) < PARITY_RTOL


def test_official_numerics_differ_from_timm(timm_f0_and_logits):
    """Why TIMM_NUMERICS exists: with the official tanh GELU and max(fan_in*var, 1e-4) the
    same weights give measurably different logits."""
    state_dict, logits = timm_f0_and_logits
    ours = create_model("nfnet_f0").eval()
    ours.load_state_dict(from_timm_state_dict(state_dict))
    x, expected = logits[SIZES[0]]
    with torch.no_grad():
        assert relative_error(ours(x), expected) > 10 * PARITY_RTOL


@pytest.mark.parametrize("index", range(7))  # timm ports F0-F6, the released checkpoints
def test_every_timm_port_maps_key_for_key(index):
    with torch.device("meta"):
        model = timm.create_model(f"dm_nfnet_f{index}", pretrained=False)
    # Shapes are checked against the variant inside; gains become vectors, SE 1x1 convs
    # become Linear weights.
    converted = from_timm_state_dict(model.state_dict(), f"nfnet_f{index}")
    assert converted["stem.conv0.gain"].shape == (16,)
    assert converted["stages.0.0.se.fc0.weight"].dim() == 2


def test_non_dm_timm_models_are_refused():
    with torch.device("meta"):
        model = timm.create_model("nfnet_f0", pretrained=False)
    with pytest.raises(ValueError, match="dm_nfnet"):
        from_timm_state_dict(model.state_dict(), "nfnet_f0")
