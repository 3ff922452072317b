"""The model registry (nfnet.inference.registry): a version exists whole or not at all, a kill at
any point of a commit leaves a registry that readers see as before or as committed, and the
next round finishes what the kill interrupted."""

from __future__ import annotations

import json

import pytest
import torch

from nfnet.data.folder_split import ManifestRow
from nfnet.errors import InputError
from nfnet.inference.classifier import from_registry
from nfnet.inference.registry import MODEL, Registry, version_folder, write_version_files
from nfnet.models import create_model, get_variant
from nfnet.models.pretrained import save_safetensors

CLASSES = ["circle", "star"]


def _stage(registry: Registry, version: str, seed: int = 0):
    torch.manual_seed(seed)
    net = create_model("nfnet_tiny", num_classes=len(CLASSES))
    staging = registry.staging(version)
    save_safetensors(net.state_dict(), staging / MODEL, get_variant("nfnet_tiny"), CLASSES)
    info = {"model": {"name": "nfnet_tiny"}, "image_size": 32, "eval_pad": 0, "data": {}}
    rows = [ManifestRow("circle/0.png", "train", "circle", 10, "ab" * 16)]
    write_version_files(staging, CLASSES, info, {"val": {"top1": 0.5}}, "seed: 0\n", rows)
    return staging, net


def _record(version, current, decision="promote"):
    return {"candidate": version, "current": current, "decision": decision, "reason": "test", "round": int(version)}


@pytest.fixture
def registry(tmp_path):
    registry = Registry(tmp_path / "models")
    with registry.lock():
        staging, _ = _stage(registry, "0001")
        registry.commit(staging, "0001", _record("0001", None))
    return registry


def test_a_committed_round_is_current_and_in_the_history(registry):
    assert registry.versions() == ["0001"] and registry.current() == "0001"
    assert [line["candidate"] for line in registry.history()] == ["0001"]
    assert registry.next_version() == "0002"
    assert registry.manifest("0001")[0].relpath == "circle/0.png"


def test_a_kill_before_the_rename_leaves_the_registry_as_it_was(registry):
    _stage(registry, "0002", seed=1)  # written, never committed: the process died here
    assert registry.versions() == ["0001"] and registry.current() == "0001" and len(registry.history()) == 1
    assert version_folder(registry.root) == registry.folder("0001")
    assert registry.complete() is None
    assert not list((registry.root / "versions").glob(".*")), "the staging folder is cleaned up"


@pytest.mark.parametrize("decision", ["promote", "keep"])
def test_a_kill_after_the_rename_is_finished_by_the_next_round(registry, monkeypatch, decision):
    staging, _ = _stage(registry, "0002", seed=1)
    monkeypatch.setattr(Registry, "complete", lambda self: None)  # the process died right after the rename
    registry.commit(staging, "0002", _record("0002", "0001", decision))
    monkeypatch.undo()
    # Readers still see the version in service, whole.
    assert registry.current() == "0001" and len(registry.history()) == 1
    assert "recorded round 0002" in registry.complete()
    assert registry.current() == ("0002" if decision == "promote" else "0001")
    assert [line["decision"] for line in registry.history()] == ["promote", decision]
    assert registry.complete() is None  # done once


def test_a_rollback_by_hand_is_not_undone(registry):
    staging, _ = _stage(registry, "0002", seed=1)
    registry.commit(staging, "0002", _record("0002", "0001"))
    (registry.root / "current").write_text("0001\n")
    assert registry.complete() is None and registry.current() == "0001"


def test_a_second_round_on_the_same_registry_is_refused(registry):
    with registry.lock():
        with pytest.raises(InputError, match=r"in use by update\.py \(pid \d+\)"):
            with Registry(registry.root).lock():
                pass


def test_readers_load_the_current_version_or_a_named_one(registry):
    staging, net = _stage(registry, "0002", seed=1)
    registry.commit(staging, "0002", _record("0002", "0001"))
    loaded = from_registry(str(registry.root))
    assert loaded.class_names == CLASSES and loaded.image_size == 32 and loaded.weights == "v0002"
    assert torch.equal(loaded.net.classifier.weight, net.classifier.weight)
    assert from_registry(str(registry.folder("0001"))).weights == "v0001"


def test_what_is_not_a_registry_is_one_line(tmp_path, registry):
    with pytest.raises(InputError, match="neither a model registry"):
        version_folder(tmp_path / "elsewhere")
    (registry.root / "current").write_text("0009\n")
    with pytest.raises(InputError, match="names version '0009'"):
        registry.current()


def test_the_history_is_one_json_object_a_line(registry):
    lines = (registry.root / "history.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["candidate"] == "0001"
