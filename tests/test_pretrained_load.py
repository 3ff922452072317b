"""`load_pretrained` and the conversion command: every supported file format into a model,
with a new classifier when the number of classes differs (head init per NFNET_SPEC.md §1.8)."""

import logging
import os
import pickle
import subprocess
import sys

import dill
import pytest
import torch
from safetensors import safe_open

from nfnet.models import create_model, load_pretrained
from nfnet.models.convert import main as convert
from nfnet.models.pretrained import save_safetensors

from test_pretrained_haiku import to_haiku  # the spec's Haiku layout

# This project's names -> timm dm_nfnet_* names (timm `models/nfnet.py`), for writing
# timm-style files from a small model.
TIMM_NAMES = {"conv0": "conv1", "conv1": "conv2", "conv1b": "conv2b", "conv2": "conv3",
              "conv_shortcut": "downsample.conv", "se.fc0": "attn_last.fc1",
              "se.fc1": "attn_last.fc2"}


def timm_style(state_dict):
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "stem":
            key, value = f"stem.conv{int(parts[1][-1]) + 1}.{parts[2]}", value
        elif parts[0] == "stages" and parts[3] == "skip_gain":
            key = ".".join(parts[:3]) + ".skipinit_gain"
        elif parts[0] == "stages":
            module, param = ".".join(parts[3:-1]), parts[-1]
            key = ".".join(parts[:3] + [TIMM_NAMES[module], param])
            if module.startswith("se.") and param == "weight":
                value = value[:, :, None, None]
        elif parts[0] == "classifier":
            key = f"head.fc.{parts[1]}"
        if key.endswith(".gain"):
            value = value[:, None, None, None]
        out[key] = value.clone()
    return out


def trained_tiny(num_classes=10):
    torch.manual_seed(0)
    model = create_model("nfnet_tiny", num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def write(fmt, model, path):
    sd = model.state_dict()
    if fmt == "safetensors":
        save_safetensors(sd, path)
    elif fmt == "timm_safetensors":
        save_safetensors(timm_style(sd), path)
    elif fmt == "timm_pth":
        torch.save(timm_style(sd), path)
    elif fmt == "lightning_style_pth":
        torch.save({"state_dict": sd, "epoch": 3}, path)
    elif fmt == "haiku":
        with open(path, "wb") as f:
            dill.dump(to_haiku(model), f)
    return path


FORMATS = {"safetensors": "w.safetensors", "timm_safetensors": "timm.safetensors",
           "timm_pth": "timm.pth", "lightning_style_pth": "ckpt.pt", "haiku": "F_haiku.npz"}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_loads_exactly(tmp_path, fmt):
    source = trained_tiny()
    path = write(fmt, source, tmp_path / FORMATS[fmt])
    model = load_pretrained(create_model("nfnet_tiny", num_classes=10), path)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_new_number_of_classes_keeps_trunk_and_reinitialises_head(tmp_path, caplog):
    source = trained_tiny(num_classes=1000)
    path = write("safetensors", source, tmp_path / "w.safetensors")
    torch.manual_seed(1)
    model = create_model("nfnet_tiny", num_classes=7)
    with caplog.at_level(logging.INFO, logger="nfnet.models.pretrained"):
        load_pretrained(model, path)
    for key, value in source.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(model.state_dict()[key], value), key
    w = model.classifier.weight.detach()
    assert w.shape == (7, model.num_features)
    assert abs(w.std().item() - 0.01) < 0.002 and torch.equal(model.classifier.bias, torch.zeros(7))
    assert "re-initialised the classifier" in caplog.text and "1000" in caplog.text


def test_weights_of_another_variant_are_refused(tmp_path):
    path = write("safetensors", trained_tiny(), tmp_path / "w.safetensors")
    with torch.device("meta"):
        model = create_model("nfnet_f0", num_classes=10)
    with pytest.raises(ValueError, match="does not fit nfnet_f0"):
        load_pretrained(model, path)


def test_convert_writes_safetensors_with_variant(tmp_path, capsys):
    source = trained_tiny()
    src = write("haiku", source, tmp_path / "F_haiku.npz")
    dst = tmp_path / "out.safetensors"
    assert convert([str(src), str(dst)]) == 0
    assert "nfnet_tiny" in capsys.readouterr().out
    with safe_open(dst, "pt") as f:
        assert f.metadata()["variant"] == "nfnet_tiny"
    model = load_pretrained(create_model("nfnet_tiny", num_classes=10), dst)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
    # A named variant that does not fit, and an unsafe file: one error line, exit code 1.
    assert convert([str(src), str(dst), "--variant", "nfnet_f1"]) == 1
    evil = tmp_path / "evil.npz"
    payload = type("Payload", (), {"__reduce__": lambda self: (os.system, ("true",))})()
    evil.write_bytes(pickle.dumps(payload))
    assert convert([str(evil), str(dst)]) == 1
    assert "refusing global" in capsys.readouterr().err


def test_convert_runs_as_a_module(tmp_path):
    src = write("timm_pth", trained_tiny(), tmp_path / "timm.pth")
    dst = tmp_path / "out.safetensors"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-m", "nfnet.models.convert", str(src), str(dst)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert dst.exists()
