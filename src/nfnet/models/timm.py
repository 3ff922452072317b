"""timm interoperability: timm's `dm_nfnet_*` state dicts <-> this model's, the timm
architecture and `timm.create_model` kwargs that compute this model's logits, and what timm
cannot match. The Hub folder layout built on them is in `timm_hub.py`.

Plain data and PyTorch: timm itself is never imported here.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

import torch

from .layers import WS_EPS
from .matching import check_state_dict
from .nfnet import ALPHA, FINAL_CONV_MULT, SE_RATIO, NFNet
from .variants import Variant, get_variant

__all__ = [
    "TIMM_NUMERICS", "from_timm_state_dict", "model_overrides", "timm_differences",
    "timm_model_kwargs", "timm_model_name", "to_timm_state_dict", "variant_of_timm_architecture",
]

# create_model overrides under which this model computes what timm's dm_nfnet_* computes
# (NFNET_SPEC.md §5): exact erf GELU instead of the tanh form, and timm's weight
# standardisation (w - mean) * gain / sqrt((var + 1e-5) * fan_in) (timm `NfCfg.std_conv_eps`
# 1e-5, added to var) instead of the official rsqrt(max(fan_in * var, 1e-4)).
TIMM_NUMERICS = {"gelu_approximate": "none", "ws_eps": 1e-5, "ws_eps_mode": "add"}

# timm dm_nfnet_* module names -> this model's (timm `models/nfnet.py`, NormFreeBlock).
_TIMM_BLOCK_SUBMODULES = {
    "conv1": "conv0", "conv2": "conv1", "conv2b": "conv1b", "conv3": "conv2",
    "downsample.conv": "conv_shortcut", "attn_last.fc1": "se.fc0", "attn_last.fc2": "se.fc1",
}
_TIMM_TOP = {"final_conv": "final_conv", "head.fc": "classifier"}
_NOT_DM = ("not a timm dm_nfnet_* state dict (timm's nfnet_* and eca_nfnet_* models have "
           "another architecture)")


class _Naming(NamedTuple):
    """One direction of the renaming: the stem convs (timm counts them from 1, this model
    from 0), a block's skip gain and submodules, and the head."""

    stem: re.Pattern
    stem_shift: int
    block: re.Pattern
    skip_gain: str
    submodules: dict[str, str]
    top: dict[str, str]
    unexpected: str


_FROM_TIMM = _Naming(
    re.compile(r"^stem\.conv([1-4])\.(\w+)$"), -1,
    re.compile(r"^(stages\.\d+\.\d+)\.(?:(skipinit_gain)|(.+)\.(\w+))$"), "skip_gain",
    _TIMM_BLOCK_SUBMODULES, _TIMM_TOP, _NOT_DM)
_TO_TIMM = _Naming(
    re.compile(r"^stem\.conv([0-3])\.(\w+)$"), 1,
    re.compile(r"^(stages\.\d+\.\d+)\.(?:(skip_gain)|(.+)\.(\w+))$"), "skipinit_gain",
    {ours: theirs for theirs, ours in _TIMM_BLOCK_SUBMODULES.items()},
    {ours: theirs for theirs, ours in _TIMM_TOP.items()},
    "not an NFNet state dict in this project's naming")


def _rename(key: str, naming: _Naming) -> str:
    if match := naming.stem.match(key):
        return f"stem.conv{int(match[1]) + naming.stem_shift}.{match[2]}"
    if match := naming.block.match(key):
        if match[2]:
            return f"{match[1]}.{naming.skip_gain}"
        if match[3] in naming.submodules:
            return f"{match[1]}.{naming.submodules[match[3]]}.{match[4]}"
    module, _, param = key.rpartition(".")
    if module in naming.top:
        return f"{naming.top[module]}.{param}"
    raise ValueError(f"unexpected key {key!r}: {naming.unexpected}")


def _timm_name(key: str) -> str:
    return _rename(key, _FROM_TIMM)


# timm ports F0-F6 as dm_nfnet_f0..f6 (DeepMind's released checkpoints). Its nfnet_f7 is the
# F7 network built with timm's own choices (gamma folded into the conv, symmetric padding, no
# skip gain); these NfCfg fields are exactly what dm_nfnet_* sets on top of nfnet_* (timm
# `_dm_nfnet_cfg` against `_nfnet_cfg`), and create_model overlays NfCfg fields given as kwargs.
_DM_SWITCHES = {"gamma_in_act": True, "same_padding": True, "skipinit": True}
_TIMM_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    **{f"nfnet_f{i}": (f"dm_nfnet_f{i}", {}) for i in range(7)},
    "nfnet_f7": ("nfnet_f7", _DM_SWITCHES),
}
# timm has no configurable GELU form or eps-inside-a-max: its dm_nfnet_* asserts the activation
# name is a key of its gamma table, where "gelu" is the erf GELU, and ScaledStdConv2dSame
# computes (w - mean) / sqrt(var + eps). For the official rsqrt(max(fan_in * var, 1e-4)) the
# closest is an eps that vanishes: it leaves every channel with fan_in * var >= 1e-4 within a
# relative 1e-12 * fan_in / 2e-4 (<= 8e-6 at F's largest fan_in, 1536, and float32-exact for
# weights near their N(0, 1/fan_in) init), and keeps a constant channel finite where 0 would
# divide by zero. Channels under the floor (fan_in * var < 1e-4) differ: timm scales them to
# unit norm, the official code by 1/sqrt(1e-4).
_TIMM_EPS_FOR_MAX = 1e-12
# create_model overrides that change the network's shape: only the table's own values export.
_ARCHITECTURE_DEFAULTS = {"width": 1.0, "se_ratio": SE_RATIO, "final_conv_mult": FINAL_CONV_MULT,
                          "activation": "gelu"}
# create_model overrides that act only in training (timm's dropout and drop-path are set by
# whoever trains in timm, and timm's drop-path is another schedule, NFNET_SPEC.md §5).
_TRAINING_ONLY = ("drop_rate", "stochdepth_rate", "grad_checkpointing")
_NUMERICS_DEFAULTS = {"gelu_approximate": "tanh", "ws_eps": WS_EPS, "ws_eps_mode": "max",
                      "alpha": ALPHA}
def from_timm_state_dict(state_dict: Mapping[str, torch.Tensor],
                         variant: str | Variant | None = None) -> dict[str, torch.Tensor]:
    """timm `dm_nfnet_f*` state dict -> a state dict for `create_model`.

    timm stores conv gains as (O,1,1,1) and the SE linears as 1x1 convs; here the gains are
    vectors (O,) and the SE linears nn.Linear. With `variant` every shape is checked.
    Logits match timm's under the `TIMM_NUMERICS` overrides.
    """
    if not any(key.endswith(".skipinit_gain") for key in state_dict):
        raise ValueError(f"no skipinit_gain parameters: {_NOT_DM}")
    converted = {}
    for key, value in state_dict.items():
        name = _timm_name(key)
        if name.endswith(".gain"):
            value = value.reshape(-1)  # (O, 1, 1, 1) -> (O,)
        elif ".se.fc" in name and name.endswith(".weight"):
            value = value.flatten(1)  # 1x1 conv (O, I, 1, 1) -> nn.Linear (O, I)
        converted[name] = value.detach().clone()
    if isinstance(variant, str):
        variant = get_variant(variant)
    if variant is not None:
        check_state_dict(converted, variant)
    return converted


def _exportable(variant: str | Variant) -> Variant:
    """The table row, if timm can build its network; a one-line ValueError otherwise."""
    variant = get_variant(variant) if isinstance(variant, str) else variant
    if variant.name not in _TIMM_ARCHITECTURES:
        stem = variant.stem_widths[-1]
        raise ValueError(
            f"{variant.name} has no timm counterpart: timm's NFNet stem is (c/8, c/4, c/2, c) = "
            f"{(stem // 8, stem // 4, stem // 2, stem)}, this variant's is {variant.stem_widths}; "
            f"timm exports exist for {', '.join(_TIMM_ARCHITECTURES)}")
    return variant


def to_timm_state_dict(state_dict: Mapping[str, torch.Tensor],
                       variant: str | Variant) -> dict[str, torch.Tensor]:
    """This project's state dict of `variant` (any class count) -> timm's names and layouts:
    the exact inverse of `from_timm_state_dict`, values unchanged (conv gains (O,) -> (O,1,1,1),
    SE nn.Linear weights (O, I) -> 1x1 convs (O, I, 1, 1)). Every shape is checked first."""
    variant = _exportable(variant)
    check_state_dict(state_dict, variant)
    converted = {}
    for key, value in state_dict.items():
        if key.endswith(".gain"):
            value = value.reshape(-1, 1, 1, 1)
        elif ".se.fc" in key and key.endswith(".weight"):
            value = value[:, :, None, None]
        converted[_rename(key, _TO_TIMM)] = value.detach().clone().contiguous()
    return converted


def timm_model_name(variant: str | Variant) -> str:
    """timm's architecture for `variant`: dm_nfnet_f0..f6, nfnet_f7 (see `timm_model_kwargs`)."""
    return _TIMM_ARCHITECTURES[_exportable(variant).name][0]


def timm_model_kwargs(variant: str | Variant, **overrides) -> dict[str, Any]:
    """The `timm.create_model(timm_model_name(variant), ...)` kwargs under which timm computes
    what `create_model(variant, **overrides)` computes, as far as timm can (see `timm_differences`).

    `overrides` are create_model's: the numerics (ws_eps, ws_eps_mode, alpha; gelu_approximate
    has no timm switch) map to timm's NfCfg fields; training-only ones (drop_rate,
    stochdepth_rate, grad_checkpointing) are left to whoever trains in timm; ones that change
    the network's shape must keep the table's values.
    """
    name = _exportable(variant).name
    numerics = _numerics(overrides)
    if numerics["ws_eps_mode"] == "add":
        std_conv_eps = numerics["ws_eps"]  # timm's own form: (var + eps) * fan_in
    else:
        std_conv_eps = _TIMM_EPS_FOR_MAX
    return {**_TIMM_ARCHITECTURES[name][1], "std_conv_eps": std_conv_eps,
            "alpha": numerics["alpha"]}


def _numerics(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """create_model overrides -> the numerics that matter at eval, refusing what timm cannot
    build; one-line ValueErrors name the key."""
    for key, value in overrides.items():
        if key in _ARCHITECTURE_DEFAULTS and value != _ARCHITECTURE_DEFAULTS[key]:
            raise ValueError(f"{key}={value!r} has no timm counterpart: a timm export needs "
                             f"{key}={_ARCHITECTURE_DEFAULTS[key]!r}")
        if key not in (*_ARCHITECTURE_DEFAULTS, *_TRAINING_ONLY, *_NUMERICS_DEFAULTS):
            raise ValueError(f"unknown create_model override {key}={value!r}")
    return {key: overrides.get(key, default) for key, default in _NUMERICS_DEFAULTS.items()}


def timm_differences(overrides: Mapping[str, Any]) -> list[str]:
    """What timm still computes differently from `create_model(..., **overrides)` under
    `timm_model_kwargs`, one sentence each (stored as the pretrained config's notes)."""
    numerics = _numerics(overrides)
    notes = []
    if numerics["gelu_approximate"] == "tanh":
        notes.append("Trained with the tanh-approximate GELU of DeepMind's code; timm's dm_nfnet "
                     "computes the exact erf GELU (not configurable), so its logits differ "
                     "slightly (3e-4 to 5e-4 of the largest logit on a random F0).")
    if numerics["ws_eps_mode"] == "max":
        notes.append(f"Weight standardisation floors fan_in*var at {numerics['ws_eps']:g}; timm "
                     f"adds std_conv_eps={_TIMM_EPS_FOR_MAX:g} to var instead: within 1e-5 "
                     "relative for every channel above the floor.")
    return notes


def model_overrides(net: NFNet) -> dict[str, Any]:
    """The create_model overrides that rebuild `net`'s numerics: activation, gelu_approximate,
    ws_eps, ws_eps_mode, alpha, drop_rate (read from the modules; the stochastic-depth rate
    is not kept by the model and is left out)."""
    act, conv = net.final_act, net.final_conv
    return {"activation": act.name, "gelu_approximate": act.gelu_approximate,
            "ws_eps": conv.eps, "ws_eps_mode": conv.eps_mode,
            "alpha": net.stages[0][0].alpha, "drop_rate": net.drop_rate}


def variant_of_timm_architecture(architecture: str, model_args: Mapping[str, Any]) -> str:
    """The variant that `timm.create_model(architecture, **model_args)` builds: the inverse of
    `timm_model_name` and the architecture switches of `timm_model_kwargs`."""
    for variant, (name, switches) in _TIMM_ARCHITECTURES.items():
        if name == architecture and all(model_args.get(k) == v for k, v in switches.items()):
            return variant
    raise ValueError(f"timm architecture {architecture!r} with model_args {dict(model_args)} "
                     f"is not one of this project's variants; expected one of "
                     f"{sorted({name for name, _ in _TIMM_ARCHITECTURES.values()})} "
                     f"(nfnet_f7 with {_DM_SWITCHES})")
