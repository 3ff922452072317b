"""The optimizer choices for fine-tuning (nfnet.optim.optimizers) and a run's length fitted to its
data (nfnet.app.budget), against their closed forms."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from nfnet.app.budget import apply_budget
from nfnet.app.schema import section
from nfnet.models import create_model
from nfnet.optim.optimizers import build_optimizer
from nfnet.optim.schedule import run_schedule_lengths
from nfnet.optim.sgd import SGD
from nfnet.optim.step_guard import StepGuard


def _net():
    torch.manual_seed(0)
    return create_model("nfnet_tiny", num_classes=5)


def test_the_default_is_the_papers_sgd_with_one_lr():
    optimizer = build_optimizer(_net(), section("optim"), 0.4)
    assert isinstance(optimizer, SGD)  # the device-side skip of nfnet.optim.step_guard
    assert {g["lr"] for g in optimizer.param_groups} == {0.4}
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in optimizer.param_groups)


def test_the_head_multiplier_gives_the_classifiers_weight_and_bias_their_own_lr():
    net = _net()
    optimizer = build_optimizer(net, section("optim", head_lr_mult=10), 0.2)
    head = {id(net.classifier.weight), id(net.classifier.bias)}
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= head or not ids & head
        assert group["lr"] == pytest.approx(2.0 if ids <= head else 0.2)
    decay = {g["role"]: g["weight_decay"] for g in optimizer.param_groups}
    # Decay by role is unchanged: the classifier weight is decayed, its bias (a bias) is not.
    assert decay["classifier_head"] == 2e-5 and decay["gains_biases_head"] == 0.0
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(net.parameters()))


def test_adamw_decays_weights_decoupled_and_leaves_gains_and_biases_alone():
    net = _net()
    optimizer = build_optimizer(net, section("optim", optimizer="adamw", weight_decay=0.05), 0.01)
    assert isinstance(optimizer, torch.optim.AdamW)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    # With a zero gradient Adam's own step is 0, so what remains is p * (1 - lr * wd) where decayed.
    after = dict(net.named_parameters())
    assert torch.allclose(after["classifier.weight"], before["classifier.weight"] * (1 - 0.01 * 0.05))
    assert torch.equal(after["classifier.bias"], before["classifier.bias"])
    assert torch.equal(after["stem.conv0.gain"], before["stem.conv0.gain"])


def test_a_frozen_trunk_computes_no_gradient_and_only_the_classifier_moves():
    net = _net()
    optimizer = build_optimizer(net, section("optim", freeze_trunk=True), 0.1)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.weight", "classifier.bias"]
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    assert net.stem.conv0.weight.grad is None and net.classifier.weight.grad is not None
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 2


def _cfg(**keys):
    return OmegaConf.create({"steps": None, "optim": {"warmup_fraction": None, "warmup_epochs": 5},
                             "trainer": {"devices": 1, "num_nodes": 1, "accumulate_grad_batches": 1,
                                         "accelerator": "cpu", "max_epochs": 5}, **keys})


def test_steps_become_max_steps_and_the_epochs_that_hold_them():
    cfg = _cfg(steps=50)
    cfg.optim.warmup_fraction = 0.1
    line = apply_budget(cfg, num_train_examples=100, per_device_batch=16)
    # 50 steps x 16 examples = 800 examples = 8 epochs of 100; warmup 10% of them.
    assert cfg.trainer.max_steps == 50 and cfg.trainer.max_epochs == 8
    assert cfg.optim.warmup_epochs == pytest.approx(0.8)
    assert "50 steps" in line and "8 epoch(s)" in line
    # The schedule the module builds from it: 50 steps (the step bound), a 5-step warmup.
    warmup, total = run_schedule_lengths(100, 16, 8, cfg.optim.warmup_epochs, step_bound=50)
    assert (warmup, total) == (pytest.approx(5.0), 50)


def test_a_large_dataset_gets_part_of_an_epoch():
    cfg = _cfg(steps=10)
    apply_budget(cfg, num_train_examples=100_000, per_device_batch=32)
    assert cfg.trainer.max_epochs == 1 and cfg.trainer.max_steps == 10


def test_no_budget_changes_nothing():
    cfg = _cfg()
    assert apply_budget(cfg, 100, 16) is None and cfg.trainer.max_epochs == 5 and "max_steps" not in cfg.trainer


def test_adamw_under_the_step_guard_skips_a_non_finite_step_and_takes_a_finite_one():
    net = _net()
    optimizer = build_optimizer(net, section("optim", optimizer="adamw"), 1e-3)
    guard = StepGuard(optimizer)
    before = [p.detach().clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    next(net.parameters()).grad.view(-1)[0] = float("nan")
    guard.step()
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert guard.counts() == (1, 1) and not optimizer.state  # no moment estimates moved either
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    guard.step()
    # Adam's first step moves every weight by lr (the bias-corrected m / sqrt(v) is 1), minus decay.
    assert all(not torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert guard.counts() == (1, 0)
