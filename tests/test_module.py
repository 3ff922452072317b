"""NFNetClassifier against the recipe: schedule, EMA, and where AGC sits in the step."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from conftest import classifier, ready_datamodule
from nfnet.optim.sgd import SGD
from nfnet.training.module import NFNetClassifier

# Dropout and stochastic depth off: the tests recompute gradients by hand and need the same
# forward pass twice.
DETERMINISTIC = {"drop_rate": 0.0, "stochdepth_rate": 0.0, "activation": "gelu", "gelu_approximate": "tanh"}


def _fake_trainer(per_device: int, devices: int, accumulate: int, total_steps: int, epochs: int):
    return SimpleNamespace(
        datamodule=SimpleNamespace(batch_size=per_device),
        world_size=devices,
        accumulate_grad_batches=accumulate,
        estimated_stepping_batches=total_steps,
        max_epochs=epochs,
    )


@pytest.mark.parametrize("per_device,devices,accumulate", [(64, 1, 1), (64, 2, 4), (128, 2, 1)])
def test_learning_rate_follows_the_closed_form(per_device, devices, accumulate):
    module = classifier(10, DETERMINISTIC, base_lr=0.1, warmup_epochs=5)
    module.trainer = _fake_trainer(per_device, devices, accumulate, total_steps=1000, epochs=10)
    config = module.configure_optimizers()
    scheduler = config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    # Peak = base_lr * global batch / 256 with global = per-device x devices x accumulation.
    peak = 0.1 * per_device * devices * accumulate / 256
    warmup = 5 * 1000 / 10  # five epochs of optimizer steps

    def expected(step):
        if step < warmup:
            return peak * step / warmup
        progress = (step - warmup) / (1000 - warmup)
        return 0.5 * peak * (1 + math.cos(math.pi * progress))

    for step in (0, 1, 250, 499, 500, 750, 999):
        lr = scheduler.lr_lambdas[0](step) * scheduler.base_lrs[0]
        assert lr == pytest.approx(expected(step), abs=1e-12), step
    assert scheduler.lr_lambdas[0](0) == 0.0  # the first optimizer step uses lr 0


def test_weight_decay_groups_and_nesterov():
    module = classifier(10, DETERMINISTIC, weight_decay=2e-5)
    module.trainer = _fake_trainer(64, 1, 1, total_steps=100, epochs=1)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, SGD)  # nfnet.optim.SGD: torch.optim.SGD's update, bit for bit (tests/test_sgd_step.py)
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    net = module.net
    assert decay_of[id(net.classifier.weight)] == 2e-5
    assert decay_of[id(net.classifier.bias)] == 0.0
    assert decay_of[id(net.stages[0][0].skip_gain)] == 0.0
    assert decay_of[id(net.stages[0][0].conv1.gain)] == 0.0
    assert decay_of[id(net.stages[0][0].conv1.weight)] == 2e-5


def _datamodule(cfg_train, overrides=()):
    cfg = cfg_train(["augment=none", *overrides])
    return ready_datamodule(cfg)


def _trainer(**kwargs):
    defaults = dict(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})


class _Recorder(pl.Callback):
    """Raw weights after each optimizer step (callbacks run before the module's batch-end hook)."""

    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.weights.append([p.detach().clone() for p in module.net.parameters()])


def test_ema_follows_the_tf1_closed_form(cfg_train):
    datamodule = _datamodule(cfg_train)
    module = classifier(10, DETERMINISTIC, ema={"decay": 0.99999})
    ema = [p.detach().clone() for p in module.net.parameters()]  # EMA starts at the init weights
    recorder = _Recorder()
    _trainer(max_steps=4, callbacks=[recorder]).fit(module, datamodule=datamodule)
    for t, weights in enumerate(recorder.weights):
        decay = min(0.99999, (1 + t) / (10 + t))  # NFNET_SPEC §4: tf1_ema with t = 0, 1, ...
        ema = [decay * e + (1 - decay) * w for e, w in zip(ema, weights)]
    for expected, actual in zip(ema, module.ema_net.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)
    # The EMA moved: after 4 steps it is neither the init nor the raw weights.
    assert not torch.equal(module.ema_net.classifier.weight, module.net.classifier.weight)


class _Probe(NFNetClassifier):
    """Keeps each micro-batch, and what AGC is handed at each optimizer step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches, self.seen_grads, self.weights_before_step = [], [], []

    def training_step(self, batch, batch_idx):
        self.batches.append(tuple(t.detach().clone() for t in batch))
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer):
        self.seen_grads.append({n: p.grad.detach().clone() for n, p in self.net.named_parameters()})
        self.weights_before_step.append(copy.deepcopy(self.net.state_dict()))
        super().on_before_optimizer_step(optimizer)


def _manual_grads(module, weights, batches, autocast=False):
    net = copy.deepcopy(module.net)
    net.load_state_dict(weights)
    net.zero_grad()
    for images, targets in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = net(images)
        (module.loss(logits, targets) / len(batches)).backward()
    return {n: p.grad for n, p in net.named_parameters()}


def test_agc_runs_once_per_optimizer_step_on_accumulated_gradients(cfg_train):
    datamodule = _datamodule(cfg_train)
    module = classifier(10, DETERMINISTIC, cls=_Probe, ema={"decay": None})
    _trainer(max_epochs=1, limit_train_batches=4, accumulate_grad_batches=2).fit(module, datamodule=datamodule)
    assert len(module.batches) == 4
    assert len(module.seen_grads) == 2  # once per optimizer step, not per micro-batch
    for step in range(2):
        expected = _manual_grads(module, module.weights_before_step[step], module.batches[2 * step : 2 * step + 2])
        for name, grad in module.seen_grads[step].items():
            torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-7, msg=name)


def test_agc_sees_float32_unscaled_gradients_under_bf16_mixed(cfg_train):
    datamodule = _datamodule(cfg_train)
    module = classifier(10, DETERMINISTIC, cls=_Probe, ema={"decay": None})
    trainer = _trainer(max_steps=1, precision="bf16-mixed")
    trainer.fit(module, datamodule=datamodule)
    seen = module.seen_grads[0]
    assert all(g.dtype == torch.float32 for g in seen.values())
    # Autocast computes in bf16; the master weights, the EMA and SGD's momentum stay float32.
    assert all(p.dtype == torch.float32 for p in module.parameters())
    momentum = [s["momentum_buffer"] for s in trainer.optimizers[0].state.values()]
    assert momentum and all(m.dtype == torch.float32 for m in momentum)
    expected = _manual_grads(module, module.weights_before_step[0], module.batches[:1], autocast=True)
    for name, grad in seen.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a GradScaler needs a CUDA device")
def test_agc_sees_unscaled_gradients_under_fp16_gradscaler(cfg_train):
    datamodule = _datamodule(cfg_train)
    module = classifier(10, DETERMINISTIC, cls=_Probe, ema={"decay": None})
    _trainer(max_steps=1, precision="16-mixed", accelerator="gpu", devices=1).fit(module, datamodule=datamodule)
    module = module.cpu()
    batches = [tuple(t.cpu() for t in b) for b in module.batches[:1]]
    weights = {k: v.cpu() for k, v in module.weights_before_step[0].items()}
    expected = _manual_grads(module, weights, batches)
    # A loss-scaled gradient would be ~65536x larger; unscaled ones agree to fp16 accuracy.
    for name, grad in module.seen_grads[0].items():
        torch.testing.assert_close(grad.cpu(), expected[name], rtol=5e-2, atol=1e-4, msg=name)


class _Fused(NFNetClassifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9, fused=True)


def test_a_fused_optimizer_is_refused_with_a_clear_message(cfg_train):
    datamodule = _datamodule(cfg_train)
    with pytest.raises(ValueError, match="fused"):
        _trainer(max_steps=1).fit(classifier(10, DETERMINISTIC, cls=_Fused), datamodule=datamodule)


def test_label_smoothing_is_applied_after_mixing():
    module = classifier(4, DETERMINISTIC, label_smoothing=0.1)
    mixed = torch.tensor([[0.7, 0.3, 0.0, 0.0]])
    # y = (1 - eps) * y_mix + eps / K (NFNET_SPEC §4)
    expected = torch.tensor([[0.9 * 0.7 + 0.025, 0.9 * 0.3 + 0.025, 0.025, 0.025]])
    torch.testing.assert_close(module.soft_targets(mixed), expected)
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]])
    manual = -(expected * torch.log_softmax(logits, -1)).sum()
    torch.testing.assert_close(module.loss(logits, mixed), manual)
