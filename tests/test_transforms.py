"""Official train crop, eval resize-then-crop, TF bicubic resize and normalisation."""

import math

import pytest
import torch

from nfnet.data.transforms import (
    IMAGENET_MEAN_255,
    IMAGENET_STD_255,
    BasicTrainTransform,
    InceptionCrop,
    ResizeCropEval,
    bicubic_taps,
    center_crop_box,
    normalize,
    resize_bicubic,
    sample_inception_crop,
)


def keys(d):
    """Keys' cubic kernel, a = -0.5, written out for the hand computations below."""
    d = abs(d)
    if d <= 1:
        return 1.5 * d**3 - 2.5 * d**2 + 1
    return -0.5 * d**3 + 2.5 * d**2 - 4 * d + 2


def test_normalize_known_values():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 2, 1).expand(3, 2, 1)
    y = normalize(x)
    assert y.dtype == torch.float32 and y.shape == (3, 2, 1)
    for c in range(3):
        mean, std = [0.485, 0.456, 0.406][c], [0.229, 0.224, 0.225][c]
        assert y[c, 0, 0].item() == pytest.approx(-mean / std, rel=1e-6)
        assert y[c, 1, 0].item() == pytest.approx(
            (255 - IMAGENET_MEAN_255[c]) / IMAGENET_STD_255[c], rel=1e-6
        )
    assert normalize(x.unsqueeze(0).expand(4, -1, -1, -1)).shape == (4, 3, 2, 1)
    assert IMAGENET_MEAN_255[0] == pytest.approx(123.675) and IMAGENET_STD_255[2] == pytest.approx(
        57.375
    )


def test_bicubic_taps_downscale_by_two():
    # 4 -> 2: output i samples (i + 0.5) * 2 - 0.5 = 0.5 and 2.5, i.e. offset 0.5 between
    # pixels; kernel weights k(1.5), k(0.5), k(0.5), k(1.5) = -1/16, 9/16, 9/16, -1/16.
    assert keys(0.5) == 9 / 16 and keys(1.5) == -1 / 16
    idx, w = bicubic_taps(4, 2)
    # Output 0: the tap at -1 is outside: dropped, the rest renormalised by 17/16.
    assert idx[0].tolist()[1:] == [0, 1, 2] and w[0, 0] == 0
    assert w[0].tolist() == pytest.approx([0, 9 / 17, 9 / 17, -1 / 17])
    assert idx[1].tolist()[:3] == [1, 2, 3] and w[1, 3] == 0
    assert w[1].tolist() == pytest.approx([-1 / 17, 9 / 17, 9 / 17, 0])
    # A row 10, 20, 30, 40 -> (9*10 + 9*20 - 30)/17 = 14.12 and (-20 + 9*30 + 9*40)/17 = 35.88.
    row = torch.tensor([10, 20, 30, 40], dtype=torch.uint8).view(1, 1, 4).expand(3, 5, 4)
    out = resize_bicubic(row, (5, 2))
    assert out.shape == (3, 5, 2) and out.dtype == torch.uint8
    assert (out == torch.tensor([14, 36], dtype=torch.uint8)).all()


def test_bicubic_taps_upscale_edges_and_interior():
    # 2 -> 4: positions -0.25, 0.25, 0.75, 1.25. Output 0 sits at -0.25: only pixels 0 (distance
    # 0.25) and 1 (distance 1.25) are inside the image.
    idx, w = bicubic_taps(2, 4)
    s = keys(0.25) + keys(1.25)
    assert w[0].tolist() == pytest.approx([0, 0, keys(0.25) / s, keys(1.25) / s], abs=1e-6)
    # Output 1 at 0.25: taps -1 (out), 0, 1, 2 (out).
    s = keys(0.25) + keys(0.75)
    assert w[1].tolist() == pytest.approx([0, keys(0.25) / s, keys(0.75) / s, 0], abs=1e-6)
    img = torch.tensor([100, 200], dtype=torch.uint8).view(1, 1, 2).expand(3, 1, 2)
    out = resize_bicubic(img, (1, 4))[0, 0].tolist()
    expect = [
        round((100 * keys(0.25) + 200 * keys(1.25)) / (keys(0.25) + keys(1.25))),
        round((100 * keys(0.25) + 200 * keys(0.75)) / (keys(0.25) + keys(0.75))),
        round((100 * keys(0.75) + 200 * keys(0.25)) / (keys(0.25) + keys(0.75))),
        round((100 * keys(1.25) + 200 * keys(0.25)) / (keys(0.25) + keys(1.25))),
    ]
    assert out == expect == [91, 121, 179, 209]


def test_resize_same_size_is_identity_and_box_crops():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 9, 7), dtype=torch.uint8, generator=g)
    assert torch.equal(resize_bicubic(img, (9, 7)), img)
    assert torch.equal(resize_bicubic(img, (4, 3), box=(2, 1, 4, 3)), img[:, 2:6, 1:4])
    batch = img.unsqueeze(0).expand(2, -1, -1, -1)
    assert resize_bicubic(batch, (5, 5)).shape == (2, 3, 5, 5)


def test_eval_resize_then_centre_crop_known_image():
    # S = 8, pad 32: the image is squashed to 40x40 ignoring aspect, then rows/cols 16:24 kept.
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8, generator=g)
    out = ResizeCropEval(8)(img)
    assert out.shape == (3, 8, 8) and out.dtype == torch.uint8
    assert torch.equal(out, img[:, 16:24, 16:24])
    # A 40x60 image whose rows are constant: squashing the width keeps each row's value, so the
    # output is rows 16:24 whatever the width (no aspect-preserving resize, no side crop).
    rows = torch.arange(40, dtype=torch.uint8).mul(5).view(1, 40, 1).expand(3, 40, 60)
    out = ResizeCropEval(8)(rows)
    assert torch.equal(out, rows[:, 16:24, :8])
    # Odd pad: offset (pad + 1) // 2, as the official crop window.
    img = torch.randint(0, 256, (3, 11, 11), dtype=torch.uint8, generator=g)
    assert torch.equal(ResizeCropEval(8, pad=3)(img), img[:, 2:10, 2:10])


def test_inception_crop_shapes_dtype_and_flip():
    img = torch.arange(3 * 30 * 40).remainder(256).to(torch.uint8).view(3, 30, 40)
    t_noflip, t_flip = InceptionCrop(16, flip=False), InceptionCrop(16)
    flips = 0
    for seed in range(200):
        torch.manual_seed(seed)
        a = t_noflip(img)
        torch.manual_seed(seed)
        b = t_flip(img)
        assert a.shape == (3, 16, 16) and a.dtype == torch.uint8
        if not torch.equal(a, b):
            # The mirror is computed in the resize (its width pass in reverse): the same pixels
            # up to float32 summation order, so rarely one level apart.
            assert (b.int() - a.flip(-1).int()).abs().max() <= 1
            flips += 1
    assert 70 <= flips <= 130  # p = 0.5, 200 draws: +-4.2 sigma


def test_inception_crop_constraints_statistically():
    g = torch.Generator().manual_seed(0)
    H, W, n = 375, 500, 3000
    areas, aspects, fallbacks = [], [], 0
    for _ in range(n):
        top, left, h, w = sample_inception_crop(H, W, 224, generator=g)
        assert 0 <= top and top + h <= H and 0 <= left and left + w <= W
        # TF's Uniform(n) is [0, n): a crop narrower/shorter than the image never touches the
        # bottom/right edge.
        assert h == H or top + h < H
        assert w == W or left + w < W
        if (top, left, h, w) == center_crop_box(H, W, 224):
            fallbacks += 1
            continue
        areas.append(h * w / (H * W))
        aspects.append(w / h)
    areas, aspects = torch.tensor(areas), torch.tensor(aspects)
    # min_object_covered 0.1 rejects crops below 10% of the image; area never exceeds it.
    assert areas.min() >= 0.1 and areas.max() < 1.0
    # width = round(height * ratio): the ratio bounds hold up to half a pixel of rounding.
    assert (aspects >= 0.75 - 0.5 / 100).all() and (aspects <= 4 / 3 + 0.5 / 100).all()
    # Both ends of the ranges are reached.
    assert areas.min() < 0.15 and areas.max() > 0.9
    assert aspects.min() < 0.78 and aspects.max() > 1.3
    assert fallbacks < 0.05 * n


def test_inception_crop_fallback_on_impossible_image():
    # 50 x 1000: a crop with aspect <= 4/3 covers at most 50*67/50000 < 8% -> every attempt
    # fails. Centre crop: side int(50/256 * 224) = int(43.75) = 43, offsets (50-43+1)//2 = 4 and
    # (1000-43+1)//2 = 479.
    assert center_crop_box(50, 1000, 224) == (4, 479, 43, 43)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_inception_crop(50, 1000, 224, generator=g) == (4, 479, 43, 43)
    # A successful draw of the whole image also falls back (the official shape comparison):
    # aspect and area pinned to 1 on a square image always give the full image.
    box = sample_inception_crop(
        100, 100, 224, area_range=(1.0, 1.0), aspect_ratio_range=(1.0, 1.0), generator=g
    )
    # side int(100/256 * 224) = int(87.5) = 87; offset (100 - 87 + 1) // 2 = 7.
    assert box == (7, 7, 87, 87)


def test_inception_crop_uses_the_fallback_end_to_end():
    # With the crop forced to the centre crop, the transform is resize_bicubic of that box.
    img = torch.randint(0, 256, (3, 50, 1000), dtype=torch.uint8)
    torch.manual_seed(0)
    out = InceptionCrop(12, flip=False)(img)
    top, left, h, w = center_crop_box(50, 1000, 12)
    assert (h, w) == (int(50 / 44 * 12), int(50 / 44 * 12))
    assert torch.equal(out, resize_bicubic(img, (12, 12), box=(top, left, h, w)))


def test_height_is_uniform_over_its_range():
    # GenerateRandomCrop draws the height uniformly between the heights allowed by the area
    # range; for a square 100x100 image and aspect ~1, that is about 28..100. Check the first
    # decile vs the last with a chi-square-free sanity bound.
    g = torch.Generator().manual_seed(3)
    hs = torch.tensor(
        [sample_inception_crop(100, 100, 224, aspect_ratio_range=(1.0, 1.0), generator=g)[2]
         for _ in range(2000)]
    )  # fmt: skip
    kept = hs[hs != 87]  # drop centre-crop fallbacks (full-image draws)
    lo, hi = math.ceil(math.sqrt(0.1) * 100), 99
    assert kept.min() >= lo - 1 and kept.max() <= hi
    low = ((kept >= lo) & (kept < lo + 10)).sum().item()
    high = ((kept >= hi - 9) & (kept <= hi)).sum().item()
    assert abs(low - high) < 0.35 * max(low, high)


def test_basic_train_transform():
    img = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8)
    out = BasicTrainTransform(24)(img)
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8


def test_channels_last_input_same_result():
    # torchvision's JPEG decoder returns an HWC buffer viewed as CHW; the fast path for that
    # layout must give the same pixels as a contiguous CHW image (up to one level, should a
    # BLAS build sum the 4 taps in another order and land on the other side of a .5).
    g = torch.Generator().manual_seed(2)
    hwc = torch.randint(0, 256, (23, 31, 3), dtype=torch.uint8, generator=g)
    chw_view, chw = hwc.permute(2, 0, 1), hwc.permute(2, 0, 1).contiguous()
    assert chw_view.stride(0) == 1
    for box in (None, (2, 3, 17, 20)):
        a = resize_bicubic(chw_view, (11, 14), box=box)
        b = resize_bicubic(chw, (11, 14), box=box)
        assert a.is_contiguous() and (a.int() - b.int()).abs().max() <= 1
    e1, e2 = ResizeCropEval(8, pad=4)(chw_view), ResizeCropEval(8, pad=4)(chw)
    assert (e1.int() - e2.int()).abs().max() <= 1


def _reference_resize(img, out_h, out_w):
    """TF's half-pixel bicubic resize written out per output pixel in float64 (no taps tables,
    no matmuls): 4x4 source pixels, Keys' kernel at the 1/1024-quantised offset, taps outside the
    image dropped and the rest renormalised per axis; rounded and clamped to uint8."""
    import numpy as np

    def axis(in_size, out_size):
        scale = np.float32(in_size / out_size)  # TF's scaler is float32
        taps = []
        for i in range(out_size):
            pos = (np.float32(i) + np.float32(0.5)) * scale - np.float32(0.5)
            base = math.floor(pos)
            frac = float(np.round(np.float32(pos - np.float32(base)) * 1024)) / 1024
            pairs = [(base + k, keys(k - frac)) for k in (-1, 0, 1, 2) if 0 <= base + k < in_size]
            total = sum(w for _, w in pairs)
            taps.append([(s, w / total) for s, w in pairs])
        return taps

    c, h, w = img.shape
    ys, xs = axis(h, out_h), axis(w, out_w)
    src = img.double().tolist()
    out = torch.empty(c, out_h, out_w, dtype=torch.uint8)
    for ch in range(c):
        for i, ty in enumerate(ys):
            for j, tx in enumerate(xs):
                v = sum(wy * wx * src[ch][sy][sx] for sy, wy in ty for sx, wx in tx)
                out[ch, i, j] = min(max(round(v), 0), 255)
    return out


@pytest.mark.parametrize(
    "in_hw, out_hw",
    [
        ((13, 17), (8, 11)),
        ((5, 7), (12, 9)),
        ((40, 31), (9, 16)),
        ((6, 6), (6, 6)),
        ((3, 50), (7, 4)),
    ],
)
def test_resize_matches_an_independent_reference(in_hw, out_hw):
    g = torch.Generator().manual_seed(in_hw[0] * 100 + out_hw[1])
    hwc = torch.randint(0, 256, (*in_hw, 3), dtype=torch.uint8, generator=g)
    expect = _reference_resize(hwc.permute(2, 0, 1), *out_hw)
    for img in (hwc.permute(2, 0, 1), hwc.permute(2, 0, 1).contiguous()):  # both layouts
        out = resize_bicubic(img, out_hw)
        diff = (out.int() - expect.int()).abs()
        # float32 vs float64 sums may land on either side of a .5 only rarely.
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    # A box crops first; an output window returns that part of the full resize.
    box = (1, 2, in_hw[0] - 1, in_hw[1] - 2)
    sub = hwc.permute(2, 0, 1)[:, 1:, 2:]
    out = resize_bicubic(hwc.permute(2, 0, 1), out_hw, box=box)
    assert (out.int() - _reference_resize(sub, *out_hw).int()).abs().max() <= 1
    window = (out_hw[0] // 3, 1, out_hw[0] - out_hw[0] // 3, out_hw[1] - 1)
    top, left, wh, ww = window
    win = resize_bicubic(hwc.permute(2, 0, 1), out_hw, out_window=window)
    assert win.shape == (3, wh, ww)
    assert (win.int() - expect[:, top : top + wh, left : left + ww].int()).abs().max() <= 1


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_a_mirrored_resize_is_the_resize_flipped_and_float_keeps_tfs_unclamped_values(dtype):
    g = torch.Generator().manual_seed(3)
    img = torch.randint(0, 256, (3, 23, 31), dtype=torch.uint8, generator=g)
    for box, window in ((None, None), ((2, 3, 17, 20), None), (None, (1, 2, 9, 7))):
        plain = resize_bicubic(img, (11, 14), box=box, dtype=dtype)
        mirrored = resize_bicubic(img, (11, 14), box=box, dtype=dtype, flip=True)
        if window is not None:  # a window of the mirrored image is the mirror of the opposite window
            top, left, h, w = window
            plain = resize_bicubic(img, (11, 14), out_window=(top, 14 - left - w, h, w), dtype=dtype)
            mirrored = resize_bicubic(img, (11, 14), out_window=window, dtype=dtype, flip=True)
        # Summed in another order (the width pass runs in reverse): equal up to float32 rounding.
        assert mirrored.dtype == dtype
        torch.testing.assert_close(mirrored.float(), plain.flip(-1).float(), rtol=0, atol=1 if dtype == torch.uint8 else 1e-3)
    # The float resize is TF's: the uint8 one is it rounded and clamped, and a sharp edge
    # overshoots [0, 255] (Keys' kernel has negative lobes), which the float result keeps.
    edge = torch.zeros(3, 8, 8, dtype=torch.uint8)
    edge[..., 4:] = 255
    as_float = resize_bicubic(edge, (8, 13), dtype=torch.float32)
    assert as_float.min() < 0 and as_float.max() > 255
    assert torch.equal(resize_bicubic(edge, (8, 13)), as_float.round().clamp(0, 255).to(torch.uint8))
