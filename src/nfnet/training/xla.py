"""What the training step does differently on TPU (torch-xla): bf16 compute, global epoch metrics,
per-step numbers that do not recompile, compile counters. (Whether a TPU is there at all is the
command line's question: nfnet.app.machine.)

Everything here imports without torch-xla installed: torch_xla is only imported inside the
functions that need it, so the CPU/GPU environments load this module (and the LightningModule,
which uses it) unchanged. See docs/TPU.md for how these pieces fit `trainer=tpu`.

Why each piece exists:
- bf16: Lightning 2.6's `precision="bf16-true"` on XLA only sets `XLA_USE_BF16=1`, which
  torch-xla >= 2.8 no longer reads, so it silently trains in float32. `XLABf16Precision` makes
  bf16 explicit instead, the way the official recipe does it (NFNET_SPEC §4 "precision"):
  float32 master weights and optimizer state, every float parameter and the images cast to bf16
  for the training forward and backward, gradients cast back to float32 by autograd before
  the cross-core reduction, AGC and the update; evaluation runs in float32.
- metrics: nfnet.training.metrics logs global accuracies without torchmetrics on XLA.
- recompiles: torch-xla shares one graph input between equal Python numbers (and 0-dim
  uploads), so a per-step number equal to another one in the step recompiles it; per-step
  numbers the module computes (the EMA weight) go up as shape-(1,) tensors instead.
"""

from __future__ import annotations

import torch
from lightning.pytorch.plugins.precision import XLAPrecision


# --------------------------------------------------------------------------- bf16 compute
class XLABf16Precision(XLAPrecision):
    """XLA precision plugin that trains with bf16 compute over float32 master weights.

    It keeps Lightning's XLA optimizer step (closure, cross-core gradient reduction, the
    `on_before_optimizer_step` hook, the step, `mark_step`) and sets no environment variable;
    the LightningModule reads `compute_dtype` and casts the network explicitly in its training
    forward (`forward_in_dtype`). Lightning lists it as "bf16-mixed" because that is what it is:
    the parameters and optimizer state stay float32.
    """

    compute_dtype = torch.bfloat16

    def __init__(self) -> None:
        super().__init__("32-true")  # the float32 path: no XLA_USE_* variable is set
        self.precision = "bf16-mixed"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(compute_dtype={self.compute_dtype})"


def forward_in_dtype(net: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`net(images)` with every float parameter and buffer, and the images, cast to `dtype`.

    The casts are ordinary differentiable ops on the float32 parameters, so backward lands
    float32 gradients on them, and nothing is stored in `dtype`: the network, its EMA copy,
    checkpoints and the optimizer state all stay float32.
    """
    cast = {
        name: tensor.to(dtype) if tensor.is_floating_point() else tensor
        for name, tensor in [*net.named_parameters(), *net.named_buffers()]
    }
    return torch.func.functional_call(net, cast, (images.to(dtype),))


def on_xla(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "xla"


# --------------------------------------------------------------------------- compile counters
def xla_counters() -> dict[str, int]:
    """How many graphs torch-xla compiled, device-to-host transfers it made, and ops that fell
    back to the CPU so far in this process (from `torch_xla.debug.metrics`)."""
    import torch_xla.debug.metrics as met

    def count(metric: str) -> int:
        data = met.metric_data(metric)
        return int(data[0]) if data else 0

    fallbacks = sum(int(met.counter_value(name) or 0) for name in met.counter_names() if name.startswith("aten::"))
    return {
        "compiles": count("CompileTime"),
        "executions": count("ExecuteTime"),
        "transfers_from_device": count("TransferFromDeviceTime"),
        "cpu_fallbacks": fallbacks,
    }
