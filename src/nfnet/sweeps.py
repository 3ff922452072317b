"""Summarise a finished multirun from its job directories, without wandb.

    python -m nfnet.sweeps logs/agc_sweep/multiruns/<time> [--metric val/acc_top1]

Every job of a sweep leaves `.hydra/overrides.yaml` (what it was run with) and `metrics.json`
(what it reached) in its own directory. With exactly two swept keys (the AGC sweep's lambda and
batch size) the result is a grid, the shape of the paper's figure; otherwise one line per job.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def load_jobs(sweep_dir: str | Path) -> list[tuple[dict[str, str], dict]]:
    """(overrides as key -> value, metrics) for every job directory; a job that did not finish
    has empty metrics, one that stopped early has a `stopped` entry saying why."""
    jobs = []
    for job_dir in sorted(Path(sweep_dir).iterdir(), key=lambda p: (len(p.name), p.name)):
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        if not overrides_file.is_file():
            continue
        overrides = dict(o.split("=", 1) for o in yaml.safe_load(overrides_file.read_text()) or [] if "=" in o)
        metrics_file = job_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        jobs.append((overrides, metrics))
    return jobs


def _sort_key(value: str):
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def swept_keys(jobs: list[tuple[dict[str, str], dict]]) -> list[str]:
    """The override keys whose value differs between jobs, in command-line order."""
    keys = list(dict.fromkeys(k for overrides, _ in jobs for k in overrides))
    return [k for k in keys if len({overrides.get(k) for overrides, _ in jobs}) > 1]


STOPPED_MARK = "*"
STOPPED_NOTE = f"{STOPPED_MARK} the job stopped early (non-finite steps in a row): its last good weights' value"


def _cell(metrics: dict, metric: str) -> str:
    value = metrics.get(metric)
    text = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
    return text + STOPPED_MARK if "stopped" in metrics else text


def summarize(sweep_dir: str | Path, metric: str = "val/acc_top1") -> str:
    jobs = load_jobs(sweep_dir)
    if not jobs:
        raise SystemExit(f"{sweep_dir}: no job directories with .hydra/overrides.yaml")
    keys = swept_keys(jobs)
    if len(keys) == 2:
        rows_key, cols_key = keys
        rows = sorted({o[rows_key] for o, _ in jobs}, key=_sort_key)
        cols = sorted({o[cols_key] for o, _ in jobs}, key=_sort_key)
        cells = {(o[rows_key], o[cols_key]): _cell(m, metric) for o, m in jobs}
        width = max(len(rows_key), *(len(r) for r in rows))
        lines = [f"{metric} by {rows_key} (rows) and {cols_key} (columns)",
                 " " * width + "".join(f"  {c:>10}" for c in cols)]
        lines += [f"{r:>{width}}" + "".join(f"  {cells.get((r, c), ''):>10}" for c in cols) for r in rows]
    else:
        lines = [f"{metric}  " + "  ".join(keys)]
        for overrides, metrics in sorted(jobs, key=lambda job: [_sort_key(job[0].get(k, "")) for k in keys]):
            lines.append(f"{_cell(metrics, metric):>{len(metric)}}  " + "  ".join(f"{k}={overrides.get(k)}" for k in keys))
    if any("stopped" in metrics for _, metrics in jobs):
        lines.append(STOPPED_NOTE)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nfnet.sweeps", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a multirun directory (logs/<task>/multiruns/<time>)")
    parser.add_argument("--metric", default="val/acc_top1", help="a key of the jobs' metrics.json")
    args = parser.parse_args(argv)
    print(summarize(args.sweep_dir, args.metric))


if __name__ == "__main__":
    main()
