"""update.py: rounds that keep a model current as a folder grows (nfnet.app.rounds), its one-line
refusals, and its watch mode. The three-round walk of the README, with a kill, is test_update_rounds.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nfnet.app.checks import check_update_config
from nfnet.data.shapes_rounds import write_round
from nfnet.errors import ConfigError
from nfnet.inference.registry import MODEL, Registry, write_version_files
from nfnet.models import create_model, get_variant
from nfnet.models.pretrained import save_safetensors
from update_helpers import ROOT, compose_update, quiet_env, update_py


def class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def fake_version(registry: Registry, classes: list[str], model: str = "nfnet_tiny") -> None:
    """A version in service without a round: what the checks read of a registry."""
    torch.manual_seed(0)
    with registry.lock():
        staging = registry.staging("0001")
        save_safetensors(create_model(model, num_classes=len(classes)).state_dict(), staging / MODEL,
                         get_variant(model), classes)
        write_version_files(staging, classes, {"model": {"name": model}, "image_size": 32, "eval_pad": 0, "data": {}},
                            {}, "", [])
        registry.commit(staging, "0001", {"candidate": "0001", "current": None, "decision": "promote", "reason": ""})


@pytest.fixture
def folder(tmp_path):
    data = tmp_path / "photos"
    write_round(data, 1, per_class=6, grown_per_class=8, image_size=32)
    return data


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "setup, overrides, words",
    [
        ("", ["data=shapes"], ["data.source='shapes'", "data=imagefolder"]),
        ("renamed", [], ["cross", "are gone", "data.class_map={cross: plus}"]),
        ("registry", ["model=nfnet_f0"], ["model.name='nfnet_f0'", "add model=nfnet_tiny"]),
        ("registry", ["model.pretrained={weights}"], ["model.pretrained=", "drop model.pretrained"]),
        ("not a registry", [], ["not a model registry", "new or empty folder"]),
        ("", ["watch=true", "poll_seconds=0"], ["poll_seconds=0", "number > 0"]),
    ],
)
def test_what_a_round_cannot_do_is_one_line_before_any_work(tmp_path, folder, setup, overrides, words):
    registry = Registry(tmp_path / "models")
    weights = tmp_path / "w.safetensors"
    save_safetensors(create_model("nfnet_tiny", num_classes=2).state_dict(), weights, get_variant("nfnet_tiny"))
    if setup in ("registry", "renamed"):
        fake_version(registry, class_folders(folder))
    if setup == "renamed":
        os.rename(folder / "cross", folder / "plus")
    if setup == "not a registry":
        registry.root.mkdir()
        (registry.root / "notes.txt").write_text("mine")
    overrides = [o.format(weights=weights) for o in overrides]
    cfg = compose_update(tmp_path, [f"data.root={folder}", f"registry={registry.root}", *overrides])
    with pytest.raises(ConfigError) as caught:
        check_update_config(cfg)
    assert "\n" not in str(caught.value)
    for word in words:
        assert word in str(caught.value), str(caught.value)


def test_update_py_refuses_a_renamed_class_in_one_line_and_writes_nothing(tmp_path, folder):
    registry = Registry(tmp_path / "models")
    fake_version(registry, class_folders(folder))
    os.rename(folder / "cross", folder / "plus")
    before = sorted(p.name for p in registry.root.rglob("*"))
    result = update_py(tmp_path, f"data.root={folder}", f"registry={registry.root}")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("config error: "), result.stderr
    assert "data.class_map={cross: plus}" in lines[0]
    assert not (tmp_path / "logs").exists() and sorted(p.name for p in registry.root.rglob("*")) == before


def test_finetune_weights_of_another_variant_are_one_line_naming_model(tmp_path, folder):
    # experiment=finetune picks nfnet_f0; weights of nfnet_tiny used to fail with a traceback after
    # loading the trunk, leaving an empty run folder.
    weights = tmp_path / "tiny.safetensors"
    save_safetensors(create_model("nfnet_tiny", num_classes=8).state_dict(), weights, get_variant("nfnet_tiny"))
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "experiment=finetune", f"data.root={folder}",
         f"model.pretrained={weights}", f"paths.log_dir={tmp_path / 'logs'}"],
        capture_output=True, text=True, timeout=300, env=quiet_env(),
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "holds nfnet_tiny weights" in lines[0] and "add model=nfnet_tiny" in lines[0]
    assert not (tmp_path / "logs").exists()


# --------------------------------------------------------------------------- rounds in process
def _update(tmp_path, *overrides):
    from nfnet.app.update_task import update

    return update(compose_update(tmp_path, [*overrides]))


def test_a_round_writes_a_whole_version_and_the_next_finds_nothing_to_do(tmp_path, folder):
    models = tmp_path / "models"
    record = _update(tmp_path, f"data.root={folder}", f"registry={models}", "steps=4")
    assert record["decision"] == "promote" and record["candidate"] == "0001" and record["current"] is None
    version = models / "versions" / "0001"
    assert sorted(p.name for p in version.iterdir()) == [
        "classes.json", "config.yaml", "manifest.csv", "metrics.json", "model.json", "model.safetensors", "round.json"]
    assert json.loads((version / "classes.json").read_text()) == class_folders(folder)
    metrics = json.loads((version / "metrics.json").read_text())
    assert metrics["val"]["images"] == sum(1 for line in (version / "manifest.csv").read_text().splitlines()
                                           if ",val," in line)
    assert set(metrics["val"]["per_class"]) <= set(class_folders(folder))
    assert (models / "current").read_text().strip() == "0001" and not (models / ".round").exists()
    history = [json.loads(line) for line in (models / "history.jsonl").read_text().splitlines()]
    assert [h["decision"] for h in history] == ["promote"] and history[0]["wall_s"] > 0
    again = _update(tmp_path, f"data.root={folder}", f"registry={models}", "steps=4")
    assert again["decision"] == "none" and len((models / "history.jsonl").read_text().splitlines()) == 1


def test_watch_waits_for_enough_new_images_then_runs_a_round(tmp_path, folder):
    models = tmp_path / "models"
    watch = [f"data.root={folder}", f"registry={models}", "steps=4", "watch=true", "poll_seconds=0.05",
             "max_wait_seconds=0.3"]
    assert len(_update(tmp_path, *watch, "min_new_images=1", "max_rounds=5")["rounds"]) == 1
    write_round(folder, 2, per_class=6, grown_per_class=7, image_size=32)  # 8 + 2 x 7 = 22 new images
    assert _update(tmp_path, *watch, "min_new_images=23")["rounds"] == []
    rounds = _update(tmp_path, *watch, "min_new_images=22", "max_rounds=1")["rounds"]
    assert [r["candidate"] for r in rounds] == ["0002"] and Registry(models).versions() == ["0001", "0002"]
