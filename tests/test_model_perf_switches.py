"""The speed switches `model.compile` and `model.channels_last` work through Lightning, and the
hand-written weight-standardization backward equals autograd's (NFNET_SPEC.md §1.6).

Behaviour only: how fast either switch makes a run is measured by benchmarks/train_step.py,
never asserted here.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from conftest import ready_datamodule
from nfnet.app import tasks
from nfnet.models import WSConv2d
from nfnet.models.layers import scaled_weight_standardization


def _spec_ws(w, gain, eps, add_eps):
    """§1.6 as plain ops (autograd differentiates them); 'add' is timm's form."""
    var, mean = torch.var_mean(w, dim=(1, 2, 3), correction=0, keepdim=True)
    n = w[0].numel()
    denom = (var + eps) * n if add_eps else torch.clamp_min(var * n, eps)
    return (w - mean) * gain.view(-1, 1, 1, 1) * torch.rsqrt(denom)


@pytest.mark.parametrize("add_eps", [False, True])
def test_ws_backward_matches_autograd_and_finite_differences(add_eps):
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64) * 2 + 0.3
    w[2] *= 1e-4  # a row whose fan_in * var is under eps: the 'max' clamp is active there
    gain = torch.rand(6, dtype=torch.float64) + 0.5
    w.requires_grad_()
    gain.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: scaled_weight_standardization(a, b, 1e-4, add_eps),
                                    (w, gain))
    upstream = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    got = torch.autograd.grad((scaled_weight_standardization(w, gain, 1e-4, add_eps) * upstream).sum(),
                              (w, gain))
    ref = torch.autograd.grad((_spec_ws(w, gain, 1e-4, add_eps) * upstream).sum(), (w, gain))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # A channels_last weight (model.to(memory_format=channels_last)) takes another code path.
    w_cl = w.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    got_cl = torch.autograd.grad(
        (scaled_weight_standardization(w_cl, gain, 1e-4, add_eps) * upstream).sum(), (w_cl, gain))
    for a, b in zip(got_cl, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(256, 128, 1, 1), (768, 128, 3, 3), (16, 3, 3, 3)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_ws_is_float64_exact_up_to_float32_rounding(shape, layout):
    """F0's conv shapes in float32 against §1.6 in float64, differentiated by autograd: forward
    and both gradients within 4 float32 epsilons of the largest value (measured on every F0
    conv: 1.7 forward, 2.0 backward; the previous form: 6.7 and 15)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen) / shape[1] ** 0.5
    w[1] *= 1e-4  # a row under the eps floor
    gain = torch.rand(shape[0], generator=gen) + 0.5
    upstream = torch.randn(shape, generator=gen)
    w64, gain64 = w.double().requires_grad_(), gain.double().requires_grad_()
    ref = _spec_ws(w64, gain64, 1e-4, False)
    ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), (w64, gain64))
    w32 = w.contiguous(memory_format=layout).requires_grad_()
    gain32 = gain.clone().requires_grad_()
    out = scaled_weight_standardization(w32, gain32, 1e-4, False)
    grads = torch.autograd.grad((out * upstream).sum(), (w32, gain32))
    eps32 = torch.finfo(torch.float32).eps
    for got, want in [(out, ref), *zip(grads, ref_grads)]:
        err = (got.double() - want.detach()).abs().max() / want.detach().abs().max()
        assert err <= 4 * eps32, f"{err / eps32:.1f} eps"


def test_ws_conv_gradients_match_the_spec_formula():
    torch.manual_seed(0)
    conv = WSConv2d(8, 6, 3, stride=2, groups=2)
    x = torch.randn(2, 8, 9, 9)
    conv(x).square().sum().backward()
    got = [conv.weight.grad.clone(), conv.gain.grad.clone(), conv.bias.grad.clone()]
    conv.zero_grad()
    w_hat = _spec_ws(conv.weight, conv.gain, conv.eps, False)
    conv.conv(x, w_hat).square().sum().backward()
    for a, b in zip(got, [conv.weight.grad, conv.gain.grad, conv.bias.grad]):
        # float32: both sides round differently; errors relative to the gradient's scale.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


class _Checks(pl.Callback):
    def __init__(self):
        self.images_channels_last = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        images = batch[0]
        self.images_channels_last.append(images.is_contiguous(memory_format=torch.channels_last))


@pytest.mark.slow
@pytest.mark.parametrize("switches", [["model.channels_last=true"],
                                      ["model.compile=true", "model.channels_last=true"]])
def test_speed_switches_train_through_lightning(cfg_train, switches):
    pl.seed_everything(0)
    cfg = cfg_train(["callbacks=none", "test=false", "augment=none", *switches])
    datamodule = ready_datamodule(cfg)
    module = tasks.build_module(cfg, datamodule.num_classes)
    checks = _Checks()
    trainer = pl.Trainer(
        # Compiling the eval graph as well would double the test's minutes of compilation.
        max_steps=2, limit_val_batches=0 if "model.compile=true" in switches else 1,
        accelerator="cpu", logger=False, callbacks=[checks],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2
    assert checks.images_channels_last and all(checks.images_channels_last)
    assert module.net.stem.conv0.weight.is_contiguous(memory_format=torch.channels_last)
    # Compiled in place: the checkpoint's keys are the eager model's, with no `_orig_mod.`.
    state = module.state_dict()
    assert not any("_orig_mod" in k for k in state)
    assert set(module.net.state_dict()) == set(before)
    assert any(not torch.equal(before[k], v) for k, v in module.net.state_dict().items())
    assert all(torch.isfinite(v).all() for v in module.net.state_dict().values())
