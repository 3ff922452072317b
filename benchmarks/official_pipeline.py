"""How far this project's input pipeline and precision are from the official TensorFlow ones, in
numbers: the size of every deviation docs/DATA.md lists.

    python benchmarks/official_pipeline.py [--images 64] [--size 224]

1. Mixing order: the official pipeline mixes the float (unclamped) bicubic resize and truncates
   to uint8 afterwards. Against a float64 reference of that order (an independent dense resize
   from TF's taps, float64 mixing, clip, truncate), the mean and mean-absolute difference in
   grey levels of this project's order (float resize, float32 mixing, truncation) and of the
   earlier order (resize rounded to uint8, then mixed), per half of the batch (MixUp, CutMix).
2. JPEG decoding: TF's `decode_jpeg` uses libjpeg's fast integer DCT (JDCT_IFAST), torchvision
   the accurate one (JDCT_ISLOW). Measured with `simplejpeg`'s `fastdct` switch (a separate
   `pip install simplejpeg`, not a project dependency; skipped without it).
3. Shear and Rotate (nearest neighbour): the fraction of pixels whose source pixel differs
   between this project's warps (torchvision's affine grid) and TF's ImageProjectiveTransform
   (float32 coordinates, std::round), emulated here from the official transform matrices.
4. bf16: the official run casts the whole network (weights, weight standardization, images) to
   bf16; this project's GPU/CPU path uses autocast. Both against float32 on one F0 batch.

A measurement script, never a test. Writes benchmarks/results/official_pipeline.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from nfnet.data.mixing import mixup_cutmix, truncate_to_uint8  # noqa: E402
from nfnet.data.randaugment import _warp_index, rotate_degrees, shear_level  # noqa: E402
from nfnet.data.transforms import bicubic_taps, resize_bicubic, sample_inception_crop  # noqa: E402

OUT = common.RESULTS / "official_pipeline.md"


def photo_like(n: int, height: int = 375, width: int = 500, seed: int = 0) -> list[torch.Tensor]:
    """Smooth colour fields plus fine texture, uint8 (3, H, W): what a photo's pixels look like."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(n):
        coarse = torch.rand(1, 3, 6, 8, generator=g) * 255
        smooth = torch.nn.functional.interpolate(coarse, (height, width), mode="bicubic")[0]
        images.append((smooth + torch.randn(3, height, width, generator=g) * 12).clamp(0, 255).to(torch.uint8))
    return images


def dense_taps(in_size: int, out_size: int) -> torch.Tensor:
    """TF's bicubic taps as a dense float64 (out, in) matrix."""
    idx, weights = bicubic_taps(in_size, out_size)
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    matrix.scatter_add_(1, idx, weights.double())
    return matrix


def reference_resize(img: torch.Tensor, box, size: int) -> torch.Tensor:
    top, left, h, w = box
    crop = img[:, top : top + h, left : left + w].double()
    return dense_taps(h, size) @ crop @ dense_taps(w, size).T


def mixing_bias(images: list[torch.Tensor], size: int) -> list[list[str]]:
    """Rows: order, half, mean difference, mean |difference| vs the float64 official order."""
    g = torch.Generator().manual_seed(1)
    boxes = [sample_inception_crop(*img.shape[-2:], size, generator=g) for img in images]
    labels = torch.arange(len(images)) % 10
    reference_in = torch.stack([reference_resize(img, box, size) for img, box in zip(images, boxes)])
    floats = torch.stack([resize_bicubic(img, (size, size), box=box, dtype=torch.float32) for img, box in zip(images, boxes)])
    rounded = torch.stack([resize_bicubic(img, (size, size), box=box) for img, box in zip(images, boxes)])

    def mixed(batch: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(2)  # the same MixUp lambdas and CutMix boxes for every order
        out, _ = mixup_cutmix(batch, labels, 10, generator=torch.Generator().manual_seed(3))
        return out

    reference = mixed(reference_in).clamp(0, 255).floor()
    orders = {"this project: float resize, mix, truncate": truncate_to_uint8(mixed(floats)),
              "before: resize rounded to uint8, then mixed": mixed(rounded)}
    half = len(images) // 4  # outputs [0, B/2) MixUp, [B/2, B) CutMix
    rows = []
    for name, out in orders.items():
        diff = out.double() - reference
        for part, sl in (("MixUp", slice(0, half)), ("CutMix", slice(half, None)), ("all", slice(None))):
            d = diff[sl]
            rows.append([name, part, f"{d.mean():+.4f}", f"{d.abs().mean():.4f}", f"{int(d.abs().max())}"])
    return rows


def jpeg_dct(images: list[torch.Tensor]) -> list[list[str]] | str:
    try:
        import simplejpeg
    except ImportError:
        return "not measured: `pip install simplejpeg` (its decoder exposes libjpeg's fast integer DCT)"
    from torchvision.io import decode_jpeg, encode_jpeg

    rows = []
    for quality in (75, 90, 95):
        diffs = []
        for img in images:
            data = encode_jpeg(img, quality=quality).numpy().tobytes()
            accurate = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)).double()
            fast = torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True)).permute(2, 0, 1).double()
            diffs.append(fast - accurate)
        d = torch.stack(diffs)
        rows.append([str(quality), f"{d.mean():+.3f}", f"{d.abs().mean():.3f}", f"{(d != 0).double().mean():.1%}",
                     f"{int(d.abs().max())}"])
    return rows


def _round_half_away(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + 0.5)  # C's std::round


def tf_warp_index(height: int, width: int, transform: list[float]) -> np.ndarray:
    """Flat source index (H*W,) of TF's nearest ImageProjectiveTransform, -1 for the fill,
    in float32 as TF computes it."""
    a0, a1, a2, b0, b1, b2 = (np.float32(v) for v in transform)
    y, x = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
    in_x = _round_half_away(a0 * x + a1 * y + a2)
    in_y = _round_half_away(b0 * x + b1 * y + b2)
    inside = (in_x >= 0) & (in_x < width) & (in_y >= 0) & (in_y < height)
    return np.where(inside, in_y * width + in_x, -1).astype(np.int64).reshape(-1)


def rotate_transform(degrees: float, height: int, width: int) -> list[float]:
    """The official rotate's matrix (tf.contrib.image.rotate / tfa: counterclockwise)."""
    r = np.float32(degrees * math.pi / 180)
    c, s = np.cos(r), np.sin(r)
    x_off = ((width - 1) - (c * (width - 1) - s * (height - 1))) / 2
    y_off = ((height - 1) - (s * (width - 1) + c * (height - 1))) / 2
    return [c, -s, x_off, s, c, y_off]


def warp_agreement(size: int) -> list[list[str]]:
    rows = []
    for m in (5, 10, 15):
        for op in ("ShearX", "ShearY", "Rotate"):
            if op == "Rotate":
                arg = rotate_degrees(m)
                tf = tf_warp_index(size, size, rotate_transform(arg, size, size))
                ours = _warp_index(1, size, size, "rotate", float(arg))
            else:
                arg = shear_level(m)
                matrix = [1, arg, 0, 0, 1, 0] if op == "ShearX" else [1, 0, 0, arg, 1, 0]
                tf = tf_warp_index(size, size, matrix)
                ours = _warp_index(1, size, size, "shear_" + op[-1].lower(), float(arg))
            ours = ours.numpy().astype(np.int64)
            ours = np.where(ours == size * size, -1, ours)  # the fill
            differ = ours != tf
            shift = np.abs(np.stack(np.divmod(np.maximum(ours, 0), size)) - np.stack(np.divmod(np.maximum(tf, 0), size)))
            both = differ & (ours >= 0) & (tf >= 0)
            far = int(shift[:, both].max()) if both.any() else 0
            rows.append([op, str(m), f"{arg:g}", f"{differ.mean():.2%}", f"{(differ & ((ours < 0) != (tf < 0))).mean():.2%}",
                         str(far)])
    return rows


def bf16_forward(batch: int) -> list[list[str]]:
    from nfnet.models import create_model
    from nfnet.training.xla import forward_in_dtype

    torch.manual_seed(0)
    net = create_model("nfnet_f0", num_classes=1000, drop_rate=0.0, stochdepth_rate=0.0).eval()
    images = torch.randn(batch, 3, 192, 192)
    labels = torch.randint(0, 1000, (batch,))

    def run(kind: str):
        net.zero_grad(set_to_none=True)
        if kind == "float32":
            logits = net(images)
        elif kind == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = net(images)
        else:
            logits = forward_in_dtype(net, images, torch.bfloat16)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        grads = torch.cat([p.grad.flatten().double() for p in net.parameters()])
        return logits.detach().float(), loss.item(), grads

    ref_logits, ref_loss, ref_grads = run("float32")
    rows = []
    for kind, name in (("autocast", "bf16 autocast (this project, GPU/CPU)"),
                       ("whole", "whole network in bf16 (official; this project on TPU)")):
        logits, loss, grads = run(kind)
        rel = float((logits - ref_logits).abs().max() / ref_logits.abs().max())
        cosine = float(torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0))
        rows.append([name, f"{rel:.2e}", f"{abs(loss - ref_loss) / ref_loss:.2e}", f"{cosine:.6f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64, help="photo-like images (a multiple of 4)")
    parser.add_argument("--size", type=int, default=224, help="train crop size")
    parser.add_argument("--bf16-batch", type=int, default=4)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    torch.set_num_threads(common.CPU_THREADS)
    images = photo_like(args.images)
    parts = [
        "# The official pipeline and precision: measured deviations",
        "",
        f"`python benchmarks/official_pipeline.py`; torch {torch.__version__}, {common.cpu_model()}. "
        "Grey levels are on the 0-255 scale.",
        "",
        f"## 1. Mixing order ({args.images} photo-like 500x375 images, official crops at {args.size} px)",
        "",
        "Difference from a float64 reference of the official order (resize unclamped, mix, clip, truncate).",
        "",
        common.markdown_table(["order", "outputs", "mean difference", "mean abs difference", "max"],
                              mixing_bias(images, args.size)),
        "",
        "## 2. JPEG decoding: libjpeg's fast integer DCT (TF) minus the accurate DCT (torchvision)",
        "",
    ]
    dct = jpeg_dct(images[:16])
    parts += [dct if isinstance(dct, str) else common.markdown_table(
        ["JPEG quality", "mean difference", "mean abs difference", "pixels that differ", "max"], dct)]
    parts += [
        "",
        f"## 3. Nearest-neighbour warps at {args.size} px: pixels whose source pixel differs from TF's",
        "",
        common.markdown_table(["op", "M", "argument", "pixels differing", "of them fill vs image", "largest shift (px)"],
                              warp_agreement(args.size)),
        "",
        f"## 4. bf16 against float32, NFNet-F0 forward and backward (batch {args.bf16_batch}, 192 px, random init)",
        "",
        common.markdown_table(["precision", "max logit difference / max logit", "loss difference (relative)",
                               "gradient cosine similarity"], bf16_forward(args.bf16_batch)),
        "",
    ]
    text = "\n".join(parts)
    print(text)
    Path(args.out).write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
