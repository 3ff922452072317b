"""Layers of the NFNet: SAME-padded and weight-standardized convs, squeeze-excite, stochastic
depth (NFNET_SPEC.md §1.3, §1.6, §1.11)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# NFNET_SPEC.md §1.6: WSConv2D takes max(fan_in * var, 1e-4), an eps inside a max on N*var.
WS_EPS = 1e-4
# 'max': the official rsqrt(max(fan_in*var, eps)); 'add': rsqrt((var + eps) * fan_in), the
# form timm's ScaledStdConv2dSame computes (with eps 1e-5), kept only for parity with timm.
WS_EPS_MODES = ("max", "add")
# NFNET_SPEC.md §1.9: haiku's hk.Linear default init truncates its normal at two stddevs.
_TRUNCATION_STDS = 2.0


def tf_same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF/XLA 'SAME' padding (before, after) of one spatial dim of length `size` (§1.11).

    The output has ceil(size / stride) positions; whatever padding that needs goes mostly
    after, so a 3x3 stride-2 conv on an even input pads (0, 1), on an odd one (1, 1).
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """nn.Conv2d with TF 'SAME' padding and a bias (every official conv has one).

    A stride-1 conv with an odd kernel pads (k-1)/2 on every side whatever the input size, so
    that padding is fixed here and handed to the conv. A strided conv's padding depends on
    the input size; it is computed per call from the static shape (integer arithmetic, no
    tensor ops) and applied as the conv's own padding when symmetric, else by one F.pad.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0,
                         groups=groups, bias=True)
        size_independent = stride == 1 and all(k % 2 == 1 for k in self.kernel_size)
        self.fixed_padding = (
            tuple((k - 1) // 2 for k in self.kernel_size) if size_independent else None
        )

    def conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.fixed_padding is not None:
            return F.conv2d(x, weight, self.bias, self.stride, self.fixed_padding, 1, self.groups)
        top, bottom = tf_same_pads(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = tf_same_pads(x.shape[-1], self.kernel_size[1], self.stride[1])
        if top == bottom and left == right:
            return F.conv2d(x, weight, self.bias, self.stride, (top, left), 1, self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, weight, self.bias, self.stride, 0, 1, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.weight)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", padding=SAME"


class WSConv2d(SameConv2d):
    """Scaled weight-standardized conv, NFNET_SPEC.md §1.6:

        w_hat = (w - mean) * gain * rsqrt(max(fan_in * var, eps))

    with mean and population variance per output channel over (I/groups, kh, kw), fan_in =
    (I/groups)*kh*kw, `gain` a vector (O,) initialised to 1, bias zeros, w ~ N(0, 1/fan_in).
    The weight is re-standardised on every call, so gradients flow through the standardisation.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, eps: float = WS_EPS, eps_mode: str = "max"):
        if eps_mode not in WS_EPS_MODES:
            raise ValueError(f"eps_mode={eps_mode!r}; choose one of {WS_EPS_MODES}")
        super().__init__(in_channels, out_channels, kernel_size, stride, groups)
        self.gain = nn.Parameter(torch.ones(out_channels, dtype=self.weight.dtype,
                                            device=self.weight.device))
        self.fan_in = self.weight[0].numel()
        self.eps = eps
        self.eps_mode = eps_mode

    def reset_parameters(self) -> None:
        # Called by nn.Conv2d.__init__ (before `gain` exists) and on demand afterwards.
        fan_in = self.weight[0].numel()
        nn.init.normal_(self.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(self.bias)
        if hasattr(self, "gain"):
            nn.init.ones_(self.gain)

    def standardized_weight(self) -> torch.Tensor:
        # One fused reduction for both moments; correction=0 is the population variance.
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), correction=0, keepdim=True)
        if self.eps_mode == "max":
            denom = torch.clamp_min(var * self.fan_in, self.eps)
        else:
            denom = (var + self.eps) * self.fan_in
        scale = self.gain.view(-1, 1, 1, 1) * torch.rsqrt(denom)
        # The official w*scale - mean*scale (§1.6): one elementwise pass over the weight.
        return torch.addcmul(-mean * scale, self.weight, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.standardized_weight())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}, eps_mode={self.eps_mode}"


def same_avg_pool(stride: int) -> nn.Module:
    """The strided shortcut's `avg_pool` with window = stride and 'SAME' padding (§1.3, §1.11).

    Even inputs need no padding. On an odd input TF pads one after and haiku divides by the
    count of valid elements; ceil_mode with no padding gives exactly that last, smaller window.
    """
    return nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)


@torch.no_grad()
def truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """N(0, std^2) truncated to +-2 std, in one pass by the inverse CDF: for z uniform over
    the truncated range, erf(z / sqrt(2)) is uniform over (-erf(2/sqrt(2)), erf(2/sqrt(2))).
    (torch's trunc_normal_ rejection-samples, several times slower on F-size models.)"""
    edge = math.erf(_TRUNCATION_STDS / math.sqrt(2.0))
    tensor.uniform_(-edge, edge).erfinv_().mul_(std * math.sqrt(2.0))
    # erfinv may round a hair past the edge in float32.
    return tensor.clamp_(-_TRUNCATION_STDS * std, _TRUNCATION_STDS * std)


class SqueezeExcite(nn.Module):
    """Squeeze-excite gate, NFNET_SPEC.md §1.3 (`base.py` SqueezeExcite).

    mean over H,W -> Linear -> plain ReLU (no gamma) -> Linear -> sigmoid. Returns the gate,
    shape (B, C, 1, 1); the block applies it with the official factor 2.
    """

    def __init__(self, channels: int, se_ratio: float):
        super().__init__()
        hidden = max(1, int(channels * se_ratio))
        self.fc0 = nn.Linear(channels, hidden)
        self.fc1 = nn.Linear(hidden, channels)
        for fc in (self.fc0, self.fc1):
            # hk.Linear default: TruncatedNormal(stddev=1/sqrt(fan_in)), bias zeros (§1.9).
            truncated_normal_(fc.weight, std=1.0 / math.sqrt(fc.in_features))
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3))
        s = self.fc1(F.relu(self.fc0(s)))
        return torch.sigmoid(s)[:, :, None, None]


class StochasticDepth(nn.Module):
    """Drop whole samples of the residual branch while training (§1.3, `base.py` StochDepth).

    mask = floor(keep_prob + U[0, 1)) per sample, with no 1/keep_prob rescaling; identity at
    eval.
    """

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep_prob = 1.0 - self.rate
        # Drawn in float32 so a bf16 input does not round keep_prob + U up to 1.
        noise = torch.rand((x.shape[0], 1, 1, 1), device=x.device, dtype=torch.float32)
        return x * torch.floor(keep_prob + noise).to(x.dtype)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"
