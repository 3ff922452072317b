"""Two real processes (gloo, `trainer=ddp_cpu`, i.e. Lightning's ddp_spawn): AGC clips the
replica-averaged gradient, and the replicas stay bit-identical (NFNET_SPEC §3, order of a step:
all-reduce, then AGC, then weight decay and momentum).

Each rank gets different images (Lightning's DistributedSampler deals even indices to rank 0 and
odd ones to rank 1). At every optimizer step each rank writes to disk the gradients AGC is handed
and the ones it leaves behind; this process then recomputes, on one process, each rank's own
gradient of the same weights on that rank's batch, averages the two, clips the average with AGC,
and compares.

Everything the spawned processes unpickle (the module and datamodule classes) is defined at module
level here: pytest puts tests/ on sys.path and a spawned child inherits it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import open_dict
from torch.utils.data import DataLoader, TensorDataset

from conftest import classifier, compose_train
from nfnet.training.module import NFNetClassifier
from nfnet.optim.agc import adaptive_clip_grad_
from nfnet.optim.param_groups import agc_parameters

# Dropout and stochastic depth off, so that a forward pass can be replayed exactly.
DETERMINISTIC = {"drop_rate": 0.0, "stochdepth_rate": 0.0, "activation": "gelu", "gelu_approximate": "tanh"}
WORLD, BATCH, STEPS, SIZE, CLASSES = 2, 4, 3, 32, 10
# No warmup: the schedule's first step would otherwise use lr 0 and leave the weights unchanged.
OPTIM = dict(warmup_epochs=0.0, base_lr=0.4)


class _RandomImages(pl.LightningDataModule):
    """WORLD * BATCH * STEPS distinct random uint8 images; `batch_size` is per device, as the
    module's learning-rate scaling expects of a datamodule."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_size = BATCH
        gen = torch.Generator().manual_seed(0)
        count = WORLD * BATCH * STEPS
        self.images = torch.randint(0, 256, (count, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen)
        self.labels = torch.randint(0, CLASSES, (count,), generator=gen)

    def train_dataloader(self) -> DataLoader:
        # Lightning swaps in a DistributedSampler (no shuffling, as this loader has none).
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=BATCH, shuffle=False)


class _Recording(NFNetClassifier):
    """Writes, per rank and optimizer step: the batch (after the on-device normalization), the
    weights before the step, and every gradient before and after AGC; and the final state dict."""

    record_dir: str = ""

    def setup(self, stage: str) -> None:
        torch.set_num_threads(1)  # two workers on a shared 2-core machine
        self._batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        super().setup(stage)

    def training_step(self, batch, batch_idx):
        self._batches.append(tuple(t.detach().clone() for t in batch))
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer) -> None:
        before = {n: p.grad.detach().clone() for n, p in self.net.named_parameters()}
        weights = copy.deepcopy(self.net.state_dict())
        super().on_before_optimizer_step(optimizer)  # AGC, in place
        after = {n: p.grad.detach().clone() for n, p in self.net.named_parameters()}
        record = {
            "batch": self._batches[-1], "weights": weights, "grads_before_agc": before,
            "grads_after_agc": after, "clip_frac": self.clipper.last_fraction.clone(),
        }
        torch.save(record, Path(self.record_dir) / f"rank{self.global_rank}_step{self.global_step}.pt")

    def on_train_end(self) -> None:
        torch.save(self.state_dict(), Path(self.record_dir) / f"rank{self.global_rank}_final.pt")


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _local_gradient(net: torch.nn.Module, module: NFNetClassifier, weights, batch) -> dict[str, torch.Tensor]:
    """One process's gradient of the module's loss on one batch, at the given weights."""
    net.load_state_dict(weights)
    net.zero_grad(set_to_none=True)
    images, targets = batch
    module.loss(net(images), targets).backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.slow
def test_agc_clips_the_averaged_gradient_and_replicas_stay_identical(tmp_path):
    import hydra

    records = tmp_path / "records"
    records.mkdir()
    cfg = compose_train(["trainer=ddp_cpu"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    trainer = hydra.utils.instantiate(
        cfg.trainer, max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    assert trainer.world_size == WORLD and type(trainer.strategy).__name__ == "DDPStrategy"
    module = classifier(CLASSES, DETERMINISTIC, cls=_Recording, **OPTIM)
    module.record_dir = str(records)
    initial = copy.deepcopy(module.net.state_dict())
    trainer.fit(module, datamodule=_RandomImages())

    # Reference gradients on this one process, with the workers' thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = classifier(CLASSES, DETERMINISTIC, **OPTIM)
        net = reference.net
        for step in range(STEPS):
            rank0, rank1 = (_load(records / f"rank{r}_step{step}.pt") for r in range(WORLD))
            # Same weights going into the step, different data.
            for name, value in rank0["weights"].items():
                assert torch.equal(value, rank1["weights"][name]), (step, name)
            if step == 0:
                for name, value in initial.items():
                    assert torch.equal(rank0["weights"][name], value), name
            assert not torch.equal(rank0["batch"][0], rank1["batch"][0]), step

            local = [_local_gradient(net, reference, r["weights"], r["batch"]) for r in (rank0, rank1)]
            # The two ranks' own gradients differ clearly, so agreeing with their mean means
            # something: AGC was not handed either rank's local gradient.
            assert (local[0]["classifier.weight"] - local[1]["classifier.weight"]).abs().max() > 1e-3
            mean = {n: (local[0][n] + local[1][n]) / 2 for n in local[0]}

            # (a) Both ranks hand AGC the same gradient, bit for bit, and it is the average.
            for name, expected in mean.items():
                seen = rank0["grads_before_agc"][name]
                assert torch.equal(seen, rank1["grads_before_agc"][name]), (step, name)
                torch.testing.assert_close(seen, expected, rtol=1e-5, atol=1e-8, msg=f"step {step}: {name}")

            # ... and what AGC leaves is the average clipped by AGC, on both ranks.
            for name, param in net.named_parameters():
                param.grad = mean[name].clone()
            fraction = adaptive_clip_grad_(
                agc_parameters(net), reference.hparams.optim["agc"]["clipping"], reference.hparams.optim["agc"]["eps"]
            )
            assert 0 < fraction.item() < 1  # some units clipped, some not: both branches checked
            torch.testing.assert_close(rank0["clip_frac"], fraction, rtol=0, atol=1e-6)
            for name, param in net.named_parameters():
                seen = rank0["grads_after_agc"][name]
                assert torch.equal(seen, rank1["grads_after_agc"][name]), (step, name)
                torch.testing.assert_close(seen, param.grad, rtol=1e-5, atol=1e-10, msg=f"step {step}: {name}")
            clipped = [n for n in mean if not torch.equal(rank0["grads_after_agc"][n], rank0["grads_before_agc"][n])]
            assert clipped and "classifier.weight" not in clipped
    finally:
        torch.set_num_threads(threads)

    # (b) The replicas end bit-identical (raw and EMA weights), and they did train.
    final0, final1 = _load(records / "rank0_final.pt"), _load(records / "rank1_final.pt")
    assert final0.keys() == final1.keys()
    for name, value in final0.items():
        assert torch.equal(value, final1[name]), name
    assert not torch.equal(final0["net.classifier.weight"], initial["classifier.weight"])
    assert any(k.startswith("ema_net.") for k in final0)


@pytest.mark.slow
def test_train_py_on_ddp_cpu_tests_after_fitting_and_keeps_every_csv_column(tmp_path, shapes_cache):
    """`python train.py trainer=ddp_cpu` end to end: the fit and then the test each spawn their
    processes; the CSV file written by the first spawn used to break the second one's rewrite."""
    import csv
    import json
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "train.py"), "trainer=ddp_cpu",
         "trainer.max_epochs=1", "test=true", "logger=csv", "print_config=false", "~callbacks.rich_progress_bar",
         "data.shapes.train_per_class=8", "data.shapes.val_per_class=2", "data.shapes.image_size=32",
         "model.train_size=32", "model.test_size=32", "data.batch_size=4", "data.num_workers=0",
         f"data.root={shapes_cache}", f"paths.log_dir={tmp_path}", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "test/acc_top1" in metrics and "val/acc_top1" in metrics
    (metrics_csv,) = run_dir.glob("csv/*/metrics.csv")
    with open(metrics_csv, newline="") as file:
        rows = list(csv.DictReader(file))
    assert any(row["train/loss_step"] for row in rows) and any(row["test/acc_top1"] for row in rows)
