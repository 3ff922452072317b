"""The benchmark suite: runs every benchmark and writes docs/PERFORMANCE.md.

    flock /tmp/nfnet-bench.lock python benchmarks/suite.py            # CPU, everything
    python benchmarks/suite.py --only train eval                       # some parts
    python benchmarks/suite.py --report-only                           # rewrite the doc only
    python benchmarks/suite.py --device cuda                           # the GPU plan

Each part is its own script (and process) under benchmarks/, writing
benchmarks/results/<name>.{json,md}; this runner calls them with the options below and then
assembles the report from those files, so a part can be re-run alone and the report rebuilt.
(`flock`: one benchmark at a time on a shared machine; the runner itself takes no lock.)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DOC = ROOT / "docs" / "PERFORMANCE.md"
PY = sys.executable

sys.path.insert(0, str(HERE))
from performance_report import report  # noqa: E402 - a sibling script's module

# torch.compile of F0's training step takes minutes on a 2-core CPU, and a compiled model timed
# between eager ones can slow both there, so on CPU each compiled model gets a run of its own.
CPU_PLAN = {
    "train": [["train_step.py", "--exec", "eager", "--precision", "fp32", "--impls", "nfnet",
               "nfnet_erf", "timm", "--rounds", "3"]],
    # bf16 convolutions are emulated on a CPU without AVX512-BF16/AMX (tens of times slower
    # than fp32 in NCHW, several times in channels_last, see bf16_ops): a bf16 F0 step takes
    # minutes there, so the CPU plan measures the ops; `--only train_bf16` times the steps.
    "bf16": [["bf16_ops.py"]],
    "train_bf16": [["train_step.py", "--exec", "eager", "--precision", "bf16", "--layout", "cl",
                    "--rounds", "2", "--memory", "none",
                    "--out", str(RESULTS / "train_step_bf16")]],
    "train_compile": [
        ["train_step.py", "--exec", "compile", "--precision", "fp32", "--layout", "nchw",
         "--no-ref", "--memory", "none", "--rounds", "2",
         "--out", str(RESULTS / "train_step_compile")]
    ],
    "eval": [["eval_step.py", "--precision", "fp32"]],
    "eval_compile": [["eval_step.py", "--precision", "fp32", "--exec", "compile", "--layout",
                      "nchw", "--rounds", "5", "--out", str(RESULTS / "eval_step_compile")]],
    "ablation": [["ablation.py", "--rounds", "2"]],
    "profile": [["profile_step.py", "--steps", "1"]],
    "effnet": [["vs_efficientnet.py", "--rounds", "2"]],
    # Owned by their own issues; run here with quick settings.
    "agc": [["agc.py", "--rounds", "3", "--step-rounds", "3", "--order-rounds", "5"]],
    "data": [["data.py", "--batch", "8", "--batches", "4"]],
}
CUDA_PLAN = {
    "train": [["train_step.py", "--device", "cuda", "--batch", "128"]],
    "eval": [["eval_step.py", "--device", "cuda", "--batch", "128", "--exec", "eager",
              "compile"]],
    "ablation": [["ablation.py", "--device", "cuda", "--precision", "bf16"]],
    "profile": [["profile_step.py", "--device", "cuda", "--batch", "128", "--precision",
                 "bf16", "--layout", "cl"]],
    "effnet": [["vs_efficientnet.py", "--device", "cuda", "--batch", "16", "--precision",
                "bf16"]],
}


def run_parts(plan: dict, only: list[str] | None) -> None:
    for part, commands in plan.items():
        if only and part not in only:
            continue
        for command in commands:
            print(f"== {part}: {' '.join(command)}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run([PY, str(HERE / command[0]), *command[1:]], cwd=ROOT)
            status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
            print(f"== {part}: {status} in {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--only", nargs="+", choices=sorted(set(CPU_PLAN) | set(CUDA_PLAN)))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--doc", default=str(DOC))
    args = ap.parse_args()
    if not args.report_only:
        run_parts(CUDA_PLAN if args.device == "cuda" else CPU_PLAN, args.only)
    doc = Path(args.doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(report())
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
