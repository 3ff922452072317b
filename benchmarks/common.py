"""Shared by the model benchmarks (train_step.py, eval_step.py, vs_efficientnet.py, ablation.py,
suite.py): their common options, machine description, interleaved timing, peak memory and the
measured matmul peak.

Timing rule of every benchmark here: the compared models run in interleaved rounds (one step of
each per round), so load from other processes on a shared machine hits them alike, and each
figure is the median over the rounds after warm-up. Ratios of medians from the same rounds are
the result; absolute times only give the scale.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

# The training step every model benchmark times: SGD as the official recipe (NFNET_SPEC.md §4),
# with a small learning rate so that random data cannot drive the weights anywhere unusual,
# and the official label smoothing on float32 logits.
LABEL_SMOOTHING = 0.1
LR, MOMENTUM, WEIGHT_DECAY = 1e-3, 0.9, 2e-5

# The CPU machine has 2 cores; benchmarks pin the thread count so runs compare.
CPU_THREADS = 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_run_arguments(parser, *, rounds: int, out: Path) -> None:
    """The options every model benchmark takes: where it runs, how many interleaved rounds it
    times, and where its results go."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=rounds, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (compilation included)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(out))


def setup_device(device: str, threads: int | None = None) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cpu":
        torch.set_num_threads(threads or CPU_THREADS)
    elif dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
        # TF32 would make "fp32" a different precision on GPU; keep fp32 honest.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    return dev


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The SIMD level oneDNN can use: decides whether bf16 has hardware support on CPU."""
    flags = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    found = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return ", ".join(found) or "none of avx2/avx512/amx"


def machine_info(device: torch.device) -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("torchvision", "timm", "lightning"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_isa": cpu_isa(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "versions": versions,
        "load_avg_start": os.getloadavg()[0],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# Seconds spent in the last `interleaved` call's warm-up rounds, per name (compilation included).
LAST_WARMUP: dict[str, float] = {}


def interleaved(steps: dict[str, Callable[[], None]], rounds: int, warmup: int,
                device: torch.device, log: Callable[[str], None] = print
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds per call of every callable: `warmup` untimed rounds, then `rounds` timed rounds,
    each round calling every callable once, in rotating order.

    Returns (wall, cpu): wall-clock seconds, and the process's CPU seconds (all its threads)
    over the same calls. On a CPU shared with other processes the wall clock also counts the
    time this process waited for a core; its CPU time does not, so the CPU-time ratio is the
    steadier estimate of the work each model needs, the wall-clock ratio the one a user sees.
    """
    names = list(steps)
    LAST_WARMUP.clear()
    for r in range(warmup):
        for name in names:
            t0 = time.perf_counter()
            steps[name]()
            sync(device)
            LAST_WARMUP[name] = LAST_WARMUP.get(name, 0.0) + time.perf_counter() - t0
            log(f"  warm-up {r + 1}/{warmup} {name}: {time.perf_counter() - t0:.2f} s")
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            sync(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        log(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {wall[n][-1]:.2f}s (cpu {cpu[n][-1]:.2f}s)" for n in names))
    return wall, cpu


def median(values: list[float]) -> float:
    return statistics.median(values)


def rss_bytes() -> int:
    """Resident set size now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_in_subprocess(script: Path, args: list[str], timeout: float = 900) -> dict:
    """Runs `script args --memory-probe` in a fresh process and returns the JSON it prints on
    its last line. A fresh process per measurement, because a CPU process's peak RSS only rises
    and the allocator keeps freed memory: two models in one process would share one peak."""
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, max_size: int | None = None,
                      rounds: int = 5, budget_s: float = 1.0) -> float:
    """Measured FLOP/s of a square matmul in `dtype` on `device`: the ceiling that model FLOP
    utilization is reported against (the best of `rounds`, since load only slows it down).
    The size doubles from 512 up to `max_size` while one product takes under `budget_s`:
    a CPU without hardware bf16 multiplies bf16 a hundred times slower than fp32."""
    max_size = max_size or (8192 if device.type == "cuda" else 2048)
    reps = 20 if device.type == "cuda" else 1
    size, best = 256, 0.0
    while size < max_size and best < budget_s:
        size *= 2
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        torch.mm(a, b)
        sync(device)
        best = float("inf")
        for _ in range(rounds if size >= max_size else 1):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            sync(device)
            best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * size ** 3 / best


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def save_result(out: str | Path, result: dict, render) -> None:
    """`<out>.json` (the raw numbers) and `<out>.md` (the rendered table), and the table on stdout."""
    out = Path(out)
    write_json(out.with_suffix(".json"), result)
    table = render(result)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- models
# This project's variant -> timm's port of the same DeepMind model (NFNET_SPEC.md §5).
TIMM_NAMES = {f"nfnet_f{i}": f"dm_nfnet_f{i}" for i in range(7)}
# The training config's stochastic-depth rate (nfnet.app.schema.ModelConfig, NFNET_SPEC.md §1.5),
# given to both models so that they train alike.
STOCHDEPTH_RATE = 0.25


def build_model(impl: str, variant: str, device: torch.device, channels_last: bool,
                num_classes: int = 1000) -> torch.nn.Module:
    """impl 'nfnet' (this project, official numerics), 'nfnet_erf' (this project with timm's
    numerics: exact erf GELU, timm's WS eps) or 'timm' (timm's dm_nfnet_* port), freshly
    initialised, with the same dropout and stochastic-depth rate.

    The official GELU is the tanh approximation, which PyTorch's CPU kernel computes about 2x
    slower than the erf GELU timm uses; 'nfnet_erf' compares the implementations at equal
    numerics."""
    from nfnet.models import create_model, get_variant
    from nfnet.models.pretrained import TIMM_NUMERICS

    drop_rate = get_variant(variant).drop_rate
    if impl in ("nfnet", "nfnet_erf"):
        numerics = TIMM_NUMERICS if impl == "nfnet_erf" else {}
        model = create_model(variant, num_classes, stochdepth_rate=STOCHDEPTH_RATE, **numerics)
    elif impl == "timm":
        import timm

        if variant not in TIMM_NAMES:
            raise SystemExit(f"timm has no dm_nfnet port of {variant}")
        model = timm.create_model(TIMM_NAMES[variant], num_classes=num_classes,
                                  drop_rate=drop_rate, drop_path_rate=STOCHDEPTH_RATE)
    else:
        raise ValueError(impl)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def model_macs(variant: str, image_size: int) -> int:
    """MACs of one forward pass of one image (the official count; timm's port is the same
    network, so the same count serves both)."""
    from nfnet.models import count_flops, create_model

    with torch.device("meta"):
        model = create_model(variant)
    return count_flops(model, image_size)


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return peak_rss_bytes()
