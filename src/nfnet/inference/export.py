"""Export one weight set for deployment, and prove the exported model computes the same logits.

Formats:
- `onnx`: the network with weight standardization folded into plain convs
  (`nfnet.models.export`), input `images` (B, 3, S, S) with any batch size, output `logits`.
- `torch`: the same folded network as a `torch.export` program (`.pt2`, load it with
  `torch.export.load(path).module()`), batch dimension dynamic.
- `safetensors`: the (unfolded) weights in this project's naming, for `model.pretrained=` in a
  later fine-tune or for `nfnet.models.create_model` + `load_state_dict`.

Every file is checked by running it (onnxruntime for ONNX) on a batch of another size than the
one it was traced with and comparing its logits with the unexported network's. A metadata JSON
beside the files gives what a consumer needs: class names, image size and the input
normalisation.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from nfnet.data.transforms import IMAGENET_MEAN_255, IMAGENET_STD_255
from nfnet.errors import InputError
from nfnet.inference.classifier import Classifier
from nfnet.models import create_model, fold_weight_standardization, get_variant
from nfnet.models.export import export_onnx

log = logging.getLogger(__name__)

# Checked with a batch size other than the traced one, so a batch dimension baked in as a
# constant fails the check.
CHECK_BATCH = 3


class ExportMismatch(RuntimeError):
    """An exported model whose logits differ from the checkpoint's."""


def _max_difference(expected: torch.Tensor, actual: torch.Tensor) -> float:
    return float((expected.float() - torch.as_tensor(actual).float()).abs().max())


# timm's DeepMind NFNets compute GELU exactly (erf): a network trained with the official tanh
# approximation differs there by a few 1e-4 of the largest logit, which the timm check allows
# for and the folder's notes say (README, "Weights out").
TANH_GELU_TOLERANCE = 1e-3


def _export_timm(classifier: Classifier, net: torch.nn.Module, folder: str, report: dict[str, Any],
                 images: torch.Tensor, verify, tolerance: float, scale: float) -> None:
    """The Hugging Face Hub's timm layout (nfnet.models.timm_hub), checked by loading it in timm."""
    from nfnet.models.timm import model_overrides, timm_differences
    from nfnet.models.timm_hub import save_timm_folder

    try:
        save_timm_folder(net, folder, class_names=classifier.class_names, image_size=classifier.image_size,
                         eval_pad=classifier.eval_pad, mean=IMAGENET_MEAN_255, std=IMAGENET_STD_255)
    except ValueError as error:  # a variant timm cannot build (nfnet_tiny, F+)
        raise InputError(f"formats=timm: {error}") from None
    report["files"]["timm"] = folder
    overrides = model_overrides(net)
    report["timm_differences"] = timm_differences(overrides)
    if verify is None:
        return
    import timm

    with torch.no_grad():
        logits = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(images)
    tanh_gelu = overrides.get("gelu_approximate") == "tanh"
    verify("timm", logits, max(tolerance, TANH_GELU_TOLERANCE if tanh_gelu else 0.0) * scale)


def export_classifier(classifier: Classifier, output_dir: str, formats: list[str], check: bool = True,
                      tolerance: float = 1e-4) -> dict[str, Any]:
    """Writes the requested formats into `output_dir`; returns a report (files, max |logit diff|).

    The tolerance is relative to the largest reference logit: folding changes the order of a
    few float operations, nothing more.
    """
    os.makedirs(output_dir, exist_ok=True)
    # The ONNX exporter's passes log every step at INFO; only their warnings matter here.
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    net = classifier.net.cpu().eval()
    size = classifier.image_size
    stem = os.path.join(output_dir, f"{classifier.model_name}_{classifier.weights}")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(CHECK_BATCH, 3, size, size, generator=generator)
    with torch.no_grad():
        reference = net(images)
    scale = max(1.0, float(reference.abs().max()))
    limit = tolerance * scale
    report: dict[str, Any] = {**classifier.describe(), "image_size": size, "files": {}, "max_abs_diff": {}}

    def verify(name: str, actual, allowed: float = limit) -> None:
        diff = _max_difference(reference, actual)
        report["max_abs_diff"][name] = diff
        if diff > allowed:
            raise ExportMismatch(f"{name} export: logits differ from the checkpoint's by {diff:.3g} (allowed {allowed:.3g})")

    if "onnx" in formats:
        path = f"{stem}.onnx"
        export_onnx(net, path, size)
        report["files"]["onnx"] = path
        if check:
            import onnxruntime

            session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            verify("onnx", session.run(["logits"], {"images": images.numpy()})[0])
    if "torch" in formats:
        path = f"{stem}.pt2"
        folded = fold_weight_standardization(net)
        example = torch.zeros(2, 3, size, size)
        program = torch.export.export(folded, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        torch.export.save(program, path)
        report["files"]["torch"] = path
        if check:
            with torch.no_grad():
                verify("torch", torch.export.load(path).module()(images))
    if "safetensors" in formats:
        from nfnet.models.pretrained import read_weights, save_safetensors

        path = f"{stem}.safetensors"
        save_safetensors(net.state_dict(), path, get_variant(classifier.model_name))
        report["files"]["safetensors"] = path
        if check:
            # Rebuilt the way a consumer would: create_model + the file, strict loading.
            rebuilt = create_model(classifier.model_name, num_classes=len(classifier.class_names),
                                   **classifier.model_kwargs).eval()
            rebuilt.load_state_dict(read_weights(path))
            with torch.no_grad():
                verify("safetensors", rebuilt(images))
    if "timm" in formats:
        _export_timm(classifier, net, f"{stem}_timm", report, images, verify if check else None, tolerance, scale)
    metadata = {
        **report,
        "class_names": classifier.class_names,
        "eval_pad": classifier.eval_pad,
        "input": {
            "name": "images", "layout": "NCHW", "dtype": "float32", "channels": "RGB",
            # As nfnet.data.transforms: resize to (S + eval_pad)^2, centre-crop S, then normalise
            # on the 0-255 scale.
            "mean_255": list(IMAGENET_MEAN_255), "std_255": list(IMAGENET_STD_255),
        },
    }
    with open(f"{stem}.json", "w") as f:
        json.dump(metadata, f, indent=2)
    report["files"]["metadata"] = f"{stem}.json"
    return report
