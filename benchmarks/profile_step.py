"""Where an F0 training step spends its time: torch.profiler operator totals of this project's
NFNet and of timm's port, grouped by kind, to show what bounds the speed ratio.

    python benchmarks/profile_step.py                    # CPU, fp32, eager, NCHW, batch 8

A script, never a test. Writes benchmarks/results/profile_step.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from train_step import make_step  # noqa: E402

RESULT = common.RESULTS / "profile_step"
# Operator name -> kind; anything else is "other elementwise / glue".
KINDS = {
    "convolution (forward)": ("aten::mkldnn_convolution", "aten::cudnn_convolution",
                              "aten::_convolution_mode"),
    "convolution (backward)": ("aten::convolution_backward",),
    "weight-standardization statistics": ("aten::var_mean", "aten::native_batch_norm",
                                          "aten::native_batch_norm_backward", "aten::bmm"),
    "activations": ("aten::gelu", "aten::gelu_backward"),
    "linear layers": ("aten::mm", "aten::addmm"),
}


def kind_of(name: str) -> str:
    for kind, names in KINDS.items():
        if name in names:
            return kind
    return "other (elementwise, reductions, optimizer, glue)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="nfnet_f0")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--precision", default="fp32", choices=common.DTYPES)
    ap.add_argument("--layout", default="nchw", choices=("nchw", "cl"))
    ap.add_argument("--steps", type=int, default=2, help="profiled steps per model")
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args()
    device = common.setup_device(args.device)
    from nfnet.models import get_variant

    size = get_variant(args.model).train_size
    info = common.machine_info(device)
    steps = {}
    for impl in ("nfnet", "timm"):
        torch.manual_seed(0)
        model = common.build_model(impl, args.model, device, args.layout == "cl")
        steps[impl] = make_step(model, args.batch, size, args.precision, args.layout, device)
        steps[impl]()  # warm-up
    totals = {}
    for impl, step in steps.items():
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                               if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            common.sync(device)
        kinds: dict[str, float] = {}
        for event in prof.key_averages():
            us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
            kinds[kind_of(event.key)] = kinds.get(kind_of(event.key), 0.0) + us / 1e6 / args.steps
        totals[impl] = kinds
    info["load_avg_end"] = common.os.getloadavg()[0]
    result = {"benchmark": "profile_step", "info": info, "model": args.model, "size": size,
              "batch": args.batch, "precision": args.precision, "layout": args.layout,
              "steps": args.steps, "seconds_by_kind": totals}
    common.save_result(args.out, result, render)


def render(result: dict) -> str:
    totals = result["seconds_by_kind"]
    kinds = list(KINDS) + ["other (elementwise, reductions, optimizer, glue)"]
    sums = {impl: sum(v.values()) for impl, v in totals.items()}
    rows = []
    for kind in kinds + ["total"]:
        cells = [kind]
        for impl in ("nfnet", "timm"):
            sec = sums[impl] if kind == "total" else totals[impl].get(kind, 0.0)
            cells.append(f"{sec:.3f} s ({100 * sec / sums[impl]:.0f}%)")
        rows.append(cells)
    info = result["info"]
    head = (f"Profile (torch.profiler self time per step, averaged over {result['steps']} steps)"
            f" of {result['model']} training at {result['size']} px, batch {result['batch']}, "
            f"{result['precision']}, eager, {result['layout']}, {info['device']}; "
            f"{info['date']}; load average {info['load_avg_start']:.1f} -> "
            f"{info['load_avg_end']:.1f}. Profiled steps run one model after the other, so "
            "compare shares within a column more than seconds across columns.")
    return head + "\n\n" + common.markdown_table(["kind", "nfnet", "timm"], rows)


if __name__ == "__main__":
    main()
