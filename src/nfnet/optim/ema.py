"""The TF1-style exponential moving average of the weights (NFNET_SPEC §4, `utils.tf1_ema`),
with its step counter and skip flag on the device.

    ema = decay_t * ema + (1 - decay_t) * p,   decay_t = min(decay, (1 + t) / (10 + t))

computed as ``lerp(ema, p, 1 - decay_t)``, bit for bit what ``torch._foreach_lerp_(ema, params,
1.0 - ema_decay(t))`` gives with a Python float: the weight is computed in float64 on the
device, as Python computes it, and rounded once to float32, as the lerp kernel rounds a Python
scalar; lerp with a tensor weight runs the same arithmetic. t counts every update call, skipped
or not (an optimizer step skipped for non-finite gradients still advances the schedule, as
`global_step` does). A skipped update (``apply`` False) leaves every average bitwise unchanged
(weight 0: ``ema + 0 * (p - ema)``, with ``p`` finite since the skipped step did not move it;
the one exception is an element that is -0.0 in the average, which stays -0.0 only if the
weight's is too, i.e. one that was -0.0 in the initial weights and never moved).

No foreach lerp takes a 0-dim tensor weight. On CPU (where foreach kernels run tensor by tensor
anyway) and on XLA (which traces the whole step into one graph) each tensor gets the same 0-dim
weight; on XLA a scratch list, created on the first update, made the second step's graph differ
from all later ones (one more compile, tests/test_xla.py). On CUDA that list would leave the
fused multi-tensor kernel for one launch per tensor, so the weight is first written into a
scratch list shaped like the averages (two fused kernels), which keeps the lerp one fused kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nfnet.optim.schedule import PAPER_EMA_DECAY

# utils.tf1_ema: the decay warms up as (1 + t) / (10 + t).
_WARMUP_OFFSET = 10.0
# Devices whose foreach lerp takes a list of 0-dim weights (CPU has no fused path to leave, XLA
# fuses the traced graph itself); everywhere else the weight is filled into a scratch list.
_BROADCAST_WEIGHT_DEVICES = frozenset({"cpu", "xla"})


class ExponentialMovingAverage:
    """``averages`` track ``sources`` (e.g. an EMA copy's parameters and the model's), pair by
    pair; ``step`` is the number of updates already made (``trainer.global_step`` on resume).

    ``step`` is kept as a 0-dim tensor on the averages' device, ``self.step`` (set it with
    ``self.step.fill_(n)``), in float64 by default (the weight then equals Python's bit for bit);
    ``step_dtype=torch.float32`` for devices without float64 (TPUs), exact for t < 2^24.
    """

    def __init__(self, averages: Sequence[torch.Tensor], sources: Sequence[torch.Tensor],
                 decay: float = PAPER_EMA_DECAY, step: int = 0, step_dtype: torch.dtype = torch.float64) -> None:
        averages, sources = list(averages), list(sources)
        if len(averages) != len(sources) or not averages:
            raise ValueError(
                f"ExponentialMovingAverage: need as many averages as sources (and at least "
                f"one), got {len(averages)} and {len(sources)}."
            )
        for index, (avg, src) in enumerate(zip(averages, sources)):
            if avg.shape != src.shape or avg.dtype != src.dtype or avg.device != src.device:
                raise ValueError(
                    f"ExponentialMovingAverage: pair {index} differs: average "
                    f"{tuple(avg.shape)} {avg.dtype} {avg.device}, source "
                    f"{tuple(src.shape)} {src.dtype} {src.device}."
                )
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ExponentialMovingAverage: decay must be in [0, 1], got {decay}.")
        self.decay = float(decay)
        # Uploaded with shape (1,) and viewed as 0-dim on the device: torch-xla would share a 0-dim
        # upload with any equal number of the step (a new graph input, a recompile).
        self.step = torch.tensor([float(step)], dtype=step_dtype, device=averages[0].device).view(())
        buckets: dict = {}
        for avg, src in zip(averages, sources):
            pair = buckets.setdefault((avg.device, avg.dtype), ([], []))
            pair[0].append(avg)
            pair[1].append(src)
        self._buckets = list(buckets.values())
        self._weight_scratch: dict[int, list[torch.Tensor]] = {}

    def weight(self) -> torch.Tensor:
        """``1 - decay_t`` at the current step: a 0-dim float32 tensor, computed in the step's dtype."""
        t = self.step
        decay_t = torch.clamp((t + 1.0) / (t + _WARMUP_OFFSET), max=self.decay)
        return torch.rsub(decay_t, 1.0).to(torch.float32)

    @torch.no_grad()
    def update_(self, apply: torch.Tensor | None = None) -> None:
        """One update; ``apply`` (a 0-dim bool tensor, None = True) False skips it on the
        device. The step counter advances either way."""
        weight = self.weight()
        if apply is not None:
            weight = torch.where(apply, weight, 0.0)
        for index, (averages, sources) in enumerate(self._buckets):
            weights = self._weights_for(index, averages, weight)
            torch._foreach_lerp_(averages, sources, weights)
        self.step.add_(1.0)

    def _weights_for(self, index: int, averages: list, weight: torch.Tensor) -> list:
        if averages[0].device.type in _BROADCAST_WEIGHT_DEVICES:
            return [weight] * len(averages)
        scratch = self._weight_scratch.get(index)
        if scratch is None:
            scratch = self._weight_scratch[index] = [torch.empty_like(a) for a in averages]
        # Written as 0 + w, exactly w, by two fused kernels.
        torch._foreach_zero_(scratch)
        torch._foreach_add_(scratch, weight)
        return scratch
