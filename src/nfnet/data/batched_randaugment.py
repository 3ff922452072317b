"""The official RandAugment applied to a whole batch on any device, each image with its own
ops, signs and Cutout centres (drawn in the loader workers, nfnet.data.plans).

For each layer the images are grouped by (op, sign) on the host, from the CPU plan tensors, so
no device value is ever read back; each group is gathered (``index_select``), transformed by
the op's batched form and scattered back (``index_copy_``). Ops that are the identity at this
magnitude (Color, Contrast, Brightness, Sharpness at M = 5, factor 1.0) are skipped. No op
reads a device value back or copies a tensor from the host (either would make the host wait
for the device), so the host keeps queuing work while the device runs.

Exactness against the per-image ops of nfnet.data.randaugment (tests/test_batched_randaugment.py):

* bit-exact on every device: Invert, Posterize, Solarize, SolarizeAdd (integer arithmetic),
  Equalize (integer histograms: torchvision's batched equalize, which the per-image op
  equals), Rotate, ShearX, ShearY (the same cached index maps, gathered), TranslateX/Y
  (slicing), Cutout (a mask of the same box), AutoContrast, Contrast, Brightness (the same
  float32 operations, one kernel each, nothing fused);
* Color and Sharpness: bit-exact on the CPU; on CUDA most likely bit-exact too, but not
  guaranteed: they use torchvision's ``add_(..., alpha=...)``, a multiply-add that a CUDA
  kernel may fuse into one FMA where the CPU kernel rounds twice (or the other way round).
  Sharpness's final blend then differs by at most one level; Color also floors a grey value
  made that way, and where that grey lands on the other side of an integer (a value within
  float32 rounding of one) the blend moves it by ``|1 - factor|``: at most one level for
  M <= 10, two at M = 15 (factor 2.8).

Sharpness is written out here, not taken from torchvision: torchvision blurs with a float32
convolution, which cuDNN runs in TF32 by default (``torch.backends.cudnn.allow_tf32``), and
TF32's 10-bit weights move the blurred value by up to ~0.1 level, enough to change its rounding.
The blurred value is ``round(n / 13)`` for an integer ``n`` (the 3x3 kernel's weights are 1/13
and 5/13), never within 1/26 of a rounding tie, so computing ``n`` exactly gives torchvision's
CPU result whatever its float32 summation order.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torchvision.transforms.v2 import functional as F

from nfnet.data import randaugment as ra_mod
from nfnet.data.randaugment import OP_NAMES, RandAugment

_SIGNED = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
_ENHANCE = ("Color", "Contrast", "Brightness", "Sharpness")


@functools.lru_cache(maxsize=64)
def _warp_index_on(device: torch.device, channels: int, height: int, width: int, kind: str, arg: float):
    # Made once per device from the CPU op's own map, so each batch pays no host-device copy.
    return ra_mod._warp_index(channels, height, width, kind, arg).to(device, torch.int64)


def warp_batch(images: torch.Tensor, kind: str, arg: float) -> torch.Tensor:
    """Rotate ("rotate") or shear ("shear_x", "shear_y") every image of a uint8 batch
    (N, C, H, W) by ``arg``, as nfnet.data.randaugment.rotate/shear do (fill 128)."""
    n, c, h, w = images.shape
    index = _warp_index_on(images.device, c, h, w, kind, float(arg))
    # Index c*h*w is the fill column.
    source = torch.cat([images.reshape(n, c * h * w), images.new_full((n, 1), ra_mod.FILL)], dim=1)
    return source.gather(1, index.view(1, -1).expand(n, -1)).view_as(images)


def cutout_batch(images: torch.Tensor, pad: int, centres: torch.Tensor) -> torch.Tensor:
    """A (2*pad)^2 square of 128 on each image of (N, C, H, W), centred on its row of
    ``centres`` (N, 2) = (row, column) and clipped at the borders (nfnet.data.randaugment.cutout)."""
    h, w = images.shape[-2:]
    rows = torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    cy, cx = centres[:, 0:1], centres[:, 1:2]
    in_y = (rows >= cy - pad) & (rows < cy + pad)  # (N, H)
    in_x = (cols >= cx - pad) & (cols < cx + pad)  # (N, W)
    return images.masked_fill((in_y[:, :, None] & in_x[:, None, :])[:, None], ra_mod.FILL)


def sharpness_batch(images: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision's ``adjust_sharpness`` of a uint8 batch, with the blur computed exactly (see
    the module docstring): border pixels kept, the interior blended towards the rounded blur."""
    h, w = images.shape[-2:]
    if factor == 1.0 or h <= 2 or w <= 2:
        return images
    pixels = images.to(torch.float32)
    # Integer sums below 13 * 255: exact in float32, whatever the order.
    taps = [pixels[..., dy : dy + h - 2, dx : dx + w - 2] for dy in range(3) for dx in range(3)]
    weighted = torch.stack(taps).sum(0) + 4 * pixels[..., 1:-1, 1:-1]
    blurred = (weighted / 13).round_()
    interior = pixels[..., 1:-1, 1:-1]
    interior.add_(blurred.sub_(interior), alpha=1.0 - factor)
    return pixels.clamp_(0, 255).to(torch.uint8)


def _unsigned(op: Callable[[torch.Tensor, RandAugment], torch.Tensor]):
    return lambda x, ra, sign: op(x, ra)


# name -> (batch, RandAugment, sign) -> batch, for every op but Cutout (which takes centres).
# The per-image ops that already run on any device and any batch are used as they are.
_BATCHED: dict[str, Callable[[torch.Tensor, RandAugment, float], torch.Tensor]] = {
    **{name: ra_mod._OPS[name] for name in (
        "AutoContrast", "Equalize", "Invert", "Posterize", "Color", "Contrast", "Brightness",
        "TranslateX", "TranslateY",
    )},
    "Rotate": lambda x, ra, s: warp_batch(x, "rotate", s * ra_mod.rotate_degrees(ra.magnitude)),
    "ShearX": lambda x, ra, s: warp_batch(x, "shear_x", s * ra_mod.shear_level(ra.magnitude)),
    "ShearY": lambda x, ra, s: warp_batch(x, "shear_y", s * ra_mod.shear_level(ra.magnitude)),
    # The official threshold is compared with uint8 pixels, so it wraps modulo 256.
    "Solarize": _unsigned(lambda x, ra: F.solarize(x, ra_mod.solarize_threshold(ra.magnitude) % 256)),
    "SolarizeAdd": _unsigned(
        lambda x, ra: ra_mod._solarize_add_values(x, ra_mod.solarize_add_amount(ra.magnitude), 128)
    ),
    "Sharpness": _unsigned(lambda x, ra: sharpness_batch(x, ra_mod.enhance_factor(ra.magnitude))),
}  # fmt: skip


def randaugment_batch(
    images: torch.Tensor,
    ops: torch.Tensor,
    negate: torch.Tensor,
    cutout_centres: torch.Tensor,
    ra: RandAugment,
) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device -> RandAugmented copy: image ``i``'s layer ``l`` applies
    ``OP_NAMES[ops[i, l]]`` at ``ra.magnitude``, its argument negated where ``negate[i, l]``,
    Cutout centred on ``cutout_centres[i, l]``. The plan tensors (B, L), (B, L), (B, L, 2) are
    the CPU ones of nfnet.data.plans.EncodedBatch: the grouping is computed from them on the
    host. Same pixels as ``ra.apply_op`` layer by layer on each image (see the module doc)."""
    images = images.clone()
    layers = ops.shape[1]
    if layers == 0:
        return images
    device = images.device
    signed = torch.tensor([name in _SIGNED for name in OP_NAMES])
    keys = ops * 2 + (negate & signed[ops]).long()  # (op, sign) of each image and layer
    order = torch.argsort(keys, dim=0, stable=True)  # per layer: images grouped by key
    sorted_keys = keys.gather(0, order)
    order_on_device = order.t().contiguous().to(device, non_blocking=True)
    centres_on_device = cutout_centres.to(device, non_blocking=True)
    skipped = _ENHANCE if ra_mod.enhance_factor(ra.magnitude) == 1.0 else ()
    pad = ra_mod.cutout_pad(ra.magnitude, ra.cutout_const)
    for layer in range(layers):
        values, counts = torch.unique_consecutive(sorted_keys[:, layer], return_counts=True)
        start = 0
        for key, count in zip(values.tolist(), counts.tolist()):
            chosen = order_on_device[layer, start : start + count]
            start += count
            name = OP_NAMES[key // 2]
            if name in skipped:
                continue
            group = images.index_select(0, chosen)
            if name == "Cutout":
                out = cutout_batch(group, pad, centres_on_device[:, layer].index_select(0, chosen))
            else:
                out = _BATCHED[name](group, ra, -1.0 if key % 2 else 1.0)
            images.index_copy_(0, chosen, out)
    return images
