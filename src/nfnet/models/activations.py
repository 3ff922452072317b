"""Gamma-scaled activations: `act(x) * gamma` (NFNET_SPEC.md §1.7).

The gammas keep the output of an activation at roughly unit variance for unit-Gaussian input,
which is what the alpha/beta schedule of the residual stream assumes. They are the official
constants (`base.py`, `nonlinearities`), used verbatim, not recomputed.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# NFNET_SPEC.md §1.7, the official table (`base.py` `nonlinearities`), verbatim.
GAMMAS: dict[str, float] = {
    "gelu": 1.7015043497085571,
    "relu": 1.7139588594436646,
    "silu": 1.7881293296813965,
    "relu6": 1.7131484746932983,
    "leaky_relu": 1.70590341091156,
    "elu": 1.2716004848480225,
    "celu": 1.270926833152771,
    "selu": 1.0008515119552612,
    "tanh": 1.5939117670059204,
    "sigmoid": 4.803835391998291,
    "softplus": 1.9203323125839233,
    "soft_sign": 2.338853120803833,
    "log_sigmoid": 1.9193484783172607,
    "log_softmax": 1.0002083778381348,
    "glu": 1.8484294414520264,
    "identity": 1.0,
}

# jax.nn.gelu defaults to approximate=True, i.e. the tanh form (§1.7); 'none' is the exact erf
# GELU that timm's dm_nfnet_* ports use (§5).
GELU_APPROXIMATIONS = ("tanh", "none")

# The functions jax.nn applies, with jax's defaults: leaky_relu slope 0.01, elu/celu alpha 1.
# The model is NCHW where the official one is NHWC, so the two ops that act along the last
# (channel) axis in jax act along dim 1 here.
_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "silu": F.silu,
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "celu": F.celu,
    "selu": F.selu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "soft_sign": F.softsign,
    "log_sigmoid": F.logsigmoid,
    "log_softmax": lambda x: F.log_softmax(x, dim=1),
    "glu": lambda x: F.glu(x, dim=1),
    "identity": lambda x: x,
}


class GammaAct(nn.Module):
    """`act(x) * gamma` for any activation of the official table (NFNET_SPEC.md §1.7)."""

    def __init__(self, name: str = "gelu", gelu_approximate: str = "tanh"):
        super().__init__()
        if name not in GAMMAS:
            raise ValueError(f"unknown activation {name!r}; choose one of {sorted(GAMMAS)}")
        if gelu_approximate not in GELU_APPROXIMATIONS:
            raise ValueError(
                f"gelu_approximate={gelu_approximate!r}; choose one of {GELU_APPROXIMATIONS}"
            )
        self.name = name
        self.gelu_approximate = gelu_approximate
        self.gamma = GAMMAS[name]

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """`act(x) * gamma * scale`; a caller's constant `scale` (a block's beta) rides on the
        gamma multiply, so the activation map is scaled in one pass, not two."""
        if self.name == "gelu":
            y = F.gelu(x, approximate=self.gelu_approximate)
        else:
            y = _FUNCTIONS[self.name](x)
        factor = self.gamma * scale
        # 1.0 after fold_weight_standardization moved gamma into the next layer's weights.
        return y if factor == 1.0 else y * factor

    def out_channels(self, channels: int) -> int:
        """Channels this activation hands on: GLU gates one half of its input with the other.

        The official model builds its convs lazily from whatever arrives, so with `glu` every
        conv that follows an activation sees half the channels; this model sizes them likewise.
        """
        return channels // 2 if self.name == "glu" else channels

    def extra_repr(self) -> str:
        approx = f", approximate={self.gelu_approximate}" if self.name == "gelu" else ""
        return f"{self.name}{approx}, gamma={self.gamma}"
