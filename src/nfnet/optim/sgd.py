"""SGD with momentum, Nesterov and coupled weight decay (NFNET_SPEC §3-4), in a handful of
foreach kernels per parameter group, with an optional device-side skip of the whole step.

The update is torch.optim.SGD's, op for op: ``d = g + wd * p``; ``buf = d`` on a parameter's
first step, then ``buf = momentum * buf + (1 - dampening) * d``; Nesterov ``d = d + momentum *
buf`` (else ``d = buf``); ``p = p - lr * d``. With a float ``lr`` the results are bit-identical to
torch.optim.SGD's (its foreach and per-tensor paths agree bit for bit). With a 0-dim tensor
``lr`` (a CUDA graph keeps it valid while a scheduler fills it in place) the last line is
``p - (lr * d)``, two roundings: what torch.optim.SGD computes for a tensor lr under
torch.compile; in eager it reads the tensor back to the host instead.

The skip (``apply_step``): a 0-dim bool tensor on the parameters' device, set before ``step``
(or inside its closure, as Lightning's ``on_before_optimizer_step`` does). When it holds False,
parameters and momentum buffers keep their exact bits, whatever the gradients hold, and the next
applied step continues as if the skipped one never happened. No value is read back to the host.
Masking by multiplication cannot do this (``0 * NaN`` is NaN) and foreach has no ``where``, so
the guarded path runs on a scratch copy ``D`` of the update (one per parameter, allocated once,
so that its integer view is allocated once too):

- ``D = g + wd * p``, then ``D`` viewed as integers is multiplied by the flag: on a skipped step
  every bit pattern, NaN and Inf included, becomes +0; on an applied step it is unchanged.
- ``D *= +1 / -1``: -0 on a skipped step, so ``buf * 1 + D`` keeps every buffer bit (``x + -0``
  is ``x`` for every x, -0 included; ``x + +0`` would turn -0 into +0).
- ``buf *= momentum / 1``, ``buf += D``; Nesterov ``D += momentum * buf``.
- ``D`` as integers times the flag again (+0 on a skipped step), then ``p += -lr * D`` (a float
  lr: ``-lr * +0`` is -0) or ``p -= lr * D`` (a tensor lr: ``p - +0``): ``p`` keeps its bits.

A guarded step allocates momentum buffers as -0.0 instead of cloning the first ``d``: ``momentum *
-0 + d`` is exactly ``d`` (for dampening 0, the recipe's), so whether the first step was skipped
never has to be known on the host. The guarded path needs dampening 0; the unguarded one
(``apply_step`` None) is torch's sequence for any dampening.

State layout: ``state[p]["momentum_buffer"]``, and param-group keys lr, momentum, dampening,
weight_decay, nesterov: torch.optim.SGD's layout, so its checkpoints load here and ours load
there (its extra group keys ``maximize``, ``foreach``, ``fused``, ``differentiable`` are ignored,
``maximize=True`` is refused).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer

# Integer dtypes with the same width as each float dtype: the guarded path clears non-finite
# values by multiplying their bit patterns by 0 or 1, which no float operation can do.
_SAME_WIDTH_INT = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


class SGD(Optimizer):
    """torch.optim.SGD's update in foreach kernels, with ``lr`` a float or a 0-dim tensor and an
    optional device-side skip flag ``apply_step`` (see the module docstring).

    ``apply_step``: None (every step applies) or a 0-dim bool tensor on the parameters' device;
    it stays set until replaced, so set it before every step (``StepGuard`` does).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float | torch.Tensor,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        if isinstance(lr, torch.Tensor) and lr.ndim != 0:
            raise ValueError(f"SGD: a tensor lr must be 0-dim, got shape {tuple(lr.shape)}.")
        if float(lr) < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"SGD: need lr, momentum and weight_decay >= 0, got lr={float(lr)}, "
                f"momentum={momentum}, weight_decay={weight_decay}."
            )
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: Nesterov momentum needs momentum > 0 and dampening 0.")
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening,
                    "weight_decay": weight_decay, "nesterov": nesterov}
        super().__init__(params, defaults)
        self.apply_step: torch.Tensor | None = None
        # Per parameter: (scratch D, D viewed as same-width integers). Not state: never saved.
        self._scratch: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            # The closure runs first: it is where Lightning's hooks set `apply_step`.
            with torch.enable_grad():
                loss = closure()
        flags = _StepFlags(self.apply_step) if self.apply_step is not None else None
        for group in self.param_groups:
            if group.get("maximize", False):
                raise ValueError("SGD: maximize=True is not supported.")
            if flags is not None and group["momentum"] != 0 and group["dampening"] != 0:
                raise ValueError(
                    "SGD: a guarded step (apply_step set) needs dampening 0: torch's first step "
                    "copies the gradient undampened, which a step skipped on the device cannot "
                    "decide."
                )
            for params, grads in _buckets(group):
                if flags is None:
                    self._update(group, params, grads)
                else:
                    self._guarded_update(group, params, grads, flags)
        return loss

    def _update(self, group: dict, params: list, grads: list) -> None:
        """torch.optim.SGD's foreach sequence."""
        momentum, lr = group["momentum"], group["lr"]
        # A fresh list, which later in-place ops may change (never the caller's gradients).
        update = torch._foreach_add(grads, params, alpha=group["weight_decay"]) \
            if group["weight_decay"] != 0 else None
        if momentum != 0:
            d = grads if update is None else update
            old_bufs, old_d = self._momentum_buffers(params, d, lambda p, d_p: d_p.detach().clone())
            if old_bufs:
                torch._foreach_mul_(old_bufs, momentum)
                torch._foreach_add_(old_bufs, old_d, alpha=1 - group["dampening"])
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            if not group["nesterov"]:
                update = bufs
            elif update is None:
                update = torch._foreach_add(grads, bufs, alpha=momentum)
            else:
                torch._foreach_add_(update, bufs, alpha=momentum)
        elif update is None:
            update = grads
        if isinstance(lr, torch.Tensor):
            torch._foreach_sub_(params, torch._foreach_mul(update, lr))
        else:
            torch._foreach_add_(params, update, alpha=-lr)

    def _momentum_buffers(self, params: list, d: list, make) -> tuple[list, list]:
        """The buffers that existed before this step and their ``d``; a missing buffer is
        created as ``make(param, d_i)``."""
        old_bufs, old_d = [], []
        for param, d_p in zip(params, d):
            buf = self.state[param].get("momentum_buffer")
            if buf is None:
                self.state[param]["momentum_buffer"] = make(param, d_p)
            else:
                old_bufs.append(buf)
                old_d.append(d_p)
        return old_bufs, old_d

    def _guarded_update(self, group: dict, params: list, grads: list, flags: "_StepFlags") -> None:
        momentum, lr = group["momentum"], group["lr"]
        scratch, scratch_bits = self._scratch_for(params)
        torch._foreach_copy_(scratch, grads)
        if group["weight_decay"] != 0:
            torch._foreach_add_(scratch, params, alpha=group["weight_decay"])
        _clear_if_skipped(scratch, scratch_bits, flags)
        if momentum != 0:
            self._momentum_buffers(params, scratch, lambda p, _: torch.full_like(p, -0.0))
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(scratch, flags.sign(scratch[0].dtype))
            torch._foreach_mul_(bufs, flags.momentum(momentum, bufs[0].dtype))
            torch._foreach_add_(bufs, scratch)
            if group["nesterov"]:
                torch._foreach_add_(scratch, bufs, alpha=momentum)
            else:
                torch._foreach_copy_(scratch, bufs)
            _clear_if_skipped(scratch, scratch_bits, flags)
        if isinstance(lr, torch.Tensor):
            torch._foreach_mul_(scratch, lr)
            torch._foreach_sub_(params, scratch)
        else:
            torch._foreach_add_(params, scratch, alpha=-lr)

    def _scratch_for(self, params: list) -> tuple[list, list]:
        scratch, bits = [], []
        for param in params:
            entry = self._scratch.get(param)
            if entry is None or entry[0].shape != param.shape or entry[0].device != param.device:
                buffer = torch.empty_like(param)
                entry = (buffer, buffer.view(_SAME_WIDTH_INT[param.dtype]))
                self._scratch[param] = entry
            scratch.append(entry[0])
            bits.append(entry[1])
        return scratch, bits


def _clear_if_skipped(scratch: list, scratch_bits: list, flags: "_StepFlags") -> None:
    """``scratch`` becomes +0 everywhere on a skipped step, NaN and Inf included, and keeps its
    bits on an applied one."""
    if torch.compiler.is_compiling():
        # AOTAutograd cannot trace in-place writes through a view of another dtype; a
        # per-tensor where gives the same bits, and inductor fuses it into few kernels.
        torch._foreach_copy_(scratch, [torch.where(flags.apply, d, 0.0) for d in scratch])
    else:
        torch._foreach_mul_(scratch_bits, flags.keep_bits(scratch_bits[0].dtype))


class _StepFlags:
    """The per-step tensors derived from ``apply_step``, each made once per dtype."""

    def __init__(self, apply_step: torch.Tensor) -> None:
        if apply_step.dtype != torch.bool or apply_step.ndim != 0:
            raise ValueError(
                f"SGD.apply_step must be a 0-dim bool tensor, got {apply_step.dtype} "
                f"of shape {tuple(apply_step.shape)}."
            )
        self.apply = apply_step
        self._cache: dict = {}

    def _get(self, key, make):
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = make()
        return value

    def keep_bits(self, dtype: torch.dtype) -> torch.Tensor:
        """1 on an applied step, 0 on a skipped one, as integers of ``dtype``."""
        return self._get(("keep", dtype), lambda: self.apply.to(dtype))

    def sign(self, dtype: torch.dtype) -> torch.Tensor:
        """+1 on an applied step, -1 on a skipped one."""
        return self._get(("sign", dtype), lambda: self._select(1.0, -1.0, dtype))

    def momentum(self, momentum: float, dtype: torch.dtype) -> torch.Tensor:
        """The buffers' decay: ``momentum`` on an applied step, 1 on a skipped one."""
        return self._get(("momentum", momentum, dtype), lambda: self._select(momentum, 1.0, dtype))

    def _select(self, applied: float, skipped: float, dtype: torch.dtype) -> torch.Tensor:
        value = torch.where(self.apply, applied, skipped)
        return value if value.dtype == dtype else value.to(dtype)


def _buckets(group: dict) -> list[tuple[list, list]]:
    """The group's parameters that have a gradient, split by (device, dtype): a foreach kernel
    takes one of each."""
    buckets: dict = {}
    for param in group["params"]:
        if param.grad is None:
            continue
        if param.grad.is_sparse:
            raise ValueError("SGD: sparse gradients are not supported.")
        params, grads = buckets.setdefault((param.device, param.dtype), ([], []))
        params.append(param)
        grads.append(param.grad)
    return list(buckets.values())

