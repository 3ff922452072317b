"""How many operators a training step dispatches: top-level aten ops per F0 step (forward with
the loss, backward, optimizer), this project's NFNet against timm's `dm_nfnet_*`.

    python benchmarks/dispatch.py                 # CPU, F0 at 192 px, batch 2, fp32, NCHW

On a GPU every dispatched op is at least one kernel launch plus the framework's CPU work
around it; a step that dispatches more ops than its kernels take to run is launch-bound
(issue 17: on an H200 our eager step spent 28 ms of CPU per step against timm's 18). The count
is a property of the code, not of the machine or the batch, so it is measured on CPU with a
small batch; it is exact and repeatable (no timing involved). Where this project's code has a
CPU form and a CUDA form (AGC's order, the EMA's weight list), `--forms cuda` (the default)
counts the CUDA forms, run on CPU: the launches a GPU step would make.

Counted: torch.profiler CPU events named `aten::*` whose parent event is not an `aten::` op
(what a user's code, autograd or an optimizer asks for, not the ops a composite op calls
internally), in the second step (the first one creates the momentum buffers). Each row is a
model and an optimizer, all with momentum 0.9, Nesterov, weight decay 2e-5:
- `torch SGD`: torch.optim.SGD as it chooses on CPU, a loop over the tensors (as
  benchmarks/train_step.py trains both models, and as issue 17 counted);
- `torch SGD foreach`: torch.optim.SGD(foreach=True), what it chooses on CUDA;
- `nfnet SGD`: this project's `nfnet.optim.SGD`, unguarded;
- `full step`: `nfnet.optim.StepGuard`: the device-side finiteness check, AGC, the guarded
  `nfnet.optim.SGD` step, the EMA update and the skip counters: everything NFNetClassifier
  is to run after backward (timm has no AGC and no EMA: this row is for scale);
- `today's full step`: what NFNetClassifier runs after backward at commit 638830f: the
  finiteness check read back to the host (`bool(...)`), AGC, torch.optim.SGD (foreach, as it
  runs on CUDA), the EMA lerp.

`--baseline` adds the rows of an earlier run's JSON (e.g. this script run in a checkout of
an older commit), marked "before".

A script, never a test. Writes benchmarks/results/dispatch.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RESULT = common.RESULTS / "dispatch"
PHASES = ("forward", "backward", "optimizer")
LABEL_SMOOTHING, LR, MOMENTUM, WEIGHT_DECAY = common.LABEL_SMOOTHING, common.LR, common.MOMENTUM, common.WEIGHT_DECAY
AGC_CLIPPING = 0.01
EMA_DECAY = 0.99999
TOP_OPS = 15
# The rows: (label, model implementation, optimizer setup).
CONFIGS = {
    "timm, torch SGD": ("timm", "torch"),
    "timm, torch SGD foreach": ("timm", "torch_foreach"),
    "nfnet, torch SGD": ("nfnet", "torch"),
    "nfnet, torch SGD foreach": ("nfnet", "torch_foreach"),
    "nfnet, nfnet SGD": ("nfnet", "nfnet"),
    "nfnet, today's full step": ("nfnet", "todays_full"),
    "nfnet, full step": ("nfnet", "full"),
}
REFERENCES = ("timm, torch SGD", "timm, torch SGD foreach")


def _optimizer_step(model: torch.nn.Module, kind: str):
    """The optimizer phase of one step, as a callable, for `kind` in CONFIGS."""
    from nfnet.optim.param_groups import optimizer_param_groups

    if kind == "todays_full":
        return _todays_full_step(model)
    if kind.startswith("torch"):
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True,
                                    weight_decay=WEIGHT_DECAY,
                                    foreach=True if kind == "torch_foreach" else None)
        return optimizer.step
    from nfnet.optim import SGD, StepGuard

    optimizer = SGD(optimizer_param_groups(model, WEIGHT_DECAY), lr=LR, momentum=MOMENTUM,
                    nesterov=True)
    if kind == "nfnet":
        return optimizer.step
    from nfnet.optim import AdaptiveGradClipper, ExponentialMovingAverage
    from nfnet.optim.param_groups import agc_named_parameters

    clipper = AdaptiveGradClipper(agc_named_parameters(model), AGC_CLIPPING)
    sources = list(model.parameters())
    ema = ExponentialMovingAverage([p.detach().clone() for p in sources], sources, EMA_DECAY)
    return StepGuard(optimizer, clipper, ema).step


def _todays_full_step(model: torch.nn.Module):
    """NFNetClassifier's on_before_optimizer_step, optimizer step and _update_ema at 638830f."""
    from nfnet.optim import AdaptiveGradClipper, ema_decay
    from nfnet.optim.param_groups import agc_named_parameters, optimizer_param_groups

    optimizer = torch.optim.SGD(optimizer_param_groups(model, WEIGHT_DECAY), lr=LR,
                                momentum=MOMENTUM, nesterov=True, foreach=True)
    clipper = AdaptiveGradClipper(agc_named_parameters(model), AGC_CLIPPING)
    params = list(model.parameters())
    averages = [p.detach().clone() for p in params]

    def step() -> None:
        grads = [p.grad for p in params]
        if bool(torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all()):
            clipper.clip_()
            optimizer.step()
            torch._foreach_lerp_(averages, [p.detach() for p in params], 1.0 - ema_decay(0, EMA_DECAY))

    return step


def make_step(impl: str, optimizer_kind: str, model_name: str, batch: int, size: int,
              device: torch.device):
    torch.manual_seed(0)
    model = common.build_model(impl, model_name, device, channels_last=False)
    model.train()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    optimizer_step = _optimizer_step(model, optimizer_kind)

    def step() -> None:
        with record_function("phase:forward"):
            loss = F.cross_entropy(model(images).float(), labels, label_smoothing=LABEL_SMOOTHING)
        with record_function("phase:backward"):
            loss.backward()
        with record_function("phase:optimizer"):
            optimizer_step()
            model.zero_grad(set_to_none=True)

    return step


def use_cuda_forms() -> None:
    """Makes this process run the CUDA forms of the device-dependent code, on CPU."""
    import importlib
    import importlib.util

    # A module may be absent from an older checkout (a --baseline run).
    for name, switch in (("agc", "_INTERLEAVE_DEVICES"), ("ema", "_BROADCAST_WEIGHT_DEVICES")):
        if importlib.util.find_spec(f"nfnet.optim.{name}") is not None:
            setattr(importlib.import_module(f"nfnet.optim.{name}"), switch, frozenset())


def _phase_of(event, spans: list[tuple[str, float, float]]) -> str | None:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("phase:"):
            return parent.name.split(":", 1)[1]
        parent = parent.cpu_parent
    # Autograd may run backward functions outside the caller's event tree: fall back to time.
    start = event.time_range.start
    for name, begin, end in spans:
        if begin <= start <= end:
            return name
    return None


def count_ops(step) -> dict:
    """Top-level aten ops of one call of `step`, by phase and by name."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.events()
    spans = [(e.name.split(":", 1)[1], e.time_range.start, e.time_range.end)
             for e in events if e.name.startswith("phase:")]
    by_phase: collections.Counter = collections.Counter()
    by_name: collections.Counter = collections.Counter()
    by_phase_name: dict[str, collections.Counter] = {p: collections.Counter() for p in PHASES}
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        if parent is not None and parent.name.startswith("aten::"):
            continue
        phase = _phase_of(event, spans) or "other"
        by_phase[phase] += 1
        by_name[event.name] += 1
        by_phase_name.setdefault(phase, collections.Counter())[event.name] += 1
    return {"total": sum(by_phase.values()), "by_phase": dict(by_phase),
            "by_name": dict(by_name.most_common()),
            "by_phase_name": {p: dict(c.most_common()) for p, c in by_phase_name.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="nfnet_f0")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=None, help="default: the variant's train size")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--forms", choices=("cuda", "cpu"), default="cuda",
                    help="count the CUDA forms of device-dependent code (default) or the CPU ones")
    ap.add_argument("--baseline", default=None, help="a dispatch.json of an earlier run")
    ap.add_argument("--baseline-label", default="an earlier checkout",
                    help="what the baseline ran on, for the table's heading (e.g. a commit)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args()
    device = common.setup_device("cpu", args.threads)
    from nfnet.models import get_variant

    if args.forms == "cuda":
        use_cuda_forms()
    size = args.size or get_variant(args.model).train_size
    counts = {}
    for label in args.configs:
        impl, optimizer_kind = CONFIGS[label]
        step = make_step(impl, optimizer_kind, args.model, args.batch, size, device)
        step()  # the first step creates the momentum buffers; count the steady state
        counts[label] = count_ops(step)
        print(f"{label}: {counts[label]['total']} ops {counts[label]['by_phase']}", flush=True)
    result = {"benchmark": "dispatch", "info": common.machine_info(device), "model": args.model,
              "size": size, "batch": args.batch, "forms": args.forms, "counts": counts}
    if args.baseline:
        before = common.json.loads(Path(args.baseline).read_text())
        result["baseline"] = {"info": before["info"], "counts": before["counts"],
                              "label": args.baseline_label}
    common.save_result(args.out, result, render)


def render(result: dict) -> str:
    counts = dict(result["counts"])
    before = result.get("baseline", {}).get("counts", {})
    rows_of = {f"before: {label}": c for label, c in before.items() if label.startswith("nfnet")}
    rows_of.update(counts)
    refs = [counts.get(label) or before.get(label) for label in REFERENCES]
    rows = []
    for label, c in rows_of.items():
        cells = [label] + [str(c["by_phase"].get(p, 0)) for p in PHASES] + [str(c["total"])]
        cells += [f"{c['total'] / ref['total']:.2f}x" if ref else "n/m" for ref in refs]
        rows.append(cells)
    info = result["info"]
    head = (f"Top-level aten ops dispatched by one {result['model']} training step "
            f"(forward with the loss, backward, optimizer step), counted with torch.profiler on "
            f"CPU at batch {result['batch']}, {result['size']} px, fp32, NCHW (the counts do not "
            f"depend on the batch), {result['forms'].upper()} forms of device-dependent code; "
            f"torch {info['versions']['torch']}, timm {info['versions'].get('timm', '?')}; "
            f"{info['date']}.")
    if before:
        baseline = result["baseline"]
        head += (f" \"before\" rows: the same script on {baseline['label']}, "
                 f"{baseline['info']['date']}.")
    table = common.markdown_table(
        ["model, optimizer", *PHASES, "total", "vs timm, torch SGD", "vs timm, torch SGD foreach"],
        rows)
    tops = []
    for label, c in rows_of.items():
        if label not in ("before: nfnet, torch SGD", "timm, torch SGD", "nfnet, nfnet SGD",
                         "nfnet, full step"):
            continue
        per_phase = c["by_phase_name"]
        tops.append(f"\nTop {TOP_OPS} ops, {label}:\n\n" + common.markdown_table(
            ["op", "count", *PHASES],
            [[name, str(n), *(str(per_phase.get(p, {}).get(name, 0)) for p in PHASES)]
             for name, n in list(c["by_name"].items())[:TOP_OPS]]))
    return head + "\n\n" + table + "\n" + "\n".join(tops)


if __name__ == "__main__":
    main()
