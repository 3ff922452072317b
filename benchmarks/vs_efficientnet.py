"""Training time per image of NFNet-F1 at 224 px against torchvision's EfficientNet-B7 at
600 px (random weights), same batch size, same run, interleaved.

    python benchmarks/vs_efficientnet.py                  # CPU, batch 2, fp32
    python benchmarks/vs_efficientnet.py --device cuda --batch 32 --precision bf16

The paper (Brock et al. 2021, Table/Fig. 1) reports NFNet-F1 training 8.7x faster than
EfficientNet-B7 on TPUv3 at comparable accuracy. A step here is forward, cross-entropy,
backward and an SGD step, at each model's own training resolution.

A script, never a test. Writes benchmarks/results/vs_efficientnet.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RESULT = common.RESULTS / "vs_efficientnet"
PAPER_SPEEDUP = 8.7  # NFNet paper: F1 vs EfficientNet-B7 training step time, TPUv3
NFNET, NFNET_SIZE = "nfnet_f1", 224
EFFNET_SIZE = 600


def effnet_b7_macs(size: int = EFFNET_SIZE) -> int:
    """Multiply-accumulates of one EfficientNet-B7 forward, counted by torch's FlopCounterMode
    on the meta device (37.75 G at 600 px, as torchvision's model card lists)."""
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = torchvision.models.efficientnet_b7(weights=None)
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, size, size))
    return counter.get_total_flops() // 2


def make_step(model, size, batch, precision, device, layout):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen).to(device)
    if layout == "cl":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    dtype = common.DTYPES[precision]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(images)
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=common.DTYPES)
    ap.add_argument("--layout", default="nchw", choices=("nchw", "cl"))
    common.add_run_arguments(ap, rounds=3, out=RESULT)
    args = ap.parse_args()
    device = common.setup_device(args.device, args.threads)
    import torchvision

    info = common.machine_info(device)
    torch.manual_seed(0)
    nfnet = common.build_model("nfnet", NFNET, device, False)
    effnet = torchvision.models.efficientnet_b7(weights=None).to(device)
    steps = {
        "nfnet_f1@224": make_step(nfnet, NFNET_SIZE, args.batch, args.precision, device,
                                  args.layout),
        "efficientnet_b7@600": make_step(effnet, EFFNET_SIZE, args.batch, args.precision,
                                         device, args.layout),
    }
    times, cpu = common.interleaved(steps, args.rounds, args.warmup, device)
    med = {k: common.median(v) for k, v in times.items()}
    cmed = {k: common.median(v) for k, v in cpu.items()}
    ratio = med["efficientnet_b7@600"] / med["nfnet_f1@224"]
    cpu_ratio = cmed["efficientnet_b7@600"] / cmed["nfnet_f1@224"]
    macs = {"nfnet_f1@224": common.model_macs(NFNET, NFNET_SIZE),
            "efficientnet_b7@600": effnet_b7_macs()}
    info["load_avg_end"] = common.os.getloadavg()[0]
    result = {"benchmark": "vs_efficientnet", "info": info, "batch": args.batch,
              "precision": args.precision, "layout": args.layout, "rounds": args.rounds,
              "times_s": times, "median_s": med, "cpu_times_s": cpu, "cpu_median_s": cmed, "macs": macs,
              "speedup": ratio, "speedup_cpu": cpu_ratio, "paper_speedup": PAPER_SPEEDUP}
    common.save_result(args.out, result, render)


def render(result: dict) -> str:
    med, batch, macs = result["median_s"], result["batch"], result["macs"]
    rows = [[name, f"{1000 * med[name] / batch:.0f}", f"{macs[name] / 1e9:.1f}",
             f"{3 * 2 * macs[name] * batch / med[name] / 1e9:.1f}"] for name in med]
    info = result["info"]
    head = (f"Training step per image, batch {batch}, {result['precision']}, {info['device']} "
            f"({info['cpu'] if info['device'] == 'cpu' else info.get('gpu')}, {info['threads']} "
            f"threads), median of {result['rounds']} interleaved rounds; {info['date']}.")
    table = common.markdown_table(
        ["model", "ms per image", "forward GMACs per image", "achieved GFLOP/s (3x fwd)"], rows)
    tail = (f"EfficientNet-B7 / NFNet-F1 time per image: **{result['speedup']:.2f}x** here "
            f"(CPU time: {result['speedup_cpu']:.2f}x); "
            f"the paper reports {result['paper_speedup']}x on TPUv3.")
    return head + "\n\n" + table + "\n\n" + tail


if __name__ == "__main__":
    main()
