"""Adaptive gradient clipping (AGC), NFNET_SPEC.md §3, in PyTorch layouts.

For every *unit* of a parameter, ``max_norm = clipping * max(||w_unit||, eps)``; where
``||g_unit|| > max_norm`` the unit's gradient becomes ``g * max_norm / max(||g_unit||, 1e-6)``.
A unit is an output channel of a conv weight ``(O, I, kh, kw)`` or an output row of a linear
weight ``(out, in)`` (generally: everything but dim 0 is reduced); a tensor with at most one
non-singleton dimension (scalars, gains, biases, skip gains) is a single unit. That last rule is
the official ``len(squeeze(x).shape) <= 1`` test, so a ``(O, 1, 1, 1)`` gain is one unit too.

Design, and why:
- Only ``.grad`` is read and written (parameters are read), so it composes with DDP, which
  averages gradients inside ``backward``, and with XLA, whose all-reduce happens before the
  optimizer hooks (PRIOR_ART §4).
- No host synchronisation and no Python branching on tensor values: "clip or not" is a
  per-unit factor (1 where not clipped, exactly, so unclipped gradients are bit-identical),
  which keeps the whole thing traceable by torch.compile(fullgraph=True), torch-xla and
  CUDA graphs. Only shapes, dtypes, devices and ``grad is None`` steer Python control flow.
- Norms are float32 whatever the parameter/gradient dtype; the factor is applied in float32
  and the result rounded once into the gradient's own dtype, in place.
- Speed: AGC is memory bound (PRIOR_ART "What none of them has" §2). Every gradient is read
  twice and written once, every parameter read once, with no full-size temporaries: one
  unit-wise norm per weight tensor, one ``_foreach_norm`` call for all whole-tensor units.
  On CUDA (and XLA) all factors are then computed at once on the concatenated norms and
  applied with a single ``_foreach_mul_``: ~2 dispatches per weight tensor plus a handful,
  against ~7 per tensor for a per-parameter loop, and launches are what costs there. On CPU
  each weight tensor is scaled right after its two norms instead (a few more, cheap, small
  ops per tensor): F0/F3 gradients are at most 18 MB (final_conv; 9 MB next), so the
  multiply mostly re-reads them from a 32 MB last-level cache rather than from DRAM, one of
  the four memory passes; measured 3-13%
  less CPU time than the batched order on F0/F3 (benchmarks/results/agc.md). Rejected: stacking
  same-shape tensors (the stack is a full copy of the gradients: more traffic, not less),
  splitting big tensors into L2-sized row blocks (measured slower: more ops than the cache
  saves) and, after measuring, torch.compile of the whole function (no steady gain on CPU,
  memory bound, after a warm-up of 15-60 s for F0; benchmarks/agc.py --compile).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

# NFNET_SPEC §3: floor on the parameter norm (optim.py SGD_AGC eps), so zero-initialised
# biases and skip gains can still move: their gradient norm is capped at clipping * eps.
DEFAULT_EPS = 1e-3
# NFNET_SPEC §3/§4: the clipping factor lambda of exp_nf.py (and SGD_AGC's default), tuned for
# global batch 4096.
PAPER_CLIPPING = 0.01
# NFNET_SPEC §3: guard in the denominator, max(||g||, 1e-6).
GRAD_NORM_FLOOR = 1e-6

_NORM_DTYPE = torch.float32
# Devices where tensor-by-tensor clipping (norms, then the multiply, per weight tensor) beats
# batching every factor into one computation: there the multiply re-reads a gradient that is
# still in cache, while one extra small op per tensor costs little. On CUDA, where a kernel
# launch costs more than the cache saves, the factors stay batched (module docstring, Speed).
_INTERLEAVE_DEVICES = frozenset({"cpu"})


def unit_dims(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...] | None:
    """Dimensions reduced for one unit's norm, or ``None`` for a single whole-tensor norm."""
    if sum(1 for size in shape if size != 1) <= 1:
        return None
    return tuple(range(1, len(shape)))


def num_units(shape: torch.Size | tuple[int, ...]) -> int:
    """How many clipping units a tensor of this shape has."""
    return 1 if unit_dims(shape) is None else int(shape[0])


@dataclass(frozen=True)
class _DevicePlan:
    """Everything about one device's parameters that does not depend on tensor values.

    ``rows`` are positions (in the caller's parameter list) of tensors clipped per output
    unit, ``wholes`` those clipped as one unit. The concatenated norm vector holds the rows'
    units first (in order), then one entry per whole tensor; ``split_sizes`` cuts it back.
    """

    rows: tuple[int, ...]
    row_dims: tuple[tuple[int, ...], ...]
    row_factor_shapes: tuple[tuple[int, ...], ...]
    wholes: tuple[int, ...]
    split_sizes: tuple[int, ...]
    num_units: int
    # Scale each per-unit tensor right after its norms (CPU) instead of all at the end.
    interleave: bool
    # Group label index of every unit, same order as the norm vector; None without telemetry.
    unit_groups: torch.Tensor | None


def _build_plans(
    params: list[torch.Tensor], groups: list[int] | None, num_groups: int
) -> list[_DevicePlan]:
    by_device: dict[torch.device, list[int]] = {}
    for index, param in enumerate(params):
        if param.numel() == 0:  # nothing to clip, and no unit to count
            continue
        by_device.setdefault(param.device, []).append(index)
    plans = []
    for device, indices in by_device.items():
        rows, row_dims, row_shapes, wholes = [], [], [], []
        for index in indices:
            shape = params[index].shape
            dims = unit_dims(shape)
            if dims is None:
                wholes.append(index)
            else:
                rows.append(index)
                row_dims.append(dims)
                row_shapes.append((shape[0],) + (1,) * (len(shape) - 1))
        sizes = [shape[0] for shape in row_shapes] + ([len(wholes)] if wholes else [])
        unit_groups = None
        if groups is not None and num_groups > 0:
            labels = [groups[i] for i, shape in zip(rows, row_shapes) for _ in range(shape[0])]
            labels += [groups[i] for i in wholes]
            unit_groups = torch.tensor(labels, dtype=torch.long, device=device)
        plans.append(
            _DevicePlan(
                rows=tuple(rows),
                row_dims=tuple(row_dims),
                row_factor_shapes=tuple(row_shapes),
                wholes=tuple(wholes),
                split_sizes=tuple(sizes),
                num_units=sum(sizes),
                interleave=device.type in _INTERLEAVE_DEVICES,
                unit_groups=unit_groups,
            )
        )
    return plans


def _factor(
    p_norm: torch.Tensor, g_norm: torch.Tensor, clipping: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit multiplier of the gradient, and the per-unit ``clipped`` mask."""
    max_norm = p_norm.clamp_min(eps).mul_(clipping)
    clipped = g_norm > max_norm
    # Exactly 1 where not clipped, so those gradients come out bit-identical (NaN stays NaN).
    return torch.where(clipped, max_norm / g_norm.clamp_min(GRAD_NORM_FLOOR), 1.0), clipped


def _clip_device(
    plan: _DevicePlan,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    clipping: float,
    eps: float,
) -> torch.Tensor:
    """Clips one device's gradients in place; returns the per-unit ``clipped`` mask."""
    targets: list[torch.Tensor] = []
    factors: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    p_norms, g_norms = [], []
    for index, dims, shape in zip(plan.rows, plan.row_dims, plan.row_factor_shapes):
        p_norm = torch.linalg.vector_norm(params[index], 2, dims, dtype=_NORM_DTYPE)
        g_norm = torch.linalg.vector_norm(grads[index], 2, dims, dtype=_NORM_DTYPE)
        if plan.interleave:
            # Scale this tensor now, while its gradient is still in the last-level cache from
            # the norm just taken: the multiply then reads cache, not DRAM.
            factor, clipped = _factor(p_norm, g_norm, clipping, eps)
            grads[index].mul_(factor.view(shape))
            masks.append(clipped)
        else:
            p_norms.append(p_norm)
            g_norms.append(g_norm)
    if plan.wholes:
        whole_p = [params[i] for i in plan.wholes]
        whole_g = [grads[i] for i in plan.wholes]
        # One call for the many small tensors (gains, biases, skip gains): the per-call
        # overhead, not the bytes, is what costs here.
        p_norms.append(torch.stack(torch._foreach_norm(whole_p, 2, dtype=_NORM_DTYPE)))
        g_norms.append(torch.stack(torch._foreach_norm(whole_g, 2, dtype=_NORM_DTYPE)))
    if p_norms:
        p_norm = torch.cat(p_norms) if len(p_norms) > 1 else p_norms[0]
        g_norm = torch.cat(g_norms) if len(g_norms) > 1 else g_norms[0]
        factor, clipped = _factor(p_norm, g_norm, clipping, eps)
        masks.append(clipped)
        if plan.interleave:  # only the whole-tensor units are left
            pieces = factor.unbind()
        else:
            pieces = factor.split(plan.split_sizes)
            factors.extend(piece.view(shape) for piece, shape in zip(pieces, plan.row_factor_shapes))
            targets.extend(grads[i] for i in plan.rows)
            pieces = pieces[-1].unbind() if plan.wholes else ()
        factors.extend(pieces)
        targets.extend(grads[i] for i in plan.wholes)
    if targets:
        # float32 factor times a bf16/fp16 gradient is computed in float32 and rounded once.
        torch._foreach_mul_(targets, factors)
    # Units in plan order either way: the rows' units, then one per whole tensor.
    return torch.cat(masks) if len(masks) > 1 else masks[0]


def _collect(
    parameters: Iterable[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params, grads = [], []
    for param in parameters:
        grad = param.grad
        if grad is None:
            continue
        if grad.layout != torch.strided:
            raise ValueError(
                f"AGC got a {grad.layout} gradient for a parameter of shape "
                f"{tuple(param.shape)}; only dense gradients can be clipped unit-wise."
            )
        params.append(param)
        grads.append(grad)
    return params, grads


def _fraction(counts: list[torch.Tensor], total: int) -> torch.Tensor:
    device = counts[0].device
    clipped = counts[0]
    for count in counts[1:]:
        clipped = clipped + count.to(device, non_blocking=True)
    return clipped / total


@torch.no_grad()
def adaptive_clip_grad_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    clipping: float,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Clips the ``.grad`` of ``parameters`` in place, unit-wise (NFNET_SPEC §3).

    Parameters whose ``.grad`` is None are skipped. Returns the fraction of units clipped as
    a 0-dim float32 tensor on the gradients' device (0 when there is nothing to clip); it
    never synchronises with the host. Pass every parameter that AGC applies to, i.e. all
    but the classifier weight (``nfnet.optim.param_groups.agc_parameters``).
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params, grads = _collect(parameters)
    plans = _build_plans(params, None, 0)
    if not plans:
        return torch.zeros((), dtype=_NORM_DTYPE)
    counts = [
        _clip_device(plan, params, grads, clipping, eps).sum(dtype=_NORM_DTYPE)
        for plan in plans
    ]
    return _fraction(counts, sum(plan.num_units for plan in plans))


def check_unscaled_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Refuses an optimizer whose step() unscales the gradients itself (a fused one, under AMP):
    the trainer then hands AGC loss-scaled gradients, and it would clip by the wrong ratio."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        raise ValueError(
            f"{type(optimizer).__name__} is fused (it unscales gradients inside step()), so adaptive "
            "gradient clipping would see loss-scaled gradients. Use a non-fused optimizer."
        )


class AdaptiveGradClipper:
    """AGC over a fixed parameter set, with the per-call planning done once.

    ``parameters`` may be tensors or ``(name, tensor)`` pairs (``model.named_parameters()``
    style). With names and a ``group_fn`` (for example ``nfnet.optim.param_groups.stage_of``)
    the fraction of clipped units is also kept per group, for telemetry. Plans are cached
    per pattern of which gradients exist, so a parameter that has no gradient on some steps
    costs one extra plan, not a rebuild per call.
    """

    def __init__(
        self,
        parameters: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        clipping: float = PAPER_CLIPPING,
        eps: float = DEFAULT_EPS,
        group_fn: Callable[[str], str] | None = None,
    ) -> None:
        items = list(parameters)
        named = bool(items) and isinstance(items[0], tuple)
        if group_fn is not None and not named:
            raise ValueError(
                "AdaptiveGradClipper: group_fn needs named parameters; pass "
                "model.named_parameters()-style (name, tensor) pairs."
            )
        self.params: list[torch.Tensor] = [item[1] for item in items] if named else items
        self.names: list[str] | None = [item[0] for item in items] if named else None
        if clipping < 0 or eps <= 0:
            raise ValueError(
                f"AdaptiveGradClipper: need clipping >= 0 and eps > 0, got clipping={clipping}, "
                f"eps={eps}."
            )
        self.clipping = float(clipping)
        self.eps = float(eps)
        self.group_names: list[str] = []
        self._groups: list[int] | None = None
        if group_fn is not None:
            labels = [group_fn(name) for name in self.names]
            self.group_names = list(dict.fromkeys(labels))
            lookup = {label: i for i, label in enumerate(self.group_names)}
            self._groups = [lookup[label] for label in labels]
        self._plans: dict[tuple[bool, ...], tuple[list[_DevicePlan], torch.Tensor | None]] = {}
        self.last_fraction: torch.Tensor | None = None
        self.last_group_fractions: torch.Tensor | None = None

    def _plan_for(self, present: tuple[bool, ...], params: list[torch.Tensor]):
        cached = self._plans.get(present)
        if cached is None:
            groups = None
            if self._groups is not None:
                groups = [g for g, has in zip(self._groups, present) if has]
            plans = _build_plans(params, groups, len(self.group_names))
            group_units = None
            if groups is not None and plans:
                units = [0] * len(self.group_names)
                for param, group in zip(params, groups):
                    if param.numel():
                        units[group] += num_units(param.shape)
                # Groups with no unit this step report 0, not NaN.
                group_units = torch.tensor(
                    [max(u, 1) for u in units], dtype=_NORM_DTYPE, device=plans[0].unit_groups.device
                )
            cached = (plans, group_units)
            self._plans[present] = cached
        return cached

    @torch.no_grad()
    def clip_(self) -> torch.Tensor:
        """Clips the current gradients in place; returns the overall clipped fraction (0-dim)."""
        present = tuple(p.grad is not None for p in self.params)
        params, grads = _collect(self.params)
        plans, group_units = self._plan_for(present, params)
        if not plans:
            self.last_fraction = torch.zeros((), dtype=_NORM_DTYPE)
            self.last_group_fractions = None
            return self.last_fraction
        masks = [_clip_device(plan, params, grads, self.clipping, self.eps) for plan in plans]
        counts = [mask.sum(dtype=_NORM_DTYPE) for mask in masks]
        self.last_fraction = _fraction(counts, sum(plan.num_units for plan in plans))
        if group_units is not None:
            device = group_units.device
            per_group = torch.zeros(len(self.group_names), dtype=_NORM_DTYPE, device=device)
            for plan, mask in zip(plans, masks):
                per_group.index_add_(
                    0, plan.unit_groups.to(device), mask.to(device, _NORM_DTYPE)
                )
            self.last_group_fractions = per_group / group_units
        return self.last_fraction

    def group_fractions(self) -> dict[str, torch.Tensor]:
        """Per-group clipped fractions of the last ``clip_()`` call, as 0-dim tensors."""
        if self.last_group_fractions is None:
            return {}
        return dict(zip(self.group_names, self.last_group_fractions.unbind()))
