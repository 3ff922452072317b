"""The variant table: data that the model, the configs and the data pipeline all read.

F0-F7 and F0+-F7+ are the official table (NFNET_SPEC.md §1.10, `base.py` `nfnet_params`);
`nfnet_tiny` is this project's CPU-sized default with the same block structure.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """One row of the variant table.

    `stem_widths` is the whole stem, four convs; officially (16, 32, 64, widths[0] // 2),
    not scaled by the model's `width` multiplier (§1.2). `train_size`/`test_size` are the image
    sizes the recipe trains and evaluates at, `ra_level` the RandAugment code (`405` = 4 layers
    at magnitude 5, §4.3), `drop_rate` the dropout before the classifier.
    """

    name: str
    depths: tuple[int, int, int, int]
    widths: tuple[int, int, int, int]
    stem_widths: tuple[int, int, int, int]
    train_size: int
    test_size: int
    ra_level: int
    drop_rate: float
    # §1.3 stage defaults: bottleneck = int(out_ch * expansion) rounded down to a multiple of
    # group_width (big_width: computed from out_ch rather than in_ch).
    group_width: int = 128
    expansion: float = 0.5
    big_width: bool = True


# §1.10: every F variant has these block widths; F+ variants copy the row with wider blocks.
F_WIDTHS = (256, 512, 1536, 1536)
F_PLUS_WIDTHS = (384, 768, 2048, 2048)
# §1.2: the first three stem convs; the fourth is widths[0] // 2.
OFFICIAL_STEM = (16, 32, 64)

# §1.10 / §2.2: (depths, train_imsize, test_imsize, RA_level, drop_rate), per F index.
_OFFICIAL_ROWS = {
    0: ((1, 2, 6, 3), 192, 256, 405, 0.2),
    1: ((2, 4, 12, 6), 224, 320, 410, 0.3),
    2: ((3, 6, 18, 9), 256, 352, 410, 0.4),
    3: ((4, 8, 24, 12), 320, 416, 415, 0.4),
    4: ((5, 10, 30, 15), 384, 512, 415, 0.5),
    5: ((6, 12, 36, 18), 416, 544, 415, 0.5),
    6: ((7, 14, 42, 21), 448, 576, 415, 0.5),
    7: ((8, 16, 48, 24), 480, 608, 415, 0.5),
}


def _stem(first_three: tuple[int, int, int], widths: tuple[int, ...]) -> tuple[int, ...]:
    return (*first_three, widths[0] // 2)


def _official(index: int, plus: bool) -> Variant:
    depths, train, test, ra, drop = _OFFICIAL_ROWS[index]
    widths = F_PLUS_WIDTHS if plus else F_WIDTHS
    return Variant(
        name=f"nfnet_f{index}{'plus' if plus else ''}", depths=depths, widths=widths,
        stem_widths=_stem(OFFICIAL_STEM, widths), train_size=train, test_size=test,
        ra_level=ra, drop_rate=drop,
    )


# The CPU-sized default: F0's block structure, narrower and shallower, so `python train.py`
# trains on the generated 64x64 dataset in minutes on two cores. Tuned by this project; the
# RandAugment code 205 is 2 layers at magnitude 5; no dropout, since a few-minute run
# underfits rather than overfits.
_TINY_WIDTHS = (64, 128, 256, 256)
TINY = Variant(
    name="nfnet_tiny", depths=(1, 1, 2, 1), widths=_TINY_WIDTHS,
    stem_widths=_stem((16, 32, 32), _TINY_WIDTHS), train_size=64, test_size=64,
    ra_level=205, drop_rate=0.0, group_width=32,
)

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [_official(i, plus) for plus in (False, True) for i in _OFFICIAL_ROWS] + [TINY]
}


def get_variant(name: str) -> Variant:
    """The table row called `name`; a ValueError lists the valid names otherwise."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown NFNet variant {name!r}; valid names: {', '.join(VARIANTS)}"
        ) from None
