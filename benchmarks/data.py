"""Throughput of one data-loader worker: the official NFNet train pipeline vs torchvision v2, and
what a worker still pays when the device does the rest (the GPU input pipeline).

    PYTHONPATH=src python benchmarks/data.py [--ra 405] [--batch 32] [--batches 15]
    PYTHONPATH=src python benchmarks/data.py --device cuda --device-batch 256   # on a GPU machine

One process, one thread (``torch.set_num_threads(1)``), as inside a DataLoader worker. Both
pipelines read the same generated 500x375 JPEGs (written with ``torchvision.io.encode_jpeg``
into a temp dir) and decode them with the same ``torchvision.io`` decoder:

* official (this project): decode -> InceptionCrop (TF crop, flip, TF bicubic resize, float
  pixels as TF leaves them) -> MixUp/CutMix of 2B raw images into B examples in float, clipped
  and truncated to uint8 -> RandAugment N x M per mixed image;
* torchvision: decode -> v2.RandomResizedCrop + v2.RandomHorizontalFlip ->
  v2.RandAugment(num_ops=N, magnitude matched, fill 128) -> v2.RandomChoice([CutMix, MixUp])
  on the batch, cast to float first as v2.MixUp requires (B raw images -> B examples, as
  torchvision mixes within a batch).

* GPU pipeline, worker side (nfnet.data.plans): read the file, parse its header, draw the crop
  and flip (EncodedImageDataset), then the batch's MixUp/CutMix and RandAugment draws, soft
  targets and byte packing (PlanCollate): what each worker pays when the device decodes,
  crops, resizes, mixes and augments.

The device stage (nfnet.data.device_pipeline.DeviceAugment) is timed apart, stage by stage, on
``--device`` (default cpu: CPU tensors, which shows its cost there, not a GPU's speed; with
``--device cuda`` it also measures how far nvjpeg's pixels are from the CPU decoder's).

The official recipe reads two raw images per training example (NFNET_SPEC §4.3) and
torchvision's mixing reads one, so both rates are reported: raw images/s (decoded, cropped
and augmented per second) and training examples/s. Batches of the two pipelines alternate
(which one goes first alternates too) so that load from other processes hits both alike, and
every figure is the median over the timed rounds, which discards rounds that another process
slowed down. Prints markdown tables and writes them to benchmarks/results/data.md
(data_cuda.md with ``--device cuda``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torchvision.io import ImageReadMode, decode_image, encode_jpeg
from torchvision.transforms import v2

from nfnet.data.batched_randaugment import randaugment_batch
from nfnet.data.device_pipeline import DeviceAugment, crop_resize, decode_images
from nfnet.data.folder import load_rgb
from nfnet.data.mixing import OfficialCollate, apply_mixing, truncate_to_uint8
from nfnet.data.plans import EncodedImageDataset, PlanCollate
from nfnet.data.randaugment import RandAugment
from nfnet.data.randaugment_levels import parse_ra_level
from nfnet.data.transforms import InceptionCrop

STAGES = ("decode", "crop+resize", "mix", "RandAugment")
WORKER_STAGES = ("read", "header+crop draw", "batch draws+packing")
DEVICE_STAGES = ("decode", "crop+resize", "mix+truncate", "RandAugment")


def make_jpegs(folder: Path, n: int, height: int = 375, width: int = 500) -> list[str]:
    """Photo-like JPEGs: smooth colour fields plus fine texture (quality 90, ~4:2:0)."""
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        coarse = torch.rand(1, 3, 6, 8, generator=g) * 255
        smooth = torch.nn.functional.interpolate(coarse, (height, width), mode="bicubic")[0]
        texture = torch.randn(3, height, width, generator=g) * 12
        img = (smooth + texture).clamp(0, 255).to(torch.uint8)
        path = folder / f"img{i:04d}.jpg"
        path.write_bytes(encode_jpeg(img, quality=90).numpy().tobytes())
        paths.append(str(path))
    return paths


class Timer:
    """Per-stage seconds of each timed batch; medians over the batches."""

    def __init__(self, stages=STAGES):
        self.stages = stages
        self.t = dict.fromkeys(stages, 0.0)
        self.rounds: list[dict[str, float]] = []

    def add(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        self.t[stage] += now - start
        return now

    def next_round(self) -> None:
        self.rounds.append(self.t)
        self.t = dict.fromkeys(self.stages, 0.0)

    def median(self, stage: str) -> float:
        return statistics.median(r[stage] for r in self.rounds)

    def median_total(self) -> float:
        return statistics.median(sum(r.values()) for r in self.rounds)


def official_batch(paths, crop, mix, ra, num_classes, timer):
    t0 = time.perf_counter()
    decoded = [load_rgb(p) for p in paths]  # 2B raw images
    t0 = timer.add("decode", t0)
    cropped = [(crop(img), i % num_classes) for i, img in enumerate(decoded)]
    t0 = timer.add("crop+resize", t0)
    mixed, targets = mix(cropped)  # the loader's collate without RandAugment: float mixing, truncation
    t0 = timer.add("mix", t0)
    out = torch.stack([ra(img) for img in mixed])
    timer.add("RandAugment", t0)
    return out, targets


def torchvision_batch(paths, crop, ra, mix, num_classes, timer):
    t0 = time.perf_counter()
    decoded = [decode_image(torchvision.io.read_file(p), mode=ImageReadMode.RGB) for p in paths]
    t0 = timer.add("decode", t0)
    cropped = [crop(img) for img in decoded]
    t0 = timer.add("crop+resize", t0)
    augmented = torch.stack([ra(img) for img in cropped])
    t0 = timer.add("RandAugment", t0)
    labels = torch.arange(len(paths)) % num_classes
    # v2.MixUp blends in place and cannot write floats into uint8: it needs a float batch.
    out, targets = mix(augmented.to(torch.float32), labels)
    timer.add("mix", t0)
    return out, targets


def plan_batch(paths, dataset, collate, timer):
    """The GPU pipeline's worker: bytes, header, crop draw per raw image; the batch's draws."""
    items = []
    for i, path in enumerate(paths):
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            data = f.read()
        t0 = timer.add("read", t0)
        items.append((dataset.encode(data, i), i % len(dataset.classes)))
        timer.add("header+crop draw", t0)
    t0 = time.perf_counter()
    batch = collate(items)
    timer.add("batch draws+packing", t0)
    return batch


def device_stages(batch, augment, device, timer):
    """DeviceAugment's stages one by one, the device synchronised after each (so each is timed
    alone); returns the uint8 batch."""
    def done(stage, t0):
        sync(device)
        return timer.add(stage, t0)

    sync(device)
    t0 = time.perf_counter()
    images = decode_images(batch, device)
    t0 = done("decode", t0)
    resized = crop_resize(images, batch.crops, batch.flips, augment.taps, augment.columns)
    t0 = done("crop+resize", t0)
    mixed = truncate_to_uint8(apply_mixing(resized, batch.mixing_draws(augment.size)))
    t0 = done("mix+truncate", t0)
    out = randaugment_batch(mixed, batch.ra_ops, batch.ra_negate, batch.ra_cutout, augment.randaugment)
    done("RandAugment", t0)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_deviation(batch, device) -> str:
    """How far the device's decoder is from the CPU pipeline's (nvjpeg vs libjpeg on CUDA)."""
    on_device = decode_images(batch, device)
    on_host = decode_images(batch, "cpu")
    diff = torch.cat([(a.cpu().float() - b.float()).flatten() for a, b in zip(on_device, on_host)])
    return (
        f"decoded pixels minus the CPU decoder's: mean {diff.mean():+.3f}, mean absolute "
        f"{diff.abs().mean():.3f}, {(diff != 0).float().mean():.1%} differ, at most {diff.abs().max():.0f} levels"
    )


def time_device_stage(args, paths, layers, mag, k) -> dict:
    """Stage and whole-call times of the device stage for ``--device-batch`` examples."""
    device = torch.device(args.device)
    ra = RandAugment(layers, mag)
    dataset = EncodedImageDataset([(p, i % k) for i, p in enumerate(paths)], [str(c) for c in range(k)], args.size)
    collate = PlanCollate(k, args.size, randaugment=ra)
    augment = DeviceAugment(args.size, ra)
    batch = collate([dataset[i] for i in range(len(paths))])
    stages, whole = Timer(DEVICE_STAGES), []
    for _ in range(args.device_warmup):
        device_stages(batch, augment, device, Timer(DEVICE_STAGES))
        augment(batch, device)
    for _ in range(args.device_rounds):
        device_stages(batch, augment, device, stages)
        stages.next_round()
        sync(device)
        t0 = time.perf_counter()
        augment(batch, device)  # as training runs it: no synchronisation between stages
        sync(device)
        whole.append(time.perf_counter() - t0)
    return {
        "stages": {s: stages.median(s) * 1e3 for s in DEVICE_STAGES},
        "total": statistics.median(whole) * 1e3,
        "deviation": decode_deviation(batch, device) if device.type == "cuda" else
        "decoded by the CPU decoder: the CPU pipeline's pixels",
    }  # fmt: skip


def per_example(timer, stages, b, raw_per_ex, name) -> dict:
    total = timer.median_total() / b  # seconds per training example
    return {
        "name": name,
        "raw": raw_per_ex,
        **{s: timer.median(s) / b * 1e3 for s in stages},  # ms per training example (median batch / B)
        "total": total * 1e3,
        "ex_s": 1 / total,
        "raw_s": raw_per_ex / total,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ra", type=int, default=405, help="official RandAugment level (405 = 4x5)")
    ap.add_argument("--size", type=int, default=224, help="train resolution")
    ap.add_argument("--batch", type=int, default=32, help="training examples per batch (B)")
    ap.add_argument("--batches", type=int, default=15, help="timed batches per pipeline")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--device", default="cpu", help="where the GPU pipeline's device stage runs")
    ap.add_argument("--device-batch", type=int, default=None, help="its batch (B examples; default --batch)")
    ap.add_argument("--device-rounds", type=int, default=5)
    ap.add_argument("--device-warmup", type=int, default=2)
    ap.add_argument("--out", default=None, help="default benchmarks/results/data.md (data_cuda.md on cuda)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers, mag = parse_ra_level(args.ra)
    b, k = args.batch, args.classes
    device_b = args.device_batch or b

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), 2 * max(b, device_b))
        jpeg_kb = statistics.mean(os.path.getsize(p) for p in paths) / 1024
        device_run = time_device_stage(args, paths[: 2 * device_b], layers, mag, k)
        paths = paths[: 2 * b]

        ours_crop, ours_ra = InceptionCrop(args.size, dtype=torch.float32), RandAugment(layers, mag)
        ours_mix = OfficialCollate(k)
        tv_crop = v2.Compose([v2.RandomResizedCrop(args.size, antialias=True),
                              v2.RandomHorizontalFlip()])  # fmt: skip
        # torchvision's magnitude bins: bin 3*M of 31 is the fraction M/10 of each op's maximum
        # (rotate 30 deg, shear 0.3, ...), the official scale.
        tv_ra = v2.RandAugment(num_ops=layers, magnitude=round(3 * mag), num_magnitude_bins=31,
                               fill=128)  # fmt: skip
        tv_mix = v2.RandomChoice([v2.CutMix(num_classes=k), v2.MixUp(num_classes=k, alpha=0.2)])
        plan_set = EncodedImageDataset([(p, i % k) for i, p in enumerate(paths)], [str(c) for c in range(k)], args.size)
        plan_collate = PlanCollate(k, args.size, randaugment=RandAugment(layers, mag))

        ours_t, tv_t, plan_t = Timer(), Timer(), Timer(WORKER_STAGES)
        # Warm-up (caches, lazy inits), untimed.
        official_batch(paths, ours_crop, ours_mix, ours_ra, k, Timer())
        torchvision_batch(paths[:b], tv_crop, tv_ra, tv_mix, k, Timer())
        plan_batch(paths, plan_set, plan_collate, Timer(WORKER_STAGES))
        for i in range(args.batches):
            # torchvision: B raw -> B examples; alternate halves so both read every file.
            half = paths[:b] if i % 2 == 0 else paths[b:]
            runs = [
                lambda: official_batch(paths, ours_crop, ours_mix, ours_ra, k, ours_t),  # 2B raw -> B
                lambda: torchvision_batch(half, tv_crop, tv_ra, tv_mix, k, tv_t),
                lambda: plan_batch(paths, plan_set, plan_collate, plan_t),  # 2B raw -> B
            ]
            for run in runs[i % 3 :] + runs[: i % 3]:  # each goes first in turn
                run()
            for timer in (ours_t, tv_t, plan_t):
                timer.next_round()

    ours = per_example(ours_t, STAGES, b, 2, "official (this project)")
    tv = per_example(tv_t, STAGES, b, 1, "torchvision v2")
    plan = per_example(plan_t, WORKER_STAGES, b, 2, "GPU pipeline, worker side")
    table = "\n".join(report(args, layers, mag, b, device_b, jpeg_kb, ours, tv, plan, device_run)) + "\n"
    print(table)
    out = Path(args.out or Path(__file__).parent / "results" / ("data_cuda.md" if args.device.startswith("cuda") else "data.md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"written to {out}")


def report(args, layers, mag, b, device_b, jpeg_kb, ours, tv, plan, device_run) -> list[str]:
    lines = [
        "# Data pipeline throughput, one worker process (1 thread)",
        "",
        f"RandAugment {layers}x{mag}, train size {args.size}, {2 * b} generated 500x375 JPEGs "
        f"(mean {jpeg_kb:.0f} KiB), B = {b}, {args.batches} timed batches per pipeline "
        "(interleaved; medians). "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{platform.processor() or platform.machine()}.",
        "",
        "Times are ms per training example, each the median over the timed batches (the "
        "official recipe decodes and crops 2 raw images per example, torchvision's batch "
        "mixing 1); the total is the median batch total, so stages need not add up to it.",
        "",
        "| pipeline | raw img / example | decode | crop+resize | mix | RandAugment | total ms "
        "| raw images/s | examples/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (ours, tv):
        lines.append(
            f"| {r['name']} | {r['raw']} | {r['decode']:.2f} | {r['crop+resize']:.2f} | "
            f"{r['mix']:.3f} | {r['RandAugment']:.2f} | {r['total']:.2f} | {r['raw_s']:.0f} | "
            f"{r['ex_s']:.0f} |"
        )
    lines += [
        "| **ratio official / torchvision** | | "
        + " | ".join(f"{tv[s] / ours[s]:.2f}x" if ours[s] else "-" for s in STAGES)
        + f" | {tv['total'] / ours['total']:.2f}x | **{ours['raw_s'] / tv['raw_s']:.2f}x** | "
        f"{ours['ex_s'] / tv['ex_s']:.2f}x |",
        "",
        "Stage ratios are torchvision time / official time per training example (> 1: ours is "
        "faster). Per raw image, the official crop+resize costs "
        f"{ours['crop+resize'] / 2:.2f} ms vs torchvision's {tv['crop+resize']:.2f} ms (TF's "
        "bicubic kernel as banded float32 matmuls vs torchvision's native uint8 bilinear), "
        "and its "
        f"RandAugment {ours['RandAugment']:.2f} ms vs {tv['RandAugment']:.2f} ms per augmented "
        "image.",
        "",
        "## GPU input pipeline: what a worker still does",
        "",
        "The same rounds (interleaved with the two above). The worker reads each raw image's bytes, "
        "parses its header and draws its crop and flip; per batch it draws MixUp/CutMix and "
        "RandAugment and packs the bytes; the device does the rest (next table).",
        "",
        "| pipeline | " + " | ".join(WORKER_STAGES) + " | total ms | raw images/s | examples/s "
        "| vs official | vs torchvision |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {plan['name']} | " + " | ".join(f"{plan[s]:.3f}" for s in WORKER_STAGES)
        + f" | {plan['total']:.3f} | {plan['raw_s']:.0f} | {plan['ex_s']:.0f} | "
        f"**{plan['ex_s'] / ours['ex_s']:.1f}x** | {plan['ex_s'] / tv['ex_s']:.1f}x |",
        "",
        f"## GPU input pipeline: the device stage on {args.device}",
        "",
        f"B = {device_b} examples ({2 * device_b} raw images) per batch, {args.device_rounds} timed rounds "
        f"after {args.device_warmup} warm-up rounds, medians; ms per batch. Stages are timed with the "
        "device synchronised after each; the whole call runs as in training, unsynchronised.",
        "",
        "| " + " | ".join(DEVICE_STAGES) + " | whole call | examples/s |",
        "|---|---|---|---|---|---|",
        "| " + " | ".join(f"{device_run['stages'][s]:.1f}" for s in DEVICE_STAGES)
        + f" | {device_run['total']:.1f} | {device_b / device_run['total'] * 1e3:.0f} |",
        "",
        f"Decoding: {device_run['deviation']}.",
    ]
    return lines


if __name__ == "__main__":
    main()
