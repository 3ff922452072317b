"""The NFNet architecture against NFNET_SPEC.md §1.2-§1.5, §1.8: stem, block table, alpha/
beta schedule, shortcuts, SkipInit, stochastic depth, head, parameter names."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nfnet.models import NFBlock, StochasticDepth, WSConv2d, create_model

GELU_GAMMA = 1.7015043497085571  # §1.7
ALPHA = 0.2  # §1.4


def spec_act(x):
    """The default activation, §1.7: tanh-approximated GELU times its gamma."""
    return F.gelu(x, approximate="tanh") * GELU_GAMMA


def blocks(model):
    return [m for m in model.modules() if isinstance(m, NFBlock)]


def meta_model(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


# NFNET_SPEC.md §1.4, the computed F0 block table with stochdepth_rate = 0.25:
# (in, out, width, groups, stride, beta, projection, SE hidden).
F0_TABLE = [
    (128, 256, 128, 1, 1, 1.0, True, 128),
    (256, 512, 256, 2, 2, 0.980581, True, 256),
    (512, 512, 256, 2, 1, 0.980581, False, 256),
    (512, 1536, 768, 6, 2, 0.962250, True, 768),
    (1536, 1536, 768, 6, 1, 0.980581, False, 768),
    (1536, 1536, 768, 6, 1, 0.962250, False, 768),
    (1536, 1536, 768, 6, 1, 0.944911, False, 768),
    (1536, 1536, 768, 6, 1, 0.928477, False, 768),
    (1536, 1536, 768, 6, 1, 0.912871, False, 768),
    (1536, 1536, 768, 6, 2, 0.898027, True, 768),
    (1536, 1536, 768, 6, 1, 0.980581, False, 768),
    (1536, 1536, 768, 6, 1, 0.962250, False, 768),
]


def test_f0_block_table_matches_spec():
    model = meta_model("nfnet_f0", stochdepth_rate=0.25)
    got = blocks(model)
    assert len(got) == len(F0_TABLE)
    for i, (block, row) in enumerate(zip(got, F0_TABLE)):
        c_in, c_out, width, groups, stride, beta, projection, se_hidden = row
        assert (block.conv0.in_channels, block.conv2.out_channels) == (c_in, c_out), i
        assert (block.conv1.out_channels, block.conv1.groups, block.conv1b.groups) == (
            width, groups, groups), i
        # Every group holds 128 channels (§1.3).
        assert block.conv1.in_channels // groups == 128
        assert block.conv1.stride == (stride, stride) and block.conv1b.stride == (1, 1), i
        assert block.beta == pytest.approx(beta, abs=1e-6), i
        assert (block.conv_shortcut is not None) == projection, i
        assert block.se.fc0.out_features == se_hidden, i
        # §1.5: rate 0.25 * i / N; block 0 has no stochastic depth module at all.
        rate = 0.25 * i / 12
        if i == 0:
            assert not any(isinstance(m, StochasticDepth) for m in block.modules())
        else:
            assert block.stochastic_depth.rate == pytest.approx(rate)
        assert block.alpha == ALPHA


def test_beta_schedule_resets_after_each_transition_for_every_variant():
    for name in ("nfnet_f1", "nfnet_f3plus"):
        model = meta_model(name)
        expected_std, betas = 1.0, []
        for depth in model.variant.depths:
            for b in range(depth):
                betas.append(1 / expected_std)
                if b == 0:
                    expected_std = 1.0
                expected_std = math.sqrt(expected_std ** 2 + ALPHA ** 2)
        assert [blk.beta for blk in blocks(model)] == pytest.approx(betas)


def test_bottleneck_width_rounds_down_to_groups_of_128():
    # F+ widths 384/768/2048: int(w*0.5) = 192/384/1024 -> 128/384/1024 (1/3/8 groups).
    got = [(b.conv1.out_channels, b.conv1.groups) for b in blocks(meta_model("nfnet_f0plus"))]
    assert got[0] == (128, 1) and got[1] == (384, 3) and got[-1] == (1024, 8)


def test_stem_is_four_convs_stride_four():
    model = meta_model("nfnet_f0")
    convs = [model.stem.conv0, model.stem.conv1, model.stem.conv2, model.stem.conv3]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128]
    assert [c.stride[0] for c in convs] == [2, 1, 1, 2]
    assert all(isinstance(c, WSConv2d) and c.kernel_size == (3, 3) for c in convs)
    assert meta_model("nfnet_f0plus").stem.conv3.out_channels == 192
    # The width multiplier scales block widths only, never the stem (§1.2).
    wide = meta_model("nfnet_f0", width=2.0)
    assert wide.stem.conv3.out_channels == 128
    assert blocks(wide)[0].conv2.out_channels == 512


def test_stem_has_no_activation_after_its_last_conv():
    torch.manual_seed(0)
    stem = create_model("nfnet_tiny").stem
    x = torch.randn(2, 3, 32, 32)
    ref = stem.conv3(spec_act(stem.conv2(spec_act(stem.conv1(spec_act(stem.conv0(x)))))))
    torch.testing.assert_close(stem(x), ref)
    assert stem(x).shape[-1] == 32 // 4


def tiny_with_live_branches(seed=0):
    torch.manual_seed(seed)
    model = create_model("nfnet_tiny", num_classes=7).eval()
    with torch.no_grad():
        for block in blocks(model):
            block.skip_gain.uniform_(0.5, 1.5)
        for m in model.modules():
            if isinstance(m, WSConv2d):
                m.gain.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


def spec_shortcut(block, x):
    """§1.3: projection shortcuts see act(x)*beta (avg-pooled when strided); the identity
    shortcut is the raw, un-activated input."""
    out = spec_act(x) * block.beta
    if block.conv1.stride[0] > 1:
        return block.conv_shortcut(F.avg_pool2d(out, 2, 2))
    if block.conv_shortcut is not None:
        return block.conv_shortcut(out)
    return x


def spec_block(block, x):
    """§1.3, written from the spec: the reference every block must compute."""
    out = block.conv0(spec_act(x) * block.beta)
    out = block.conv1(spec_act(out))
    out = block.conv1b(spec_act(out))
    out = block.conv2(spec_act(out))
    pooled = out.mean(dim=(2, 3))
    gate = torch.sigmoid(block.se.fc1(torch.relu(block.se.fc0(pooled))))[:, :, None, None]
    out = (2 * gate) * out
    return out * block.skip_gain * ALPHA + spec_shortcut(block, x)


def test_every_block_computes_the_spec_block():
    model = tiny_with_live_branches()
    x = model.stem(torch.randn(2, 3, 64, 64))
    kinds = set()
    with torch.no_grad():
        for block in blocks(model):
            kinds.add((block.conv1.stride[0], block.conv_shortcut is not None))
            torch.testing.assert_close(block(x), spec_block(block, x), rtol=1e-5, atol=1e-6)
            x = block(x)
    # The CPU variant has all three kinds: 1x1 projection, pooled projection, identity.
    assert kinds == {(1, True), (2, True), (1, False)}


def test_skip_gain_is_a_zero_scalar_so_identity_blocks_start_as_identity():
    model = create_model("nfnet_tiny").eval()
    for name, p in model.named_parameters():
        if name.endswith("skip_gain"):
            assert p.shape == () and p.item() == 0.0
    assert sum(n.endswith("skip_gain") for n, _ in model.named_parameters()) == len(blocks(model))
    identity = next(b for b in blocks(model) if b.conv_shortcut is None)
    x = torch.randn(2, identity.in_channels, 4, 4)
    assert torch.equal(identity(x), x)


def test_stochastic_depth_drops_the_branch_per_sample_without_rescaling():
    torch.manual_seed(0)
    model = tiny_with_live_branches()
    for block in blocks(model)[1:]:
        x = torch.randn(256, block.in_channels, 4, 4)
        block.stochastic_depth.rate = 0.5
        with torch.no_grad():
            full = block.eval()(x)
            shortcut = spec_shortcut(block, x)
            trained = block.train()(x)
        kept = torch.isclose(trained, full, atol=1e-6).flatten(1).all(1)
        dropped = torch.isclose(trained, shortcut, atol=1e-6).flatten(1).all(1)
        assert bool((kept ^ dropped).all())
        assert 0.35 < dropped.float().mean().item() < 0.65


def test_default_stochdepth_rate_and_overrides():
    model = meta_model("nfnet_f0")
    rates = [getattr(b.stochastic_depth, "rate", 0.0) for b in blocks(model)]
    assert rates == pytest.approx([0.1 * i / 12 for i in range(12)])  # model default 0.1
    model = meta_model("nfnet_f0", alpha=0.5, se_ratio=0.25, drop_rate=0.0,
                       activation="relu", final_conv_mult=1.5)
    assert blocks(model)[2].beta == pytest.approx(1 / math.sqrt(1 + 0.5 ** 2))
    assert blocks(model)[0].se.fc0.out_features == 64
    assert model.dropout.p == 0.0 and model.final_conv.out_channels == 2304
    assert model.stem.act.name == "relu" and blocks(model)[0].act.gamma == 1.7139588594436646
    with pytest.raises(TypeError):
        create_model("nfnet_tiny", no_such_option=1)


def test_head_is_final_conv_act_mean_dropout_linear():
    model = meta_model("nfnet_f0")
    assert (model.final_conv.in_channels, model.final_conv.out_channels) == (1536, 3072)
    assert model.final_conv.kernel_size == (1, 1)
    assert isinstance(model.classifier, nn.Linear)
    assert (model.classifier.in_features, model.classifier.out_features) == (3072, 1000)
    assert model.dropout.p == 0.2  # the variant's drop_rate
    assert meta_model("nfnet_f0plus").final_conv.out_channels == 4096

    torch.manual_seed(0)
    tiny = tiny_with_live_branches()
    x = torch.randn(2, 3, 64, 64)
    features = tiny.stages(tiny.stem(x))
    pooled = spec_act(tiny.final_conv(features)).mean(dim=(2, 3))
    torch.testing.assert_close(tiny(x), tiny.classifier(pooled))


def test_classifier_init_is_normal_001_with_zero_bias():
    torch.manual_seed(0)
    model = create_model("nfnet_tiny", num_classes=1000)
    w = model.classifier.weight.detach()
    assert abs(w.std().item() - 0.01) < 0.0005 and torch.equal(
        model.classifier.bias, torch.zeros(1000))
    model.reset_classifier(5)
    assert model.classifier.out_features == 5 and model.num_classes == 5


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = create_model("nfnet_tiny", drop_rate=0.5)
    features = torch.randn(4, model.num_features, 2, 2)
    model.eval()
    assert torch.equal(model.forward_head(features), model.forward_head(features))
    model.train()
    assert not torch.equal(model.forward_head(features), model.forward_head(features))


def test_parameter_names_group_by_stage():
    model = create_model("nfnet_tiny")
    pattern = (r"^(stem\.conv[0-3]\.(weight|gain|bias)"
               r"|stages\.\d\.\d+\.(skip_gain|(conv0|conv1|conv1b|conv2|conv_shortcut)\."
               r"(weight|gain|bias)|se\.fc[01]\.(weight|bias))"
               r"|final_conv\.(weight|gain|bias)|classifier\.(weight|bias))$")
    for name, p in model.named_parameters():
        assert re.match(pattern, name), name
        if name.endswith(".gain"):
            assert p.dim() == 1
    depths = model.variant.depths
    stage_blocks = {tuple(n.split(".")[1:3]) for n, _ in model.named_parameters()
                    if n.startswith("stages.")}
    assert stage_blocks == {(str(s), str(b)) for s, d in enumerate(depths) for b in range(d)}


def test_no_normalization_layer_anywhere():
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
             nn.RMSNorm)
    for name in ("nfnet_f0", "nfnet_tiny"):
        for module_name, module in meta_model(name).named_modules():
            assert not isinstance(module, norms), module_name
            assert "norm" not in type(module).__name__.lower(), module_name


def test_cpu_variant_builds_its_table_row():
    model = create_model("nfnet_tiny", num_classes=10)
    v = model.variant
    assert [len(stage) for stage in model.stages] == list(v.depths)
    assert [stage[0].conv2.out_channels for stage in model.stages] == list(v.widths)
    assert model.stem.conv3.out_channels == v.stem_widths[-1]
    assert all(b.conv1.in_channels // b.conv1.groups == v.group_width for b in blocks(model))
    x = torch.randn(2, 3, v.train_size, v.train_size)
    assert model(x).shape == (2, 10)


def test_channels_last_gives_the_same_logits():
    torch.manual_seed(0)
    model = tiny_with_live_branches()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = tiny_with_live_branches()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model)(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
