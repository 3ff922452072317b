"""The official MixUp/CutMix pairing: layout, label mass, lambda distributions, exact areas."""

import math

import pytest
import torch

from nfnet.data.mixing import (
    OfficialCollate,
    draw_mixing,
    mix_to_uint8,
    mixed_targets,
    truncate_to_uint8,
    cutmix_boxes,
    mixup_cutmix,
    sample_cutmix_boxes,
    sample_cutmix_params,
)


def beta_cdf_symmetric(x: float, a: float) -> float:
    """CDF of Beta(a, a), by quadrature (no scipy). With u = t**a the integrand of
    int_0^x t^(a-1) (1-t)^(a-1) dt becomes (1/a) (1 - u^(1/a))^(a-1), smooth for x <= 1/2;
    the upper half follows from symmetry."""
    if x > 0.5:
        return 1.0 - beta_cdf_symmetric(1.0 - x, a)
    if x <= 0:
        return 0.0
    n = 2000  # Simpson, even number of intervals
    top = x**a
    h = top / n
    f = lambda u: (1.0 - u ** (1.0 / a)) ** (a - 1.0)  # noqa: E731
    s = f(0.0) + f(top) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n))
    log_beta = 2 * math.lgamma(a) - math.lgamma(2 * a)
    return (s * h / 3.0) / a / math.exp(log_beta)


def ks_statistic(samples: torch.Tensor, cdf) -> float:
    x = samples.double().sort().values
    n = x.numel()
    f = torch.tensor([cdf(v) for v in x.tolist()], dtype=torch.float64)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - f).max().item(), (f - (i - 1) / n).max().item())


def _pairs(b, mixup=True, cutmix=True):
    """Documented raw-image layout: (first, second) raw index of each output."""
    m = (b + 1) // 2 if (mixup and cutmix) else (b if mixup else 0)
    c = b - m
    first = list(range(m)) + list(range(2 * m, 2 * m + c))
    second = list(range(m, 2 * m)) + list(range(2 * m + c, 2 * m + 2 * c))
    return first, second


@pytest.mark.parametrize("b", [1, 2, 3, 8])
@pytest.mark.parametrize("mode", [(True, True), (True, False), (False, True)])
def test_layout_label_mass_and_distinct_pairs(b, mode):
    torch.manual_seed(b)
    images = torch.randint(0, 256, (2 * b, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(2 * b)  # one class per raw image: targets reveal the pairing
    mixed, targets = mixup_cutmix(images, labels, 2 * b, mixup=mode[0], cutmix=mode[1])
    assert mixed.shape == (b, 3, 8, 8) and mixed.dtype == torch.uint8
    assert targets.shape == (b, 2 * b) and targets.dtype == torch.float32
    assert torch.allclose(targets.sum(1), torch.ones(b), atol=1e-6)
    first, second = _pairs(b, *mode)
    # Each output mixes two different raw images; every raw image is used exactly once.
    assert sorted(first + second) == list(range(2 * b))
    for i, (p, q) in enumerate(zip(first, second)):
        assert p != q
        lam = targets[i, p].item()
        assert targets[i, q].item() == pytest.approx(1 - lam, abs=1e-6)
        others = torch.cat([targets[i, : min(p, q)], targets[i, min(p, q) + 1 : max(p, q)],
                            targets[i, max(p, q) + 1 :]])  # fmt: skip
        assert (others == 0).all()


def test_mixup_pixels_are_the_lambda_blend_truncated():
    # First images 0, second 255: output = trunc((1 - lam) * 255), lam from the targets.
    b = 64
    images = torch.cat([torch.zeros(b, 3, 2, 2), torch.full((b, 3, 2, 2), 255.0)]).to(torch.uint8)
    labels = torch.cat([torch.zeros(b), torch.ones(b)]).long()
    torch.manual_seed(0)
    mixed, targets = mixup_cutmix(images, labels, 2, cutmix=False)
    lam = targets[:, 0]
    expect = ((1 - lam) * 255).floor().to(torch.uint8)
    assert torch.equal(mixed[:, 0, 0, 0], expect)
    assert (mixed == mixed[:, :1, :1, :1]).all()  # one value per image
    # Float input stays float and is not clipped or cast.
    mixed_f, targets_f = mixup_cutmix(images.float() * 2, labels, 2, cutmix=False)
    assert mixed_f.dtype == torch.float32
    assert torch.allclose(mixed_f[:, 0, 0, 0], (1 - targets_f[:, 0]) * 510)


def test_cutmix_kept_area_equals_lambda_exactly():
    b, h, w = 300, 13, 17
    images = torch.cat([torch.ones(b, 1, h, w), torch.zeros(b, 1, h, w)]).to(torch.uint8)
    labels = torch.cat([torch.zeros(b), torch.ones(b)]).long()
    torch.manual_seed(1)
    mixed, targets = mixup_cutmix(images, labels, 2, mixup=False)
    kept = mixed.flatten(1).sum(1)  # pixels of the first image
    assert torch.equal(targets[:, 0], kept.float() / (h * w))
    # The kept pixels form one box (rows x cols), the first image inside it.
    for m, k in zip(mixed[:, 0], kept.tolist()):
        rows, cols = m.any(1).sum().item(), m.any(0).sum().item()
        assert rows * cols == k


def test_cutmix_boxes_by_hand():
    # Side ratio 0.5 on 10x20: int(5) // 2 = 2 rows and int(10) // 2 = 5 cols each side.
    box = cutmix_boxes(torch.tensor([5]), torch.tensor([10]), torch.tensor([0.5]), 10, 20)
    assert box.tolist() == [[3, 7, 5, 15]]
    # Clipped at the top-left corner.
    box = cutmix_boxes(torch.tensor([1]), torch.tensor([2]), torch.tensor([0.5]), 10, 20)
    assert box.tolist() == [[0, 3, 0, 7]]


def test_mixup_lambda_matches_beta_02():
    assert beta_cdf_symmetric(0.5, 0.2) == pytest.approx(0.5, abs=1e-9)
    assert beta_cdf_symmetric(0.5, 1.0) == pytest.approx(0.5, abs=1e-9)
    assert beta_cdf_symmetric(0.3, 1.0) == pytest.approx(0.3, abs=1e-9)
    n = 3000
    images = torch.zeros(2 * n, 1, 1, 1)
    labels = torch.cat([torch.zeros(n), torch.ones(n)]).long()
    torch.manual_seed(0)
    _, targets = mixup_cutmix(images, labels, 2, mixup_alpha=0.2, cutmix=False)
    lam = targets[:, 0]
    d = ks_statistic(lam, lambda x: beta_cdf_symmetric(x, 0.2))
    assert d < 1.63 / math.sqrt(n)  # KS at alpha = 0.01
    # And it is not U(0, 1): Beta(0.2, 0.2) piles up near 0 and 1.
    assert ks_statistic(lam, lambda x: x) > 1.63 / math.sqrt(n)
    # Alpha is configurable: alpha = 1 is uniform.
    _, targets = mixup_cutmix(images, labels, 2, mixup_alpha=1.0, cutmix=False)
    assert ks_statistic(targets[:, 0], lambda x: x) < 1.63 / math.sqrt(n)


def test_cutmix_area_matches_uniform():
    n = 4000
    g = torch.Generator().manual_seed(0)
    cy, cx, side = sample_cutmix_params(n, 224, 224, g)
    # Unclipped area fraction side^2 ~ U(0, 1).
    assert ks_statistic(side**2, lambda x: min(max(x, 0.0), 1.0)) < 1.63 / math.sqrt(n)
    # Centred boxes are never clipped: their pixel area (sides rounded down to even lengths)
    # is U(0, 1) up to that rounding.
    h = w = 1000
    centred = cutmix_boxes(torch.full((n,), h // 2), torch.full((n,), w // 2), side, h, w)
    area = ((centred[:, 1] - centred[:, 0]) * (centred[:, 3] - centred[:, 2])).double() / (h * w)
    assert ks_statistic(area, lambda x: min(max(x, 0.0), 1.0)) < 1.63 / math.sqrt(n)
    # Centres are uniform over the pixels.
    assert cy.min() >= 0 and cy.max() < 224 and abs(cy.double().mean().item() - 111.5) < 3


def test_cutmix_clipped_lambda_mean_by_hand():
    # With the box centre uniform and side s (s^2 ~ U(0,1)), the kept length per axis averages
    # s - s^2/4, so E[lambda] = E[(s - s^2/4)^2] = 1/2 - (2/5)/2 + (1/3)/16 = 0.32083.
    g = torch.Generator().manual_seed(0)
    boxes = sample_cutmix_boxes(200_000, 448, 448, g)
    lam = ((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).double() / 448**2
    assert lam.mean().item() == pytest.approx(1 / 2 - 1 / 5 + 1 / 48, abs=0.005)


def test_device_tensors_and_determinism():
    images = torch.randint(0, 256, (8, 3, 6, 6), dtype=torch.uint8)
    labels = torch.arange(8)
    torch.manual_seed(3)
    a = mixup_cutmix(images, labels, 8)
    torch.manual_seed(3)
    b = mixup_cutmix(images, labels, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    if torch.cuda.is_available():
        torch.manual_seed(3)
        c = mixup_cutmix(images.cuda(), labels.cuda(), 8)
        assert c[0].is_cuda and torch.equal(c[0].cpu(), a[0])
        assert torch.allclose(c[1].cpu(), a[1])


def test_errors():
    images, labels = torch.zeros(6, 3, 2, 2), torch.zeros(6).long()
    with pytest.raises(ValueError, match="mixup or cutmix"):
        mixup_cutmix(images, labels, 2, mixup=False, cutmix=False)
    with pytest.raises(ValueError, match="even"):
        mixup_cutmix(images[:5], labels[:5], 2)


def test_collate_mixes_float_pixels_then_truncates_then_augments():
    seen = []

    def fake_ra(img):
        seen.append(img.clone())
        return 255 - img

    collate = OfficialCollate(5, randaugment=fake_ra)
    assert collate.reads_per_example == 2
    g = torch.Generator().manual_seed(0)
    # Float pixels as the official resize leaves them: fractional, and over- and undershooting.
    batch = [(torch.rand(3, 4, 4, generator=g) * 320 - 30, i % 5) for i in range(8)]
    raw = torch.stack([x for x, _ in batch])  # the collate consumes the float images in place
    torch.manual_seed(4)
    images, targets = collate(batch)
    assert images.shape == (4, 3, 4, 4) and images.dtype == torch.uint8
    assert targets.shape == (4, 5) and torch.allclose(targets.sum(1), torch.ones(4))
    # RandAugment saw each mixed image once, after mixing in float, clipping and truncation.
    torch.manual_seed(4)
    mixed, _ = mixup_cutmix(raw, torch.tensor([y for _, y in batch]), 5)
    truncated = mixed.clamp(0, 255).floor().to(torch.uint8)
    assert len(seen) == 4 and all(s.dtype == torch.uint8 for s in seen)
    assert torch.equal(torch.stack(seen), truncated) and torch.equal(images, 255 - truncated)


@pytest.mark.parametrize("mode", [(True, True), (True, False), (False, True)])
def test_the_loaders_in_place_mixing_is_the_batched_mixing_bit_for_bit(mode):
    g = torch.Generator().manual_seed(5)
    raw = torch.rand(12, 3, 20, 24, generator=g) * 330 - 40  # unclamped float, as the resize leaves it
    labels = torch.arange(12) % 4
    torch.manual_seed(9)
    batched, batched_targets = mixup_cutmix(raw, labels, 4, mixup=mode[0], cutmix=mode[1],
                                            generator=torch.Generator().manual_seed(1))
    torch.manual_seed(9)
    draws = draw_mixing(12, 20, 24, mixup=mode[0], cutmix=mode[1], generator=torch.Generator().manual_seed(1))
    in_place = mix_to_uint8([image.clone() for image in raw], draws)
    assert in_place.dtype == torch.uint8 and torch.equal(in_place, truncate_to_uint8(batched))
    assert torch.equal(mixed_targets(labels, 4, draws), batched_targets)


def test_without_mixing_every_image_is_still_truncated_and_augmented():
    # augment=official with mixup=false cutmix=false: one raw image per example, integer
    # labels, and RandAugment on every image (it used to be skipped).
    collate = OfficialCollate(3, randaugment=lambda img: 255 - img, mixup=False, cutmix=False)
    assert collate.reads_per_example == 1
    batch = [(torch.tensor([-5.0, 0.4, 99.99, 254.9, 255.0, 300.0]).view(1, 1, 6), i) for i in range(3)]
    images, labels = collate(batch)
    assert labels.tolist() == [0, 1, 2] and labels.dtype == torch.int64
    assert images[0].flatten().tolist() == [255 - v for v in [0, 0, 99, 254, 255, 255]]


def test_integer_blend_is_the_float32_formula_truncated_for_every_pair():
    # uint8 batches (on an accelerator) are blended as the official float32
    # `ratio * a + (1 - ratio) * b`, then clipped and truncated: for all 65536 (a, b) pairs.
    import nfnet.data.mixing as mixing

    a = torch.arange(256, dtype=torch.uint8).view(256, 1).expand(256, 256)
    b = torch.arange(256, dtype=torch.uint8).view(1, 256).expand(256, 256)
    a, b = a.reshape(1, 1, 256, 256).contiguous(), b.reshape(1, 1, 256, 256).contiguous()
    for lam in (0.0, 1e-8, 0.1, 1 / 3, 0.5, 0.7311, 0.999999, 1.0):
        lam_t = torch.tensor([lam], dtype=torch.float32)
        direct = a.float() * lam_t + b.float() * (1 - lam_t)
        expect = direct.clamp(0, 255).to(torch.uint8)
        assert torch.equal(mixing._blend(a, b, lam_t), expect)


def test_the_loaders_pixels_are_the_official_float_order_within_005_grey_levels():
    """Crop, float resize, MixUp/CutMix, clip and truncate as the loader does, against the
    official order computed independently in float64 (dense TF taps, float64 mixing). Resizing
    to uint8 before mixing, as this project once did, was +0.5 levels off on the CutMix half."""
    from nfnet.data.transforms import InceptionCrop, bicubic_taps, sample_inception_crop

    def dense(n_in, n_out):
        idx, weights = bicubic_taps(n_in, n_out)
        return torch.zeros(n_out, n_in, dtype=torch.float64).scatter_add_(1, idx, weights.double())

    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(16, 3, 5, 6, generator=g) * 255, (60, 80), mode="bicubic")
    images = (smooth + torch.randn(16, 3, 60, 80, generator=g) * 12).clamp(0, 255).to(torch.uint8)
    torch.manual_seed(0)
    crops = [(InceptionCrop(32, flip=False, dtype=torch.float32)(img), 0) for img in images]
    torch.manual_seed(0)
    boxes = [sample_inception_crop(60, 80, 32) for _ in images]
    reference = torch.stack([dense(h, 32) @ img[:, t : t + h, l : l + w].double() @ dense(w, 32).T
                             for img, (t, l, h, w) in zip(images, boxes)])
    torch.manual_seed(1)
    ours, _ = OfficialCollate(2)(crops)
    torch.manual_seed(1)
    official, _ = mixup_cutmix(reference, torch.zeros(16, dtype=torch.int64), 2)
    difference = ours.double() - official.clamp(0, 255).floor()
    assert abs(difference.mean()) <= 0.05 and difference.abs().max() <= 1
