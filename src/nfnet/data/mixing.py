"""The official MixUp/CutMix pairing (NFNET_SPEC §4.3; ``dataset.py`` ``my_mixup_cutmix``).

The loader draws 2B raw images for B training examples. With ``bs = B/2``:

* outputs ``[0:bs]``  = MixUp of raw ``[0:bs]`` with raw ``[bs:2bs]``, lambda ~ Beta(a, a) per
  example (a = 0.2; not symmetrised: lambda is the weight of the first image);
* outputs ``[bs:B]`` = CutMix of raw ``[2bs:3bs]`` with raw ``[3bs:4bs]``: per example a box
  centred on a uniform pixel, side ``sqrt(1-U)`` of the image's (U ~ U(0,1), sides truncated
  to even lengths), clipped at the borders; the *first* image fills the box and lambda is the
  box's area fraction (so lambda is the kept area of the first image).

Targets are ``lambda * onehot(y_a) + (1 - lambda) * onehot(y_b)``. Every output mixes two
different raw images. With only one of MixUp/CutMix on, all B outputs use it (raw ``[0:B]``
with ``[B:2B]``), as the official ``my_mixup``/``my_cutmix`` do.

Odd B (the official code would silently drop an example): ``ceil(B/2)`` MixUp and
``floor(B/2)`` CutMix outputs, keeping the same raw-image layout.

Everything is mask-based and shape-static (no data-dependent slicing), so it runs unchanged on
CPU float batches in a collate function and on accelerator tensors, XLA included. Random draws are made on the CPU (torch's global RNG or ``generator``) and moved to the
images' device, so results do not depend on the device and DataLoader worker seeding makes
them reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

MIXUP_ALPHA = 0.2  # official default; the NFNet augment strings never override it


def sample_mixup_lambda(n: int, alpha: float = MIXUP_ALPHA) -> torch.Tensor:
    """n draws of Beta(alpha, alpha) (float32, CPU, torch's global RNG)."""
    # torch's Beta sampler has no generator argument; it uses the global RNG, which
    # seed_everything(workers=True) seeds per DataLoader worker.
    a = torch.full((n,), float(alpha), dtype=torch.float32)
    return torch.distributions.Beta(a, a).sample()


def cutmix_boxes(
    cy: torch.Tensor, cx: torch.Tensor, side: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Boxes (y1, y2, x1, x2), int64 (n, 4), of the official ``cutmix_padding`` for centres
    ``(cy, cx)`` and side ratios ``side`` (box side / image side before clipping)."""
    # TF casts float -> int32 by truncation; the box then spans centre -+ (length // 2), so its
    # sides are even, and it is clipped at the image borders.
    rh = (side * height).long() // 2
    rw = (side * width).long() // 2
    y1, y2 = (cy - rh).clamp(0, height), (cy + rh).clamp(0, height)
    x1, x2 = (cx - rw).clamp(0, width), (cx + rw).clamp(0, width)
    return torch.stack([y1, y2, x1, x2], dim=1)


def sample_cutmix_params(
    n: int, height: int, width: int, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centres (cy, cx) uniform over the pixels and side ratios ``sqrt(1 - U)``, U ~ U(0, 1), so
    the unclipped box covers a U(0, 1) fraction of the image (Beta(1, 1), as the paper's
    Beta(alpha, alpha) with alpha = 1)."""
    cy = torch.randint(height, (n,), generator=generator)
    cx = torch.randint(width, (n,), generator=generator)
    side = torch.sqrt(1.0 - torch.rand(n, generator=generator))
    return cy, cx, side


def sample_cutmix_boxes(
    n: int, height: int, width: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """n random CutMix boxes: :func:`cutmix_boxes` of :func:`sample_cutmix_params`."""
    return cutmix_boxes(*sample_cutmix_params(n, height, width, generator), height, width)


def cutmix_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boolean (n, 1, H, W) masks, True inside each box (built by comparisons, static shape)."""
    rows = torch.arange(height, device=boxes.device)
    cols = torch.arange(width, device=boxes.device)
    in_y = (rows >= boxes[:, 0:1]) & (rows < boxes[:, 1:2])  # (n, H)
    in_x = (cols >= boxes[:, 2:3]) & (cols < boxes[:, 3:4])  # (n, W)
    return (in_y[:, :, None] & in_x[:, None, :])[:, None]


def _blend(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """The official ``ratio * a + (1 - ratio) * b`` in float32, per example."""
    lam = lam.view(-1, 1, 1, 1)
    if a.is_floating_point():
        return lam.to(a.dtype) * a + (1 - lam).to(a.dtype) * b
    # Integer images (uint8 batches on an accelerator): blended in float32, then clipped and
    # truncated as the official pipeline casts before RandAugment.
    out = a.to(torch.float32) * lam + b.to(torch.float32) * (1 - lam)
    return truncate_to_uint8(out).to(a.dtype)


def truncate_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float pixels -> uint8 as the official pipeline casts after mixing: clipped to [0, 255],
    then truncated (not rounded). Through int32: the same values as a direct cast, and several
    times faster on CPU."""
    return images.clamp(0, 255).to(torch.int32).to(torch.uint8)


@dataclass
class MixingDraws:
    """One batch's random draws: ``n_mix`` MixUp lambdas and ``n_cut`` CutMix boxes, for
    ``2 * (n_mix + n_cut)`` raw images of ``height`` x ``width`` in the layout of the module doc
    (outputs ``[0, n_mix)`` MixUp raw ``i`` with ``n_mix + i``, then CutMix raw
    ``2 n_mix + j`` with ``2 n_mix + n_cut + j``). CPU tensors; applying them is deterministic.
    """

    mixup_lam: torch.Tensor  # (n_mix,) float32: the first image's weight
    boxes: torch.Tensor  # (n_cut, 4) int64: (y1, y2, x1, x2), the first image inside
    height: int
    width: int

    @property
    def n_mix(self) -> int:
        return self.mixup_lam.shape[0]

    @property
    def n_cut(self) -> int:
        return self.boxes.shape[0]

    def lam(self) -> torch.Tensor:
        """(B,) float32: the first image's share of each output (for CutMix its kept area,
        exactly the mask's mean, the official ``ratio``)."""
        area = (self.boxes[:, 1] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 2])
        return torch.cat([self.mixup_lam, area.to(torch.float32) / (self.height * self.width)])

    def pairs(self) -> tuple[list[int], list[int]]:
        """The raw indices (first, second) mixed into each output."""
        m, c = self.n_mix, self.n_cut
        first = list(range(m)) + list(range(2 * m, 2 * m + c))
        second = list(range(m, 2 * m)) + list(range(2 * m + c, 2 * m + 2 * c))
        return first, second


def draw_mixing(
    n_raw: int,
    height: int,
    width: int,
    mixup_alpha: float = MIXUP_ALPHA,
    mixup: bool = True,
    cutmix: bool = True,
    generator: Optional[torch.Generator] = None,
) -> MixingDraws:
    """The draws for ``n_raw`` raw images (2 per output): MixUp lambdas first (torch's global
    RNG), then the CutMix boxes (``generator``, or the global RNG)."""
    if not (mixup or cutmix):
        raise ValueError("mixing needs mixup or cutmix enabled; with both off, do not mix")
    if n_raw % 2 or n_raw == 0:
        raise ValueError(
            f"mixing needs an even, non-zero number of raw images (2 per example); got {n_raw}"
        )
    b = n_raw // 2
    n_mix = (b + 1) // 2 if (mixup and cutmix) else (b if mixup else 0)
    lam = sample_mixup_lambda(n_mix, mixup_alpha) if n_mix else torch.zeros(0)
    boxes = sample_cutmix_boxes(b - n_mix, height, width, generator) if b - n_mix else torch.zeros(0, 4, dtype=torch.int64)
    return MixingDraws(lam, boxes, height, width)


def mixed_targets(labels: torch.Tensor, num_classes: int, draws: MixingDraws) -> torch.Tensor:
    """``lambda * onehot(y_a) + (1 - lambda) * onehot(y_b)``, float32 (B, K), on the labels' device."""
    onehot = torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.float32)
    first, second = draws.pairs()
    device = labels.device
    lam = draws.lam().to(device, non_blocking=True).view(-1, 1)
    index = torch.tensor(first, device=device), torch.tensor(second, device=device)
    return lam * onehot[index[0]] + (1 - lam) * onehot[index[1]]


def mixup_cutmix(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    mixup_alpha: float = MIXUP_ALPHA,
    mixup: bool = True,
    cutmix: bool = True,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """2B raw images (2B, C, H, W) + int labels (2B,) -> B mixed images + float32 targets (B, K).

    Output dtype equals input dtype. The official pipeline mixes float pixels (the unclamped
    bicubic resize) and only then clips and truncates to uint8 (:func:`truncate_to_uint8`);
    integer input is blended in float32 and truncated the same way. ``generator`` drives the
    CutMix boxes; MixUp's Beta draws always use the global RNG (see :func:`sample_mixup_lambda`).
    Batched and shape-static, for any device; :func:`mix_to_uint8` is the CPU loader's form.
    """
    n = images.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f"mixup_cutmix needs one label per raw image; got {n} images and {labels.shape[0]} labels")
    h, w = images.shape[-2:]
    draws = draw_mixing(n, h, w, mixup_alpha, mixup, cutmix, generator)
    return apply_mixing(images, draws), mixed_targets(labels.to(images.device), num_classes, draws)


def apply_mixing(images: torch.Tensor, draws: MixingDraws) -> torch.Tensor:
    """2B raw images (2B, C, H, W) on any device -> the B mixed images of ``draws`` (same
    dtype; integer images are blended in float32 and truncated as :func:`mixup_cutmix` says).
    Deterministic: the GPU input pipeline applies the draws its loader workers made."""
    h, w = images.shape[-2:]
    dev = images.device
    m, c = draws.n_mix, draws.n_cut
    outs = []
    if m:
        outs.append(_blend(images[:m], images[m : 2 * m], draws.mixup_lam.to(dev, non_blocking=True)))
    if c:
        mask = cutmix_masks(draws.boxes.to(dev, non_blocking=True), h, w)
        outs.append(torch.where(mask, images[2 * m : 2 * m + c], images[2 * m + c : 2 * m + 2 * c]))
    return torch.cat(outs)


def mix_to_uint8(images: Sequence[torch.Tensor], draws: MixingDraws) -> torch.Tensor:
    """The loader's MixUp/CutMix on CPU: float images (C, H, W), consumed in place, -> the uint8
    batch (B, C, H, W) that ``truncate_to_uint8(mixup_cutmix(...))`` gives for these draws, bit
    for bit (the same float32 operations), without stacking the float images: each output is
    blended or box-copied in its first or second image and truncated straight into the batch."""
    m, c = draws.n_mix, draws.n_cut
    out = torch.empty((m + c, *images[0].shape), dtype=torch.uint8)
    for i in range(m):
        lam = draws.mixup_lam[i]
        first = images[i].mul_(lam).add_(images[m + i].mul_(1 - lam))
        out[i].copy_(first.clamp_(0, 255).to(torch.int32))
    for j, (y1, y2, x1, x2) in enumerate(draws.boxes.tolist()):
        second = images[2 * m + c + j]
        second[..., y1:y2, x1:x2] = images[2 * m + j][..., y1:y2, x1:x2]
        out[m + j].copy_(second.clamp_(0, 255).to(torch.int32))
    return out


class OfficialCollate:
    """DataLoader ``collate_fn`` of the official train pipeline after the crop (NFNET_SPEC §4.3):
    float images (the unclamped bicubic resize) -> MixUp/CutMix in float (when either is on:
    2B samples -> B examples and float32 soft targets (B, K)) -> clip to [0, 255] and truncate
    to uint8 -> RandAugment each image (when a level is set). Returns uint8 images (B, 3, H, W)
    and the soft targets, or the integer labels when nothing is mixed. The loader's batch must
    be 2B when mixing, B otherwise (:attr:`reads_per_example`).

    Order as the official ``augment_before_mix=False``: mix the batch, then RandAugment each
    mixed uint8 image. The float images of ``batch`` are consumed (mixed in place).
    """

    def __init__(
        self,
        num_classes: int,
        randaugment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        mixup_alpha: float = MIXUP_ALPHA,
        mixup: bool = True,
        cutmix: bool = True,
    ):
        self.num_classes = int(num_classes)
        self.randaugment = randaugment
        self.mixup_alpha = float(mixup_alpha)
        self.mixup = mixup
        self.cutmix = cutmix

    @property
    def reads_per_example(self) -> int:
        """Raw images per training example: 2 when pairs are mixed."""
        return 2 if (self.mixup or self.cutmix) else 1

    def __call__(
        self, batch: Sequence[tuple[torch.Tensor, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = [img for img, _ in batch]
        targets = torch.tensor([int(label) for _, label in batch], dtype=torch.int64)
        if self.reads_per_example == 2:
            h, w = images[0].shape[-2:]
            draws = draw_mixing(len(images), h, w, self.mixup_alpha, self.mixup, self.cutmix)
            images, targets = mix_to_uint8(images, draws), mixed_targets(targets, self.num_classes, draws)
        else:
            images = truncate_to_uint8(torch.stack(images))
        if self.randaugment is not None:
            images = torch.stack([self.randaugment(img) for img in images])
        return images, targets

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, mixup={self.mixup}, "
            f"cutmix={self.cutmix}, mixup_alpha={self.mixup_alpha}, "
            f"randaugment={self.randaugment!r})"
        )
