"""Every parameter of NFNet-F0 lands in the official group (NFNET_SPEC §3, exp_nf.py `_make_opt`).

The spec's rule, in this project's names: a parameter whose name contains ``gain`` or ``bias``
(conv gains and biases, ``skip_gain``, SE and classifier biases) -> no decay, AGC on; the final
classifier's weight -> decay, no AGC; every other weight (stem, block, shortcut and final convs,
SE linears) -> decay and AGC. Counts follow from the F0 architecture (spec §1): 4 stem convs +
12 blocks x 4 convs + 4 projection shortcuts (blocks 0, 1, 3, 9) + final_conv = 57 convs;
12 x 2 SE linears; 12 skip gains; one classifier.
"""

from __future__ import annotations

import pytest
from torch import nn

from nfnet import models
from nfnet.optim.param_groups import (
    agc_named_parameters,
    optimizer_param_groups,
    parameter_roles,
    stage_of,
)

F0_PARAMS = 71_489_284  # NFNET_SPEC §2.2, computed from the official code
F0_CONVS = 4 + 12 * 4 + 4 + 1
F0_SE_LINEARS = 12 * 2
F0_SKIP_GAINS = 12
PAPER_WEIGHT_DECAY = 2e-5  # NFNET_SPEC §4


def spec_group(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if "gain" in leaf or "bias" in leaf:
        return "gains_biases"
    if name == "classifier.weight":
        return "classifier"
    return "weights"


@pytest.fixture(scope="module")
def f0() -> nn.Module:
    return models.create_model("nfnet_f0")


def test_every_f0_parameter_is_in_its_spec_group(f0):
    roles = parameter_roles(f0)
    got = {name: role for role, named in roles.items() for name, _ in named}
    all_names = [name for name, _ in f0.named_parameters()]
    assert sorted(got) == sorted(all_names)
    wrong = {n: (got[n], spec_group(n)) for n in all_names if got[n] != spec_group(n)}
    assert not wrong
    assert sum(p.numel() for _, p in f0.named_parameters()) == F0_PARAMS


def test_f0_group_sizes_match_the_architecture(f0):
    roles = parameter_roles(f0)
    convs = [n for n, m in f0.named_modules() if isinstance(getattr(m, "weight", None), nn.Parameter)
             and m.weight.ndim == 4]
    linears = [n for n, m in f0.named_modules() if isinstance(m, nn.Linear) and n != "classifier"]
    assert len(convs) == F0_CONVS
    assert len(linears) == F0_SE_LINEARS
    assert len(roles["weights"]) == F0_CONVS + F0_SE_LINEARS
    weight_names = {n for n, _ in roles["weights"]}
    assert {f"{n}.weight" for n in convs + linears} == weight_names
    # Each conv has a gain and a bias, each SE linear a bias, each block a skip gain, plus the
    # classifier bias.
    assert len(roles["gains_biases"]) == 2 * F0_CONVS + F0_SE_LINEARS + F0_SKIP_GAINS + 1
    assert sum(n.endswith("skip_gain") for n, _ in roles["gains_biases"]) == F0_SKIP_GAINS
    assert [n for n, _ in roles["classifier"]] == ["classifier.weight"]


def test_f0_decay_and_agc_flags(f0):
    groups = {g["role"]: g for g in optimizer_param_groups(f0, PAPER_WEIGHT_DECAY)}
    assert groups["weights"]["weight_decay"] == PAPER_WEIGHT_DECAY
    assert groups["classifier"]["weight_decay"] == PAPER_WEIGHT_DECAY
    assert groups["gains_biases"]["weight_decay"] == 0.0
    clipped = [n for n, _ in agc_named_parameters(f0)]
    everything = [n for n, _ in f0.named_parameters()]
    assert set(everything) - set(clipped) == {"classifier.weight"}
    assert "classifier.bias" in clipped
    assert {stage_of(n) for n in clipped} == {
        "stem", "stage0", "stage1", "stage2", "stage3", "final_conv", "classifier"
    }
