"""TPU (torch-xla) support: bf16 compute, global epoch metrics, the no-TPU check, compile counters.

Everything here imports without torch-xla installed: torch_xla is only imported inside the
functions that need it, so the CPU/GPU environments load this module (and `nfnet.module`, which
uses it) unchanged. See docs/TPU.md for how these pieces fit `trainer=tpu`.

Why each piece exists:
- bf16: Lightning 2.6's `precision="bf16-true"` on XLA only sets `XLA_USE_BF16=1`, which
  torch-xla >= 2.8 no longer reads, so it silently trains in float32. `XLABf16Precision` makes
  bf16 explicit instead, the way the official recipe does it (NFNET_SPEC §4 "precision"):
  float32 master weights and optimizer state, every float parameter and the images cast to bf16
  for the training forward and backward, gradients cast back to float32 by autograd before
  the cross-core reduction, AGC and the update; evaluation runs in float32.
- metrics: Lightning's XLA strategy never initialises `torch.distributed`, so torchmetrics
  objects do not sync across TPU cores (their epoch values would be one core's), and their input
  checks read tensors back to the host every step. On XLA the module logs per-batch means with
  the batch size and `sync_dist=True` instead: Lightning accumulates sum(value * n) and sum(n)
  on the device and reduces both across cores once per epoch, which is the exact global mean.
- recompiles: torch-xla shares one graph input between equal Python numbers (and 0-dim
  uploads), so a per-step number equal to another one in the step recompiles it; per-step
  numbers the module computes (the EMA weight) go up as shape-(1,) tensors instead.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.plugins.precision import XLAPrecision

from nfnet.optim.schedule import ema_decay

# The torch release the torch-xla wheels are built against; the TPU install must pin both
# (scripts/env_xla.sh and docs/TPU.md use the same numbers).
TORCH_XLA_PINS = "torch==2.9.0 torchvision==0.24.0 'torch-xla[tpu]==2.9.0'"
INSTALL_HINT = f"pip install {TORCH_XLA_PINS} -e '.[tpu]'"


# --------------------------------------------------------------------------- is there a TPU?
def tpu_unavailable_reason() -> str | None:
    """None when this machine can run `trainer=tpu`, else one line saying why not and what to do.

    Counts TPU chips on the PCI bus (what Lightning's accelerator ends up counting) without
    asking the GCE metadata server, so on an ordinary machine this answers at once instead of
    waiting on a network request that torch-xla sends without a timeout.
    """
    if importlib.util.find_spec("torch_xla") is None:
        return (
            "trainer=tpu needs torch-xla, which is not installed: on a Cloud TPU VM run "
            f"`{INSTALL_HINT}` (torch-xla only loads into the torch it was built for; docs/TPU.md)"
        )
    # Importing torch_xla picks a PJRT device and logs which ("Defaulting to PJRT_DEVICE=CPU")
    # on the root logger; that line would sit beside, and contradict, the one given here.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        from torch_xla._internal import tpu
    except Exception as error:  # a torch-xla built for another torch fails here, in varied ways
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        return (
            f"torch-xla is installed but does not load with torch {torch.__version__} ({first_line}); "
            f"reinstall with `{INSTALL_HINT}`"
        )
    finally:
        root.setLevel(level)
    if tpu.num_available_chips() == 0:
        return (
            "trainer=tpu found no TPU on this machine (no TPU chip on the PCI bus): run it on a Cloud "
            "TPU VM with PJRT_DEVICE=TPU, or pick trainer=cpu / trainer=gpu here; PJRT_DEVICE=CPU "
            "only serves the XLA tests (`pytest -m xla`, docs/TPU.md)"
        )
    return None


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


# --------------------------------------------------------------------------- global metrics
def on_xla(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "xla"


def topk_accuracies(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Per-batch top-k accuracies, one float32 entry per k, with static shapes and no host read.

    k is capped at the class count (top-5 of 3 classes is top-3), as the torchmetrics path does.
    """
    num_classes = logits.shape[-1]
    ks = [min(k, num_classes) for k in ks]
    top = logits.topk(max(ks), dim=-1).indices  # (B, max k), sorted by score
    hit = (top == labels[:, None]).to(torch.float32)
    # hit has at most one 1 per row, so its running sum over ranks says "in the top k".
    in_top = hit.cumsum(dim=-1)  # (B, max k)
    return torch.stack([in_top[:, k - 1].mean() for k in ks])


def log_global_accuracy(
    module: Any, prefix: str, logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int], **log_kwargs: Any
) -> None:
    """Logs `{prefix}acc_top{k}` as epoch values that are global across TPU cores.

    Each is a per-batch mean logged with its batch size and `sync_dist=True`: Lightning keeps
    sum(mean * n) and sum(n) on the device and reduces both across cores only when it computes
    the epoch value, so every core reports correct / seen over all cores' examples.
    """
    batch_size = labels.shape[0]
    for k, value in zip(ks, topk_accuracies(logits, labels, ks).unbind()):
        module.log(
            f"{prefix}acc_top{k}", value, on_step=False, on_epoch=True, sync_dist=True,
            batch_size=batch_size, reduce_fx="mean", **log_kwargs,
        )


def log_train_step_xla(
    module: Any, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]
) -> None:
    """The training-step logs on XLA: nothing is read back to the host inside the step.

    The per-step loss is this core's (it goes to the logger only every `log_every_n_steps` and
    never to the progress bar, which would read it back every step); the epoch loss and
    accuracies are global, reduced once per epoch.
    """
    batch_size = labels.shape[0]
    module.log("train/loss", loss.detach(), on_step=True, on_epoch=False)
    module.log(
        "train/loss_epoch", loss.detach(), on_step=False, on_epoch=True, sync_dist=True,
        batch_size=batch_size, reduce_fx="mean",
    )
    log_global_accuracy(module, "train/", logits.detach(), labels, ks)


# --------------------------------------------------------------------------- per-step scalars
def scalar_on_device(value: float, device: torch.device) -> torch.Tensor:
    """A per-step host number as a 0-dim float32 tensor on `device`, safe from recompiles.

    torch-xla turns every Python number an op receives, and every 0-dim tensor uploaded with
    `torch.tensor(x, device=...)`, into a graph input looked up by value, so two such numbers
    that happen to be equal share one input. A per-step number that equals another number in
    the step (0.9: the momentum, and 1 - label smoothing) thus changes the graph's inputs and
    forces a full compile. A shape-(1,) upload is an ordinary transfer, never shared; viewing
    it as 0-dim happens on the device.
    """
    return torch.tensor([value], dtype=torch.float32, device=device).view(())


def ema_weights_on_device(step: int, decay: float, count: int, device: torch.device) -> list[torch.Tensor]:
    """The EMA interpolation weight 1 - ema_decay(step), for `torch._foreach_lerp_` on XLA.

    1 - decay(t) = 9 / (10 + t) is 0.9 at t = 0, 0.5 at t = 8, 0.2 (the residual alpha) at
    t = 35, ...: as Python floats those steps would each compile the step again
    (`scalar_on_device`). It is one 0-dim tensor per EMA tensor because torch's
    `_foreach_lerp_` overload that takes a single tensor weight reads it back to the host.
    """
    weight = scalar_on_device(1.0 - float(ema_decay(step, decay)), device)
    return [weight] * count


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
