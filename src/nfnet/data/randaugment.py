"""The official RandAugment policy (NFNET_SPEC §4.4; ``autoaugment.py``
``distort_image_with_randaugment``) on uint8 CHW tensors.

Each of ``num_layers`` layers picks one of the 16 ops below uniformly and always applies it at
the fixed magnitude ``M`` (``_MAX_LEVEL`` = 10 is the scale of M). Ops are built on
``torchvision.transforms.v2.functional`` where it has the same operation; the rest are a few
lines of tensor code. Randomness (op choice, signs, Cutout position) comes from torch's global
RNG or an explicit ``torch.Generator``.

Quirks of the official code, kept on purpose:

* Posterize keeps ``int(M/10*4)`` bits, so a *lower* magnitude is a *stronger* posterize
  (M=5 keeps 2 bits, M=15 keeps 6).
* Solarize's threshold is ``int(M/10*256)`` (128, 256, 384 at M = 5, 10, 15), compared with
  a uint8 image, so TF converts it to uint8 and it wraps modulo 256: M = 10 (F1, F2) inverts
  every pixel and M = 15 (F3-F7) acts as 128, as at M = 5 (NFNET_SPEC §4.4).
* Contrast blends towards a "mean" that is ``sum(histogram)/256`` = the pixel count / 256
  (clipped to 255), not the mean intensity.
* Color/Contrast/Brightness/Sharpness use the factor ``M/10*1.8 + 0.1`` and are never negated;
  at M=5 the factor is exactly 1.0 and the official ``blend`` returns the image unchanged.
* Rotate/Shear/Translate get a random sign; Translate is in absolute pixels (``M/10*100``);
  Shear is about the top-left pixel (a projective transform, not a centred shear); the empty
  area of geometric ops and the Cutout square are filled with 128.
* A per-op ``prob`` is drawn in the official loop but never used; it is not drawn here.

Rounding: the official ops go through TF's float32 conversions. Where torchvision's op rounds
differently, the result differs by at most one grey level: Color's grey image is kept in float
(TF quantises it to uint8 first), Sharpness rounds its blurred image (TF truncates).
AutoContrast is written out in TF's form, because torchvision's ``(x - lo) / ((hi - lo) / 255)``
often maps the brightest pixel to 254 instead of 255.

Speed (these ops run once per layer per training example, in the loader workers): pointwise ops
(AutoContrast, Equalize, Solarize, SolarizeAdd) compute their result for the 256 possible values
and look the image up in that table, and the nearest-neighbour warps (Rotate, ShearX/Y) gather
pixels through a source-index map made once per image size by running the same torchvision op
on an image of pixel indices. Both give exactly the pixels of the direct computation (a
pointwise op is its table; nearest sampling copies a source pixel, or the fill, chosen by the
geometry alone), several times faster than float conversions, ``torch.where`` and
``grid_sample`` on every image.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from nfnet.data.randaugment_levels import (  # noqa: F401 - the ops' numbers, also for importers of this module
    FILL,
    CUTOUT_CONST,
    TRANSLATE_CONST,
    OP_NAMES,
    enhance_factor,
    posterize_bits,
    solarize_threshold,
    solarize_add_amount,
    rotate_degrees,
    shear_level,
    translate_pixels,
    cutout_pad,
)

# ---- fast paths: lookup tables and cached warp maps -----------------------------------------


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float already clipped to [0, 255] -> uint8 by truncation, as TF's cast. Via int32: the
    same values, and several times faster than torch's direct float -> uint8 conversion."""
    return x.to(torch.int32).to(torch.uint8)


def apply_lut(img: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """``lut[c, img[..., c, h, w]]`` for a uint8 (C, 256) table (or (256,), all channels)."""
    idx = img.to(torch.int32)
    if lut.dim() == 2:
        c = img.shape[-3]
        idx += (torch.arange(c, dtype=torch.int32) * 256).view(c, 1, 1)
    return lut.reshape(-1).index_select(0, idx.view(-1)).view(img.shape)


_U8_VALUES = torch.arange(256, dtype=torch.uint8)


@functools.lru_cache(maxsize=64)
def _warp_index(channels: int, height: int, width: int, kind: str, arg: float) -> torch.Tensor:
    """Flat source index (C*H*W,) int32 of a nearest-neighbour warp; C*H*W means "the fill".

    Made by warping an image whose values are their own pixel indices with the very op used
    for uint8 images (same geometry, same grid), with fill -1 marking pixels from outside.
    """
    hw = height * width
    index_img = torch.arange(hw, dtype=torch.float32).view(1, height, width)
    if kind == "rotate":
        src = _rotate_tv(index_img, arg, fill=-1.0)
    else:
        src = _shear_tv(index_img, arg, kind[-1], fill=-1.0)
    src = src.reshape(-1).to(torch.int64)
    per_channel = src.view(1, hw) + (torch.arange(channels) * hw).view(channels, 1)
    idx = torch.where(src.view(1, hw) >= 0, per_channel, torch.tensor(channels * hw))
    return idx.view(-1).to(torch.int32)


def _warp(img: torch.Tensor, kind: str, arg: float) -> torch.Tensor:
    c, h, w = img.shape[-3:]
    if h * w > 2**24:  # float32 pixel indices stop being exact: warp the image itself
        return _rotate_tv(img, arg) if kind == "rotate" else _shear_tv(img, arg, kind[-1])
    idx = _warp_index(c, h, w, kind, float(arg))
    n = img.numel() // (c * h * w)
    src = torch.cat([img.reshape(n, c * h * w), img.new_full((n, 1), FILL)], dim=1)
    if n > 1:
        # One gather for the whole batch: offset each image's indices by its row.
        idx = (idx.view(1, -1) + (torch.arange(n, dtype=torch.int32) * (c * h * w + 1)).view(n, 1))
    return src.view(-1).index_select(0, idx.view(-1)).view(img.shape)


# ---- the ops (uint8 (..., 3, H, W) in and out) ------------------------------------------------


def blend(degenerate: torch.Tensor, img: torch.Tensor, factor: float) -> torch.Tensor:
    """Official ``blend``: ``degenerate + factor * (img - degenerate)``, clipped, truncated."""
    if factor == 0.0:
        return degenerate.expand_as(img).clone()
    if factor == 1.0:
        return img
    d = degenerate.to(torch.float32)
    out = d + factor * (img.to(torch.float32) - d)
    return _to_uint8(out.clamp_(0.0, 255.0))


def _autocontrast_values(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    # float32 in TF's order: x * (255 / (hi - lo)) + (-lo * scale), then clip and truncate.
    scale = 255.0 / (hi - lo)
    out = _to_uint8((x * scale + (-lo * scale)).clamp_(0.0, 255.0))
    return torch.where(hi > lo, out, x.to(torch.uint8))


def autocontrast(img: torch.Tensor) -> torch.Tensor:
    """Per-channel stretch of [lo, hi] to [0, 255]; a constant channel is left unchanged."""
    lo = img.amin(dim=(-2, -1), keepdim=True).to(torch.float32)
    hi = img.amax(dim=(-2, -1), keepdim=True).to(torch.float32)
    if img.dim() == 3:
        # The same float32 formula on the 256 possible values, then a table lookup.
        values = _U8_VALUES.to(torch.float32).view(1, 256)
        return apply_lut(img, _autocontrast_values(values, lo.view(-1, 1), hi.view(-1, 1)))
    return _autocontrast_values(img.to(torch.float32), lo, hi)


def equalize(img: torch.Tensor) -> torch.Tensor:
    """Per-channel histogram equalization with PIL's rule (as torchvision's ``equalize``):
    ``step = (count - count(max value)) // 255``, ``lut[v] = (count(< v) + step // 2) // step``;
    a channel with ``step == 0`` is left unchanged."""
    if img.dim() != 3:
        return F.equalize(img)
    c, h, w = img.shape
    idx = img.reshape(c, h * w).to(torch.int32)
    idx += (torch.arange(c, dtype=torch.int32) * 256).view(c, 1)
    hist = torch.bincount(idx.view(-1), minlength=256 * c).view(c, 256)
    cum = hist.cumsum(1)
    last = hist.gather(1, (cum.argmax(1, keepdim=True)))  # count of the top value present
    step = (h * w - last) // 255
    lut = (cum[:, :-1] + step // 2) // step.clamp(min=1)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut.clamp(0, 255)], dim=1)
    lut = torch.where(step > 0, lut, torch.arange(256).view(1, 256)).to(torch.uint8)
    return lut.view(-1).index_select(0, idx.view(-1)).view(img.shape)


def solarize(img: torch.Tensor, threshold: int) -> torch.Tensor:
    """Inverts the pixels >= ``threshold``, the threshold taken modulo 256 as the official
    comparison with a uint8 image does (256 -> 0: every pixel inverted; 384 -> 128)."""
    return apply_lut(img, F.solarize(_U8_VALUES, threshold % 256))


def _solarize_add_values(x: torch.Tensor, addition: int, threshold: int) -> torch.Tensor:
    added = (x.to(torch.int16) + addition).clamp_(0, 255).to(torch.uint8)
    return torch.where(x < threshold, added, x)


def solarize_add(img: torch.Tensor, addition: int, threshold: int = 128) -> torch.Tensor:
    return apply_lut(img, _solarize_add_values(_U8_VALUES, addition, threshold))


def posterize(img: torch.Tensor, bits: int) -> torch.Tensor:
    # The official shift is 8 - bits; bits outside [0, 8] (M > 20) would be a negative shift,
    # which TF leaves undefined: clamp to "keep everything".
    bits = min(max(bits, 0), 8)
    if bits == 0:
        return torch.zeros_like(img)
    return F.posterize(img, bits)


def contrast(img: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 1.0:
        return img
    # Quirk: the official "mean" is sum(histogram) / 256, i.e. the number of pixels / 256.
    h, w = img.shape[-2:]
    mean = int(min(h * w / 256.0, 255.0))
    # Filled on the image's device: a tensor copied from the host would make a CUDA stream wait.
    return blend(torch.full((), mean, dtype=torch.uint8, device=img.device), img, factor)


def _enhance(op: Callable[[torch.Tensor, float], torch.Tensor]):
    def apply(img: torch.Tensor, factor: float) -> torch.Tensor:
        # Official blend returns the image itself at factor 1.0 (M=5): skip the work.
        return img if factor == 1.0 else op(img, factor)

    return apply


def _rotate_tv(img: torch.Tensor, degrees: float, fill: float = FILL) -> torch.Tensor:
    # Nearest-neighbour about the image centre, like tfa.image.rotate's defaults.
    fills = [fill] * img.shape[-3]
    return F.rotate(img, degrees, interpolation=InterpolationMode.NEAREST, fill=fills)


def _shear_tv(img: torch.Tensor, level: float, axis: str, fill: float = FILL) -> torch.Tensor:
    # Official: a projective transform mapping output (x, y) to input (x + level*y, y)
    # (ShearX) about pixel (0, 0). torchvision's affine with shear angle atan(level) and its
    # centre on the centre of pixel (0, 0) — (0.5, 0.5) in its coordinates — is that map.
    angle = math.degrees(math.atan(level))
    sh = [angle, 0.0] if axis == "x" else [0.0, angle]
    return F.affine(
        img, angle=0.0, translate=[0.0, 0.0], scale=1.0, shear=sh,
        interpolation=InterpolationMode.NEAREST, fill=[fill] * img.shape[-3], center=[0.5, 0.5],
    )  # fmt: skip


def rotate(img: torch.Tensor, degrees: float) -> torch.Tensor:
    """torchvision's nearest ``rotate`` about the centre, fill 128 (via a cached index map)."""
    return _warp(img, "rotate", degrees)


def shear(img: torch.Tensor, level: float, axis: str) -> torch.Tensor:
    """Shear about the top-left pixel, nearest, fill 128 (via a cached index map)."""
    return _warp(img, "shear_" + axis, level)


def translate(img: torch.Tensor, pixels: float, axis: str) -> torch.Tensor:
    """Output pixel (x, y) = input (x + pixels, y) for TranslateX, filled with 128 outside.

    The official translate moves the image by ``-pixels``. Pixels are whole numbers for integer
    magnitudes (M*10), so a nearest-neighbour warp is an exact shift: done here by slicing
    instead of a float grid_sample.
    """
    p = int(round(pixels))
    dim = -1 if axis == "x" else -2
    n = img.shape[dim]
    out = torch.full_like(img, FILL)
    if abs(p) >= n:
        return out
    if p >= 0:
        out.narrow(dim, 0, n - p).copy_(img.narrow(dim, p, n - p))
    else:
        out.narrow(dim, -p, n + p).copy_(img.narrow(dim, 0, n + p))
    return out


def draw_cutout_centre(
    height: int, width: int, generator: Optional[torch.Generator] = None
) -> tuple[int, int]:
    """Cutout's random centre (row, column), uniform over the pixels."""
    cy = int(torch.randint(height, (), generator=generator))
    cx = int(torch.randint(width, (), generator=generator))
    return cy, cx


def cutout(img: torch.Tensor, pad: int, generator: Optional[torch.Generator] = None):
    """A (2*pad)^2 square of 128 centred on a uniform pixel, clipped at the borders."""
    h, w = img.shape[-2:]
    cy, cx = draw_cutout_centre(h, w, generator)
    top, left = max(0, cy - pad), max(0, cx - pad)
    bottom, right = min(h, cy + pad), min(w, cx + pad)
    if bottom <= top or right <= left:
        return img
    value = torch.tensor(FILL, dtype=img.dtype, device=img.device)
    return F.erase(img, top, left, bottom - top, right - left, value)


# Each op as (image, RandAugment, sign) -> image; module-level so RandAugment pickles into
# DataLoader workers under any start method. ``sign`` (+-1) is used by the signed ops only.
_OPS: dict[str, Callable[[torch.Tensor, "RandAugment", float], torch.Tensor]] = {
    "AutoContrast": lambda x, ra, s: autocontrast(x),
    "Equalize": lambda x, ra, s: equalize(x),
    "Invert": lambda x, ra, s: F.invert(x),
    "Rotate": lambda x, ra, s: rotate(x, s * rotate_degrees(ra.magnitude)),
    "Posterize": lambda x, ra, s: posterize(x, posterize_bits(ra.magnitude)),
    "Solarize": lambda x, ra, s: solarize(x, solarize_threshold(ra.magnitude)),
    "Color": lambda x, ra, s: _enhance(F.adjust_saturation)(x, enhance_factor(ra.magnitude)),
    "Contrast": lambda x, ra, s: contrast(x, enhance_factor(ra.magnitude)),
    "Brightness": lambda x, ra, s: _enhance(F.adjust_brightness)(x, enhance_factor(ra.magnitude)),
    "Sharpness": lambda x, ra, s: _enhance(F.adjust_sharpness)(x, enhance_factor(ra.magnitude)),
    "ShearX": lambda x, ra, s: shear(x, s * shear_level(ra.magnitude), "x"),
    "ShearY": lambda x, ra, s: shear(x, s * shear_level(ra.magnitude), "y"),
    "TranslateX": lambda x, ra, s: translate(
        x, s * translate_pixels(ra.magnitude, ra.translate_const), "x"
    ),
    "TranslateY": lambda x, ra, s: translate(
        x, s * translate_pixels(ra.magnitude, ra.translate_const), "y"
    ),
    "Cutout": lambda x, ra, s: cutout(x, cutout_pad(ra.magnitude, ra.cutout_const), ra.generator),
    "SolarizeAdd": lambda x, ra, s: solarize_add(x, solarize_add_amount(ra.magnitude)),
}
assert tuple(_OPS) == OP_NAMES


class RandAugmentDraws(NamedTuple):
    """One image's RandAugment draws, per layer: the op (an index into :data:`OP_NAMES`),
    whether its argument is negated, and the Cutout centre (row, column) where the op is
    Cutout, else None."""

    ops: list[int]
    negate: list[bool]
    cutout_centres: list[Optional[tuple[int, int]]]


class RandAugment:
    """Official RandAugment: ``num_layers`` uniformly chosen ops, each always applied at
    magnitude ``magnitude``. ``__call__(uint8 (..., 3, H, W)) -> uint8`` of the same shape."""

    def __init__(
        self,
        num_layers: int,
        magnitude: float,
        cutout_const: int = CUTOUT_CONST,
        translate_const: float = TRANSLATE_CONST,
        generator: Optional[torch.Generator] = None,
    ):
        self.num_layers = int(num_layers)
        self.magnitude = float(magnitude)
        self.cutout_const = cutout_const
        self.translate_const = translate_const
        self.generator = generator

    def apply_op(self, img: torch.Tensor, name: str, sign: float = 1.0) -> torch.Tensor:
        """Apply one named op at this magnitude (``sign`` used by Rotate/Shear/Translate)."""
        return _OPS[name](img, self, sign)

    def _draw_layers(self) -> tuple[list[int], list[bool]]:
        # All layer draws of an image at once: one op index and one sign per layer.
        ops = torch.randint(len(OP_NAMES), (self.num_layers,), generator=self.generator)
        negate = torch.rand(self.num_layers, generator=self.generator) < 0.5
        return ops.tolist(), negate.tolist()

    def draw(self, height: int, width: int) -> RandAugmentDraws:
        """Every random parameter of one :meth:`__call__` on a ``height`` x ``width`` image,
        drawn with the same calls in the same order (the layers' ops and signs, then each
        Cutout layer's centre in layer order, which is when ``__call__`` draws it), so that the
        GPU input pipeline can draw them in the loader workers and apply them on the device."""
        ops, negate = self._draw_layers()
        centres = [
            draw_cutout_centre(height, width, self.generator) if OP_NAMES[op] == "Cutout" else None
            for op in ops
        ]
        return RandAugmentDraws(ops, negate, centres)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if img.dtype != torch.uint8:
            raise TypeError(f"RandAugment expects a uint8 image, got {img.dtype}")
        ops, negate = self._draw_layers()
        for op, neg in zip(ops, negate):
            img = _OPS[OP_NAMES[op]](img, self, -1.0 if neg else 1.0)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_layers={self.num_layers}, magnitude={self.magnitude:g})"
