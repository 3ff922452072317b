"""Update rounds on real images against a classical baseline on the same split.

    python benchmarks/update_rounds.py            # writes benchmarks/results/update_rounds.md

scikit-learn's handwritten digits (1,797 real scanned 8x8 images, 10 classes), written as a class
folder of 32 px PNGs, as a user's own small dataset:

* round 1, from scratch: the digits 0-7, two thirds of their images;
* round 2, from version 1: the digits 8 and 9 arrive, and the rest of the images of 0-7;
* "scratch": a model trained from scratch on round 2's folder (as many steps as both rounds),
  the alternative to an update round.

Each is a `python update.py` run as a user types it, with the own-folder recipe of README.md
(no flips, crops of at least 80% of the image). The baseline is a support-vector machine (RBF)
and a logistic regression on the raw pixels of the same PNGs, fitted on the files each version's
manifest puts in train and scored on those it puts in validation. Reported per round: overall,
old-class and new-class val top-1 and the round's wall time. A script, never a test: wall time on
a shared machine is a measurement.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "update_rounds.md"
sys.path.insert(0, str(ROOT / "src"))

from nfnet.inference.registry import Registry  # noqa: E402

IMAGE_SIZE = 32
OLD_DIGITS, NEW_DIGITS = tuple(range(8)), (8, 9)
# The share of each old digit's images in round 1; the rest arrive in round 2.
ROUND_1_SHARE = 2 / 3
# The own-folder recipe (README.md, "Train from scratch on your own folder") at 32 px on the CPU.
RECIPE = ["model=nfnet_tiny", "data.train_size=32", "data.test_size=32", "data.eval_pad=0", "data.val_fraction=0.2",
          "data.batch_size=32", "augment.hflip=false", "augment.crop_min_area=0.8", "optim.base_lr=1.6",
          "print_config=false", "logger=none", "callbacks.augmented_images=null"]


def write_digits(folder: Path, round_number: int) -> int:
    """Round 1 or 2 of the digits as a class folder (`<digit>/<index>.png`); returns the image count."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    per_digit: dict[int, int] = {}
    written = 0
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        label = int(label)
        seen = per_digit[label] = per_digit.get(label, 0) + 1
        share = ROUND_1_SHARE * np.sum(digits.target == label)
        if round_number == 1 and (label in NEW_DIGITS or seen > share):
            continue
        path = folder / str(label) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            # 0-16 ink levels -> 0-255 grey, enlarged as a scanner at 4x the resolution would see it.
            grey = Image.fromarray(np.uint8(np.round(pixels * 255 / 16)), "L")
            grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC).convert("RGB").save(path)
        written += 1
    return written


def run_round(folder: Path, registry: Path, logs: Path, steps: int) -> dict:
    command = [sys.executable, str(ROOT / "update.py"), f"data.root={folder}", f"registry={registry}",
               f"paths.log_dir={logs}", f"steps={steps}", *RECIPE]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"update.py failed ({result.returncode}):\n{result.stderr[-3000:]}")
    print(result.stdout.strip().splitlines()[-1], flush=True)
    return Registry(registry).history()[-1]


def class_top1(per_class: dict, names: list[str]) -> float:
    """Top-1 over the images of the classes `names` (per-class top-1 weighted by image count)."""
    rows = [per_class[n] for n in names if n in per_class]
    images = sum(r["images"] for r in rows)
    return sum(r["top1"] * r["images"] for r in rows) / images if images else float("nan")


def nfnet_row(registry: Registry, version: str, old: list[str], new: list[str]) -> dict:
    val = registry.metrics(version)["val"]
    return {"all": val["top1"], "old": class_top1(val["per_class"], old), "new": class_top1(val["per_class"], new)}


def baselines(folder: Path, registry: Registry, version: str, old: list[str], new: list[str]) -> dict[str, dict]:
    """SVM and logistic regression on raw pixels, fitted and scored on the version's own split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    rows = registry.manifest(version)
    pixels = {r.relpath: np.asarray(Image.open(folder / r.relpath).convert("L"), np.float32).ravel() / 255 for r in rows}
    train = [r for r in rows if r.split == "train"]
    val = [r for r in rows if r.split == "val"]
    x_train, y_train = np.stack([pixels[r.relpath] for r in train]), [r.label for r in train]
    x_val, y_val = np.stack([pixels[r.relpath] for r in val]), np.array([r.label for r in val])
    scores = {}
    for name, model in (("SVM (RBF) on raw pixels", SVC()), ("logistic regression on raw pixels",
                                                             LogisticRegression(max_iter=2000))):
        hit = model.fit(x_train, y_train).predict(x_val) == y_val
        scores[name] = {
            "all": hit.mean(),
            "old": hit[np.isin(y_val, old)].mean(),
            "new": hit[np.isin(y_val, new)].mean() if new else float("nan"),
        }
    return scores


def cell(value: float) -> str:
    return "–" if value != value else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs=2, default=(400, 200), metavar=("ROUND_1", "ROUND_2"))
    parser.add_argument("--out", default=str(RESULT))
    args = parser.parse_args()
    old_names, new_names = [str(d) for d in OLD_DIGITS], [str(d) for d in NEW_DIGITS]
    with tempfile.TemporaryDirectory() as tmp:
        folder, logs = Path(tmp) / "digits", Path(tmp) / "logs"
        models, scratch = Registry(Path(tmp) / "models"), Registry(Path(tmp) / "scratch")
        counts = {1: write_digits(folder, 1)}
        records = {1: run_round(folder, models.root, logs, args.steps[0])}
        counts[2] = write_digits(folder, 2)
        records[2] = run_round(folder, models.root, logs, args.steps[1])
        records["scratch"] = run_round(folder, scratch.root, logs, sum(args.steps))
        table = []
        for key, registry, version, new in ((1, models, "0001", []), (2, models, "0002", new_names),
                                            ("scratch", scratch, "0001", new_names)):
            row = {"NFNet (nfnet_tiny)": nfnet_row(registry, version, old_names, new)}
            row.update(baselines(folder, registry, version, old_names, new))
            table.append((key, registry, version, row))
        second = models.metrics("0002")
    lines = [
        "# Update rounds on real images (scikit-learn's digits) against a classical baseline",
        "",
        f"`python benchmarks/update_rounds.py --steps {args.steps[0]} {args.steps[1]}`; machine: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
        f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"Round 1: digits 0-7, {counts[1]} images, from scratch, {args.steps[0]} steps. Round 2: digits 8 and 9 "
        f"arrive with the rest of 0-7 ({counts[2]} images), {args.steps[1]} steps from version 1. Scratch: round 2's "
        f"folder from scratch, {sum(args.steps)} steps. Batch 32 at 32 px, the own-folder recipe "
        f"(`{' '.join(RECIPE[:9])}`); val top-1 on each version's own validation split (a hash of each path: "
        "round 1's validation files are round 2's too). The baselines are fitted on the same train files.",
        "",
        "| run | model | val top-1 | old classes (0-7) | new classes (8, 9) | wall time (s) | decision |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, _, _, row in table:
        record = records[key]
        for index, (model, scores) in enumerate(row.items()):
            first = index == 0
            lines.append(
                f"| {'round ' + str(key) if key != 'scratch' else 'scratch on all'} | {model} | {cell(scores['all'])} | "
                f"{cell(scores['old'])} | {cell(scores['new'])} | {record['wall_s'] if first else ''} | "
                f"{record['decision'] if first else ''} |")
    gap = {key: row["NFNet (nfnet_tiny)"]["all"] - max(s["all"] for m, s in row.items() if m != "NFNet (nfnet_tiny)")
           for key, _, _, row in table}
    lines += [
        "",
        f"NFNet minus the best baseline, overall val top-1: round 1 {gap[1]:+.3f}, round 2 {gap[2]:+.3f}, "
        f"scratch {gap['scratch']:+.3f} (the issue's goal: within 3 points, i.e. >= -0.030).",
        "",
        f"Round 2's gate: {records[2]['reason']}",
        "",
        f"Old classes after the round against the model retrained from scratch on all the data: "
        f"{table[1][3]['NFNet (nfnet_tiny)']['old']:.3f} vs {table[2][3]['NFNet (nfnet_tiny)']['old']:.3f} "
        f"({records[2]['wall_s']:.0f} s vs {records['scratch']['wall_s']:.0f} s of training and scoring).",
        "",
        "Round 2 against version 1 on version 1's own validation files (the previous round's set): "
        f"{second['previous_val']['top1']:.3f} vs {second['current']['previous_val']['top1']:.3f}.",
        "",
    ]
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
