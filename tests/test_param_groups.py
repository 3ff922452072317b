"""Parameter roles (NFNET_SPEC §3): decay and AGC chosen by role, never by position or shape."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nfnet.optim.agc import adaptive_clip_grad_
from nfnet.optim.param_groups import (
    agc_named_parameters,
    agc_parameters,
    optimizer_param_groups,
    parameter_roles,
    stage_of,
)


class GainConv(nn.Module):
    """Shaped like the project's WSConv2d: weight, per-channel gain, bias."""

    def __init__(self, cin: int, cout: int, gain_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.gain = nn.Parameter(torch.ones(gain_shape or (cout,)))
        self.bias = nn.Parameter(torch.zeros(cout))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0 = GainConv(4, 4, gain_shape=(4, 1, 1, 1))  # a timm-shaped gain is a gain
        self.se = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 4))
        self.skip_gain = nn.Parameter(torch.zeros(()))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # Registered first on purpose: a positional rule ("the last two parameters") would
        # pick the wrong tensors.
        self.classifier = nn.Linear(8, 3)
        self.stem = GainConv(3, 4)
        self.stages = nn.Sequential(nn.Sequential(Block()))
        self.final_conv = GainConv(4, 8)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


EXPECTED = {
    "classifier": ["classifier.weight"],
    "weights": [
        "stem.weight",
        "stages.0.0.conv0.weight",
        "stages.0.0.se.0.weight",
        "stages.0.0.se.2.weight",
        "final_conv.weight",
    ],
    "gains_biases": [
        "classifier.bias",
        "stem.gain",
        "stem.bias",
        "stages.0.0.skip_gain",
        "stages.0.0.conv0.gain",
        "stages.0.0.conv0.bias",
        "stages.0.0.se.0.bias",
        "stages.0.0.se.2.bias",
        "final_conv.gain",
        "final_conv.bias",
    ],
}


def names(named) -> set[str]:
    return {name for name, _ in named}


def test_roles_by_module_and_name():
    roles = parameter_roles(Tiny())
    assert {role: names(v) for role, v in roles.items()} == {
        role: set(v) for role, v in EXPECTED.items()
    }


def test_frozen_parameters_are_in_no_group():
    model = Tiny()
    everything = set().union(*(names(v) for v in parameter_roles(model).values()))
    assert not any(n.startswith("frozen.") for n in everything)
    assert not any(n.startswith("frozen.") for n in names(agc_named_parameters(model)))


def test_agc_parameters_are_all_but_the_classifier_weight():
    model = Tiny()
    agc = agc_parameters(model)
    assert {id(p) for p in agc} == {
        id(p) for n, p in model.named_parameters() if p.requires_grad and n != "classifier.weight"
    }
    assert all(p is not model.classifier.weight for p in agc)
    assert any(p is model.classifier.bias for p in agc)
    # In model order, stem to head, for per-stage telemetry.
    order = [n for n, p in model.named_parameters() if p.requires_grad and n != "classifier.weight"]
    assert [n for n, _ in agc_named_parameters(model)] == order


def test_optimizer_groups_carry_the_decay_of_their_role():
    model = Tiny()
    groups = optimizer_param_groups(model, weight_decay=2e-5)
    by_role = {g["role"]: g for g in groups}
    assert set(by_role) == {"weights", "classifier", "gains_biases"}
    assert by_role["weights"]["weight_decay"] == 2e-5
    assert by_role["classifier"]["weight_decay"] == 2e-5
    assert by_role["gains_biases"]["weight_decay"] == 0.0
    params_by_name = dict(model.named_parameters())
    for role, expected in EXPECTED.items():
        in_order = _model_order(model, expected)
        assert [id(p) for p in by_role[role]["params"]] == [id(params_by_name[n]) for n in in_order]


def _model_order(model: nn.Module, subset: list[str]) -> list[str]:
    return [n for n, _ in model.named_parameters() if n in set(subset)]


def test_sgd_step_applies_coupled_decay_after_agc_only_where_the_role_says():
    """One SGD step, lr 1, no momentum, by hand: p' = p - (clipped_g + wd * p) for decayed
    roles and p' = p - clipped_g for gains/biases; the classifier weight is not clipped."""
    model = Tiny()
    wd = 0.5
    opt = torch.optim.SGD(optimizer_param_groups(model, weight_decay=wd), lr=1.0)
    with torch.no_grad():
        model.classifier.weight.fill_(1.0)
        model.stem.bias.zero_()
        model.stem.gain.fill_(1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    model.classifier.weight.grad.fill_(10.0)  # huge, but the classifier weight is exempt
    model.stem.bias.grad[0] = 3.0  # zero bias: capped at 0.01 * 1e-3 = 1e-5
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    adaptive_clip_grad_(agc_parameters(model), clipping=0.01)
    opt.step()

    torch.testing.assert_close(model.classifier.weight, before["classifier.weight"] - (10.0 + wd))
    expected_bias = torch.zeros(4)
    expected_bias[0] = -1e-5  # clipped gradient, no decay
    torch.testing.assert_close(model.stem.bias, expected_bias, rtol=1e-6, atol=0)
    torch.testing.assert_close(model.stem.gain, before["stem.gain"])  # no grad, no decay
    torch.testing.assert_close(model.stem.weight, before["stem.weight"] * (1 - wd))
    torch.testing.assert_close(model.stages[0][0].skip_gain, before["stages.0.0.skip_gain"])


def test_missing_classifier_is_a_clear_error_and_can_be_given():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(AttributeError, match="no `.classifier`"):
        parameter_roles(net)
    roles = parameter_roles(net, classifier=net[1])
    assert names(roles["classifier"]) == {"1.weight"}
    assert names(roles["weights"]) == {"0.weight"}


def test_shared_parameter_is_listed_once():
    model = Tiny()
    model.tied = GainConv(3, 4)
    model.tied.weight = model.stem.weight
    roles = parameter_roles(model)
    ids = [id(p) for v in roles.values() for _, p in v]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    "name, stage",
    [
        ("stem.conv0.weight", "stem"),
        ("stages.0.0.conv0.gain", "stage0"),
        ("stages.3.2.skip_gain", "stage3"),
        ("final_conv.bias", "final_conv"),
        ("classifier.bias", "classifier"),
    ],
)
def test_stage_of(name, stage):
    assert stage_of(name) == stage
