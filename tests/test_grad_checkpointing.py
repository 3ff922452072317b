"""Activation checkpointing (issue 20.2): a training step with the trunk recomputed per stage or
per block is the step without it, bit for bit: logits, gradients (so AGC), the SGD update and
the RNG stream that a resumed run continues from, with stochastic depth and dropout drawing
masks; under bf16 autocast, DDP and torch.compile too. Only training with grad checkpoints."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import nfnet.models.nfnet as nfnet_module
from nfnet.models import create_model
from nfnet.optim.agc import adaptive_clip_grad_

MODES = ("stage", "block")
CLASSES, BATCH, SIZE = 5, 8, 64
# High rates so that, at this batch, stochastic depth drops samples in most blocks and dropout
# zeroes features: a recomputed forward that drew other masks could not go unnoticed.
STOCHDEPTH_RATE, DROP_RATE = 0.9, 0.5
SEED = 123


def live_tiny(**overrides):
    """nfnet_tiny with every residual branch live: skip gains (init 0) and conv gains/biases
    moved off their init, so gradients reach every parameter."""
    torch.manual_seed(0)
    model = create_model("nfnet_tiny", CLASSES, **{"stochdepth_rate": STOCHDEPTH_RATE,
                                                    "drop_rate": DROP_RATE, **overrides})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("skip_gain"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("gain"):
                p.uniform_(0.8, 1.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.train()


def batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    return images, torch.randint(0, CLASSES, (BATCH,), generator=g)


def train_step(model, autocast=False):
    """forward, loss, backward, AGC, SGD: returns the logits, the clipped gradients, the
    updated parameters and the RNG state after the step."""
    x, y = batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                weight_decay=2e-5)
    torch.manual_seed(SEED)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(x)
    F.cross_entropy(logits.float(), y).backward()
    # AGC as the recipe applies it: every parameter but the classifier weight (NFNET_SPEC.md §3).
    clipped = [p for n, p in model.named_parameters() if n != "classifier.weight"]
    adaptive_clip_grad_(clipped, clipping=0.01)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return logits.detach(), grads, params, torch.get_rng_state()


def assert_same_step(got, expected):
    logits, grads, params, rng = got
    ref_logits, ref_grads, ref_params, ref_rng = expected
    assert torch.equal(logits, ref_logits)
    assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)
    assert all(torch.equal(params[n], ref_params[n]) for n in ref_params)
    assert torch.equal(rng, ref_rng)


@pytest.fixture(scope="module")
def model():
    return live_tiny()


def test_masks_are_live(model):
    """The premise of the equality tests: another seed draws other masks, other logits."""
    x, _ = batch()
    net = copy.deepcopy(model)
    torch.manual_seed(SEED)
    a = net(x)
    torch.manual_seed(SEED + 1)
    assert not torch.equal(a, net(x))


@pytest.mark.parametrize("mode", MODES)
def test_step_equals_the_step_without_checkpointing(model, mode):
    expected = train_step(copy.deepcopy(model))
    net = copy.deepcopy(model)
    net.set_grad_checkpointing(mode)
    assert_same_step(train_step(net), expected)
    assert all(g.abs().sum() > 0 for n, g in expected[1].items() if "stages" in n), \
        "every block parameter gets a gradient"


@pytest.mark.parametrize("mode", MODES)
def test_step_under_bf16_autocast_equals_the_step_without(model, mode):
    expected = train_step(copy.deepcopy(model), autocast=True)
    net = copy.deepcopy(model)
    net.set_grad_checkpointing(mode)
    assert_same_step(train_step(net, autocast=True), expected)


def test_checkpoints_only_while_training_with_grad(monkeypatch):
    calls = []
    real = nfnet_module.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(nfnet_module, "checkpoint", counting)
    net = create_model("nfnet_tiny", CLASSES, grad_checkpointing="block")
    x, _ = batch()
    net.eval()(x)
    with torch.no_grad():
        net.train()(x)
    assert calls == []
    net.train()(x)
    # the stem and every block, each non-reentrant
    assert calls == [False] * (1 + sum(net.variant.depths))
    calls.clear()
    net.set_grad_checkpointing("stage")
    net(x)
    assert len(calls) == 1 + len(net.stages)


def test_setting_values():
    net = create_model("nfnet_tiny", CLASSES)
    assert net.grad_checkpointing is False
    net.set_grad_checkpointing()
    assert net.grad_checkpointing == "block"
    net.set_grad_checkpointing(False)
    assert net.grad_checkpointing is False
    with pytest.raises(ValueError, match="grad_checkpointing='layer'; choose one of"):
        net.set_grad_checkpointing("layer")
    with pytest.raises(ValueError, match="grad_checkpointing"):
        create_model("nfnet_tiny", grad_checkpointing="all")


def test_ddp_step_equals_the_plain_step(model, tmp_path):
    """One gloo process: DDP's gradient hooks fire once per parameter although the checkpointed
    blocks run their forward twice (a reentrant checkpoint would trip them)."""
    expected = train_step(copy.deepcopy(model))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        net = copy.deepcopy(model)
        net.set_grad_checkpointing("block")
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        x, y = batch()
        torch.manual_seed(SEED)
        logits = ddp(x)
        F.cross_entropy(logits, y).backward()
    finally:
        dist.destroy_process_group()
    assert torch.equal(logits.detach(), expected[0])
    # DDP averages over one replica: the raw gradients, before AGC, equal the plain ones.
    plain = copy.deepcopy(model)
    torch.manual_seed(SEED)
    F.cross_entropy(plain(x), y).backward()
    for (name, p), q in zip(net.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.slow
def test_compiled_checkpointed_net_trains():
    """Inductor compiles the checkpointed trunk: its first gradients are the eager ones (no
    random masks here: compiled code draws its own), and a few steps lower the loss."""
    eager = live_tiny(stochdepth_rate=0.0, drop_rate=0.0)
    net = copy.deepcopy(eager)
    net.set_grad_checkpointing("block")
    net.compile()
    x, y = batch()
    F.cross_entropy(eager(x), y).backward()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(3):
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        if step == 0:
            for (name, p), q in zip(net.named_parameters(), eager.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
