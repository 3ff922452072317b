"""The official RandAugment's numbers (NFNET_SPEC §4.4; ``autoaugment.py``): the level string, the
16 ops in the official order, and each op's argument at magnitude M (official `level_to_arg`).
The quirks these closed forms keep are listed in nfnet.data.randaugment."""

from __future__ import annotations

MAX_LEVEL = 10.0
FILL = 128  # replace_value of the official RandAugment
CUTOUT_CONST = 40
TRANSLATE_CONST = 100

OP_NAMES = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
    "Cutout", "SolarizeAdd",
)  # fmt: skip  (the official `available_ops` order)


def parse_ra_level(level: int) -> tuple[int, int]:
    """Official ``randaugment_<level>`` decoding: above 100 the hundreds are the layer count
    (405 -> 4 layers at M=5); otherwise 2 layers at M=level."""
    level = int(level)
    if level > 100:
        num_layers = level // 100
        return num_layers, level - 100 * num_layers
    return 2, level


# ---- magnitude -> argument (official `level_to_arg`) -----------------------------------------


def enhance_factor(m: float) -> float:
    return (m / MAX_LEVEL) * 1.8 + 0.1


def posterize_bits(m: float) -> int:
    return int((m / MAX_LEVEL) * 4)


def solarize_threshold(m: float) -> int:
    return int((m / MAX_LEVEL) * 256)


def solarize_add_amount(m: float) -> int:
    return int((m / MAX_LEVEL) * 110)


def rotate_degrees(m: float) -> float:
    return (m / MAX_LEVEL) * 30.0


def shear_level(m: float) -> float:
    return (m / MAX_LEVEL) * 0.3


def translate_pixels(m: float, translate_const: float = TRANSLATE_CONST) -> float:
    return (m / MAX_LEVEL) * float(translate_const)


def cutout_pad(m: float, cutout_const: int = CUTOUT_CONST) -> int:
    return int((m / MAX_LEVEL) * cutout_const)
