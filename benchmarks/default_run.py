"""Time the default run, `python train.py` with no arguments, end to end (dataset generation
included, installation not), and report its final validation accuracy.

    python benchmarks/default_run.py            # writes benchmarks/results/default_run.md

A script, never a test: wall-clock time on a shared machine is a measurement, not a pass/fail.
The dataset cache and the run directory go to a fresh temporary folder, so the generator runs
as it would on a first checkout.
"""

from __future__ import annotations

import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "default_run.md"


def last_value(rows: list[dict[str, str]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return values[-1] if values else None


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, str(ROOT / "train.py"), f"paths.data_dir={tmp}/data", f"paths.log_dir={tmp}/logs"]
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "NFNET_ROOT": str(ROOT)})
        seconds = time.perf_counter() - start
        metrics_file = next(Path(tmp, "logs").rglob("metrics.csv"))
        with open(metrics_file) as f:
            rows = list(csv.DictReader(f))
    val_top1 = last_value(rows, "val/acc_top1")
    val_ema_top1 = last_value(rows, "val/ema_acc_top1")
    test_top1 = last_value(rows, "test/acc_top1")
    test_top5 = last_value(rows, "test/acc_top5")
    table = "\n".join(
        [
            "# The default run (`python train.py`), measured",
            "",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            "| wall clock (s), generation included | final val/acc_top1 | final val/ema_acc_top1 | test top-1 (best ckpt) | test top-5 |",
            "|---|---|---|---|---|",
            f"| {seconds:.0f} | {val_top1:.4f} | {val_ema_top1 or float('nan'):.4f} | {test_top1:.4f} | {test_top5:.4f} |",
            "",
            "Targets (issue 2): at least 0.90 val top-1 within 300 s on 2 CPU cores.",
            "",
        ]
    )
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
