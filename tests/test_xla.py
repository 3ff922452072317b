"""The training step on an XLA device: compiled once, no host reads, learning; AGC equals the CPU.

Run in the torch-xla environment with the XLA compiler on the CPU (what `.ci/run` does):

    source scripts/env_xla.sh && PJRT_DEVICE=CPU "$NFNET_XLA_PY" -m pytest -m xla

Elsewhere (no torch_xla) every test here is skipped. No TPU is needed: XLA on the CPU compiles
the same graphs, so a step that recompiles or reads a value back to the host here does so on a
TPU too. What this cannot show (TPU speed, memory, several cores) is listed in docs/TPU.md.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest

if importlib.util.find_spec("torch_xla") is None:
    pytest.skip("needs torch-xla (the XLA environment, scripts/env_xla.sh)", allow_module_level=True)

# Read when torch-xla creates its runtime, i.e. at the first device use below. The CPU backend's
# optimisation passes are switched off: the graphs, and so what is compiled when, are the same,
# and each compile of the step takes a fraction of the time on CI's small machine.
os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch_xla  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from lightning.fabric.accelerators import xla as fabric_xla  # noqa: E402
from omegaconf import open_dict  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from conftest import compose_train  # noqa: E402
from nfnet.data.mixing import mixup_cutmix  # noqa: E402
from nfnet.models import create_model  # noqa: E402
from nfnet.app.schema import section  # noqa: E402
from nfnet.training.module import NFNetClassifier  # noqa: E402
from nfnet.optim.agc import AdaptiveGradClipper  # noqa: E402
from nfnet.optim.param_groups import agc_named_parameters, stage_of  # noqa: E402
from nfnet.training.xla import XLABf16Precision, xla_counters  # noqa: E402

pytestmark = pytest.mark.xla

STEPS = 8
BATCH = 8
IMAGE = 32
CLASSES = 4


class _ImagesInMemory(pl.LightningDataModule):
    """uint8 images whose class sets their brightness: learnable within a few steps."""

    def __init__(self, batches: int) -> None:
        super().__init__()
        self.batch_size = BATCH  # per device, read by the module to scale the learning rate
        generator = torch.Generator().manual_seed(0)
        n = batches * BATCH
        labels = torch.arange(n) % CLASSES
        level = torch.linspace(40.0, 215.0, CLASSES)[labels].view(-1, 1, 1, 1)
        images = level + 25.0 * torch.randn(n, 3, IMAGE, IMAGE, generator=generator)
        self.dataset = TensorDataset(images.clamp(0, 255).to(torch.uint8), labels)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=BATCH, shuffle=False, drop_last=True)


class _StepProbe(pl.Callback):
    """After every optimizer step (Lightning's XLA step ends with mark_step): the counters, and
    the loss kept on the device so that recording it reads nothing back."""

    def __init__(self) -> None:
        self.counters: list[dict[str, int]] = []
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.counters.append(xla_counters())
        self.losses.append(outputs["loss"].detach())


@pytest.fixture
def cpu_as_tpu(monkeypatch):
    """Lets Lightning's TPU accelerator take the XLA CPU device: it only counts TPU chips."""
    monkeypatch.setattr(fabric_xla.XLAAccelerator, "is_available", staticmethod(lambda: True))
    monkeypatch.setattr(fabric_xla.XLAAccelerator, "auto_device_count", staticmethod(lambda: 1))


def test_trainer_tpu_step_compiles_twice_then_runs_without_host_reads(cpu_as_tpu, tmp_path, capsys):
    """`trainer=tpu` as composed from conf/ (TPU accelerator, the bf16 plugin, its log
    interval), on one XLA device, running the LightningModule's real step: on-device
    normalization, bf16 forward, soft-target loss, backward, AGC in on_before_optimizer_step,
    Nesterov SGD with weight decay, the per-step schedule and the EMA update.

    Step 1 compiles without momentum buffers, step 2 with them (and with the EMA update that
    step 1 queued); from then on every step reuses step 2's graph. The EMA weight comes from a
    step counter on the device (nfnet.optim.ema): as a per-step Python float it would be a new
    graph input at steps whose value equals another constant (0.9 at step 1, the momentum) and
    force more compiles, which this also checks.
    """
    cfg = compose_train(["trainer=tpu", "model=nfnet_tiny", "optim=sgd_agc", "logger=none"])
    assert cfg.trainer.accelerator == "tpu" and cfg.trainer.devices == "auto" and cfg.trainer.strategy == "xla"
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    probe = _StepProbe()
    # XLAStrategy needs several devices; with one, Lightning picks its single-device twin.
    trainer = instantiate(
        cfg.trainer, devices=1, strategy="auto", max_steps=STEPS, max_epochs=1, logger=False,
        callbacks=[probe], enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    assert isinstance(trainer.precision_plugin, XLABf16Precision)
    assert trainer.log_every_n_steps > STEPS  # nothing reaches a logger inside the run
    pl.seed_everything(0)
    module = NFNetClassifier(
        section("model", name="nfnet_tiny"),
        section("optim", base_lr=0.1, reference_batch=BATCH, warmup_epochs=0, weight_decay=cfg.optim.weight_decay,
                agc={"clipping": cfg.optim.agc.clipping}, ema={"decay": 0.999}),
        num_classes=CLASSES,
    )
    trainer.fit(module, datamodule=_ImagesInMemory(STEPS))

    compiles = [c["compiles"] for c in probe.counters]
    report = "compiles after each step: " + ", ".join(map(str, compiles))
    with capsys.disabled():
        print(f"\n[xla] {report}; counters after the last step: {probe.counters[-1]}")
    assert len(compiles) == STEPS
    assert compiles[1] > compiles[0], report  # step 2 is a new graph (momentum buffers, EMA) ...
    assert compiles[2:] == [compiles[1]] * (STEPS - 2), report  # ... and the last one
    # No `.item()` and no op falling back to the CPU inside a step: after the first step (whose
    # count includes Lightning's set-up reads) nothing more is read back or run on the host.
    for key in ("transfers_from_device", "cpu_fallbacks"):
        assert [c[key] for c in probe.counters] == [probe.counters[0][key]] * STEPS, key
    # 8 steps ran each one graph execution at most (plus none for the probe itself).
    executions = [c["executions"] for c in probe.counters]
    assert all(b - a <= 2 for a, b in zip(executions[1:], executions[2:])), executions

    losses = [float(loss) for loss in probe.losses]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < losses[0] - 0.01, losses
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    # The EMA moved away from its initial copy, on the device, in float32.
    ema = dict(module.ema_net.named_parameters())
    assert all(p.dtype == torch.float32 for p in ema.values())
    assert any(not torch.equal(p.cpu(), q.cpu()) for p, q in zip(ema.values(), module.net.parameters()))


def test_one_agc_call_on_xla_equals_the_cpu_result():
    """The module's clipper (unit-wise norms, role-based exemption, per-stage telemetry) on the
    CPU-sized NFNet's real parameters, with gradients spread so that some units clip and some
    do not: XLA and CPU agree on every clipped gradient and on the clipped fractions."""
    torch.manual_seed(0)
    cpu_net = create_model("nfnet_tiny", num_classes=CLASSES)
    for param in cpu_net.parameters():
        # Per-tensor scales from 1e-4 to 1 around ||w||: units on both sides of the threshold.
        param.grad = torch.randn_like(param) * 10.0 ** torch.empty(()).uniform_(-4.0, 0.0)
    device = torch_xla.device()
    xla_net = create_model("nfnet_tiny", num_classes=CLASSES).to(device)
    xla_net.load_state_dict(cpu_net.state_dict())
    for cpu_param, xla_param in zip(cpu_net.parameters(), xla_net.parameters()):
        xla_param.grad = cpu_param.grad.to(device)

    cpu_clipper = AdaptiveGradClipper(agc_named_parameters(cpu_net), 0.01, group_fn=stage_of)
    xla_clipper = AdaptiveGradClipper(agc_named_parameters(xla_net), 0.01, group_fn=stage_of)
    cpu_fraction = cpu_clipper.clip_()
    xla_fraction = xla_clipper.clip_()
    torch_xla.sync()

    assert 0.05 < float(cpu_fraction) < 0.95  # the case is not trivial either way
    assert float(xla_fraction) == pytest.approx(float(cpu_fraction), abs=1e-6)
    for name, fraction in cpu_clipper.group_fractions().items():
        assert float(xla_clipper.group_fractions()[name]) == pytest.approx(float(fraction), abs=1e-6), name
    for (name, cpu_param), xla_param in zip(cpu_net.named_parameters(), xla_net.parameters()):
        torch.testing.assert_close(xla_param.grad.cpu(), cpu_param.grad, rtol=1e-5, atol=1e-8, msg=name)


def test_on_device_mixing_is_shape_static_and_equals_the_cpu():
    """MixUp/CutMix of uint8 batches already on the device (the official pairing) compiles
    once for its shapes, reads nothing back, and gives the CPU's images and targets for the
    same random draws."""
    device = torch_xla.device()
    generator = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (2 * BATCH, 3, IMAGE, IMAGE), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, CLASSES, (2 * BATCH,), generator=generator)
    raw_xla, labels_xla = raw.to(device), labels.to(device)
    counters = []
    for step in range(4):
        torch.manual_seed(step)  # MixUp's Beta draws use the global RNG
        mixed, targets = mixup_cutmix(raw_xla, labels_xla, CLASSES, generator=torch.Generator().manual_seed(step))
        torch_xla.sync()
        counters.append(xla_counters())
        torch.manual_seed(step)
        cpu_mixed, cpu_targets = mixup_cutmix(raw, labels, CLASSES, generator=torch.Generator().manual_seed(step))
        # Compared only after the counters are read: .cpu() is itself a transfer.
        assert mixed.dtype == torch.uint8 and mixed.shape == (BATCH, 3, IMAGE, IMAGE)
        # The blend rounds float32 values to uint8 on both sides: allow one level of difference.
        assert (mixed.cpu().int() - cpu_mixed.int()).abs().max() <= 1
        torch.testing.assert_close(targets.cpu(), cpu_targets, rtol=1e-6, atol=1e-6)
        counters[-1] = xla_counters()  # after the comparisons' own transfers
    compiles = [c["compiles"] for c in counters]
    assert compiles[1:] == [compiles[1]] * 3, compiles
    assert all(c["cpu_fallbacks"] == counters[0]["cpu_fallbacks"] for c in counters), counters
