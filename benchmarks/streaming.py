"""Training examples per second read + decoded + augmented from shards (data=streaming) against
the image folder they were packed from (data=imagefolder), with one loader worker and two.

    PYTHONPATH=src python benchmarks/streaming.py [--classes 10] [--per-class 100] [--rounds 3]

Generates classes x per-class JPEGs (smooth colour ramps with noise, 320 x 240, quality 90, about
the bytes per pixel of ImageNet's photos), packs them with pack.py's code, then times the real
training loaders of both sources (ImageDataModule, augment=official: 2 raw images per example,
inception crop, MixUp/CutMix, RandAugment 405, at 128 px) in interleaved rounds: each round draws
`--batches` batches of 32 examples from each configuration, the first batch of each (worker
start-up) untimed. Medians of examples/s; the ratio is shards over folder at the same worker
count. The files are in the page cache: this is the local-disk, warm-cache case, where both
sources cost about the same, since decoding and augmenting dominate; on a shared file system or
an object store the folder pays a metadata round trip per image and shards do not.

Also packs the tree once with one and with two processes and reports images/s.

Prints a markdown table and writes it to benchmarks/results/streaming.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torchvision.io import encode_jpeg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, median  # noqa: E402

from nfnet.app.schema import section  # noqa: E402
from nfnet.data.datamodule import ImageDataModule  # noqa: E402
from nfnet.data.packing import pack, plan_imagefolder  # noqa: E402

BATCH, SIZE = 32, 128


def make_photos(root: Path, classes: int, per_class: int) -> None:
    generator = torch.Generator().manual_seed(0)
    ramp_y, ramp_x = torch.meshgrid(torch.linspace(0, 1, 240), torch.linspace(0, 1, 320), indexing="ij")
    for c in range(classes):
        (root / f"class_{c:03d}").mkdir(parents=True)
        for i in range(per_class):
            colour = torch.rand(3, 1, 1, generator=generator) * 255
            image = colour * (0.5 + 0.5 * ramp_x) * (0.5 + 0.5 * ramp_y) + torch.randn(3, 240, 320, generator=generator) * 12
            data = encode_jpeg(image.clamp(0, 255).to(torch.uint8), quality=90)
            (root / f"class_{c:03d}" / f"{i:05d}.jpg").write_bytes(data.numpy().tobytes())


def loader(source: str, root: Path, workers: int, index_dir: Path):
    data = section("data", source=source, root=str(root), train_size=SIZE, test_size=SIZE, num_workers=workers,
                   persistent_workers=False, index_dir=str(index_dir))
    module = ImageDataModule(data, section("augment", name="official", ra_level=405), batch_size=BATCH)
    module.prepare_data()
    module.setup("fit")
    return module.train_dataloader()


def examples_per_second(source: str, root: Path, workers: int, batches: int, index_dir: Path) -> float:
    iterator = iter(loader(source, root, workers, index_dir))
    next(iterator)  # worker start-up and first reads: not timed
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    del iterator
    return batches * BATCH / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--out", type=Path, default=RESULTS / "streaming.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    scratch = Path(tempfile.mkdtemp(prefix="nfnet-streaming-bench-"))
    try:
        photos, shards, index_dir = scratch / "photos", scratch / "shards", scratch / "index"
        make_photos(photos, args.classes, args.per_class)
        files = args.classes * args.per_class
        megabytes = sum(p.stat().st_size for p in photos.rglob("*.jpg")) / 2**20
        pack_rate = {}
        for workers in (1, 2):
            start = time.perf_counter()
            pack(plan_imagefolder(str(photos), 0.1, 0), str(shards), workers=workers, show_progress=False)
            pack_rate[workers] = files / (time.perf_counter() - start)
        configs = [(source, workers) for workers in (1, 2) for source in ("imagefolder", "streaming")]
        rates: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
        for round_number in range(args.rounds):
            for config in configs[round_number % len(configs):] + configs[:round_number % len(configs)]:
                source, workers = config
                root = photos if source == "imagefolder" else shards
                rates[config].append(examples_per_second(source, root, workers, args.batches, index_dir))
                print(f"round {round_number}: {source} x{workers}: {rates[config][-1]:.1f} examples/s", flush=True)
        info = machine_info(torch.device("cpu"))
        lines = [
            "# Streaming shards vs the image folder: examples/s read + decoded + augmented",
            "",
            f"{files} JPEGs of 320 x 240 ({megabytes:.1f} MiB, {megabytes * 1024 / files:.0f} KiB each) in {args.classes} "
            f"classes, packed into LitData chunks; local disk, page cache warm. Loader: augment=official (2 raw images "
            f"per example, MixUp/CutMix, RandAugment 405) at {SIZE} px, batches of {BATCH} examples, {args.batches} timed "
            f"batches per configuration per round, {args.rounds} interleaved rounds, medians. {info['cpu']}, "
            f"{info['cores']} cores (shared with other work); {info['date']}; torch {torch.__version__}.",
            "",
            "Command: `PYTHONPATH=src python benchmarks/streaming.py`",
            "",
            "| loader workers | folder examples/s | shards examples/s | shards / folder |",
            "|---|---|---|---|",
        ]
        for workers in (1, 2):
            folder, sharded = (median(rates[(s, workers)]) for s in ("imagefolder", "streaming"))
            lines.append(f"| {workers} | {folder:.1f} | {sharded:.1f} | {sharded / folder:.2f}x |")
        lines += [
            "",
            "| pack.py processes | images/s packed (read + decode check + write) |",
            "|---|---|",
            *(f"| {w} | {pack_rate[w]:.0f} |" for w in (1, 2)),
            "",
            "The pack rates include starting the reading processes (spawned: each imports torch and the "
            "decoder, seconds each), which on a tree this small is most of the time with 2 processes; "
            "they pay off only where reading and checking the files takes minutes (ImageNet: 1.28M files).",
        ]
        text = "\n".join(lines) + "\n"
        print(text)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
