"""What a start pays to list and header-check an image folder, with and without the folder index.

    PYTHONPATH=src python benchmarks/folder_index.py [--classes 1000] [--per-class 100] [--rounds 5]

Generates a tree of classes x per-class tiny files (a JPEG signature and a counter: 18 bytes
each) in a temporary folder, then times, in interleaved rounds (medians; the tree is in the
page cache, so every figure is a local-disk, warm-cache lower bound: on a network file system
each open is a round trip and the gaps widen):

* list only: the walk without ``stat`` (what ``scan_image_folder`` costs);
* list + stat: the walk that computes the index key (one ``stat`` per file);
* no index: ``scan_image_folder`` + ``ImageFolderDataset`` header checks, what every rank's
  ``setup`` paid before (one ``stat`` + one ``open`` + a 16-byte read per file);
* build index: the same checks, then the index written (each round from scratch);
* load index: walk + stat + read the index (a later run, or another rank with no key);
* load index by key: read the index only (a rank given rank 0's key).

Then the same with two ranks as two processes started at once (forked once, released together
by a barrier each round; the figure is the slower rank): both checking headers without an
index, both building at once (one takes the builders' lock and checks the headers, the other
waits for it and reads its index), and both loading.

Prints a markdown table and writes it to benchmarks/results/folder_index.md.
"""

from __future__ import annotations

import argparse
import glob
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, interleaved, machine_info, median  # noqa: E402

from nfnet.data import folder_files  # noqa: E402
from nfnet.data.folder import ImageFolderDataset, build_index, load_index, scan_image_folder  # noqa: E402
from nfnet.data.folder_scan import walk_image_folder  # noqa: E402

JPEG_HEAD = b"\xff\xd8\xff\xe0" + bytes(12)


def make_tree(root: str, classes: int, per_class: int) -> None:
    for c in range(classes):
        folder = os.path.join(root, f"n{c:08d}")
        os.mkdir(folder)
        for i in range(per_class):
            with open(os.path.join(folder, f"n{c:08d}_{i:05d}.JPEG"), "wb") as f:
                f.write(JPEG_HEAD + i.to_bytes(2, "big"))


OPENS = [0]  # image files opened by this process (header checks), counted by count_opens


def count_opens() -> None:
    real = folder_files.open_regular

    def counting(path):
        OPENS[0] += 1
        return real(path)

    folder_files.open_regular = counting


def opened_by(step) -> int:
    before = OPENS[0]
    step()
    return OPENS[0] - before


def remove_index(root: str) -> None:
    for path in glob.glob(os.path.join(root, ".nfnet-index-*")):
        os.unlink(path)


def no_index(root: str) -> None:
    classes, samples = scan_image_folder(root)
    ImageFolderDataset(samples, classes)


def fresh_build(root: str) -> None:
    remove_index(root)
    build_index(root)


def make_steps(root: str, key: str) -> dict:
    return {
        "list only (scandir, no stat)": lambda: walk_image_folder(root),
        "list + stat (the index key)": lambda: walk_image_folder(root, with_stats=True).key(),
        "no index: scan + header checks": lambda: no_index(root),
        "build index (from scratch)": lambda: fresh_build(root),
        "load index (walk + stat + read)": lambda: load_index(root),
        "load index by key (read only)": lambda: load_index(root, key=key),
    }


def rank_loop(root: str, key: str, barrier, commands, results) -> None:
    """One simulated rank: waits for a step name, meets the other rank at the barrier, runs it."""
    warnings.simplefilter("ignore")
    steps = make_steps(root, key) | {"build index (both at once; one waits)": lambda: build_index(root)}
    while (name := commands.get()) is not None:
        barrier.wait()
        t0, opened = time.perf_counter(), OPENS[0]
        steps[name]()
        results.put((time.perf_counter() - t0, OPENS[0] - opened))


def two_ranks(root: str, key: str, rounds: int, warmup: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds of the slower rank per round, and image files both ranks opened in the last round."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    queues = [ctx.Queue() for _ in range(2)]
    ranks = [ctx.Process(target=rank_loop, args=(root, key, barrier, q, results)) for q in queues]
    for p in ranks:
        p.start()
    names = ["no index: scan + header checks", "build index (both at once; one waits)",
             "load index (walk + stat + read)", "load index by key (read only)"]
    times: dict[str, list[float]] = {name: [] for name in names}
    opens: dict[str, int] = {}
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            if name.startswith("build"):
                remove_index(root)
            for q in queues:
                q.put(name)
            (t1, n1), (t2, n2) = results.get(), results.get()
            opens[name] = n1 + n2
            if r >= warmup:
                times[name].append(max(t1, t2))
        print(f"  2 ranks, round {r + 1}/{warmup + rounds}: "
              + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items() if t), flush=True)
    for q in queues:
        q.put(None)
    for p in ranks:
        p.join()
    build_index(root)  # whichever rank wrote last, the index is whole
    return times, opens


def table(one: tuple[dict, dict], one_opens: dict[str, int], two: tuple[dict, dict], files: int,
          index_bytes: int) -> list[str]:
    wall, cpu = one
    base = median(wall["no index: scan + header checks"])
    lines = ["| what one rank does at start | wall s (median) | CPU s | per file µs | vs no index | images opened |",
             "|---|---|---|---|---|---|"]
    for name in wall:
        w = median(wall[name])
        lines.append(f"| {name} | {w:.3f} | {median(cpu[name]):.3f} | {w / files * 1e6:.1f} | {w / base:.2f}x "
                     f"| {one_opens[name]} |")
    times, opens = two
    base2 = median(times["no index: scan + header checks"])
    lines += ["", "| two ranks started at once | wall s, slower rank (median) | vs no index | images opened, both |",
              "|---|---|---|---|"]
    for name, t in times.items():
        lines.append(f"| {name} | {median(t):.3f} | {median(t) / base2:.2f}x | {opens[name]} |")
    per_file = index_bytes / files
    lines += ["", f"Index file: {index_bytes / 1e6:.1f} MB for {files} files ({per_file:.0f} bytes per file)."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dir", default=None, help="where the temporary tree goes (default: the system temp dir)")
    ap.add_argument("--out", default=str(RESULTS / "folder_index.md"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    info = machine_info(torch.device("cpu"))
    tmp = tempfile.mkdtemp(prefix="nfnet-folder-index-", dir=args.dir)
    try:
        root = os.path.join(tmp, "train")
        os.mkdir(root)
        t0 = time.perf_counter()
        make_tree(root, args.classes, args.per_class)
        files = args.classes * args.per_class
        print(f"generated {files} files in {time.perf_counter() - t0:.1f} s under {root}", flush=True)
        index = build_index(root)
        index_bytes = os.path.getsize(index.path)
        count_opens()
        steps = make_steps(root, index.key)
        one_opens = {name: opened_by(step) for name, step in steps.items()}
        one = interleaved(steps, args.rounds, args.warmup, torch.device("cpu"))
        two = two_ranks(root, index.key, args.rounds, args.warmup)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    head = [
        "# Folder index: what a start pays to list and header-check an image folder",
        "",
        f"{args.classes} classes x {args.per_class} files of 18 bytes ({files} files), on local disk in the page "
        f"cache; {args.rounds} interleaved rounds after {args.warmup} warm-up, medians. {info['cpu']}, "
        f"{info['cores']} cores (shared), load average {info['load_avg_start']:.1f} at start; {info['date']}; "
        f"python {info['versions']['python']}, torch {info['versions']['torch']}.",
        "",
        "Command: `PYTHONPATH=src python benchmarks/folder_index.py`",
        "",
    ]
    text = "\n".join(head + table(one, one_opens, two, files, index_bytes)) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
