"""Is bf16 faster than fp32 on this device? The matmul peak and one of F0's grouped 3x3 convs
(stage 1: 256 channels at 48x48 for 192 px input, groups of 128, batch 8) forward, in fp32 and
bf16, NCHW and channels_last.

    python benchmarks/bf16_ops.py

On a CPU without hardware bf16 (AVX512-BF16 or AMX), oneDNN emulates bf16; this measures by
how much, which decides whether bf16 autocast training can beat fp32 there at all.
A script, never a test. Writes benchmarks/results/bf16_ops.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RESULT = common.RESULTS / "bf16_ops"


def conv_seconds(dtype: torch.dtype, channels_last: bool, device: torch.device,
                 rounds: int = 3) -> float:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 256, 48, 48, generator=gen).to(device, dtype)
    w = torch.randn(256, 128, 3, 3, generator=gen).to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    F.conv2d(x, w, padding=1, groups=2)
    best = float("inf")
    for _ in range(rounds):
        common.sync(device)
        t0 = time.perf_counter()
        F.conv2d(x, w, padding=1, groups=2)
        common.sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args()
    device = common.setup_device(args.device)
    info = common.machine_info(device)
    peaks = {p: common.matmul_peak_flops(device, dt) for p, dt in common.DTYPES.items()}
    convs = {f"{p} {'channels_last' if cl else 'NCHW'}": conv_seconds(dt, cl, device)
             for p, dt in common.DTYPES.items() for cl in (False, True)}
    result = {"benchmark": "bf16_ops", "info": info, "matmul_peak_flops": peaks,
              "conv_s": convs}
    common.save_result(args.out, result, render)


def render(result: dict) -> str:
    peaks, convs = result["matmul_peak_flops"], result["conv_s"]
    rows = [[f"matmul peak {p}", f"{v / 1e9:.1f} GFLOP/s",
             f"{peaks['fp32'] / v:.1f}x"] for p, v in peaks.items()]
    rows += [[f"grouped 3x3 conv, {k}", f"{1000 * v:.0f} ms",
              f"{v / convs['fp32 NCHW']:.1f}x"] for k, v in convs.items()]
    info = result["info"]
    head = (f"bf16 against fp32 on {info['device']} ({info['cpu']}, ISA {info['cpu_isa']}, "
            f"{info['threads']} threads); best of a few calls; {info['date']}.")
    return head + "\n\n" + common.markdown_table(
        ["operation", "time or rate", "slowdown vs fp32 (NCHW)"], rows)


if __name__ == "__main__":
    main()
