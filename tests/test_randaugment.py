"""The official 16-op RandAugment: each op on small known inputs, expected values by hand."""

import pytest
import torch

import nfnet.data.randaugment as ra_mod
from nfnet.data.randaugment import OP_NAMES, RandAugment
from nfnet.data.randaugment_levels import parse_ra_level

U8 = torch.uint8


def img_from(rows, channels=3):
    """A uint8 (3, H, W) image with the same 2-D values in every channel."""
    t = torch.tensor(rows, dtype=U8)
    return t.unsqueeze(0).expand(channels, *t.shape).contiguous()


def op(name, x, m, sign=1.0):
    return RandAugment(1, m).apply_op(x, name, sign)


def test_parse_ra_level():
    assert parse_ra_level(405) == (4, 5)
    assert parse_ra_level(410) == (4, 10)
    assert parse_ra_level(415) == (4, 15)
    assert parse_ra_level(10) == (2, 10)
    assert parse_ra_level(5) == (2, 5)
    assert parse_ra_level(215) == (2, 15)


@pytest.mark.parametrize(
    "m, rot, bits, thr, add, factor, shear, trans, pad",
    [
        (5, 15.0, 2, 128, 55, 1.0, 0.15, 50.0, 20),
        (10, 30.0, 4, 256, 110, 1.9, 0.3, 100.0, 40),
        (15, 45.0, 6, 384, 165, 2.8, 0.45, 150.0, 60),
    ],
)
def test_magnitude_to_argument_table(m, rot, bits, thr, add, factor, shear, trans, pad):
    assert ra_mod.rotate_degrees(m) == pytest.approx(rot)
    assert ra_mod.posterize_bits(m) == bits
    assert ra_mod.solarize_threshold(m) == thr
    assert ra_mod.solarize_add_amount(m) == add
    assert ra_mod.enhance_factor(m) == pytest.approx(factor)
    assert ra_mod.shear_level(m) == pytest.approx(shear)
    assert ra_mod.translate_pixels(m) == pytest.approx(trans)
    assert ra_mod.cutout_pad(m) == pad
    assert len(OP_NAMES) == 16


def test_autocontrast():
    x = torch.stack(
        [
            torch.tensor([[50, 100, 150]], dtype=U8),  # stretched: (v - 50) * 255 / 100
            torch.tensor([[7, 7, 7]], dtype=U8),  # constant: unchanged
            torch.tensor([[0, 255, 10]], dtype=U8),  # already full range: unchanged
        ]
    )
    out = op("AutoContrast", x, 5)
    assert out[0].tolist() == [[0, 127, 255]]  # 127.5 truncated
    assert out[1].tolist() == [[7, 7, 7]] and out[2].tolist() == [[0, 255, 10]]


def test_equalize():
    # 32x32, four equal quarters 0/64/128/192. PIL's rule: step = (1024 - 256) // 255 = 3;
    # lut[v] = (count(< v) + step // 2) // step -> 0, 257 // 3 = 85, 513 // 3 = 171,
    # 769 // 3 = 256 -> 255.
    v = torch.tensor([0, 64, 128, 192], dtype=U8).repeat_interleave(256).view(32, 32)
    x = torch.stack([v, v, torch.full((32, 32), 9, dtype=U8)])
    out = op("Equalize", x, 5)
    lut = {0: 0, 64: 85, 128: 171, 192: 255}
    expect = torch.tensor([lut[int(a)] for a in v.flatten()], dtype=U8).view(32, 32)
    assert torch.equal(out[0], expect) and torch.equal(out[1], expect)
    assert torch.equal(out[2], x[2])  # one value only: step 0, unchanged


def test_invert():
    assert op("Invert", img_from([[0, 1, 128, 255]]), 5)[0].tolist() == [[255, 254, 127, 0]]


def test_rotate_90_and_45_with_fill():
    x = img_from([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    # M = 30 -> 90 degrees. Positive = counter-clockwise: the right column becomes the top row.
    assert op("Rotate", x, 30)[0].tolist() == [[3, 6, 9], [2, 5, 8], [1, 4, 7]]
    assert op("Rotate", x, 30, -1)[0].tolist() == [[7, 4, 1], [8, 5, 2], [9, 6, 3]]
    # M = 15 -> 45 degrees on 5x5: each corner's source is 2*sqrt(2) = 2.83 px from the centre
    # along an axis, outside the image -> fill 128; the centre stays.
    y = img_from([[10 * r + c for c in range(5)] for r in range(5)])
    out = op("Rotate", y, 15)[0]
    assert [out[0, 0], out[0, 4], out[4, 0], out[4, 4]] == [128] * 4
    assert out[2, 2] == 22


def test_posterize_lower_magnitude_is_stronger():
    x = img_from([[255, 100, 63, 64, 191, 3]])
    assert op("Posterize", x, 5)[0].tolist() == [[192, 64, 0, 64, 128, 0]]  # 2 bits kept
    assert op("Posterize", x, 15)[0].tolist() == [[252, 100, 60, 64, 188, 0]]  # 6 bits kept
    assert op("Posterize", x, 0)[0].tolist() == [[0] * 6]  # 0 bits: shift by 8
    assert torch.equal(op("Posterize", x, 20), x)  # 8 bits


@pytest.mark.parametrize("magnitude", [5, 10, 15])
def test_solarize_threshold_wraps_modulo_256_like_the_uint8_comparison(magnitude):
    # Official: threshold int(M/10*256) = 128 / 256 / 384, compared with a uint8 image, which
    # wraps it to 128 / 0 / 128 (NFNET_SPEC §4.4): M=10 inverts every pixel, M=15 acts as M=5.
    wrapped = {5: 128, 10: 0, 15: 128}[magnitude]
    values = torch.arange(256, dtype=torch.uint8)
    x = values.view(1, 16, 16).expand(3, 16, 16).contiguous()
    expected = torch.where(values < wrapped, values, 255 - values).view(1, 16, 16).expand(3, 16, 16)
    assert torch.equal(op("Solarize", x, magnitude), expected)


def test_solarize_on_known_pixels():
    x = img_from([[0, 127, 128, 200, 255]])
    assert op("Solarize", x, 5)[0].tolist() == [[0, 127, 127, 55, 0]]  # >= 128 inverted
    assert op("Solarize", x, 10)[0].tolist() == [[255, 128, 127, 55, 0]]  # threshold 256 -> 0: all
    assert op("Solarize", x, 15)[0].tolist() == [[0, 127, 127, 55, 0]]  # threshold 384 -> 128


def test_solarize_add():
    x = img_from([[0, 100, 127, 128, 250]])
    assert op("SolarizeAdd", x, 5)[0].tolist() == [[55, 155, 182, 128, 250]]
    assert op("SolarizeAdd", x, 15)[0].tolist() == [[165, 255, 255, 128, 250]]  # clipped


def test_color():
    # Pixel (100, 50, 0): grey L = .2989*100 + .587*50 = 59.24; out = L + 1.9 (v - L), truncated
    # and clipped: 136.684 -> 136, 41.684 -> 41, -53.3 -> 0. A grey pixel stays grey.
    x = torch.tensor([[[100, 80]], [[50, 80]], [[0, 80]]], dtype=U8)
    out = op("Color", x, 10)
    assert out[:, 0, 0].tolist() == [136, 41, 0]
    assert out[:, 0, 1].tolist() == [80, 80, 80]


def test_contrast_pixel_count_mean_quirk():
    # 16x16: the official "mean" is 256 pixels / 256 = 1, not the mean intensity, so even a
    # constant image changes: 1 + 1.9 * (100 - 1) = 189.1 -> 189.
    flat = torch.full((3, 16, 16), 100, dtype=U8)
    assert (op("Contrast", flat, 10) == 189).all()
    x = torch.zeros(3, 16, 16, dtype=U8)
    x[:, 0, :3] = torch.tensor([0, 100, 200], dtype=U8)
    assert op("Contrast", x, 10)[0, 0, :3].tolist() == [0, 189, 255]
    # 64x64: mean 4096 / 256 = 16: 16 + 1.9 * 84 = 175.6 -> 175; 16 - 1.9 * 6 = 4.6 -> 4.
    y = torch.full((3, 64, 64), 100, dtype=U8)
    y[:, 0, 0] = 10
    out = op("Contrast", y, 10)
    assert out[0, 0, 0] == 4 and out[0, 1, 1] == 175
    # 256x256: 65536 / 256 = 256, clipped to 255.
    big = torch.full((3, 256, 256), 5, dtype=U8)
    assert (op("Contrast", big, 10) == 0).all()  # 255 + 1.9 * (5 - 255) < 0 -> 0


def test_brightness():
    x = img_from([[100, 50, 200, 0]])
    assert op("Brightness", x, 10)[0].tolist() == [[190, 95, 255, 0]]
    assert op("Brightness", x, 15)[0].tolist() == [[255, 140, 255, 0]]  # 2.8x


def test_sharpness():
    # 3x3 with 13 in the centre: the smoothing kernel [[1,1,1],[1,5,1],[1,1,1]]/13 gives 5 at
    # the centre; out = 5 + 1.9 * (13 - 5) = 20.2 -> 20. Border pixels keep their values.
    x = img_from([[0, 0, 0], [0, 13, 0], [0, 0, 0]])
    assert op("Sharpness", x, 10)[0].tolist() == [[0, 0, 0], [0, 20, 0], [0, 0, 0]]


@pytest.mark.parametrize("name", ["Color", "Contrast", "Brightness", "Sharpness"])
def test_enhance_ops_are_identity_at_m5(name):
    x = torch.randint(0, 256, (3, 16, 16), dtype=U8)
    assert torch.equal(op(name, x, 5), x)  # factor exactly 1.0


def _grid(h, w):
    return img_from([[10 * r + c + 1 for c in range(w)] for r in range(h)])


def test_shear_x_about_top_left():
    # Output (x, y) samples input (x + 0.3 y, y) at M=10, nearest: row shifts round(0.3 y) =
    # 0, 0, 1, 1, 1; pixels sampled from outside become 128.
    x = _grid(5, 6)
    out = op("ShearX", x, 10)[0]
    for y, s in enumerate([0, 0, 1, 1, 1]):
        expect = [10 * y + c + s + 1 if c + s < 6 else 128 for c in range(6)]
        assert out[y].tolist() == expect
    out = op("ShearX", x, 10, -1)[0]
    for y, s in enumerate([0, 0, -1, -1, -1]):
        expect = [10 * y + c + s + 1 if c + s >= 0 else 128 for c in range(6)]
        assert out[y].tolist() == expect


def test_shear_y_about_top_left():
    x = _grid(6, 5)
    out = op("ShearY", x, 10)[0]
    for c, s in enumerate([0, 0, 1, 1, 1]):
        expect = [10 * (r + s) + c + 1 if r + s < 6 else 128 for r in range(6)]
        assert out[:, c].tolist() == expect


def test_translate_absolute_pixels():
    # M=1 -> 10 pixels. Positive: output x = input x + 10 (the image moves left).
    x = img_from([list(range(1, 13))])
    assert op("TranslateX", x, 1)[0].tolist() == [[11, 12] + [128] * 10]
    assert op("TranslateX", x, 1, -1)[0].tolist() == [[128] * 10 + [1, 2]]
    y = img_from([[v] for v in range(1, 13)])
    assert op("TranslateY", y, 1)[0, :, 0].tolist() == [11, 12] + [128] * 10
    assert (op("TranslateX", x, 5) == 128).all()  # 50 pixels > width


def test_cutout_square_of_fill_at_the_drawn_centre():
    x = torch.zeros(3, 10, 12, dtype=U8)
    for seed in range(5):
        ra = RandAugment(1, 1, generator=torch.Generator().manual_seed(seed))  # pad 4
        out = ra.apply_op(x, "Cutout")
        g = torch.Generator().manual_seed(seed)
        cy, cx = int(torch.randint(10, (), generator=g)), int(torch.randint(12, (), generator=g))
        expect = torch.zeros(10, 12, dtype=U8)
        expect[max(0, cy - 4) : min(10, cy + 4), max(0, cx - 4) : min(12, cx + 4)] = 128
        assert torch.equal(out[0], expect) and torch.equal(out[2], expect)


def test_every_op_keeps_shape_and_dtype():
    x = torch.randint(0, 256, (3, 20, 17), dtype=U8)
    for name in OP_NAMES:
        for m in (5, 10, 15):
            for s in (1.0, -1.0):
                out = op(name, x, m, s)
                assert out.shape == x.shape and out.dtype == U8, name


def test_layers_pick_ops_uniformly_and_always_apply(monkeypatch):
    calls = []
    for name in OP_NAMES:
        monkeypatch.setitem(
            ra_mod._OPS, name, lambda x, ra, s, name=name: calls.append((name, s)) or x
        )
    torch.manual_seed(0)
    ra = RandAugment(4, 5)
    x = torch.zeros(3, 4, 4, dtype=U8)
    for _ in range(800):
        ra(x)
    assert len(calls) == 3200  # 4 layers, every layer applies its op
    counts = torch.tensor([sum(1 for n, _ in calls if n == name) for name in OP_NAMES]).float()
    chi2 = ((counts - 200) ** 2 / 200).sum().item()
    assert chi2 < 37.7  # 15 dof, p = 0.001
    negative = sum(1 for _, s in calls if s < 0)
    assert abs(negative - 1600) < 4 * 40  # Binomial(3200, 0.5): sd ~ 28


def test_deterministic_given_seed_and_rejects_float():
    x = torch.randint(0, 256, (3, 24, 24), dtype=U8)
    ra = RandAugment(4, 15)
    torch.manual_seed(7)
    a = ra(x)
    torch.manual_seed(7)
    assert torch.equal(ra(x), a)
    with pytest.raises(TypeError):
        ra(x.float())


def test_fast_paths_equal_the_direct_ops():
    # Table lookups and cached warp maps must give exactly the pixels of the direct computation.
    from torchvision.transforms.v2 import functional as F

    g = torch.Generator().manual_seed(3)
    for shape in ((3, 37, 29), (3, 24, 24), (2, 3, 11, 13)):
        x = torch.randint(0, 256, shape, dtype=U8, generator=g)
        narrow = x // 4 + 60
        for deg in (15.0, -30.0, 45.0, 90.0, 7.3):
            assert torch.equal(ra_mod.rotate(x, deg), ra_mod._rotate_tv(x, deg))
        for level, axis in ((0.15, "x"), (-0.3, "y"), (0.45, "y"), (-0.45, "x")):
            assert torch.equal(ra_mod.shear(x, level, axis), ra_mod._shear_tv(x, level, axis))
        for img in (x, narrow):
            lo = img.amin(dim=(-2, -1), keepdim=True).float()
            hi = img.amax(dim=(-2, -1), keepdim=True).float()
            assert torch.equal(
                ra_mod.autocontrast(img), ra_mod._autocontrast_values(img.float(), lo, hi)
            )
            assert torch.equal(ra_mod.equalize(img), F.equalize(img))
            assert torch.equal(ra_mod.solarize(img, 128), F.solarize(img, 128))
            assert torch.equal(
                ra_mod.solarize_add(img, 55), ra_mod._solarize_add_values(img, 55, 128)
            )
