"""export.py: ONNX and torch.export programs of the EMA, WS-folded network compute the
checkpoint's logits; the safetensors export and the checkpoint itself feed a later fine-tune."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nfnet.data.folder import load_rgb
from nfnet.data.transforms import ResizeCropEval, normalize
from nfnet.models import WSConv2d, create_model
from trained_run import shapes_root, trained_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


def _checkpoint_net(run_dir: Path, prefix: str):
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    model = checkpoint["hyper_parameters"]["model"]
    architecture = {k: model[k] for k in ("drop_rate", "stochdepth_rate", "activation", "gelu_approximate")}
    net = create_model("nfnet_tiny", num_classes=10, **architecture).eval()
    net.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)})
    return net


def _val_images(run_dir: Path, n: int = 5) -> torch.Tensor:
    files = sorted((shapes_root(run_dir) / "val").rglob("*.png"))[::16][:n]
    return normalize(torch.stack([ResizeCropEval(64, pad=0)(load_rgb(str(f))) for f in files]))


@pytest.mark.slow
def test_export_py_writes_onnx_and_torch_export_programs_with_the_checkpoints_logits(run_dir, tmp_path):
    out = tmp_path / "exported"
    result = subprocess.run(
        [sys.executable, str(ROOT / "export.py"), f"ckpt_path={run_dir}/checkpoints/last.ckpt", f"output_dir={out}",
         f"paths.log_dir={tmp_path}"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = json.loads((out / "nfnet_tiny_ema.json").read_text())
    assert metadata["weights"] == "ema" and metadata["image_size"] == 64
    assert metadata["class_names"][7] == "star"
    assert all(diff <= 1e-4 for diff in metadata["max_abs_diff"].values())

    # Independently of export.py's own check: real images (5, not the traced batch of 2).
    images = _val_images(run_dir)
    with torch.no_grad():
        expected = _checkpoint_net(run_dir, "ema_net.")(images)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "nfnet_tiny_ema.onnx"), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(["logits"], {"images": images.numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_logits), expected, atol=1e-4, rtol=1e-4)

    program = torch.export.load(str(out / "nfnet_tiny_ema.pt2"))
    # Folded: the program holds plain convolutions, no weight standardization left.
    assert not any(isinstance(m, WSConv2d) for m in program.module().modules())
    assert "var_mean" not in str(program.graph)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(images), expected, atol=1e-4, rtol=1e-4)
    # The EMA, not the raw weights, was exported.
    with torch.no_grad():
        raw = _checkpoint_net(run_dir, "net.")(images)
    assert not torch.allclose(raw, expected, atol=1e-4)


def test_safetensors_export_and_the_checkpoint_itself_load_as_pretrained_weights(run_dir, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONF_DIR
    from nfnet.app import tasks
    from nfnet.inference.weights import load_pretrained

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("export", overrides=[f"ckpt_path={run_dir}/checkpoints/last.ckpt", "formats=safetensors",
                                           f"output_dir={tmp_path}", f"paths.output_dir={tmp_path}"])
    GlobalHydra.instance().clear()
    report = tasks.export(cfg)
    images = _val_images(run_dir, 3)
    with torch.no_grad():
        expected = _checkpoint_net(run_dir, "ema_net.")(images)
    # model.pretrained=<file> for the next fine-tune: the exported file, or the checkpoint directly.
    for weights in (report["files"]["safetensors"], run_dir / "checkpoints" / "last.ckpt"):
        net = load_pretrained(create_model("nfnet_tiny", num_classes=10), weights).eval()
        with torch.no_grad():
            torch.testing.assert_close(net(images), expected)
