"""RandAugment on a batch, each image with its own ops: the same pixels as the per-image ops of
nfnet.data.randaugment (bit for bit on the CPU), and as RandAugment.__call__ under one seed."""

import pytest
import torch
from torchvision.transforms.v2 import functional as F

import nfnet.data.randaugment as ra_mod
from nfnet.data.batched_randaugment import randaugment_batch, sharpness_batch
from nfnet.data.randaugment import OP_NAMES, RandAugment
from nfnet.data.randaugment_levels import parse_ra_level

U8 = torch.uint8
# Ops whose float32 multiply-adds may be fused on CUDA: their bound per magnitude, in grey
# levels (see nfnet.data.batched_randaugment); every other op is bit-exact there.
CUDA_BOUND = {"Color": {10: 1, 15: 2}, "Sharpness": {10: 1, 15: 1}}


def images(n, h=20, w=17, seed=0):
    """Random images plus the cases the per-channel ops treat apart: constant channels, a narrow
    range, pixels at 0 and 255."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, h, w), dtype=U8, generator=g)
    x[0] = 77
    x[1] = x[1] // 8 + 100
    x[2, 1] = 0
    x[3, :, 0, 0] = 255
    return x


def cutout_by_hand(img, pad, cy, cx):
    out = img.clone()
    out[:, max(0, cy - pad) : cy + pad, max(0, cx - pad) : cx + pad] = ra_mod.FILL
    return out


def per_image(x, ops, negate, centres, ra):
    """The reference: each image through the per-image ops, layer by layer."""
    out = []
    for img, img_ops, img_neg, img_centres in zip(x, ops.tolist(), negate.tolist(), centres.tolist()):
        for op, neg, (cy, cx) in zip(img_ops, img_neg, img_centres):
            name = OP_NAMES[op]
            if name == "Cutout":
                img = cutout_by_hand(img, ra_mod.cutout_pad(ra.magnitude), cy, cx)
            else:
                img = ra.apply_op(img, name, -1.0 if neg else 1.0)
        out.append(img)
    return torch.stack(out)


def random_plan(n, layers, h, w, seed, op=None):
    g = torch.Generator().manual_seed(seed)
    ops = torch.randint(16, (n, layers), generator=g) if op is None else torch.full((n, layers), op)
    negate = torch.rand(n, layers, generator=g) < 0.5
    # Centres anywhere, so that squares are clipped at every border.
    centres = torch.stack([torch.randint(h, (n, layers), generator=g), torch.randint(w, (n, layers), generator=g)], -1)
    return ops, negate, centres


@pytest.mark.parametrize("name", OP_NAMES)
@pytest.mark.parametrize("magnitude", [5, 10, 15])
def test_each_op_batched_is_the_per_image_op_bit_for_bit(name, magnitude):
    x = images(10, seed=magnitude)
    ra = RandAugment(1, magnitude)
    ops, negate, centres = random_plan(10, 1, 20, 17, seed=len(name), op=OP_NAMES.index(name))
    out = randaugment_batch(x, ops, negate, centres, ra)
    assert out.dtype == U8 and out.shape == x.shape
    assert torch.equal(out, per_image(x, ops, negate, centres, ra))


@pytest.mark.parametrize("level", [405, 410, 415, 215])
def test_mixed_ops_over_layers_are_the_per_image_ops(level):
    layers, magnitude = parse_ra_level(level)
    x = images(40, 24, 24, seed=level)
    ra = RandAugment(layers, magnitude)
    ops, negate, centres = random_plan(40, layers, 24, 24, seed=level)
    out = randaugment_batch(x, ops, negate, centres, ra)
    assert torch.equal(out, per_image(x, ops, negate, centres, ra))
    assert not torch.equal(out, x)


def test_draws_applied_in_a_batch_equal_randaugment_call_under_the_same_seed():
    x = images(12, 16, 16, seed=3)
    for level in (405, 410, 415):
        ra = RandAugment(*parse_ra_level(level))
        for seed in range(4):
            torch.manual_seed(seed)
            expect = torch.stack([ra(img) for img in x])
            torch.manual_seed(seed)
            draws = [ra.draw(16, 16) for _ in x]
            ops = torch.tensor([d.ops for d in draws])
            negate = torch.tensor([d.negate for d in draws])
            centres = torch.tensor([[c or (-1, -1) for c in d.cutout_centres] for d in draws])
            assert torch.equal(randaugment_batch(x, ops, negate, centres, ra), expect)


def test_input_is_not_modified_and_no_layers_is_identity():
    x = images(5)
    before = x.clone()
    ops, negate, centres = random_plan(5, 2, 20, 17, seed=1)
    randaugment_batch(x, ops, negate, centres, RandAugment(2, 10))
    assert torch.equal(x, before)
    empty = torch.zeros(5, 0, dtype=torch.int64)
    out = randaugment_batch(x, empty, empty.bool(), torch.zeros(5, 0, 2, dtype=torch.int64), RandAugment(0, 10))
    assert torch.equal(out, x)


@pytest.mark.parametrize("factor", [0.0, 0.5, 1.9, 2.8])
def test_sharpness_with_an_exact_blur_is_torchvisions(factor):
    x = images(8, 13, 11, seed=4)
    assert torch.equal(sharpness_batch(x, factor), F.adjust_sharpness(x, factor))
    tiny = x[:, :, :2, :]  # nothing inside the border: unchanged, as torchvision's
    assert torch.equal(sharpness_batch(tiny, factor), F.adjust_sharpness(tiny, factor))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", OP_NAMES)
def test_each_op_on_cuda_against_the_cpu(name):
    x = images(32, 64, 48, seed=11)
    for magnitude in (10, 15):
        ra = RandAugment(1, magnitude)
        ops, negate, centres = random_plan(32, 1, 64, 48, seed=5, op=OP_NAMES.index(name))
        on_cpu = randaugment_batch(x, ops, negate, centres, ra)
        on_cuda = randaugment_batch(x.cuda(), ops, negate, centres, ra).cpu()
        difference = (on_cuda.int() - on_cpu.int()).abs().max().item()
        assert difference <= CUDA_BOUND.get(name, {}).get(magnitude, 0), (name, magnitude, difference)
