"""The device half of the GPU input pipeline: decode, crop + resize, mix, truncate, RandAugment,
batched, applying the draws the loader workers made (nfnet.data.plans).

:class:`DeviceAugment` turns a worker's :class:`~nfnet.data.plans.EncodedBatch` into what the
CPU pipeline's OfficialCollate returns: uint8 images (B, 3, S, S) and the targets, on the
device. Stage by stage, against the CPU pipeline (OfficialCollate over
``InceptionCrop(dtype=torch.float32)``) on the same seeds:

* decode: on CUDA, JPEGs go through nvjpeg, batched (``torchvision.io.decode_jpeg`` with a
  list); its IDCT and chroma upsampling are not libjpeg's, so its pixels differ from the CPU
  pipeline's (by how much, ``benchmarks/data.py --device cuda`` prints; not yet measured).
  Everything else, and every image on a CPU device, is decoded by the loader's own decoder:
  the same pixels.
* crop + TF bicubic resize, float: :func:`crop_resize`, the same float32 values as
  ``resize_bicubic`` (see there);
* MixUp/CutMix in float32, clip and truncate: the same operations as the loader's
  ``mix_to_uint8``, bit for bit on any device;
* RandAugment: nfnet.data.batched_randaugment, bit-exact on the CPU and, on CUDA, for every
  op but Color and Sharpness (bounds there).

The soft targets are the workers' own (computed exactly as OfficialCollate computes them).
"""

from __future__ import annotations

import re
import warnings
from typing import Optional, Sequence

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from nfnet.data.batched_randaugment import randaugment_batch
from nfnet.data.folder import decode_rgb
from nfnet.data.mixing import apply_mixing, truncate_to_uint8
from nfnet.data.plans import JPEG, PIXELS, EncodedBatch
from nfnet.data.randaugment import FILL, RandAugment
from nfnet.data.transforms import bicubic_taps

# ----------------------------------------------------------------------------------------------
# Decoding


def _decode_jpegs_cuda(data: list[torch.Tensor], device: torch.device) -> list[Optional[torch.Tensor]]:
    """nvjpeg, batched; a batch with an image nvjpeg rejects is retried image by image, and an
    image it still rejects comes back as None (for the host decoder)."""
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    decoded: list[Optional[torch.Tensor]] = []
    for one in data:
        try:
            decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            decoded.append(None)
    return decoded


def _decode_on_host(data: torch.Tensor, height: int, width: int, index: int) -> torch.Tensor:
    try:
        return decode_rgb(data)
    except Warning:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure means a corrupt file
        # The CPU pipeline finds such a file in the worker and reads the next one instead; here
        # its plan is already drawn for its size: train on a grey image rather than stop.
        # torchvision prefixes its messages with "function, /path/file.cpp:line, ".
        reason = re.sub(r"^[\w()]+, \S+:\d+, ", "", str(err).splitlines()[-1] if str(err) else type(err).__name__)
        warnings.warn(f"dataset sample {index} does not decode ({reason}); using a grey image in its place")
        return torch.full((3, height, width), FILL, dtype=torch.uint8)


def decode_images(batch: EncodedBatch, device: torch.device | str) -> list[torch.Tensor]:
    """Every raw image of ``batch`` as uint8 (3, h, w) on ``device``, in batch order. The
    payload stays on the host: nvjpeg reads the encoded bytes from host memory."""
    device = torch.device(device)
    kinds = batch.kinds.tolist()
    sizes = batch.image_sizes.tolist()
    images: list[Optional[torch.Tensor]] = [None] * len(kinds)
    on_gpu = [i for i, kind in enumerate(kinds) if kind == JPEG and device.type == "cuda"]
    if on_gpu:
        for i, image in zip(on_gpu, _decode_jpegs_cuda([batch.data(i) for i in on_gpu], device)):
            images[i] = image
    for i, (kind, (h, w)) in enumerate(zip(kinds, sizes)):
        if images[i] is None:
            data = batch.data(i)
            host = data.view(3, h, w) if kind == PIXELS else _decode_on_host(data, h, w, int(batch.indices[i]))
            images[i] = host.to(device, non_blocking=True)
        if tuple(images[i].shape) != (3, h, w):
            raise ValueError(
                f"dataset sample {int(batch.indices[i])} decoded to {tuple(images[i].shape)}, but its "
                f"header says (3, {h}, {w}), the size its crop was drawn for"
            )
    return images


# ----------------------------------------------------------------------------------------------
# Crop + resize


class BicubicTapTable:
    """TF's bicubic taps (``transforms.bicubic_taps``) for every input size up to a bound, held
    on one device, so that a batch looks its images' taps up in one gather. Grows by doubling."""

    def __init__(self, out_size: int):
        self.out_size = int(out_size)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def lookup(self, in_sizes: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``in_sizes`` (N,) CPU int64 -> source indices (N, out, 4) int64 and weights (N, out, 4)
        float64 (the float32 weights, exactly) on ``device``."""
        needed = int(in_sizes.max())
        table = self._tables.get(device)
        if table is None or table[0].shape[0] <= needed:
            bound = max(needed, 2 * (table[0].shape[0] - 1) if table is not None else 512)
            # Uncached: a table covers thousands of sizes, more than bicubic_taps keeps.
            taps = [bicubic_taps.__wrapped__(n, self.out_size) for n in range(1, bound + 1)]
            index = torch.stack([torch.zeros(self.out_size, 4, dtype=torch.int64)] + [t[0] for t in taps])
            weight = torch.stack([torch.zeros(self.out_size, 4)] + [t[1] for t in taps]).double()
            table = self._tables[device] = (index.to(device), weight.to(device))
        rows = in_sizes.to(device, non_blocking=True)
        return table[0].index_select(0, rows), table[1].index_select(0, rows)


def _fma32(x: torch.Tensor, weight: torch.Tensor, acc: Optional[torch.Tensor]) -> torch.Tensor:
    """float32 ``fma(weight, x, acc)``: the product of two float32 (or a byte and a float32) is
    exact in float64, so one float64 add and one rounding to float32 is a fused multiply-add
    (up to a double rounding, about once in 2^29 operations)."""
    if acc is None:
        return (x.to(torch.float64) * weight).to(torch.float32)
    return torch.addcmul(acc.to(torch.float64), x.to(torch.float64), weight).to(torch.float32)


def _resize_group(crops: torch.Tensor, flip: torch.Tensor, row_taps, column_taps) -> torch.Tensor:
    """uint8 crops (N, C, H, W), top-left aligned in a padded buffer, -> float32 (N, C, S, S).

    Each output is its 4 taps' fused multiply-adds in ascending source order, height pass then
    width pass, as sgemm accumulates the loader's banded matrices (zeros add nothing)."""
    n, c, h, w = crops.shape
    iy, wy = row_taps
    ix, wx = column_taps
    s = iy.shape[1]
    mirror = flip.view(n, 1, 1)
    ix, wx = torch.where(mirror, ix.flip(1), ix), torch.where(mirror, wx.flip(1), wx)
    source_rows = crops.view(n * c * h, w)
    first_row = (torch.arange(n * c, device=crops.device) * h).view(n, c, 1)
    acc = None
    for k in range(4):
        picked = source_rows.index_select(0, (first_row + iy[:, None, :, k]).view(-1)).view(n, c, s, w)
        acc = _fma32(picked, wy[:, None, :, k, None], acc)
    out = None
    for k in range(4):
        picked = acc.gather(3, ix[:, None, None, :, k].expand(n, c, s, s))
        out = _fma32(picked, wx[:, None, None, :, k], out)
    return out


def _groups(widths: list[int], columns: int) -> list[tuple[int, int]]:
    """Consecutive ranges of ascending ``widths`` whose count times their largest width stays
    within ``columns`` (a single image may exceed it)."""
    groups, start = [], 0
    for end in range(1, len(widths) + 1):
        if end - start > 1 and (end - start) * widths[end - 1] > columns:
            groups.append((start, end - 1))
            start = end - 1
    return groups + [(start, len(widths))]


def crop_resize(
    images: Sequence[torch.Tensor],
    crops: torch.Tensor,
    flips: torch.Tensor,
    taps: BicubicTapTable,
    columns: Optional[int] = None,
) -> torch.Tensor:
    """uint8 images (C, h_i, w_i) on one device -> float32 (N, C, S, S) (S = ``taps.out_size``):
    ``resize_bicubic(img, (S, S), box=crops[i], dtype=torch.float32, flip=flips[i])`` for each.

    Bit-exact with ``resize_bicubic`` where sgemm accumulates each output's taps in order with
    fused multiply-adds (MKL on x86-64 does, except for crops of at most 4 pixels on a side,
    which its small-matrix kernel sums in another order; tests/test_device_pipeline.py checks
    both), else within float32 rounding.

    Images go in groups by crop width, each group's crops copied into one buffer padded to its
    widest; a group holds at most ``columns`` padded crop columns, which bounds the height
    pass's float64 temporaries to ``C * S * columns * 8`` bytes and keeps one huge photo from
    padding a whole batch. The default is 65536 on CUDA (about 200 ImageNet-sized crops, 300 MB
    at S = 192: few launches, and the caching allocator makes big temporaries cheap) and 1024
    elsewhere (on the CPU, temporaries small enough for malloc to reuse run 10x faster than
    freshly mapped ones)."""
    device = images[0].device
    if columns is None:
        columns = 65536 if device.type == "cuda" else 1024
    channels, s = images[0].shape[0], taps.out_size
    out = torch.empty(len(images), channels, s, s, dtype=torch.float32, device=device)
    order = torch.argsort(crops[:, 3], stable=True)
    for start, end in _groups(crops[order, 3].tolist(), columns):
        members = order[start:end]
        boxes = crops[members]
        buffer = torch.empty(
            end - start, channels, int(boxes[:, 2].max()), int(boxes[:, 3].max()), dtype=torch.uint8, device=device
        )
        for slot, (i, (top, left, h, w)) in enumerate(zip(members.tolist(), boxes.tolist())):
            buffer[slot, :, :h, :w].copy_(images[i][:, top : top + h, left : left + w])
        flip = flips[members].to(device, non_blocking=True)
        resized = _resize_group(buffer, flip, taps.lookup(boxes[:, 2], device), taps.lookup(boxes[:, 3], device))
        out.index_copy_(0, members.to(device, non_blocking=True), resized)
    return out


# ----------------------------------------------------------------------------------------------
# The whole device stage


class DeviceAugment:
    """The device stage of ``augment=official`` with GPU decoding: an
    :class:`~nfnet.data.plans.EncodedBatch` (CPU, as the loader returns it) -> uint8 images
    (B, 3, size, size) and the targets (soft (B, K) float32, or (B,) int64 labels without
    mixing) on ``device``, ready for normalisation. ``size`` and ``randaugment`` must be those
    the workers' :class:`~nfnet.data.plans.PlanCollate` drew for."""

    def __init__(self, size: int, randaugment: Optional[RandAugment] = None, columns: Optional[int] = None):
        self.size = int(size)
        self.randaugment = randaugment
        self.columns = columns  # see crop_resize
        self.taps = BicubicTapTable(self.size)

    def __call__(self, batch: EncodedBatch, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        layers = self.randaugment.num_layers if self.randaugment is not None else 0
        if batch.ra_ops.shape[1] != layers:
            raise ValueError(
                f"the batch was drawn for {batch.ra_ops.shape[1]} RandAugment layers, this stage applies "
                f"{layers}: build PlanCollate and DeviceAugment from the same RandAugment settings"
            )
        resized = crop_resize(decode_images(batch, device), batch.crops, batch.flips, self.taps, self.columns)
        mixed = apply_mixing(resized, batch.mixing_draws(self.size)) if batch.mixed else resized
        images = truncate_to_uint8(mixed)
        if self.randaugment is not None:
            images = randaugment_batch(images, batch.ra_ops, batch.ra_negate, batch.ra_cutout, self.randaugment)
        return images, batch.targets.to(device, non_blocking=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, randaugment={self.randaugment!r})"
