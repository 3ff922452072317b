"""What each of the model's speed measures is worth: an F0 training step with each one undone,
in the same interleaved rounds.

    python benchmarks/ablation.py                      # CPU, fp32, eager, NCHW, batch 8, 192 px

Variants (each is the shipped model with the named measures replaced by the straightforward
form, written here as the reference):
- shipped: `nfnet.models` as it is;
- autograd WS: weight standardization differentiated by autograd through its ops, instead of
  the hand-written closed-form backward (`layers._ScaledWeightStandardization`);
- unfused block: the block's tail written as the spec reads, `((2*se)*out)`, stochastic
  depth, `*skip_gain*alpha + shortcut`, and `act(x)*beta` as two multiplies, instead of one
  addcmul over the feature map with all per-(sample, channel) factors on the small gate;
- straightforward: both undone;
- timm: timm's dm_nfnet port, for scale.

A script, never a test. Writes benchmarks/results/ablation.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from train_step import make_step  # noqa: E402

RESULT = common.RESULTS / "ablation"


def autograd_ws(self) -> torch.Tensor:
    """§1.6 as plain tensor ops; autograd differentiates through them."""
    var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), correction=0, keepdim=True)
    if self.eps_mode == "max":
        denom = torch.clamp_min(var * self.fan_in, self.eps)
    else:
        denom = (var + self.eps) * self.fan_in
    scale = self.gain.view(-1, 1, 1, 1) * torch.rsqrt(denom)
    return self.weight * scale - mean * scale


def unfused_block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """NFNET_SPEC.md §1.3 line by line."""
    from nfnet.models.nfnet import SE_GAIN

    out = self.act(x) * self.beta
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(self.pool(out))
    out = self.conv0(out)
    out = self.conv1(self.act(out))
    out = self.conv1b(self.act(out))
    out = self.conv2(self.act(out))
    out = (SE_GAIN * self.se(out)) * out
    out = self.stochastic_depth(out)
    return out * self.skip_gain * self.alpha + shortcut


def patched(model: torch.nn.Module, ws: bool, block: bool) -> torch.nn.Module:
    from nfnet.models import NFBlock, WSConv2d

    for module in model.modules():
        if ws and isinstance(module, WSConv2d):
            module.standardized_weight = autograd_ws.__get__(module)
        if block and isinstance(module, NFBlock):
            module.forward = unfused_block_forward.__get__(module)
    return model


VARIANTS = {
    "shipped": ("nfnet", False, False),
    "autograd WS": ("nfnet", True, False),
    "unfused block": ("nfnet", False, True),
    "straightforward": ("nfnet", True, True),
    "timm": ("timm", False, False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="nfnet_f0")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--precision", default="fp32", choices=common.DTYPES)
    ap.add_argument("--layout", default="nchw", choices=("nchw", "cl"))
    common.add_run_arguments(ap, rounds=5, out=RESULT)
    args = ap.parse_args()
    device = common.setup_device(args.device, args.threads)
    from nfnet.models import get_variant

    batch = args.batch or (128 if device.type == "cuda" else 8)
    size = get_variant(args.model).train_size
    info = common.machine_info(device)
    steps = {}
    for name, (impl, ws, block) in VARIANTS.items():
        torch.manual_seed(0)
        model = patched(common.build_model(impl, args.model, device, args.layout == "cl"),
                        ws, block)
        steps[name] = make_step(model, batch, size, args.precision, args.layout, device)
    times, cpu = common.interleaved(steps, args.rounds, args.warmup, device)
    med = {k: common.median(v) for k, v in times.items()}
    cmed = {k: common.median(v) for k, v in cpu.items()}
    info["load_avg_end"] = common.os.getloadavg()[0]
    result = {"benchmark": "ablation", "info": info, "model": args.model, "size": size,
              "batch": batch, "precision": args.precision, "layout": args.layout,
              "rounds": args.rounds, "times_s": times, "median_s": med, "cpu_times_s": cpu, "cpu_median_s": cmed}
    common.save_result(args.out, result, render)


def render(result: dict) -> str:
    med, batch = result["median_s"], result["batch"]
    cmed = result["cpu_median_s"]
    rows = [[name, f"{med[name]:.2f}", f"{cmed[name]:.2f}", f"{batch / med[name]:.2f}",
             f"{med[name] / med['shipped']:.3f}x / {cmed[name] / cmed['shipped']:.3f}x",
             f"{med['timm'] / med[name]:.2f}x / {cmed['timm'] / cmed[name]:.2f}x"]
            for name in med]
    info = result["info"]
    head = (f"Ablation: {result['model']} training step at {result['size']} px, batch {batch}, "
            f"{result['precision']}, eager, {result['layout']}, {info['device']} "
            f"({info['threads']} threads); median of {result['rounds']} interleaved rounds; "
            f"{info['date']}; load average {info['load_avg_start']:.1f} -> "
            f"{info['load_avg_end']:.1f}.")
    table = common.markdown_table(
        ["variant", "wall s / step", "CPU s / step", "img/s", "time / shipped (wall / CPU)",
         "timm time / variant time (wall / CPU)"], rows)
    return head + "\n\n" + table


if __name__ == "__main__":
    main()
