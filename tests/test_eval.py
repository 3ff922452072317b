"""eval.py: the metrics it reports for a checkpoint are the ones training logged for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONF_DIR
from trained_run import data_cache, shapes_root, trained_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


def _eval_cfg(overrides, out_dir):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[f"paths.output_dir={out_dir}", "num_workers=0", *overrides])
    GlobalHydra.instance().clear()
    return cfg


@pytest.mark.slow
def test_eval_py_reports_the_training_time_ema_metrics_of_the_checkpoint(run_dir, tmp_path):
    trained = json.loads((run_dir / "metrics.json").read_text())
    output = tmp_path / "eval.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), f"ckpt_path={run_dir}/checkpoints/last.ckpt", "num_workers=0",
         f"output={output}", f"paths.log_dir={tmp_path}", f"paths.data_dir={data_cache(run_dir)}"],
        capture_output=True, text=True, timeout=600, env={**os.environ},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    # EMA weights by default; the same images, transform and metric code as validation.
    assert report["weights"] == "ema"
    assert report["top1"] == pytest.approx(trained["val/ema_acc_top1"], abs=1e-6)
    assert report["top5"] == pytest.approx(trained["val/ema_acc_top5"], abs=1e-6)
    assert report["images"] == 80  # 10 classes x 8 val images
    assert report["image_size"] == 64
    # The table on standard output names the numbers.
    assert "top1" in result.stdout and f"{report['top1']:.4f}" in result.stdout


@pytest.mark.slow
def test_raw_weights_on_request_match_the_training_time_raw_metrics(run_dir, tmp_path):
    from nfnet.app import tasks

    trained = json.loads((run_dir / "metrics.json").read_text())
    cfg = _eval_cfg([f"ckpt_path={run_dir}/checkpoints/last.ckpt", "weights=raw", f"output={tmp_path}/raw.json",
                     f"root={data_cache(run_dir)}"], tmp_path)
    report = tasks.evaluate(cfg)
    assert report["weights"] == "raw"
    assert report["top1"] == pytest.approx(trained["val/acc_top1"], abs=1e-6)
    assert report["top5"] == pytest.approx(trained["val/acc_top5"], abs=1e-6)
    assert report["loss"] == pytest.approx(trained["val/loss"], rel=1e-4)
    assert json.loads((tmp_path / "raw.json").read_text()) == report


@pytest.mark.slow
def test_converted_weights_are_evaluated_like_the_checkpoint_they_came_from(run_dir, tmp_path):
    """The `pretrained=` path (safetensors here; DeepMind/timm files take the same road)."""
    from nfnet.app import tasks
    from nfnet.models.pretrained import save_safetensors

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ema = {k[len("ema_net."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("ema_net.")}
    weights = tmp_path / "tiny.safetensors"
    save_safetensors(ema, weights)
    trained = json.loads((run_dir / "metrics.json").read_text())
    # The shapes cache is laid out as ImageNet is: <root>/train/<class>, <root>/val/<class>.
    cfg = _eval_cfg([f"pretrained={weights}", "model_name=nfnet_tiny", "source=imagenet",
                     f"root={shapes_root(run_dir)}", "eval_pad=0", "output=null"], tmp_path)
    report = tasks.evaluate(cfg)
    assert report["weights"] == "pretrained" and report["num_classes"] == 10
    assert report["top1"] == pytest.approx(trained["val/ema_acc_top1"], abs=1e-6)


def test_a_checkpoint_for_other_classes_is_refused(run_dir, tmp_path):
    from nfnet.app import tasks
    from nfnet.errors import InputError

    other = tmp_path / "other"
    for name in ("cat", "dog"):
        (other / name).mkdir(parents=True)
        (other / name / "a.png").write_bytes((shapes_root(run_dir) / "val" / "star" / "00000.png").read_bytes())
    cfg = _eval_cfg([f"ckpt_path={run_dir}/checkpoints/last.ckpt", "source=imagefolder", f"root={other}"], tmp_path)
    with pytest.raises(InputError, match="2 classes"):
        tasks.evaluate(cfg)


def test_a_checkpoint_cannot_send_eval_to_write_elsewhere(run_dir, tmp_path):
    """The data folder a checkpoint stores is data, not an instruction: eval generates the
    embedded dataset only in this project's cache (paths.data_dir) or where root= says, and
    reads an image folder only from root=."""
    from nfnet.app import tasks
    from nfnet.errors import ConfigError

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    victim = tmp_path / "somewhere-else"
    checkpoint["datamodule_hyper_parameters"]["data"]["root"] = str(victim)
    crafted = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, crafted)
    cache = tmp_path / "project-cache"
    report = tasks.evaluate(_eval_cfg([f"ckpt_path={crafted}", f"paths.data_dir={cache}", "output=null"], tmp_path))
    assert report["images"] == 80 and not victim.exists()
    assert len(list(cache.glob("shapes-*/val/*/*.png"))) == 80

    checkpoint["datamodule_hyper_parameters"]["data"]["source"] = "imagefolder"
    torch.save(checkpoint, crafted)
    with pytest.raises(ConfigError) as error:
        tasks.evaluate(_eval_cfg([f"ckpt_path={crafted}", "output=null"], tmp_path))
    assert f"was trained on data=imagefolder at {str(victim)!r}" in str(error.value)
    assert "add root=<folder>" in str(error.value) and not victim.exists()

    checkpoint["datamodule_hyper_parameters"]["data"].update(source="shapes", val_fraction=7)
    torch.save(checkpoint, crafted)
    with pytest.raises(ConfigError, match=r"its stored data.val_fraction=7 must be a finite number in \(0, 1\)"):
        tasks.evaluate(_eval_cfg([f"ckpt_path={crafted}", f"paths.data_dir={cache}", "output=null"], tmp_path))
