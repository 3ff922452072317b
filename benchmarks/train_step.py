"""Training throughput and peak memory of this project's NFNet against timm's `dm_nfnet_*`,
measured in the same run with identical settings.

    python benchmarks/train_step.py                       # CPU: F0, 192 px, batch 8, all modes
    python benchmarks/train_step.py --exec eager           # skip torch.compile (minutes on CPU)
    python benchmarks/train_step.py --device cuda --batch 128 --precision bf16 --layout cl

A training step is: forward (under bf16 autocast in the bf16 modes), cross-entropy with label
smoothing on float32 logits, backward, SGD step (Nesterov momentum 0.9, weight decay 2e-5),
zero_grad. Both models train with the variant's dropout and stochastic-depth rate 0.25. AGC is
not part of the step (timm's models have none; benchmarks/agc.py times it).

Modes: precision {fp32, bf16 autocast} x execution {eager, torch.compile of the network} x
layout {NCHW, channels_last}. Within a mode the two models run in interleaved rounds together
with a fixed reference, timm in fp32 eager NCHW, so that every mode has a ratio to timm in the
same mode and one to timm's plain fp32 figure from the same rounds. Peak memory is measured in
a fresh process per model and mode (see `common.measure_in_subprocess`).

A script, never a test: wall-clock time on a shared machine is a measurement, not a pass/fail.
Writes benchmarks/results/train_step.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RESULT = common.RESULTS / "train_step"
IMPLS = ("nfnet", "nfnet_erf", "timm")
REFERENCE = ("timm", "fp32", "eager", "nchw")
LABEL_SMOOTHING, LR, MOMENTUM, WEIGHT_DECAY = common.LABEL_SMOOTHING, common.LR, common.MOMENTUM, common.WEIGHT_DECAY
# --exec name -> torch.compile mode (None: the default mode).
COMPILE_MODES = {"compile": None, "cudagraphs": "reduce-overhead"}


def make_step(model: torch.nn.Module, batch: int, size: int, precision: str,
              layout: str, device: torch.device, num_classes: int = 1000):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen).to(device)
    if layout == "cl":
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True,
                                weight_decay=WEIGHT_DECAY)
    dtype = common.DTYPES[precision]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=LABEL_SMOOTHING)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def build(impl: str, args, precision: str, execution: str, layout: str, device: torch.device):
    torch.manual_seed(0)
    model = common.build_model(impl, args.model, device, layout == "cl")
    if execution in COMPILE_MODES:
        # In place, as NFNetClassifier does: the state-dict keys keep their names.
        model.compile(mode=COMPILE_MODES[execution])
    return make_step(model, args.batch, args.size, precision, layout, device)


def memory_probe(args, device: torch.device) -> None:
    """In a fresh process: warm up (and compile), then report the peak memory of steady-state
    training steps. CPU: peak RSS during the steps minus the RSS before the model existed
    (weights, gradients, momentum, activations, workspaces, allocator slack). CUDA: peak of
    torch.cuda.max_memory_allocated during the steps (everything the model holds)."""
    impl, precision, execution, layout = args.memory_probe
    base = common.rss_bytes()
    step = build(impl, args, precision, execution, layout, device)
    for _ in range(args.warmup):
        step()
    common.sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    common.reset_peak_rss()
    for _ in range(2):
        step()
    common.sync(device)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else common.vm_hwm_bytes() - base)
    print(common.json.dumps({"peak_bytes": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="nfnet_f0")
    ap.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 128 on CUDA")
    ap.add_argument("--size", type=int, default=None, help="default: the variant's train size")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=common.DTYPES)
    ap.add_argument("--exec", dest="execution", nargs="+", default=["eager", "compile"],
                    choices=("eager", *COMPILE_MODES),
                    help="cudagraphs: torch.compile(mode='reduce-overhead'), CUDA graphs (model.compile=reduce-overhead)")
    ap.add_argument("--layout", nargs="+", default=["nchw", "cl"], choices=("nchw", "cl"))
    ap.add_argument("--impls", nargs="+", default=["nfnet", "timm"], choices=IMPLS,
                    help="nfnet_erf: this model with timm's numerics (erf GELU)")
    ap.add_argument("--no-ref", action="store_true",
                    help="leave timm fp32 eager NCHW out of the rounds (e.g. with --exec compile "
                         "only: an eager model between compiled ones can slow both on CPU)")
    ap.add_argument("--memory", choices=("none", "eager", "all"), default=None,
                    help="which modes get a peak-memory probe (default: eager on CPU, all on CUDA)")
    ap.add_argument("--memory-probe", nargs=4, metavar=("IMPL", "PREC", "EXEC", "LAYOUT"),
                    help=argparse.SUPPRESS)
    common.add_run_arguments(ap, rounds=5, out=RESULT)
    args = ap.parse_args()
    device = common.setup_device(args.device, args.threads)
    from nfnet.models import get_variant

    args.batch = args.batch or (128 if device.type == "cuda" else 8)
    args.size = args.size or get_variant(args.model).train_size
    if args.memory_probe:
        return memory_probe(args, device)
    memory = args.memory or ("all" if device.type == "cuda" else "eager")

    info = common.machine_info(device)
    macs = common.model_macs(args.model, args.size)
    # Training FLOPs per image: the usual 3x forward (backward costs twice the forward).
    train_flops = 3 * 2 * macs
    peaks = {p: common.matmul_peak_flops(device, common.DTYPES[p]) for p in args.precision}
    print(f"{args.model} {args.size}px batch {args.batch} on {device}; matmul peak "
          + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items()), flush=True)

    ref_step = None if args.no_ref else build(*REFERENCE[:1], args, *REFERENCE[1:], device)
    rows = []
    for precision, execution, layout in itertools.product(args.precision, args.execution,
                                                          args.layout):
        mode = (precision, execution, layout)
        print(f"mode {precision} {execution} {layout}", flush=True)
        steps = {impl: build(impl, args, *mode, device) for impl in args.impls}
        if ref_step is not None and (mode != REFERENCE[1:] or "timm" not in steps):
            steps["ref"] = ref_step
        wall, cpu = common.interleaved(steps, args.rounds, args.warmup, device)
        ref_key = "ref" if "ref" in wall else ("timm" if mode == REFERENCE[1:] else None)

        def ratio(times: dict, key: str | None, sec: float) -> float | None:
            return common.median(times[key]) / sec if key in times else None

        for impl in args.impls:
            sec, cpu_sec = common.median(wall[impl]), common.median(cpu[impl])
            ips = args.batch / sec
            rows.append({
                "impl": impl, "precision": precision, "exec": execution, "layout": layout,
                "median_s": sec, "cpu_median_s": cpu_sec, "times_s": wall[impl],
                "cpu_times_s": cpu[impl], "images_per_s": ips,
                "vs_timm_same_mode": ratio(wall, "timm", sec),
                "vs_timm_same_mode_cpu": ratio(cpu, "timm", cpu_sec),
                "vs_timm_fp32_eager_nchw": ratio(wall, ref_key, sec),
                "vs_timm_fp32_eager_nchw_cpu": ratio(cpu, ref_key, cpu_sec),
                "mfu": ips * train_flops / peaks[precision],
                "warmup_s": common.LAST_WARMUP.get(impl),
            })
        del steps
    if memory != "none":
        for row in rows:
            if (memory == "eager" and row["exec"] != "eager") or row["impl"] == "nfnet_erf":
                continue
            probe = [row["impl"], row["precision"], row["exec"], row["layout"]]
            print("memory", *probe, flush=True)
            out = common.measure_in_subprocess(
                Path(__file__), ["--memory-probe", *probe, "--device", args.device,
                                 "--model", args.model, "--batch", str(args.batch),
                                 "--size", str(args.size), "--warmup", str(args.warmup)]
                + (["--threads", str(args.threads)] if args.threads else []))
            row["peak_bytes"] = out["peak_bytes"]
    info["load_avg_end"] = common.os.getloadavg()[0]
    result = {
        "benchmark": "train_step", "info": info, "model": args.model, "size": args.size,
        "batch": args.batch, "rounds": args.rounds, "warmup": args.warmup, "macs": macs,
        "matmul_peak_flops": peaks, "rows": rows,
    }
    common.save_result(args.out, result, render)


def _x(value: float | None) -> str:
    return "n/m" if value is None else f"{value:.2f}x"


def render(result: dict) -> str:
    """One line per mode and implementation present in `result` (rows of several runs may be
    merged: the suite runs compiled modes separately)."""
    by = {(r["impl"], r["precision"], r["exec"], r["layout"]): r for r in result["rows"]}
    rows = []
    for (impl, precision, execution, layout), r in by.items():
        t = by.get(("timm", precision, execution, layout)) if impl != "timm" else None
        mem = "n/m"
        if "peak_bytes" in r:
            mem = f"{r['peak_bytes'] / 2**20:.0f} MiB"
            if t is not None and "peak_bytes" in t:
                mem += f" ({r['peak_bytes'] / t['peak_bytes']:.2f}x timm)"
        rows.append([
            impl, precision, execution, "channels_last" if layout == "cl" else "NCHW",
            f"{r['images_per_s']:.2f}",
            f"**{_x(r['vs_timm_same_mode'])}** / {_x(r['vs_timm_same_mode_cpu'])}"
            if impl != "timm" else "",
            f"{_x(r['vs_timm_fp32_eager_nchw'])} / {_x(r['vs_timm_fp32_eager_nchw_cpu'])}",
            f"{100 * r['mfu']:.1f}%", mem,
        ])
    info = result["info"]
    head = (f"Training step, {result['model']} at {result['size']} px, batch {result['batch']}, "
            f"{info['device']} ({info['cpu'] if info['device'] == 'cpu' else info.get('gpu')}, "
            f"{info['threads']} threads). Median of {result['rounds']} interleaved rounds after "
            f"{result['warmup']} warm-up; {info['date']}; load average {info['load_avg_start']:.1f}"
            f" -> {info['load_avg_end']:.1f}. Matmul peak: "
            + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in result["matmul_peak_flops"].items())
            + ". Ratios are speedups, wall clock / CPU time (see benchmarks/common.py).")
    table = common.markdown_table(
        ["model", "precision", "execution", "layout", "img/s", "vs timm, same mode",
         "vs timm fp32 eager NCHW", "MFU", "peak memory"], rows)
    return head + "\n\n" + table


if __name__ == "__main__":
    main()
