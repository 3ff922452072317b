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


class _ScaledWeightStandardization(torch.autograd.Function):
    """w_hat = (w - mean) * gain / denom per output channel, denom = max(||w - mean||,
    sqrt(eps)) ('max', the official rsqrt(max(fan_in * var, eps)): fan_in * var is the squared
    norm of the centered row) or sqrt(||w - mean||^2 + eps * fan_in) ('add'), with a
    hand-written backward.

    Written for few dispatched ops (every op is a kernel launch on a GPU, where a step of small
    ones is launch-bound): 8 ops forward, 10 backward, against about 25 each for autograd
    through the same formula. The moments are a mean and the norm of the centered copy, two
    passes as in the official jnp.var (stable for any mean); the norm is a vectorized
    reduction, several times faster on CPU than torch.var_mean's Welford pass. Reductions run
    over dims (1, 2, 3) in whatever memory format the weight has, so a channels_last weight is
    read as it lies.

    Backward, closed form: with u = (w - mean) / denom and g = dL/dw_hat, per output channel
    (sums over the channel's fan_in elements):

        dL/dgain = sum(g * u)
        dL/dw    = gain / denom * (g - mean(g) - active * u * sum(g * u))

    where active is 0 for a 'max' row whose norm sits under sqrt(eps) (its denom is then a
    constant) and 1 otherwise. (This uses sum(u) = 0, exact in real arithmetic.) Saved for
    backward: the weight itself (a parameter, no copy) and per-channel vectors.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, gain: torch.Tensor, eps: float,
                add_eps: bool) -> torch.Tensor:
        dims = tuple(range(1, weight.ndim))
        mean = weight.mean(dims, keepdim=True)
        centered = weight - mean
        norm = torch.linalg.vector_norm(centered, 2, dims, keepdim=True)
        if add_eps:
            fan_in = weight.numel() // weight.shape[0]
            denom = norm.square_().add_(eps * fan_in).sqrt_()
            active = None
        else:
            floor = math.sqrt(eps)
            active = norm > floor
            denom = norm.clamp_min_(floor)
        scale = gain.view((-1,) + (1,) * len(dims)) / denom
        ctx.save_for_backward(weight, mean, denom, scale, active)
        return centered.mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mean, denom, scale, active = ctx.saved_tensors
        dims = tuple(range(1, weight.ndim))
        u = (weight - mean).div_(denom)
        g_dot_u = (grad * u).sum(dims, keepdim=True)
        grad_gain = g_dot_u.view(-1) if ctx.needs_input_grad[1] else None
        grad_weight = None
        if ctx.needs_input_grad[0]:
            coeff = g_dot_u if active is None else g_dot_u * active
            grad_weight = grad - grad.mean(dims, keepdim=True)
            grad_weight.addcmul_(u, coeff, value=-1).mul_(scale)
        return grad_weight, grad_gain, None, None


def scaled_weight_standardization(weight: torch.Tensor, gain: torch.Tensor, eps: float = WS_EPS,
                                  add_eps: bool = False) -> torch.Tensor:
    """NFNET_SPEC.md §1.6 on a conv weight (O, I/groups, kh, kw) and its gain (O,)."""
    return _ScaledWeightStandardization.apply(weight, gain, eps, add_eps)


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
        return scaled_weight_standardization(self.weight, self.gain, self.eps,
                                             self.eps_mode == "add")

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
        s = self.fc1(F.relu(self.fc0(x.mean(dim=(2, 3)))))
        # One view to (B, C, 1, 1), not two unsqueezes. (Running the Linears as 1x1 convs would
        # dispatch fewer ops, but each cuDNN call costs more host time than the GEMMs and views
        # it would replace, and launches as many kernels.)
        return torch.sigmoid(s).view(*s.shape, 1, 1)


class StochasticDepth(nn.Module):
    """Drop whole samples of the residual branch while training (§1.3, `base.py` StochDepth).

    mask = floor(keep_prob + U[0, 1)) per sample, with no 1/keep_prob rescaling; identity at
    eval.
    """

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The per-sample 0/1 mask, (B, 1, 1, 1) in x's dtype, or None at eval. A caller that
        scales x anyway (NFBlock) folds it into that scale instead of a pass of its own."""
        if not self.training:
            return None
        # floor(keep_prob + U) is 1 exactly when U >= rate (in real arithmetic; the comparison
        # skips the sum's rounding), one in-place op; drawn in float32 so that a bf16 input does
        # not round the draw.
        mask = torch.rand((x.shape[0], 1, 1, 1), device=x.device, dtype=torch.float32)
        mask = mask.ge_(self.rate)
        return mask if x.dtype == mask.dtype else mask.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.keep_mask(x)
        return x if mask is None else x * mask

    def extra_repr(self) -> str:
        return f"rate={self.rate}"
