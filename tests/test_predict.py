"""predict.py: top-k classes with names for an image, a folder or a video, as JSON or CSV."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONF_DIR
from nfnet.data.folder import load_rgb
from nfnet.data.transforms import ResizeCropEval, normalize
from nfnet.models import create_model
from trained_run import shapes_root, trained_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def ema_net(run_dir):
    """The checkpoint's EMA network, rebuilt independently of nfnet.inference."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    model = checkpoint["hyper_parameters"]["model"]
    architecture = {k: model[k] for k in ("drop_rate", "stochdepth_rate", "activation", "gelu_approximate")}
    net = create_model("nfnet_tiny", num_classes=10, **architecture).eval()
    net.load_state_dict({k[len("ema_net."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("ema_net.")})
    return net, checkpoint["hyper_parameters"]["class_names"]


def _expected_top(ema_net, image: torch.Tensor, k: int):
    net, names = ema_net
    with torch.no_grad():
        probs = torch.softmax(net(normalize(ResizeCropEval(64, pad=0)(image)[None]))[0], dim=0)
    values, indices = probs.topk(k)
    return [names[i] for i in indices], values


def _predict(run_dir, tmp_path, overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from nfnet.app import tasks

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("predict", overrides=[f"ckpt_path={run_dir}/checkpoints/last.ckpt", f"paths.output_dir={tmp_path}",
                                            "device=cpu", *overrides])
    GlobalHydra.instance().clear()
    return tasks.predict(cfg)


def test_folder_to_json_top_k_with_class_names(run_dir, ema_net, tmp_path):
    folder = shapes_root(run_dir) / "val" / "star"
    output = tmp_path / "out.json"
    count = _predict(run_dir, tmp_path, [f"input={folder}", "top_k=3", f"output={output}", "batch_size=3"])
    rows = json.loads(output.read_text())
    files = sorted(folder.glob("*.png"))
    assert count == len(rows) == len(files) == 8
    for row, file in zip(rows, files):
        assert row["input"] == str(file) and row["frame"] is None
        names, values = _expected_top(ema_net, load_rgb(str(file)), 3)
        assert [p["class"] for p in row["top_k"]] == names
        assert [p["probability"] for p in row["top_k"]] == pytest.approx(values.tolist(), abs=1e-5)
        assert [p["rank"] for p in row["top_k"]] == [1, 2, 3]


def test_single_image_to_csv(run_dir, ema_net, tmp_path):
    image = shapes_root(run_dir) / "val" / "circle" / "00003.png"
    output = tmp_path / "out.csv"
    _predict(run_dir, tmp_path, [f"input={image}", "top_k=2", "format=csv", f"output={output}"])
    rows = list(csv.DictReader(io.StringIO(output.read_text())))
    assert [r["rank"] for r in rows] == ["1", "2"] and {r["input"] for r in rows} == {str(image)}
    names, _ = _expected_top(ema_net, load_rgb(str(image)), 2)
    assert [r["class"] for r in rows] == names


@pytest.mark.slow
def test_predict_py_writes_json_to_stdout_and_logs_to_stderr(run_dir, tmp_path):
    image = shapes_root(run_dir) / "val" / "ring" / "00000.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), f"ckpt_path={run_dir}/checkpoints/last.ckpt", f"input={image}",
         "top_k=1", f"paths.log_dir={tmp_path}"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(result.stdout)  # nothing but the JSON on stdout: it pipes into jq
    assert row["input"] == str(image) and len(row["top_k"]) == 1


def test_video_frames(run_dir, ema_net, tmp_path):
    import cv2
    images = [load_rgb(str(p)) for p in sorted((shapes_root(run_dir) / "val" / "square").glob("*.png"))[:6]]
    video = tmp_path / "clip.avi"
    # Lossless (FFV1) so that decoded frames equal the images they were written from.
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"FFV1"), 5, (64, 64))
    assert writer.isOpened()
    for image in images:
        writer.write(image.permute(1, 2, 0).numpy()[..., ::-1].copy())
    writer.release()
    output = tmp_path / "video.json"
    _predict(run_dir, tmp_path, [f"input={video}", "top_k=1", f"output={output}", "video.every_n_frames=2",
                                 "video.max_frames=2"])
    rows = json.loads(output.read_text())
    assert [row["frame"] for row in rows] == [0, 2]
    for row in rows:
        names, _ = _expected_top(ema_net, images[row["frame"]], 1)
        assert row["input"] == str(video) and row["top_k"][0]["class"] == names[0]


@pytest.mark.slow
@pytest.mark.parametrize("to_file", [False, True])
def test_camera_that_cannot_be_opened_is_one_line_and_writes_nothing(run_dir, tmp_path, to_file):
    output = tmp_path / "earlier.json"
    output.write_text("[]")  # a previous run's predictions
    result = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), f"ckpt_path={run_dir}/checkpoints/last.ckpt", "input=camera:97",
         f"paths.log_dir={tmp_path}", *([f"output={output}"] if to_file else [])],
        capture_output=True, text=True, timeout=600,
    )
    # OpenCV's own warnings about the device are silenced: the line names the input.
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and lines == ["config error: input='camera:97': camera 97 cannot be opened"], result.stderr
    # No half-begun JSON on standard output, and the earlier file is not truncated.
    assert result.stdout == "" and output.read_text() == "[]"


def test_video_without_opencv_is_one_clear_error(run_dir, tmp_path, monkeypatch):
    from nfnet.errors import InputError

    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\0")
    monkeypatch.setitem(sys.modules, "cv2", None)  # as if OpenCV were not installed
    with pytest.raises(InputError, match=r"needs OpenCV: pip install -e '\.\[video\]'"):
        _predict(run_dir, tmp_path, [f"input={video}"])
