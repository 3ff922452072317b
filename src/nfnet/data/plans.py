"""The loader-worker half of the GPU input pipeline: read bytes, draw every random parameter.

With ``augment=official`` the CPU pipeline decodes, crops, resizes, mixes and RandAugments in
the workers (nfnet.data.mixing.OfficialCollate), about 120-290 training examples/s per worker.
Here the workers only

* read each raw image's file and its size from the header (nfnet.data.headers), and draw its
  crop box and flip (:meth:`nfnet.data.transforms.InceptionCrop.draw`);
* per batch, draw the MixUp lambdas and CutMix boxes (nfnet.data.mixing.draw_mixing) and
  compute the soft targets;
* per mixed image, draw the RandAugment ops, signs and Cutout centres
  (:meth:`nfnet.data.randaugment.RandAugment.draw`),

and the device decodes and applies them, batched (nfnet.data.device_pipeline.DeviceAugment).
Every draw is made with the same RNG calls, in the same order, as the CPU pipeline makes them:
under the same per-sample seed (SeededDataset) and per-batch seed (SeededCollate) the plans
are exactly the parameters the CPU transforms use, so resuming stays bit-exact and the two
pipelines train on the same augmentations.

A JPEG that is not a baseline grey or colour stream (progressive, CMYK, arithmetic-coded...,
see :func:`device_decodable`) or whose stream is truncated, and any other format, are decoded
here on the CPU as before and travel as RGB pixels (:data:`PIXELS`); PNG travels encoded when
``encoded_formats`` includes it (the device stage then decodes it on the host: torchvision has
no GPU PNG decoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional, Sequence

import torch

from nfnet.data.folder import ImageFolderDataset, decode_rgb
from nfnet.data.headers import ImageHeader, ends_complete, image_header
from nfnet.data.mixing import MIXUP_ALPHA, MixingDraws, OfficialCollate, draw_mixing, mixed_targets
from nfnet.data.randaugment import RandAugment, RandAugmentDraws
from nfnet.data.transforms import InceptionCrop

# What a raw image's payload holds.
JPEG, PNG, PIXELS = 0, 1, 2
_KINDS = {"jpeg": JPEG, "png": PNG}


class EncodedImage(NamedTuple):
    """One raw image as a worker ships it: ``data`` (1-D uint8) is the file's bytes (``kind``
    JPEG or PNG) or its decoded RGB pixels, (3, height, width) flattened (PIXELS); ``box`` =
    (top, left, h, w) and ``flip`` are its crop draws; ``index`` is the dataset sample that
    was read (for messages about a file that fails to decode on the device)."""

    data: torch.Tensor
    kind: int
    height: int
    width: int
    box: tuple[int, int, int, int]
    flip: bool
    index: int


def device_decodable(header: Optional[ImageHeader], encoded_formats: Sequence[str]) -> bool:
    """Whether a file with this header travels encoded: a format in ``encoded_formats``, and
    for JPEG a baseline grey or colour stream. Those are what nvjpeg decodes in its batched
    hardware path; it decodes progressive streams too, but one at a time with the Huffman
    decoding on the host, which would be the training process here: the workers decode those,
    in parallel. CMYK has its own colour conversion in torchvision's CPU decoder."""
    if header is None or header.format not in encoded_formats:
        return False
    if header.format == "jpeg":
        return header.process == "baseline" and header.bits == 8 and header.channels in (1, 3)
    return True


class EncodedImageDataset(ImageFolderDataset):
    """(path, label) samples -> (:class:`EncodedImage`, label): the bytes and the crop draws of
    the official train transform ``InceptionCrop(size, flip)``, which draws from torch's
    global RNG (run it under nfnet.data.sampling.SeededDataset, as the CPU dataset is).

    The up-front header check and the bad-file accounting are ImageFolderDataset's. A file is
    found bad here when it cannot be read, or is decoded here (another format, or a truncated
    stream) and does not decode: the files the CPU pipeline skips. The rare file with a whole
    stream that no decoder reads is found on the device instead
    (nfnet.data.device_pipeline.decode_images), and trained on as a grey image.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str],
        size: int,
        flip: bool = True,
        encoded_formats: Sequence[str] = ("jpeg",),
        max_bad_fraction: float = 0.01,
        name: str = "train",
        verify: bool = True,
        known_bad: Optional[Mapping[str, str]] = None,
    ):
        unknown = set(encoded_formats) - set(_KINDS)
        if unknown:
            raise ValueError(f"encoded_formats {sorted(unknown)}: only {sorted(_KINDS)} travel encoded")
        super().__init__(samples, classes, None, max_bad_fraction=max_bad_fraction, name=name, verify=verify,
                         known_bad=known_bad)
        self.crop = InceptionCrop(size, flip=flip)
        self.encoded_formats = tuple(encoded_formats)

    def encode(self, data: bytes, index: int) -> EncodedImage:
        """One file's bytes -> its :class:`EncodedImage`; raises as :func:`decode_rgb` does when
        a file that needs the CPU decoder is undecodable."""
        header = image_header(data)
        # A truncated file is decoded here, so that it is found bad and skipped as the CPU
        # pipeline skips it.
        if device_decodable(header, self.encoded_formats) and ends_complete(data, header.format):
            payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            kind, height, width = _KINDS[header.format], header.height, header.width
        else:
            pixels = decode_rgb(data)
            height, width = pixels.shape[-2:]
            payload, kind = pixels.contiguous().view(-1), PIXELS
        # Drawn only once the image is known good, as the CPU dataset draws after decoding.
        box, flip = self.crop.draw(height, width)
        return EncodedImage(payload, kind, height, width, box, flip, index)

    def __getitem__(self, index: int) -> tuple[EncodedImage, int]:
        n = len(self.samples)
        for step in range(n):
            position = (index + step) % n
            path, label = self.samples[position]
            if path in self._lazy_bad:
                continue
            try:
                with open(path, "rb") as f:
                    return self.encode(f.read(), position), label
            except Warning:
                raise  # a warning turned into an error by the user's filters is not a bad file
            except Exception as err:  # noqa: BLE001 - unreadable or undecodable: a bad file
                self._mark_bad(path, err)
        raise RuntimeError(f"{self.name} split: no readable image left among {n} files")


@dataclass
class EncodedBatch:
    """What a worker's :class:`PlanCollate` returns for 2B raw images (B without mixing): every
    tensor on the CPU and small except ``payload``. A dataclass, so the DataLoader's
    ``pin_memory`` leaves it as it is (the JPEG bytes are read by nvjpeg on the host, never
    copied to the device); Lightning's default transfer would move every tensor, so the
    device stage must take the batch first (``transfer_batch_to_device``; DeviceAugment).
    """

    payload: torch.Tensor  # (total,) uint8: every raw image's data, back to back
    offsets: torch.Tensor  # (n_raw + 1,) int64: raw image i is payload[offsets[i]:offsets[i + 1]]
    kinds: torch.Tensor  # (n_raw,) int64: JPEG, PNG or PIXELS
    image_sizes: torch.Tensor  # (n_raw, 2) int64: (height, width) of each raw image
    crops: torch.Tensor  # (n_raw, 4) int64: (top, left, h, w)
    flips: torch.Tensor  # (n_raw,) bool
    indices: torch.Tensor  # (n_raw,) int64: dataset samples, for messages
    mixup_lam: torch.Tensor  # (n_mix,) float32: the first image's weight
    cutmix_boxes: torch.Tensor  # (n_cut, 4) int64: (y1, y2, x1, x2), the first image inside
    targets: torch.Tensor  # (B, K) float32 soft targets; (B,) int64 labels without mixing
    ra_ops: torch.Tensor  # (B, L) int64: index into randaugment.OP_NAMES per image and layer
    ra_negate: torch.Tensor  # (B, L) bool
    ra_cutout: torch.Tensor  # (B, L, 2) int64: Cutout centre (row, column); -1 where not Cutout

    @property
    def num_raw(self) -> int:
        return self.kinds.shape[0]

    @property
    def mixed(self) -> bool:
        return self.mixup_lam.shape[0] + self.cutmix_boxes.shape[0] > 0

    def data(self, i: int) -> torch.Tensor:
        """Raw image ``i``'s payload: a view, no copy."""
        return self.payload[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def mixing_draws(self, size: int) -> MixingDraws:
        return MixingDraws(self.mixup_lam, self.cutmix_boxes, size, size)


def _ra_tensors(draws: list[RandAugmentDraws], layers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = len(draws)
    ops = torch.tensor([d.ops for d in draws], dtype=torch.int64).view(n, layers)
    negate = torch.tensor([d.negate for d in draws], dtype=torch.bool).view(n, layers)
    centres = [[c if c is not None else (-1, -1) for c in d.cutout_centres] for d in draws]
    return ops, negate, torch.tensor(centres, dtype=torch.int64).view(n, layers, 2)


class PlanCollate(OfficialCollate):
    """DataLoader ``collate_fn`` of the GPU input pipeline: the draws OfficialCollate makes, made
    the same way (MixUp/CutMix for ``size`` x ``size`` images, then RandAugment per mixed
    image in order), without touching a pixel. (:class:`EncodedImage`, label) items ->
    :class:`EncodedBatch`. Run it under nfnet.data.sampling.SeededCollate, as OfficialCollate."""

    def __init__(
        self,
        num_classes: int,
        size: int,
        randaugment: Optional[RandAugment] = None,
        mixup_alpha: float = MIXUP_ALPHA,
        mixup: bool = True,
        cutmix: bool = True,
    ):
        if randaugment is not None and not isinstance(randaugment, RandAugment):
            raise TypeError("PlanCollate draws for nfnet.data.randaugment.RandAugment only")
        super().__init__(num_classes, randaugment, mixup_alpha, mixup, cutmix)
        self.size = int(size)

    def __call__(self, batch: Sequence[tuple[EncodedImage, int]]) -> EncodedBatch:
        images = [image for image, _ in batch]
        targets = torch.tensor([int(label) for _, label in batch], dtype=torch.int64)
        s = self.size
        if self.reads_per_example == 2:
            draws = draw_mixing(len(images), s, s, self.mixup_alpha, self.mixup, self.cutmix)
            targets = mixed_targets(targets, self.num_classes, draws)
        else:
            draws = MixingDraws(torch.zeros(0), torch.zeros(0, 4, dtype=torch.int64), s, s)
        ra, b = self.randaugment, targets.shape[0]
        # One draw per mixed image, in output order, after the mixing draws: OfficialCollate's order.
        plans = [ra.draw(s, s) for _ in range(b)] if ra is not None else [RandAugmentDraws([], [], [])] * b
        ra_ops, ra_negate, ra_cutout = _ra_tensors(plans, ra.num_layers if ra is not None else 0)
        lengths = torch.tensor([0] + [image.data.numel() for image in images], dtype=torch.int64)
        return EncodedBatch(
            payload=torch.cat([image.data for image in images]),
            offsets=lengths.cumsum(0),
            kinds=torch.tensor([image.kind for image in images], dtype=torch.int64),
            image_sizes=torch.tensor([(image.height, image.width) for image in images], dtype=torch.int64),
            crops=torch.tensor([image.box for image in images], dtype=torch.int64),
            flips=torch.tensor([image.flip for image in images], dtype=torch.bool),
            indices=torch.tensor([image.index for image in images], dtype=torch.int64),
            mixup_lam=draws.mixup_lam,
            cutmix_boxes=draws.boxes,
            targets=targets,
            ra_ops=ra_ops,
            ra_negate=ra_negate,
            ra_cutout=ra_cutout,
        )

    def __repr__(self) -> str:
        return super().__repr__().replace("(", f"(size={self.size}, ", 1)
