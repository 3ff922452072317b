"""Images per second of the real training loop: `train.py`'s fit (Lightning, the official data
pipeline from JPEG files on disk, AGC, EMA, the non-finite guard; checkpoints, validation and
loggers off), against this project's raw training step and timm's in the same run, with MFU.

    python benchmarks/fit_throughput.py                                   # CPU: F0, 192 px, batch 8, a few steps
    python benchmarks/fit_throughput.py --device cuda --batch 128 --precision bf16 --layout cl \
        --compile reduce-overhead --workers 14 --decode gpu                 # an H200 (benchmarks/gpu_plan.sh)

The fit reads generated 500x375 photo-like JPEGs (as benchmarks/data.py makes them) from a
class-per-folder tree in a temporary directory, with `augment=official` (2 raw images per
example) and `data.decode` cpu (workers decode and augment) or gpu (workers read bytes; the
device decodes with nvjpeg and augments, nfnet.data.device_pipeline). Its rate is measured over
`--steps` optimizer steps after `--warmup` steps (compilation, worker start-up), from the first
timed batch's start to the last one's end, with the device synchronised at both ends.

The raw steps are forward + loss + backward + SGD on one fixed batch already on the device
(benchmarks/train_step.py `make_step`), this project's network and timm's `dm_nfnet_*` in
interleaved rounds, both in the same precision, layout and compile mode as the fit: the ceiling
the loop would reach if data, AGC, EMA and Lightning cost nothing. MFU counts the official
multiply-accumulates (x2 FLOPs, x3 for forward + backward) against the measured matmul peak.

A script, never a test. Writes benchmarks/results/fit_throughput[_<device>].{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from data import make_jpegs  # noqa: E402
from train_step import make_step  # noqa: E402

CLASSES = 10


class StepTimer(pl.Callback):
    """Wall time of optimizer steps [warmup, warmup + steps), device synchronised at both ends.
    The run builds it from the config; the last one built is `StepTimer.last`."""

    last: "StepTimer | None" = None

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.start = self.end = None
        StepTimer.last = self

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            common.sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup + self.steps and self.end is None:
            common.sync(pl_module.device)
            self.end = time.perf_counter()


def jpeg_tree(folder: Path, images: int) -> Path:
    """`images` photo-like JPEGs in CLASSES class folders (a few more than the run reads)."""
    (folder / "flat").mkdir()
    flat = make_jpegs(folder / "flat", images)
    root = folder / "tree"
    for i, path in enumerate(flat):
        target = root / f"class{i % CLASSES}" / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    return root


def fit_rate(args, root: Path) -> tuple[float, float]:
    """(examples/s of the fit, seconds of its warm-up steps)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from nfnet.app import tasks
    from nfnet.app.schema import register

    register()
    trainer = "gpu" if args.device.startswith("cuda") else "cpu"
    overrides = [
        f"model={args.model}", "augment=official", "data=imagefolder", f"data.root={root}", "data.val_fraction=0.1",
        f"data.batch_size={args.batch}", f"data.num_workers={args.workers}", f"data.decode={args.decode}",
        f"model.train_size={args.size}", f"model.channels_last={args.layout == 'cl'}",
        f"model.compile={args.compile}", f"trainer={trainer}", "trainer.max_epochs=1000",
        f"+trainer.max_steps={args.warmup + args.steps}", "trainer.limit_val_batches=0", "test=false",
        "callbacks=none", "logger=none", "print_config=false",
        f"trainer.precision={'bf16-mixed' if args.precision == 'bf16' else '32-true'}",
    ]
    with initialize_config_dir(config_dir=str(common.ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with tempfile.TemporaryDirectory() as out, open_dict(cfg):
        cfg.paths.output_dir = cfg.paths.log_dir = cfg.hydra.runtime.output_dir = out
        cfg.paths.data_dir = out
        cfg.callbacks = {"timer": {"_target_": "fit_throughput.StepTimer", "warmup": args.warmup, "steps": args.steps}}
        HydraConfig().set_config(cfg)
        t0 = time.perf_counter()
        tasks.train(cfg)
    import fit_throughput  # the module the config's `_target_` named (this file, imported by name)

    clock = fit_throughput.StepTimer.last
    return args.steps * args.batch / (clock.end - clock.start), clock.start - t0


def raw_rates(args, device: torch.device) -> dict[str, float]:
    steps = {}
    for impl in ("nfnet", "timm"):
        torch.manual_seed(0)
        model = common.build_model(impl, args.model, device, args.layout == "cl", num_classes=CLASSES)
        if args.compile not in ("false", "False"):
            model.compile(mode=None if args.compile in ("true", "default") else args.compile)
        steps[impl] = make_step(model, args.batch, args.size, args.precision, args.layout, device, CLASSES)
    wall, _ = common.interleaved(steps, args.rounds, args.raw_warmup, device)
    return {impl: args.batch / common.median(times) for impl, times in wall.items()}


def render(result: dict) -> str:
    s = result["settings"]
    raw = result["raw"]
    rows = [[name, f"{rate:.1f}", f"{result['mfu'][name]:.1%}",
             f"{rate / raw['nfnet']:.2f}x" if raw else "-", f"{rate / raw['timm']:.2f}x" if raw else "-"]
            for name, rate in result["rates"].items()]
    return "\n".join([
        f"# Fit throughput: {s['model']} at {s['size']} px, batch {s['batch']}, {s['precision']}, {s['layout']}, "
        f"compile={s['compile']}, data.decode={s['decode']}, {s['workers']} workers, {result['machine']['device']}",
        "",
        f"Measured {result['machine']['date']} ({common.cpu_model()}); the fit over {s['steps']} steps after "
        f"{s['warmup']} ({result['fit_warmup_s']:.0f} s incl. start-up); raw steps: median of {s['rounds']} "
        f"interleaved rounds. MFU against a measured {s['precision']} matmul peak of "
        f"{result['peak_flops'] / 1e12:.1f} TFLOP/s.",
        "",
        common.markdown_table(["loop", "img/s", "MFU", "vs our raw step", "vs timm's raw step"], rows),
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="nfnet_f0")
    ap.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 128 on CUDA")
    ap.add_argument("--size", type=int, default=None, help="default: the variant's train size")
    ap.add_argument("--precision", default="fp32", choices=common.DTYPES)
    ap.add_argument("--layout", default="nchw", choices=("nchw", "cl"))
    ap.add_argument("--compile", default="false", help="false, default, reduce-overhead, max-autotune")
    ap.add_argument("--decode", default="cpu", choices=("cpu", "gpu"))
    ap.add_argument("--workers", type=int, default=None, help="default: 2 on CPU, 14 on CUDA")
    ap.add_argument("--steps", type=int, default=None, help="timed fit steps (default: 4 on CPU, 60 on CUDA)")
    ap.add_argument("--warmup-steps", dest="warmup", type=int, default=None, help="default: 2 on CPU, 15 on CUDA")
    ap.add_argument("--raw-warmup", type=int, default=1)
    ap.add_argument("--no-raw", action="store_true",
                    help="only the fit (the raw steps come from benchmarks/train_step.py's run, as in gpu_plan.sh)")
    common.add_run_arguments(ap, rounds=3, out=common.RESULTS / "fit_throughput")
    args = ap.parse_args()
    device = common.setup_device(args.device, args.threads)
    cuda = device.type == "cuda"
    from nfnet.models import get_variant

    args.size = args.size or get_variant(args.model).train_size
    args.batch = args.batch or (128 if cuda else 8)
    args.workers = args.workers if args.workers is not None else (14 if cuda else 2)
    args.steps = args.steps or (60 if cuda else 4)
    args.warmup = args.warmup if args.warmup is not None else (15 if cuda else 2)
    with tempfile.TemporaryDirectory() as tmp:
        # Every example reads 2 raw images; with the 10% held out for validation, 1.3x that.
        root = jpeg_tree(Path(tmp), int(2.6 * args.batch * (args.warmup + args.steps)) + CLASSES * 4)
        fit, fit_warmup = fit_rate(args, root)
    raw = {} if args.no_raw else raw_rates(args, device)
    peak = common.matmul_peak_flops(device, common.DTYPES[args.precision])
    flops_per_image = 3 * 2 * common.model_macs(args.model, args.size)
    rates = {"train.py fit (Lightning, data, AGC, EMA)": fit}
    if raw:
        rates.update({"our raw step": raw["nfnet"], "timm's raw step": raw["timm"]})
    result = {
        "machine": common.machine_info(device), "settings": vars(args), "rates": rates, "raw": raw,
        "fit_warmup_s": fit_warmup, "peak_flops": peak,
        "mfu": {name: rate * flops_per_image / peak for name, rate in rates.items()},
    }
    out = Path(f"{args.out}_cuda" if cuda and args.out == str(common.RESULTS / "fit_throughput") else args.out)
    common.save_result(out, result, render)


if __name__ == "__main__":
    main()
