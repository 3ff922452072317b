"""Activation memory and step time of a training step with activation checkpointing off, per
stage and per block (`create_model(..., grad_checkpointing=...)`), and the largest F7 batch at
416 px that one H200 would fit, computed from the measured per-image activation memory.

    python benchmarks/memory.py                          # CPU: nfnet_f3, 320 px, batches 2 and 4
    python benchmarks/memory.py --device cuda --precision bf16 --batches 16 32
    python benchmarks/memory.py --device cuda --precision bf16 --model nfnet_f7 --size 416 --batches 8 16

A step is forward (bf16 autocast with --precision bf16), cross-entropy with label smoothing,
backward, SGD (Nesterov momentum 0.9, weight decay 2e-5, the per-parameter loop rather than
foreach, whose full-size temporaries would otherwise set the peak), with the training recipe's
stochastic depth (0.25) and the variant's dropout.

Activation memory is the peak of one step above what the model and optimizer hold between
steps (weights, gradients, momentum: the gradients are kept, zeroed, so they count there): on
CPU the process's peak RSS above its RSS before the step (glibc told to return every freed
block above 64 KiB, so RSS follows live memory), on CUDA torch.cuda.max_memory_allocated above
memory_allocated. Each (mode, batch) is measured in a fresh process. Two batches give the
per-image slope and the batch-independent part (the standardised weights every conv keeps
for backward, for one). Step times come from one model switched between the modes in
interleaved rounds (benchmarks/common.py), on one CPU thread unless --threads says otherwise.

A script, never a test. Writes benchmarks/results/memory.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RESULT = common.RESULTS / "memory"
MODES = ("off", "stage", "block")
LABEL_SMOOTHING, LR, MOMENTUM, WEIGHT_DECAY = common.LABEL_SMOOTHING, common.LR, common.MOMENTUM, common.WEIGHT_DECAY
# The goal for per-block checkpointing, against no checkpointing.
GOAL_MEMORY, GOAL_TIME = 0.4, 1.35
# glibc: serve every allocation above 64 KiB by mmap and unmap it when freed, so that the peak
# RSS of a step measures what the step allocated (set for the probe processes).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}

# The computed F7 estimate (issue 20.2): F7 at its 416 px on one H200.
TARGET_MODEL, TARGET_SIZE = "nfnet_f7", 416
# torch reports about 139 GiB on an H200 (141 GB nominal); 10% of it is left for the CUDA
# context, cuDNN workspaces and allocator fragmentation.
H200_USABLE_BYTES = 0.9 * 139 * 2**30
# Per parameter, in float32: weights, gradients, SGD momentum, EMA weights.
STATE_BYTES_PER_PARAM = 4 * 4
# Assumption: under bf16 autocast the tensors kept for backward are bf16, half the fp32 bytes.
BF16_ACTIVATION_FACTOR = 0.5


def build(args, device: torch.device, mode: str, batch: int):
    """The model (checkpointing `mode`), and a training step on a fixed random batch."""
    from nfnet.models import create_model

    torch.manual_seed(0)
    model = create_model(args.model, stochdepth_rate=common.STOCHDEPTH_RATE,
                         grad_checkpointing=False if mode == "off" else mode).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True,
                                weight_decay=WEIGHT_DECAY, foreach=False)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, args.size, args.size, generator=gen).to(device)
    labels = torch.randint(0, model.num_classes, (batch,), generator=gen).to(device)
    dtype = common.DTYPES[args.precision]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(images)
        F.cross_entropy(logits.float(), labels, label_smoothing=LABEL_SMOOTHING).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    return model, step


def memory_probe(args, device: torch.device) -> None:
    """In a fresh process: warm up (gradients and momentum now exist), then the activation
    peak of one step above what is held between steps."""
    mode, batch = args.memory_probe[0], int(args.memory_probe[1])
    before_model = common.rss_bytes()
    model, step = build(args, device, mode, batch)
    for _ in range(args.warmup):
        step()
    common.sync(device)
    if device.type == "cuda":
        held = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        activation = torch.cuda.max_memory_allocated(device) - held
    else:
        held = common.rss_bytes()
        common.reset_peak_rss()
        step()
        activation = common.vm_hwm_bytes() - held
        held -= before_model
    params = sum(p.numel() for p in model.parameters())
    print(common.json.dumps({"activation_bytes": activation, "held_bytes": held,
                             "params": params}))


def measure_memory(args) -> dict[str, dict[int, dict]]:
    os.environ.update(MALLOC_ENV)
    found: dict[str, dict[int, dict]] = {}
    for mode in args.modes:
        for batch in args.batches:
            print(f"memory {mode} batch {batch}", flush=True)
            found.setdefault(mode, {})[batch] = common.measure_in_subprocess(
                Path(__file__), ["--memory-probe", mode, str(batch), "--device", args.device,
                                 "--model", args.model, "--size", str(args.size),
                                 "--precision", args.precision, "--warmup", str(args.warmup)]
                + (["--threads", str(args.threads)] if args.threads else []), timeout=3600)
    return found


def measure_time(args, device: torch.device) -> tuple[dict, dict]:
    """Interleaved rounds of one model, its checkpointing switched before each step."""
    model, step = build(args, device, "off", min(args.batches))

    def in_mode(mode: str):
        def run() -> None:
            model.set_grad_checkpointing(False if mode == "off" else mode)
            step()
        return run

    return common.interleaved({mode: in_mode(mode) for mode in args.modes}, args.rounds,
                              args.warmup, device)


def f7_estimate(args, rows: list[dict], params: int) -> dict:
    """Computed, not measured: the largest F7 batch at 416 px on one H200 per mode."""
    from nfnet.models import create_model, get_variant

    measured, target = get_variant(args.model), get_variant(TARGET_MODEL)
    with torch.device("meta"):
        target_params = sum(p.numel() for p in create_model(TARGET_MODEL).parameters())
    # F3 to F7: every stage twice as deep at the same widths (NFNET_SPEC.md §1.10), so blocks
    # hold depth-ratio times the activations at equal size; the stem does not deepen, so
    # scaling all of it overestimates slightly. Activations scale with the image area.
    depth = sum(target.depths) / sum(measured.depths)
    area = (TARGET_SIZE / args.size) ** 2
    precision = BF16_ACTIVATION_FACTOR if args.precision == "fp32" else 1.0
    scale = depth * area * precision
    state = STATE_BYTES_PER_PARAM * target_params
    out = {"depth_factor": depth, "area_factor": area, "precision_factor": precision,
           "target_params": target_params, "state_bytes": state,
           "usable_bytes": H200_USABLE_BYTES, "modes": {}}
    for row in rows:
        per_image = row["per_image_bytes"] * scale
        # The batch-independent part (standardised weights kept for backward) grows with the
        # parameter count; a negative fit from noise counts as nothing.
        fixed = max(row["fixed_bytes"], 0) * target_params / params
        batch = math.floor((H200_USABLE_BYTES - state - fixed) / per_image)
        out["modes"][row["mode"]] = {"per_image_bytes": per_image, "fixed_bytes": fixed,
                                     "max_batch": batch}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="nfnet_f3")
    ap.add_argument("--size", type=int, default=None, help="default: the variant's train size")
    ap.add_argument("--batches", type=int, nargs=2, default=None,
                    help="two batch sizes (default: 2 4 on CPU, 16 32 on CUDA)")
    ap.add_argument("--precision", choices=common.DTYPES, default=None,
                    help="default: fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--memory-probe", nargs=2, metavar=("MODE", "BATCH"), help=argparse.SUPPRESS)
    common.add_run_arguments(ap, rounds=5, out=RESULT)
    # One CPU thread: its CPU time barely moves with the load of other processes on a shared
    # machine, while two threads' spin-waits for each other inflate theirs by up to 2x.
    ap.set_defaults(threads=1)
    args = ap.parse_args()
    device = common.setup_device(args.device, args.threads)
    from nfnet.models import get_variant

    on_cuda = device.type == "cuda"
    args.size = args.size or get_variant(args.model).train_size
    args.batches = sorted(args.batches or ([16, 32] if on_cuda else [2, 4]))
    args.precision = args.precision or ("bf16" if on_cuda else "fp32")
    if args.memory_probe:
        return memory_probe(args, device)

    info = common.machine_info(device)
    memory = measure_memory(args)
    print(f"timing {', '.join(args.modes)} at batch {min(args.batches)}", flush=True)
    wall, cpu = measure_time(args, device)
    info["load_avg_end"] = os.getloadavg()[0]
    small, large = args.batches
    rows = []
    for mode in args.modes:
        a_small, a_large = (memory[mode][b]["activation_bytes"] for b in args.batches)
        per_image = (a_large - a_small) / (large - small)
        rows.append({
            # keyed by str(batch), as the JSON file has it
            "mode": mode, "activation_bytes": {str(b): memory[mode][b]["activation_bytes"]
                                               for b in args.batches},
            "held_bytes": memory[mode][large]["held_bytes"],
            "per_image_bytes": per_image, "fixed_bytes": a_small - per_image * small,
            "median_s": common.median(wall[mode]), "cpu_median_s": common.median(cpu[mode]),
            "times_s": wall[mode], "cpu_times_s": cpu[mode],
        })
    params = memory[args.modes[0]][large]["params"]
    result = {
        "benchmark": "memory", "info": info, "model": args.model, "size": args.size,
        "batches": args.batches, "precision": args.precision, "rounds": args.rounds,
        "warmup": args.warmup, "params": params, "rows": rows,
        "f7_estimate": f7_estimate(args, rows, params),
    }
    common.save_result(args.out, result, render)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def _ratio(value: float, reference: float | None) -> str:
    return "n/m" if reference is None else f"{value / reference:.2f}x"


def render(result: dict) -> str:
    info, small, large = result["info"], *result["batches"]
    rows = {r["mode"]: r for r in result["rows"]}
    off = rows.get("off")
    table = []
    for mode, r in rows.items():
        act = r["activation_bytes"]
        table.append([
            mode, _mib(act[str(small)]), _mib(act[str(large)]),
            f"**{_ratio(act[str(large)], off and off['activation_bytes'][str(large)])}**",
            _mib(r["per_image_bytes"]),
            _ratio(r["per_image_bytes"], off and off["per_image_bytes"]),
            _mib(r["held_bytes"]), f"{r['median_s']:.2f} s / {r['cpu_median_s']:.2f} s",
            f"**{_ratio(r['median_s'], off and off['median_s'])}** / "
            f"{_ratio(r['cpu_median_s'], off and off['cpu_median_s'])}",
        ])
    device = info["cpu"] if info["device"] == "cpu" else info.get("gpu")
    head = (f"Activation checkpointing, {result['model']} at {result['size']} px, "
            f"{result['precision']}, {info['device']} ({device}, {info['threads']} "
            f"thread{'' if info['threads'] == 1 else 's'}); "
            f"{info['date']}; load average {info['load_avg_start']:.1f} -> "
            f"{info['load_avg_end']:.1f}. Activation memory: the step's peak above weights, "
            f"gradients and momentum (held between steps), one fresh process per cell. Step "
            f"time (forward, backward, SGD) at batch {small}: median of {result['rounds']} "
            f"interleaved rounds after {result['warmup']} warm-up, wall clock / CPU time.")
    text = head + "\n\n" + common.markdown_table(
        ["checkpointing", f"activations, batch {small}", f"activations, batch {large}",
         f"vs off, batch {large}", "per image (slope)", "per image vs off",
         "held (weights, grads, momentum)", "step time", "time vs off"], table)
    if off and "block" in rows:
        b = rows["block"]
        mem = b["per_image_bytes"] / off["per_image_bytes"]
        wall, cpu = b["median_s"] / off["median_s"], b["cpu_median_s"] / off["cpu_median_s"]
        # On a CPU shared with other processes the CPU time is the steadier figure (common.py).
        time = cpu if info["device"] == "cpu" else wall
        met = "met" if mem <= GOAL_MEMORY and time <= GOAL_TIME else "not met"
        text += (f"\n\nGoal for per-block checkpointing (activation memory <= {GOAL_MEMORY}x, "
                 f"step time <= {GOAL_TIME}x of no checkpointing): per-image memory {mem:.2f}x, "
                 f"step time {wall:.2f}x (wall) / {cpu:.2f}x (CPU time): **{met}**"
                 + (" (by CPU time)." if info["device"] == "cpu" else "."))
    est = result["f7_estimate"]
    est_rows = [[mode, _gib(e["per_image_bytes"]), _gib(e["fixed_bytes"]), str(e["max_batch"])]
                for mode, e in est["modes"].items()]
    text += (
        f"\n\n**Computed, not measured on a GPU:** the largest {TARGET_MODEL} batch at "
        f"{TARGET_SIZE} px on one H200 ({_gib(est['usable_bytes'])} usable: 90% of the 139 GiB "
        f"torch reports). Per-image activations = the measured slope x {est['depth_factor']:.2f} "
        f"({TARGET_MODEL}'s blocks / {result['model']}'s: F7's stages are twice F3's, same "
        f"widths; the stem does not deepen, so this overestimates a little) x "
        f"{est['area_factor']:.3f} (({TARGET_SIZE}/{result['size']})^2) x "
        f"{est['precision_factor']:g} (assumed: bf16 autocast keeps half the fp32 bytes for "
        f"backward). Held: {est['target_params'] / 1e6:.1f}M parameters x 16 B (fp32 weights, "
        f"gradients, momentum, EMA) = {_gib(est['state_bytes'])}, plus the measured "
        f"batch-independent activations scaled by the parameter count.\n\n"
        + common.markdown_table(["checkpointing", "per image (F7, 416 px, bf16)",
                                 "batch-independent", "largest batch (computed)"], est_rows))
    return text


if __name__ == "__main__":
    main()
