"""eval.py, predict.py and export.py refuse a bad command line as train.py does: one line
`config error: <key>=<value> ...what is allowed...`, exit status 2, nothing written, before any
weights are read. The cases run in this process through the command line's own check
(nfnet.app.cli.precheck, the first thing each entry point does); one per entry point runs as the
real process too."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nfnet.app.cli import precheck

ROOT = Path(__file__).resolve().parents[1]

# Placeholders filled in per test: {ckpt} an existing file (its contents are not read by the
# checks), {folder} an existing image folder, {image} an existing file to predict on, {missing}
# a path that does not exist.
CKPT = "ckpt_path={ckpt}"
IMAGE = "input={image}"

# entry -> {case: (overrides, what the one line must say)}
CASES = {
    "eval": {
        "no weights": ([], ["give exactly one of ckpt_path=", "pretrained=", "registry=", "got ckpt_path=None"]),
        "two weight sources": ([CKPT, "pretrained={ckpt}"], ["give exactly one of", "pretrained='{ckpt}'"]),
        "pretrained without its variant": (["pretrained={ckpt}"], ["model_name=None must name the variant", "nfnet_f0"]),
        "pretrained of an unknown variant": (
            ["pretrained={ckpt}", "model_name=nfnet_f9"], ["model_name='nfnet_f9' must name the variant", "nfnet_f7plus"],
        ),
        "a folder that is not a registry": (["registry={folder}"], ["registry='{folder}'", "no versions/ folder"]),
        "pretrained file missing": (
            ["pretrained={missing}", "model_name=nfnet_f0"], ["pretrained='{missing}' is not a file", "*_haiku.npz"],
        ),
        "checkpoint missing": (["ckpt_path={missing}"], ["ckpt_path='{missing}' is not a file"]),
        "image size off the padding": ([CKPT, "image_size=100"], ["image_size=100", "multiple of", "32"]),
        "unknown weight set": ([CKPT, "weights=best"], ["weights='best'", "choose one of: ema, raw"]),
        "negative eval padding": ([CKPT, "eval_pad=-1"], ["eval_pad=-1", "integer >= 0 or null"]),
        "task name outside the log folder": ([CKPT, "task_name=../x"], ["task_name='../x'", "without /"]),
        "pretrained weights without images": (
            ["pretrained={ckpt}", "model_name=nfnet_f0"], ["pretrained weights carry no dataset", "root=<folder>"],
        ),
        "image folder missing": ([CKPT, "root={missing}"], ["root='{missing}' does not exist"]),
        "unknown split": ([CKPT, "split=test"], ["split='test'", "choose one of: val, train"]),
        "unknown data source": ([CKPT, "source=foo"], ["source='foo'", "imagefolder", "null"]),
        "no batch": ([CKPT, "batch_size=0"], ["batch_size=0", "integer >= 1"]),
        "negative workers": ([CKPT, "num_workers=-1"], ["num_workers=-1", "integer >= 0"]),
        "negative seed": ([CKPT, "seed=-1"], ["seed=-1", "[0, 4294967295]"]),
        "unknown accelerator": ([CKPT, "trainer.accelerator=quantum"], ["trainer.accelerator='quantum'", "cpu, gpu"]),
    },
    "predict": {
        "no input": ([CKPT], ["input is required", "input=<value>"]),
        "camera without an index": ([CKPT, "input=camera:x"], ["input='camera:x'", "camera:<index>"]),
        "input missing": ([CKPT, "input={missing}"], ["input='{missing}' does not exist", "a folder of images"]),
        "unknown device": ([CKPT, IMAGE, "device=tpu"], ["device='tpu' is not allowed", "cuda:<index>"]),
        "class names file missing": ([CKPT, IMAGE, "class_names={missing}"], ["class_names='{missing}' is not a file"]),
        "no classes to report": ([CKPT, IMAGE, "top_k=0"], ["top_k=0", "integer >= 1"]),
        "unknown output format": ([CKPT, IMAGE, "format=xml"], ["format='xml'", "choose one of: json, csv"]),
        "no frames": ([CKPT, IMAGE, "video.every_n_frames=0"], ["video.every_n_frames=0", "integer >= 1"]),
        "weights of two kinds": ([CKPT, IMAGE, "registry={folder}"], ["give exactly one of", "registry='{folder}'"]),
    },
    "export": {
        "unknown format": ([CKPT, "formats=[tf]"], ["formats=['tf'] may only hold", "onnx, torch, safetensors, timm"]),
        "no format": ([CKPT, "formats=[]"], ["formats=[] may only hold"]),
        "a Hub id that is not user/name": ([CKPT, "formats=[timm]", "hub.repo_id=foo"], ["hub.repo_id='foo'", "user/name"]),
        "a Hub upload without the timm folder": (
            [CKPT, "formats=[onnx]", "hub.repo_id=a/b"], ["hub.repo_id='a/b'", "add timm to formats"],
        ),
        "zero tolerance": ([CKPT, "tolerance=0"], ["tolerance=0", "finite number > 0"]),
        "infinite tolerance": ([CKPT, "tolerance=inf"], ["tolerance=inf", "finite number > 0"]),
        "check not a flag": ([CKPT, "check=maybe"], ["check='maybe'", "true or false"]),
        "image size off the padding": ([CKPT, "image_size=250"], ["image_size=250", "multiple of"]),
    },
}
PARAMS = [(entry, case) for entry, cases in CASES.items() for case in cases]
AS_PROCESSES = [("eval", "two weight sources"), ("predict", "input missing"), ("export", "unknown format")]


def _make_places(folder: Path) -> dict:
    (folder / "images" / "cat").mkdir(parents=True)
    (folder / "weights.ckpt").write_bytes(b"")
    (folder / "image.png").write_bytes(b"")
    return {"ckpt": folder / "weights.ckpt", "folder": folder / "images", "image": folder / "image.png",
            "missing": folder / "missing"}


@pytest.fixture
def places(tmp_path):
    return _make_places(tmp_path / "files")


def _filled(texts: list[str], places: dict) -> list[str]:
    return [text.format(**places) for text in texts]


def _outputs(folder: Path) -> list[str]:
    return [f"paths.log_dir={folder / 'logs'}", f"hydra.run.dir={folder / 'run'}"]


def _assert_one_line(entry: str, case: str, code, stderr: str, stdout: str, places: dict, outputs: Path) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr and stdout == ""
    assert len(lines) == 1 and lines[0].startswith("config error: "), stderr
    for needle in _filled(CASES[entry][case][1], places):
        assert needle in lines[0]
    assert not outputs.exists()  # no run folder, no log, no report


@pytest.mark.parametrize("entry,case", PARAMS)
def test_a_bad_value_is_one_line(entry, case, places, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outputs = tmp_path / "outputs"
    with pytest.raises(SystemExit) as stop:
        precheck(ROOT / "conf", entry, [*_filled(CASES[entry][case][0], places), *_outputs(outputs)])
    captured = capsys.readouterr()
    _assert_one_line(entry, case, stop.value.code, captured.err, captured.out, places, outputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["files"]


@pytest.mark.parametrize("entry", ["eval", "predict", "export"])
def test_an_output_folder_under_a_file_is_one_line(entry, places, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    argv = [*_filled([CKPT, IMAGE] if entry == "predict" else [CKPT], places), f"paths.log_dir={blocker / 'logs'}"]
    with pytest.raises(SystemExit) as stop:
        precheck(ROOT / "conf", entry, argv)
    line = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in line
    assert line.startswith("config error: paths.log_dir=") and f"{blocker} is a file, not a folder" in line


@pytest.mark.parametrize("absent,needle", [("onnxruntime", "formats=onnx needs onnxruntime"),
                                           ("timm", "formats=timm is checked by loading the folder in timm")])
def test_an_export_format_whose_library_is_missing_is_one_line(absent, needle, places, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, absent, None)  # as if it were not installed
    formats = "formats=[onnx]" if absent == "onnxruntime" else "formats=[timm]"
    with pytest.raises(SystemExit) as stop:
        precheck(ROOT / "conf", "export", [*_filled([CKPT], places), formats, *_outputs(tmp_path / "outputs")])
    line = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in line and needle in line


def _run(entry: str, case: str, folder: Path, places: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / f"{entry}.py"), *_filled(CASES[entry][case][0], places), *_outputs(folder / "outputs")],
        capture_output=True, text=True, timeout=300, cwd=folder,
    )


@pytest.mark.slow
def test_the_entry_points_themselves_answer_in_one_line(tmp_path):
    folders = {entry: tmp_path / entry for entry, _ in AS_PROCESSES}
    places = {entry: _make_places(folders[entry]) for entry, _ in AS_PROCESSES}
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = {entry: pool.submit(_run, entry, case, folders[entry], places[entry]) for entry, case in AS_PROCESSES}
        for entry, case in AS_PROCESSES:
            result = results[entry].result()
            _assert_one_line(entry, case, result.returncode, result.stderr, result.stdout, places[entry],
                             folders[entry] / "outputs")
