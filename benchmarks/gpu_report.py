"""docs/PERFORMANCE.md's GPU section (issue 17): the H200 starting figures, the targets, and the
figures `benchmarks/gpu_plan.sh` writes once it has run on a GPU (else said to be missing).
Assembled by performance_report.py."""

from __future__ import annotations

from performance_report import demote, read_md


# Issue 17's starting figures: one H200, torch 2.11 (cu130), F0 at 192 px, bf16 autocast,
# SGD-Nesterov, interleaved rounds in one run, MFU against a measured bf16 matmul peak of
# 777 TFLOP/s: (setting, ours img/s, timm img/s, our MFU).
GPU_BEFORE = [
    ("batch 128, eager, NCHW", 1635, 1980, 0.088),
    ("batch 128, eager, channels_last", 2120, 2588, 0.114),
    ("batch 128, `model.compile()` (default mode), channels_last", 2346, 2574, 0.128),
    ("batch 256, eager, channels_last", 3357, 2990, 0.182),
    ("batch 128, `torch.compile(mode=\"reduce-overhead\")` (CUDA graphs), channels_last", 5977, 5556, 0.325),
]
GPU_TARGETS = [
    "eager step >= 1.1x timm's eager step (was 0.82x); best compiled step >= 1.2x timm's best compiled "
    "step (was 1.08x) and MFU >= 35% (was 32.5%)",
    "the full Lightning fit from JPEG files >= 0.85x our best raw step and >= 4,500 img/s with the "
    "GPU input pipeline (was ~1,700 img/s on tiny images)",
]


def gpu_section() -> list[str]:
    """Issue 17's GPU table: the starting figures, and the re-measured ones once
    benchmarks/gpu_plan.sh has run on an H200 (its *_cuda results), else said to be missing."""
    out = ["## GPU (issue 17)", "",
           "Starting figures (before the device-side step, the dispatch cuts and the GPU input "
           "pipeline), one H200:", ""]
    out.append("| F0 step | ours img/s | timm img/s | ours / timm | MFU ours |")
    out.append("|---|---|---|---|---|")
    out += [f"| {name} | {ours:,} | {timm:,} | {ours / timm:.2f}x | {mfu:.1%} |" for name, ours, timm, mfu in GPU_BEFORE]
    out += ["", "Targets: " + "; ".join(GPU_TARGETS) + ".", ""]
    measured = [name for name in ("train_step_cuda", "train_step_cuda_nchw", "fit_throughput_cuda",
                                  "fit_throughput_cuda_cpu_decode", "data_cuda", "memory_cuda", "memory_cuda_f7")
                if read_md(name)]
    if not measured:
        out += ["**Re-measured: not yet.** No GPU was lent to the session that built these changes, so every "
                "GPU target above is unmeasured. One command produces every GPU figure of this section on one "
                "H200 in about 8 minutes and writes them to `benchmarks/results/*_cuda.*`, which this page then "
                "shows (a machine without Hydra takes wheels carried in `.whl/`: `pip wheel hydra-core==1.3.8 "
                "omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 -w .whl --no-deps`):", "",
                "```", "bash benchmarks/gpu_plan.sh", "```", ""]
    for name in measured:
        out += [f"### `{name}`", "", demote(read_md(name)), ""]
    dispatch = read_md("dispatch")
    if dispatch:
        out += ["### Dispatched operations per step, on this CPU (`benchmarks/dispatch.py`)", "",
                "What made the GPU step launch-bound, counted where it can be counted without a GPU:", "",
                demote(dispatch), ""]
    return out
