"""Inference throughput of this project's NFNet with weight standardization folded into plain
convs, against the same model unfolded and against timm's `dm_nfnet_*`, in the same run.

    python benchmarks/eval_step.py                         # CPU: F0, 256 px, batch 8
    python benchmarks/eval_step.py --device cuda --batch 128 --precision bf16 --exec eager compile

An eval step is one forward pass under torch.inference_mode (bf16 autocast in the bf16 modes)
on the variant's test size. Folding (`nfnet.models.fold_weight_standardization`) computes each
standardized weight once, so the folded model runs plain convolutions; the unfolded one
re-standardizes every weight on every call, as in training. All three run in interleaved
rounds within each mode; figures are medians.

A script, never a test. Writes benchmarks/results/eval_step.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RESULT = common.RESULTS / "eval_step"
IMPLS = ("folded", "unfolded", "timm")
LABELS = {"folded": "nfnet, WS folded", "unfolded": "nfnet, WS per call", "timm": "timm"}


def build(impl: str, args, execution: str, layout: str, device: torch.device) -> torch.nn.Module:
    from nfnet.models import fold_weight_standardization

    torch.manual_seed(0)
    model = common.build_model("timm" if impl == "timm" else "nfnet", args.model, device,
                               layout == "cl").eval()
    if impl == "folded":
        model = fold_weight_standardization(model)
        if layout == "cl":
            model = model.to(memory_format=torch.channels_last)
    if execution == "compile":
        # A folded model's weights are constants: inductor's freezing may then fold and
        # prepack them (and fuse activations into the convs), which a model whose weights
        # are standardized on every call cannot offer.
        model.compile(options={"freezing": True} if impl == "folded" else None)
    return model


def make_step(model: torch.nn.Module, args, precision: str, layout: str, device: torch.device):
    images = torch.randn(args.batch, 3, args.size, args.size,
                         generator=torch.Generator().manual_seed(0)).to(device)
    if layout == "cl":
        images = images.contiguous(memory_format=torch.channels_last)
    dtype = common.DTYPES[precision]

    def step() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype,
                                                     enabled=dtype != torch.float32):
            model(images)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="nfnet_f0")
    ap.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 128 on CUDA")
    ap.add_argument("--size", type=int, default=None, help="default: the variant's test size")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=common.DTYPES)
    ap.add_argument("--exec", dest="execution", nargs="+", default=["eager"],
                    choices=("eager", "compile"))
    ap.add_argument("--layout", nargs="+", default=["nchw", "cl"], choices=("nchw", "cl"))
    common.add_run_arguments(ap, rounds=7, out=RESULT)
    args = ap.parse_args()
    device = common.setup_device(args.device, args.threads)
    from nfnet.models import get_variant

    args.batch = args.batch or (128 if device.type == "cuda" else 8)
    args.size = args.size or get_variant(args.model).test_size
    info = common.machine_info(device)
    flops = 2 * common.model_macs(args.model, args.size)
    peaks = {p: common.matmul_peak_flops(device, common.DTYPES[p]) for p in args.precision}

    rows = []
    for execution, layout in itertools.product(args.execution, args.layout):
        models = {impl: build(impl, args, execution, layout, device) for impl in IMPLS}
        for precision in args.precision:
            print(f"mode {precision} {execution} {layout}", flush=True)
            steps = {impl: make_step(m, args, precision, layout, device)
                     for impl, m in models.items()}
            wall, cpu = common.interleaved(steps, args.rounds, args.warmup, device)
            med = {impl: common.median(t) for impl, t in wall.items()}
            cmed = {impl: common.median(t) for impl, t in cpu.items()}
            for impl in IMPLS:
                ips = args.batch / med[impl]
                rows.append({
                    "impl": impl, "precision": precision, "exec": execution, "layout": layout,
                    "median_s": med[impl], "cpu_median_s": cmed[impl], "times_s": wall[impl],
                    "cpu_times_s": cpu[impl], "images_per_s": ips,
                    "vs_unfolded": med["unfolded"] / med[impl],
                    "vs_unfolded_cpu": cmed["unfolded"] / cmed[impl],
                    "vs_timm": med["timm"] / med[impl],
                    "vs_timm_cpu": cmed["timm"] / cmed[impl],
                    "mfu": ips * flops / peaks[precision],
                })
        del models
    info["load_avg_end"] = common.os.getloadavg()[0]
    result = {"benchmark": "eval_step", "info": info, "model": args.model, "size": args.size,
              "batch": args.batch, "rounds": args.rounds, "warmup": args.warmup,
              "macs": flops // 2, "matmul_peak_flops": peaks, "rows": rows}
    common.save_result(args.out, result, render)


def render(result: dict) -> str:
    by = {(r["impl"], r["precision"], r["exec"], r["layout"]): r for r in result["rows"]}
    rows = []
    for (impl, precision, execution, layout), r in by.items():
        if impl != "folded":
            continue
        u = by[("unfolded", precision, execution, layout)]
        t = by[("timm", precision, execution, layout)]
        rows.append([
            precision, execution, "channels_last" if layout == "cl" else "NCHW",
            f"{r['images_per_s']:.2f}", f"{u['images_per_s']:.2f}", f"{t['images_per_s']:.2f}",
            f"**{r['vs_unfolded']:.2f}x** / {r['vs_unfolded_cpu']:.2f}x",
            f"**{r['vs_timm']:.2f}x** / {r['vs_timm_cpu']:.2f}x",
            f"{u['vs_timm']:.2f}x / {u['vs_timm_cpu']:.2f}x",
            f"{100 * r['mfu']:.1f}% / {100 * t['mfu']:.1f}%",
        ])
    info = result["info"]
    head = (f"Eval step (forward, inference_mode), {result['model']} at {result['size']} px, "
            f"batch {result['batch']}, {info['device']} "
            f"({info['cpu'] if info['device'] == 'cpu' else info.get('gpu')}, {info['threads']} "
            f"threads). Median of {result['rounds']} interleaved rounds after {result['warmup']} "
            f"warm-up; {info['date']}; load average {info['load_avg_start']:.1f} -> "
            f"{info['load_avg_end']:.1f}. Ratios are speedups, wall clock / CPU time.")
    table = common.markdown_table(
        ["precision", "execution", "layout", "folded img/s", "unfolded img/s", "timm img/s",
         "folded / unfolded", "folded / timm", "unfolded / timm", "MFU folded / timm"], rows)
    return head + "\n\n" + table


if __name__ == "__main__":
    main()
