"""Weights out through the entry points: export.py formats=timm (checked by loading the folder in
timm), a timm folder back in as pretrained weights, the Hub push without credentials, and
model.grad_checkpointing from the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF_DIR, classifier
from nfnet.app.inference_tasks import export, load_classifier
from nfnet.errors import InputError
from nfnet.inference.classifier import Classifier
from nfnet.inference.export import export_classifier
from nfnet.inference.weights import read_any_weights
from nfnet.models import create_model
from test_timm_interop import perturbed_f0

ROOT = Path(__file__).resolve().parents[1]
NAMES = [f"class{i}" for i in range(10)]


def _classifier(net, size=64) -> Classifier:
    return Classifier(net, "nfnet_f0", NAMES, size, 32, "ema", "random", {})


@pytest.mark.parametrize("gelu", ["none", "tanh"])
def test_a_timm_export_is_loaded_by_timm_with_our_logits(tmp_path, gelu):
    net = perturbed_f0(gelu_approximate=gelu)
    report = export_classifier(_classifier(net), str(tmp_path), ["timm"], tolerance=1e-4)
    folder = Path(report["files"]["timm"])
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    scale = max(1.0, float(net(torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))).abs().max()))
    relative = report["max_abs_diff"]["timm"] / scale
    said_gelu = any("gelu" in line.lower() for line in report["timm_differences"])
    if gelu == "none":  # the numerics timm can express: the export's own 1e-4 check holds
        assert relative <= 1e-4 and not said_gelu
    else:  # the official tanh GELU, which timm computes exactly: allowed up to 1e-3, and said
        assert relative <= 1e-3 and said_gelu
    # Back in as pretrained weights: the same network.
    state = read_any_weights(str(folder))
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_a_variant_timm_cannot_build_is_refused_in_one_line(tmp_path):
    tiny = create_model("nfnet_tiny", num_classes=10)
    with pytest.raises(InputError, match="formats=timm") as error:
        export_classifier(Classifier(tiny, "nfnet_tiny", NAMES, 64, 0, "ema", "x", {}), str(tmp_path), ["timm"])
    assert "\n" not in str(error.value)


def test_pretrained_weights_can_be_a_timm_folder(tmp_path):
    net = perturbed_f0(gelu_approximate="none")
    folder = export_classifier(_classifier(net), str(tmp_path), ["timm"], check=False)["files"]["timm"]
    cfg = OmegaConf.create({"ckpt_path": None, "pretrained": folder, "model_name": "nfnet_f0", "class_names": None,
                            "image_size": 64, "eval_pad": None, "weights": "ema"})
    loaded = load_classifier(cfg)
    assert all(torch.equal(loaded.net.state_dict()[k], v) for k, v in net.state_dict().items())


def test_the_hub_push_without_credentials_is_one_config_error_line(tmp_path):
    net = perturbed_f0(gelu_approximate="none")
    folder = export_classifier(_classifier(net), str(tmp_path / "in"), ["timm"], check=False)["files"]["timm"]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "", "HF_HUB_OFFLINE": "1"}
    env.pop("HF_TOKEN")
    result = subprocess.run(
        [sys.executable, str(ROOT / "export.py"), f"pretrained={folder}", "model_name=nfnet_f0", "formats=timm",
         "check=false", "hub.repo_id=someone/nfnet-f0", f"output_dir={tmp_path / 'out'}", f"paths.log_dir={tmp_path}"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip() and "config error" in line]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "hub.repo_id='someone/nfnet-f0'" in lines[0] and "token" in lines[0]


def test_grad_checkpointing_from_the_config_reaches_the_network(cfg_train):
    from nfnet.app import tasks

    cfg = cfg_train(["model.grad_checkpointing=block"])
    module = tasks.build_module(cfg, num_classes=10)
    assert module.net.grad_checkpointing == "block"
    assert classifier(10).net.grad_checkpointing is False  # the schema's default: off


def test_export_with_a_hub_repo_needs_the_timm_format():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from nfnet.app.inference_checks import check_export_config
    from nfnet.errors import ConfigError

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("export", overrides=["ckpt_path=x.ckpt", "formats=[onnx]", "hub.repo_id=a/b"])
    GlobalHydra.instance().clear()
    with pytest.raises(ConfigError, match="add timm to formats"):
        check_export_config(cfg, this_machine=False)
    assert export  # the task the entry point runs
