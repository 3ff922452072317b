"""The TPU pieces that need no XLA device: explicit bf16 compute, global metrics from logged
sums and counts, the EMA weight uploaded for XLA, the `trainer=tpu` config and its one-line
refusal on a machine without a TPU.

They run in both environments: in the default one with the rest of the suite, and (marked
`xla`) in the torch-xla one under torch 2.9, where the refusal is the "no TPU found" branch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from conftest import compose_train
from nfnet.models import create_model
from nfnet.training.metrics import log_global_accuracy, topk_accuracies
from nfnet.training.xla import forward_in_dtype

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xla


def test_trainer_tpu_config_casts_bf16_explicitly():
    trainer = compose_train(["trainer=tpu"]).trainer
    assert (trainer.accelerator, trainer.devices, trainer.strategy) == ("tpu", "auto", "xla")
    # Lightning's "bf16-true" would only set XLA_USE_BF16, which torch-xla >= 2.8 ignores.
    assert trainer.precision is None
    assert [p._target_ for p in trainer.plugins] == ["nfnet.training.xla.XLABf16Precision"]
    assert trainer.log_every_n_steps > compose_train(["trainer=cpu"]).trainer.log_every_n_steps


def test_forward_in_dtype_computes_in_bf16_over_float32_weights():
    torch.manual_seed(0)
    net = create_model("nfnet_tiny", num_classes=4).eval()  # no dropout: both passes comparable
    images = torch.randn(2, 3, 32, 32)
    reference = net(images)
    reference.square().sum().backward()
    reference_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()

    logits = forward_in_dtype(net, images, torch.bfloat16)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, rtol=0.1, atol=0.05)
    logits.float().square().sum().backward()
    # Nothing was stored in bf16: weights and the gradients autograd lands on them are float32.
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in net.parameters())
    grad = torch.cat([p.grad.flatten() for p in net.parameters()])
    expected = torch.cat([g.flatten() for g in reference_grads])
    assert torch.nn.functional.cosine_similarity(grad, expected, dim=0) > 0.99


@pytest.mark.parametrize("num_classes", [10, 3])
def test_topk_accuracies_equal_torchmetrics_micro_accuracy(num_classes):
    torch.manual_seed(num_classes)
    logits, labels = torch.randn(37, num_classes), torch.randint(0, num_classes, (37,))
    got = topk_accuracies(logits, labels, (1, 5))
    for value, k in zip(got, (1, 5)):
        metric = MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro")
        assert float(value) == pytest.approx(float(metric(logits, labels)), abs=1e-6)


# ----------------------------------------------------------------------------- global metrics
class _FixedLogits(pl.LightningModule):
    """Validation batches carry their own logits; accuracy is logged the way the module does
    on XLA (per-batch mean, batch size, sync_dist=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Linear(1, 1)  # Lightning wants a parameter to place

    def validation_step(self, batch, batch_idx):
        logits, labels = batch
        log_global_accuracy(self, "val/", logits, labels, (1,))


def _ten_examples():
    # DistributedSampler without shuffling deals even indices to rank 0 and odd ones to rank 1.
    # Rank 0 gets all 5 right; rank 1 gets only index 1 right. Global: 6 / 10.
    labels = torch.zeros(10, dtype=torch.long)
    right = {0, 2, 4, 6, 8, 1}
    logits = torch.tensor([[1.0, 0.0] if i in right else [0.0, 1.0] for i in range(10)])
    return TensorDataset(logits, labels)


@pytest.mark.slow
def test_logged_sums_and_counts_give_the_global_accuracy_across_two_processes(tmp_path):
    """Two real processes (gloo): each logs only its own batches, of uneven sizes (3 and 2), yet
    the epoch value is the global correct / seen (0.6), neither rank 0's own 1.0 nor the plain
    mean of the four batch means (0.583). On TPU the same logs are reduced by XLAStrategy.reduce
    (an all-core sum) instead of gloo's all_reduce."""
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    loader = DataLoader(_ten_examples(), batch_size=3, shuffle=False)
    (result,) = trainer.validate(_FixedLogits(), dataloaders=loader)
    assert result["val/acc_top1"] == pytest.approx(0.6, abs=1e-6)


# ----------------------------------------------------------------------------- no TPU here
def test_trainer_tpu_without_a_tpu_says_so_in_one_line(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "trainer=tpu", "logger=none", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith("config error: ") and "trainer=tpu" in line
    # Without torch-xla: what to install; with it (the XLA test environment): that no TPU was found.
    assert ("pip install torch==2.9.0" in line and "torch-xla" in line) or "found no TPU" in line, line
