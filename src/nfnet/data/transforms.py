"""Train and eval image transforms of the official NFNet pipeline (NFNET_SPEC §4.1, §4.2).

All transforms take uint8 CHW RGB tensors and return uint8 ones (the official train crop
returns float for mixing, which the collate truncates to uint8), so workers ship 1 byte per
pixel and the model normalises on the device with :func:`normalize`.

Official quirks kept here, each also noted where it is implemented:

* The crop is TF's ``sample_distorted_bounding_box`` (not torchvision's RandomResizedCrop): the
  crop *height* is drawn uniformly in integers between the heights allowed by the area range,
  the width follows by rounding, and a crop that equals the whole image (all 10 attempts
  failed, or a lucky full-image draw) is replaced by a centre crop of side
  ``min(H, W) * S / (S + 32)``.
* Resizing is TF's ``tf.image.resize(..., BICUBIC)`` without antialiasing: Keys' cubic kernel
  with a = -0.5 (torch's bicubic uses -0.75), half-pixel centres, taps that fall outside the
  image dropped and the rest renormalised (torch clamps to the edge), and the sub-pixel offset
  quantised to 1/1024 as TF's coefficient table does. See :func:`resize_bicubic`.
* The official resize output is float and unclamped (the code comments observe [-51, 337]).
  The official train path keeps it so (``InceptionCrop(dtype=torch.float32)``): pixels are
  mixed in float and only then clipped and truncated to uint8 before RandAugment. The eval
  path rounds and clamps to uint8, so that workers ship 1 byte per pixel: at most half a
  level plus the clamped overshoot from the official float (docs/DATA.md).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
from torchvision.transforms import v2

# ImageNet statistics on the 0-255 scale, as the official dataset.py defines MEAN_RGB/STDDEV_RGB.
IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# Official crop parameters (dataset.py `_decode_and_random_crop`).
AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
MIN_OBJECT_COVERED = 0.1
MAX_ATTEMPTS = 10
# The centre-crop fallback and resize_crop_32 both pad the target size by 32 pixels.
CROP_PADDING = 32

# TF's bicubic kernel: Keys' cubic convolution with a = -0.5, sampled in a 1024-entry table.
_KEYS_A = -0.5
_TABLE_SIZE = 1024


def normalize(
    x: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN_255,
    std: Sequence[float] = IMAGENET_STD_255,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 (..., 3, H, W) on any device -> ``(x - mean) / std`` in ``dtype`` (0-255 scale)."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return ((x.to(torch.float32) - m) / s).to(dtype)


# ----------------------------------------------------------------------------------------------
# TF-compatible bicubic resize


def _keys_cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' kernel (a = -0.5) at distances |x| in [0, 2]."""
    a = _KEYS_A
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x <= 1, near, far)


@functools.lru_cache(maxsize=4096)
def bicubic_taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices (out, 4) and weights (out, 4) of TF's half-pixel bicubic resize on one axis.

    Output pixel ``i`` samples source position ``(i + 0.5) * in/out - 0.5`` from the four pixels
    around it. TF looks the weights up in a table at the offset rounded to 1/1024, zeroes the
    weight of taps outside ``[0, in_size)`` and renormalises the rest to sum to 1.
    Cached per size pair: callers must not modify the returned tensors.
    """
    # float32 like TF's scaler, so the table offsets round the same way.
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    pos = (torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5
    base = torch.floor(pos)
    # lrintf rounds half to even, as torch.round does.
    frac = (torch.round((pos - base) * _TABLE_SIZE) / _TABLE_SIZE).double()
    offsets = torch.arange(-1, 3, dtype=torch.float64)
    weights = _keys_cubic(offsets.view(1, 4) - frac.view(-1, 1))
    idx = base.view(-1, 1).long() + offsets.long().view(1, 4)
    inside = (idx >= 0) & (idx < in_size)
    weights = torch.where(inside, weights, torch.zeros(()))
    weights = weights / weights.sum(dim=1, keepdim=True)
    return idx.clamp(0, in_size - 1), weights.to(torch.float32)


# Output rows per band. Each band of output rows reads one contiguous window of about
# ``band * in/out + 3`` source rows, so a pass is one batched matmul of small dense matrices
# (zeros outside each output row's 4 taps) instead of many (1 x 4) products: ~3x the
# multiply-adds at train-crop scales, in far fewer, larger BLAS blocks. 8 measured best among
# 4, 8, 16 and 32 for 224 px crops of 500x375 images. Strong downscales (a large photo
# squashed for eval) use narrower bands, down to 1 (4 taps, no wasted work), so the window
# never grows past ~_BAND_TAPS source rows.
_BAND = 8
_BAND_TAPS = 16


@functools.lru_cache(maxsize=4096)
def _band_weights(
    in_size: int, out_size: int, start: int = 0, count: Optional[int] = None, mirror: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """TF's taps for output pixels ``[start, start + count)`` as banded dense matrices
    (``mirror``: in reverse order, which flips the resized image along this axis for free).

    Returns ``rows`` (n_bands * K,) source indices and ``weights`` (n_bands, band, K): band
    ``b`` computes its outputs as ``weights[b] @ src[rows[b*K:(b+1)*K]]``. The weights are
    exactly those of :func:`bicubic_taps` (each output row holds its 4 tap weights, summed where
    clamped edge taps coincide, zeros elsewhere); padding rows of the last band are all zero.
    Cached per size pair and window: callers must not modify the returned tensors.
    """
    idx, w = bicubic_taps(in_size, out_size)
    count = out_size - start if count is None else count
    idx, w = idx[start : start + count], w[start : start + count]
    if mirror:
        idx, w = idx.flip(0), w.flip(0)
    band = max(1, min(_BAND, int(_BAND_TAPS * out_size / in_size)))
    n_bands = -(-count // band)
    pad = n_bands * band - count
    if pad:
        # Padding rows repeat the last row's indices with zero weights (discarded later).
        idx = torch.cat([idx, idx[-1:].expand(pad, 4)])
        w = torch.cat([w, torch.zeros(pad, 4)])
    idx, w = idx.view(n_bands, band, 4), w.view(n_bands, band, 4)
    first = idx.amin(dim=(1, 2))
    k = int((idx.amax(dim=(1, 2)) - first).max()) + 1
    # Same window length K for every band (one batched matmul): shift windows that would run
    # past the end back inside the image.
    first = first.clamp(max=max(in_size - k, 0))
    k = min(k, in_size)
    rel = idx - first.view(-1, 1, 1)  # in [0, K)
    dense = torch.zeros(n_bands, band, k, dtype=torch.float32)
    dense.scatter_add_(2, rel, w)
    rows = (first.view(-1, 1) + torch.arange(k)).reshape(-1)
    return rows, dense


def _resample_dim0(x: torch.Tensor, band: tuple[torch.Tensor, torch.Tensor], n: int):
    """Resample dim 0 of ``x`` (L, ...), any dtype and strides, to (n, R) float32 (R = the
    product of the other dims) with banded weights."""
    rows, dense = band
    n_bands, per_band, k = dense.shape
    g = x.index_select(0, rows).to(torch.float32).view(n_bands, k, -1)
    return torch.bmm(dense, g).view(n_bands * per_band, -1)[:n]


def _round_to_uint8(x: torch.Tensor) -> torch.Tensor:
    # Rounded and clamped: TF keeps the unclamped float here (see the module docstring).
    # Through int32: the same values as a direct cast, several times faster on CPU.
    return x.round_().clamp_(0, 255).to(torch.int32).to(torch.uint8)


def resize_bicubic(
    img: torch.Tensor,
    size: tuple[int, int],
    box: Optional[tuple[int, int, int, int]] = None,
    out_window: Optional[tuple[int, int, int, int]] = None,
    dtype: torch.dtype = torch.uint8,
    flip: bool = False,
) -> torch.Tensor:
    """TF2 ``tf.image.resize(img[box], size, BICUBIC)`` of a uint8 (..., C, H, W) image.

    ``dtype=torch.uint8`` rounds and clamps the result (contiguous); ``torch.float32`` returns
    it as TF does, unrounded and unclamped (the official train path mixes these float pixels),
    as a channels-last view, which saves a copy the next step makes anyway. ``flip`` mirrors the
    result horizontally at no cost (the width pass writes its columns in reverse).

    ``box = (top, left, height, width)`` crops the source first (a view, no copy), so only the
    crop is read; ``out_window = (top, left, height, width)`` returns only that window of the
    resized image (the eval centre crop needs only the middle of the resized image).

    Separable: the height pass, then the width pass, each a banded matmul in float32 (see
    :func:`_band_weights`); the intermediate stays float32, only the output is rounded.
    """
    if box is not None:
        top, left, h, w = box
        img = img[..., top : top + h, left : left + w]
    in_h, in_w = img.shape[-2:]
    oy, ox, oh, ow = out_window if out_window is not None else (0, 0, size[0], size[1])
    lead = img.shape[:-2]
    # Work as (H, W, rest): for torchvision's JPEG decoder output (an HWC buffer viewed as
    # CHW) this is a free view in which a source row is one contiguous run of W*C bytes.
    hwc = img.reshape(-1, in_h, in_w).permute(1, 2, 0)
    c = hwc.shape[2]
    rows = _resample_dim0(hwc.reshape(in_h, in_w * c), _band_weights(in_h, size[0], oy, oh), oh)
    # The width pass resamples rows of the transposed intermediate (W, oh, C): a strided view,
    # which the width pass's row gather reads directly (one copy instead of two).
    cols = rows.view(oh, in_w, c).transpose(0, 1)
    window = _band_weights(in_w, size[1], size[1] - ox - ow if flip else ox, ow, mirror=flip)
    out_t = _resample_dim0(cols, window, ow)  # (ow, oh*C)
    if dtype == torch.float32:
        return out_t.view(ow, oh, c).permute(2, 1, 0).view(*lead, oh, ow)  # (C, oh, ow), strided
    if dtype != torch.uint8:
        raise ValueError(f"resize_bicubic returns uint8 or float32, not {dtype}")
    out = _round_to_uint8(out_t).view(ow, oh, c).permute(2, 1, 0)  # (C, oh, ow)
    return out.contiguous().view(*lead, oh, ow)


# ----------------------------------------------------------------------------------------------
# The official random crop


def _rand(generator: Optional[torch.Generator]) -> float:
    return torch.rand((), generator=generator).item()


def _randint(n: int, generator: Optional[torch.Generator]) -> int:
    return int(torch.randint(n, (), generator=generator).item())


def _generate_crop(
    width: int, height: int, aspect: float, area_range: tuple[float, float], generator
) -> Optional[tuple[int, int, int, int]]:
    """One attempt of TF's GenerateRandomCrop: (top, left, h, w) or None when it fails.

    TF computes in float32; doubles here can only differ exactly at a rounding tie.
    """
    min_area = area_range[0] * width * height
    max_area = area_range[1] * width * height
    h = round(math.sqrt(min_area / aspect))  # lrintf: round half to even, like round()
    max_h = round(math.sqrt(max_area / aspect))
    if round(max_h * aspect) > width:
        # Largest height whose rounded width still fits.
        max_h = int((width + 0.5 - 1e-7) / aspect)
        if round(max_h * aspect) > width:
            max_h -= 1
    max_h = min(max_h, height)
    h = min(h, max_h)
    if h < max_h:
        # The crop height, not its area or side, is uniform (inclusive range).
        h += _randint(max_h - h + 1, generator)
    w = round(h * aspect)
    area = w * h
    # TF nudges the height by one when rounding pushed the area out of range.
    if area < min_area:
        h += 1
        w = round(h * aspect)
        area = w * h
    if area > max_area:
        h -= 1
        w = round(h * aspect)
        area = w * h
    if area < min_area or area > max_area or w > width or h > height or w <= 0 or h <= 0:
        return None
    # Quirk: Uniform(n) draws from [0, n), so a crop smaller than the image never touches the
    # bottom or right edge.
    top = _randint(height - h, generator) if h < height else 0
    left = _randint(width - w, generator) if w < width else 0
    return top, left, h, w


def center_crop_box(height: int, width: int, size: int, pad: int = CROP_PADDING):
    """Official ``_decode_and_center_crop``: the centred crop that ``size`` occupies in a
    ``size + pad`` square, scaled to the image's short side; (top, left, h, w)."""
    scale = min(height / (size + pad), width / (size + pad))
    # max(1, .): only a 1-pixel image would give an empty crop (the official code would fail).
    ch = cw = max(1, int(scale * size))
    return (height - ch + 1) // 2, (width - cw + 1) // 2, ch, cw


def sample_inception_crop(
    height: int,
    width: int,
    size: int,
    area_range: tuple[float, float] = AREA_RANGE,
    aspect_ratio_range: tuple[float, float] = ASPECT_RATIO_RANGE,
    min_object_covered: float = MIN_OBJECT_COVERED,
    max_attempts: int = MAX_ATTEMPTS,
    generator: Optional[torch.Generator] = None,
) -> tuple[int, int, int, int]:
    """The official train crop box (top, left, h, w) for an image of ``height`` x ``width``."""
    box = None
    for _ in range(max_attempts):
        lo, hi = aspect_ratio_range
        aspect = _rand(generator) * (hi - lo) + lo
        cand = _generate_crop(width, height, aspect, area_range, generator)
        # The only object box is the whole image, so "covered" is the crop's area fraction;
        # crops with area in [0.08, 0.1) of the image are rejected here.
        if cand is not None and cand[2] * cand[3] >= min_object_covered * height * width:
            box = cand
            break
    if box is None or (box[2] == height and box[3] == width):
        # Quirk: the official code detects failure by comparing the crop's shape to the image's,
        # so a successful full-image draw also falls back to the centre crop. (It compares the
        # JPEG's channel count too, so grayscale JPEGs never fall back there; decoding to RGB
        # first, we do not reproduce that.)
        box = center_crop_box(height, width, size)
    return box


class InceptionCrop:
    """Official train transform: TF distorted-bbox crop, random flip, TF bicubic resize.

    ``dtype=torch.float32`` (the official pipeline) keeps the resize's float pixels, unclamped,
    for mixing; the collate clips and truncates them to uint8 (nfnet.data.mixing.OfficialCollate).
    """

    def __init__(self, size: int, flip: bool = True, dtype: torch.dtype = torch.uint8):
        self.size = int(size)
        self.flip = flip
        self.dtype = dtype

    def draw(self, height: int, width: int) -> tuple[tuple[int, int, int, int], bool]:
        """The random parameters of one call on a ``height`` x ``width`` image: the crop box
        (top, left, h, w) and whether to mirror, drawn from torch's global RNG exactly as
        :meth:`__call__` draws them (the GPU input pipeline draws them in the loader workers
        from the image header alone, nfnet.data.plans)."""
        box = sample_inception_crop(height, width, self.size)
        return box, self.flip and _rand(None) < 0.5

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        box, flip = self.draw(*img.shape[-2:])
        # The official code flips the crop before resizing; with half-pixel centres and a
        # symmetric kernel, mirroring the resize's output gives the same pixels, for free.
        return resize_bicubic(img, (self.size, self.size), box=box, dtype=self.dtype, flip=flip)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, flip={self.flip}, dtype={self.dtype})"


class ResizeCropEval:
    """Official ``resize_crop_32`` eval transform: squash-resize to (S+pad)^2, centre crop S."""

    def __init__(self, size: int, pad: int = CROP_PADDING):
        self.size = int(size)
        self.pad = int(pad)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        full = self.size + self.pad
        off = (self.pad + 1) // 2  # the official offset ((S + pad - S) + 1) // 2
        # Only the kept window of the (S+pad)^2 resize is computed; its pixels are identical.
        return resize_bicubic(img, (full, full), out_window=(off, off, self.size, self.size))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, pad={self.pad})"


class BasicTrainTransform:
    """``augment=basic``: torchvision's RandomResizedCrop (bilinear, antialiased), a horizontal
    flip unless ``flip=False`` (digits, text and many medical images must not be mirrored), and
    optionally RandAugment on each image; uint8.

    Not the official recipe; a cheap, familiar baseline for fine-tuning on small folders.
    """

    def __init__(self, size: int, scale: tuple[float, float] = AREA_RANGE, flip: bool = True, randaugment=None):
        self.size = int(size)
        self.flip = flip
        self.randaugment = randaugment
        steps = [v2.RandomResizedCrop(self.size, scale=scale, antialias=True)]
        self._t = v2.Compose(steps + ([v2.RandomHorizontalFlip()] if flip else []))

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        img = self._t(img)
        return self.randaugment(img) if self.randaugment is not None else img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, flip={self.flip}, randaugment={self.randaugment is not None})"
