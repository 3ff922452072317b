"""The variant table against NFNET_SPEC.md §1.10 / §2.2."""

import dataclasses

import pytest

from nfnet.models import VARIANTS, Variant, create_model, get_variant

# NFNET_SPEC.md §1.10: variant -> (depth, train_imsize, test_imsize, RA_level, drop_rate).
SPEC_TABLE = {
    0: ((1, 2, 6, 3), 192, 256, 405, 0.2),
    1: ((2, 4, 12, 6), 224, 320, 410, 0.3),
    2: ((3, 6, 18, 9), 256, 352, 410, 0.4),
    3: ((4, 8, 24, 12), 320, 416, 415, 0.4),
    4: ((5, 10, 30, 15), 384, 512, 415, 0.5),
    5: ((6, 12, 36, 18), 416, 544, 415, 0.5),
    6: ((7, 14, 42, 21), 448, 576, 415, 0.5),
    7: ((8, 16, 48, 24), 480, 608, 415, 0.5),
}
SPEC_F_WIDTHS = (256, 512, 1536, 1536)  # §1.10
SPEC_F_PLUS_WIDTHS = (384, 768, 2048, 2048)  # §1.10


@pytest.mark.parametrize("index", sorted(SPEC_TABLE))
@pytest.mark.parametrize("plus", [False, True])
def test_official_rows_match_spec(index, plus):
    name = f"nfnet_f{index}{'plus' if plus else ''}"
    v = get_variant(name)
    depths, train, test, ra, drop = SPEC_TABLE[index]
    assert v.name == name
    assert (v.depths, v.train_size, v.test_size, v.ra_level, v.drop_rate) == (
        depths, train, test, ra, drop)
    widths = SPEC_F_PLUS_WIDTHS if plus else SPEC_F_WIDTHS
    assert v.widths == widths
    # §1.2: stem 16/32/64 and width[0]//2 = 128 (F) or 192 (F+).
    assert v.stem_widths == (16, 32, 64, 192 if plus else 128)
    # §1.3 stage defaults.
    assert (v.group_width, v.expansion, v.big_width) == (128, 0.5, True)


def test_table_has_every_official_name_and_the_cpu_default():
    expected = {f"nfnet_f{i}" for i in range(8)} | {f"nfnet_f{i}plus" for i in range(8)}
    assert set(VARIANTS) == expected | {"nfnet_tiny"}
    assert all(VARIANTS[name].name == name for name in VARIANTS)


def test_cpu_default_keeps_the_official_structure():
    tiny = get_variant("nfnet_tiny")
    assert len(tiny.depths) == len(tiny.widths) == 4
    # The stem's last conv is widths[0] // 2, as in the official stem (§1.2).
    assert len(tiny.stem_widths) == 4 and tiny.stem_widths[-1] == tiny.widths[0] // 2
    # Every stage has at least one whole group in its bottleneck.
    assert all(int(w * tiny.expansion) >= tiny.group_width for w in tiny.widths)
    assert tiny.train_size % 32 == 0 and tiny.test_size % 32 == 0


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="nfnet_f0.*nfnet_tiny"):
        get_variant("nfnet_f9")
    with pytest.raises(ValueError, match="nfnet_f0"):
        create_model("resnet50")


def test_variants_are_frozen_data():
    v = get_variant("nfnet_f0")
    assert isinstance(v, Variant)
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.train_size = 1
