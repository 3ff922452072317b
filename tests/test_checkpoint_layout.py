"""A train.py checkpoint's layout as inference reads it, written by the LightningModule; and the
checkpoints of nfnet 0.1 (flat hyperparameters, before the config schema), which stay usable."""

from __future__ import annotations

import torch

from conftest import classifier
from nfnet.inference.checkpoint import EMA_PREFIX, NET_PREFIX, read_checkpoint
from nfnet.inference.classifier import from_checkpoint
from nfnet.inference.weights import read_any_weights
from nfnet.models import create_model


def test_the_modules_attributes_are_the_prefixes_inference_reads():
    module = classifier(3)
    keys = module.state_dict().keys()
    assert any(k.startswith(NET_PREFIX) for k in keys) and any(k.startswith(EMA_PREFIX) for k in keys)
    assert {k.split(".")[0] + "." for k in keys} == {NET_PREFIX, EMA_PREFIX}


def _legacy_checkpoint(path, net, ema):
    """What nfnet 0.1's train.py wrote: flat module and datamodule hyperparameters."""
    torch.save({
        "state_dict": {**{f"net.{k}": v for k, v in net.state_dict().items()},
                       **{f"ema_net.{k}": v for k, v in ema.state_dict().items()}},
        "hyper_parameters": {
            "model_name": "nfnet_tiny", "num_classes": 4, "pretrained": None, "base_lr": 0.8,
            "model_kwargs": {"drop_rate": 0.0, "stochdepth_rate": 0.0, "activation": "gelu", "gelu_approximate": "tanh"},
            "label_smoothing": 0.1, "agc_clipping": 0.01, "ema_decay": 0.99999, "compile": False,
            "channels_last": False, "class_names": ["a", "b", "c", "d"], "skip_nonfinite": True,
        },
        "datamodule_hyper_parameters": {
            "source": "imagefolder", "root": "/data/x", "train_size": 64, "test_size": 96, "eval_pad": 0,
            "batch_size": 8, "augment": "basic", "crop_min_area": 0.5, "val_fraction": 0.2, "split_seed": 3,
            "max_bad_fraction": 0.01, "shapes_seed": 0, "shapes_train_per_class": 500,
        },
    }, path)


def test_a_checkpoint_of_nfnet_0_1_is_read_in_todays_layout(tmp_path):
    torch.manual_seed(0)
    net, ema = create_model("nfnet_tiny", num_classes=4), create_model("nfnet_tiny", num_classes=4)
    path = tmp_path / "old.ckpt"
    _legacy_checkpoint(path, net, ema)
    checkpoint = read_checkpoint(path)
    assert checkpoint["hyper_parameters"]["model"]["name"] == "nfnet_tiny"
    data = checkpoint["datamodule_hyper_parameters"]
    assert data["data"]["test_size"] == 96 and data["data"]["split_seed"] == 3
    assert data["augment"] == {"name": "basic", "crop_min_area": 0.5} and data["data"]["shapes"]["seed"] == 0
    loaded = from_checkpoint(str(path), "raw")
    assert loaded.class_names == ["a", "b", "c", "d"] and (loaded.image_size, loaded.eval_pad) == (96, 0)
    assert all(torch.equal(loaded.net.state_dict()[k], v) for k, v in net.state_dict().items())
    # As model.pretrained, its EMA weights.
    weights = read_any_weights(path)
    assert all(torch.equal(weights[k], v) for k, v in ema.state_dict().items())
