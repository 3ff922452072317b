"""Damaged checkpoints and foreign weights files: a resume passes over a damaged newest checkpoint
to the next whole one, and every tool names a file it cannot use, and why, in one line."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from damaged_files import DAMAGE, Exploit, damage, npz_weights, pickle_named_safetensors, write_checkpoint
from nfnet.errors import ConfigError, InputError
from nfnet.inference.torch_files import TRAINING_STATE, damage as damage_of, load_torch_file
from nfnet.training.checkpoints import checkpoint_damage, checkpoints_in, newest_whole


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_each_kind_of_damage_is_found_and_named(tmp_path, kind):
    path = damage(write_checkpoint(tmp_path / "last.ckpt"), kind)
    why = damage_of(path, TRAINING_STATE)
    assert why is not None and DAMAGE[kind] in why and "\n" not in why
    with pytest.raises(InputError) as error:
        load_torch_file(path)
    assert str(error.value).startswith(f"{path} ") and "\n" not in str(error.value)


def test_a_whole_checkpoint_has_no_damage_and_a_partial_one_lacks_the_training_state(tmp_path):
    whole = write_checkpoint(tmp_path / "whole.ckpt")
    assert damage_of(whole, TRAINING_STATE) is None
    assert load_torch_file(whole)["global_step"] == 3
    weights_only = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {"net.weight": torch.zeros(2)}}, weights_only)
    why = damage_of(weights_only, TRAINING_STATE)
    assert "holds no optimizer_states, lr_schedulers, loops, epoch, global_step" in why


def test_random_bytes_are_damage_not_code(tmp_path):
    # torch's weights-only loader words random bytes like a refused pickle; they are neither
    # refused nor "would run code", just not a checkpoint.
    path = damage(write_checkpoint(tmp_path / "x.ckpt"), "random bytes")
    assert "run code" not in checkpoint_damage(str(path))


def test_a_pickle_that_would_run_code_is_refused_not_damaged(tmp_path):
    target = tmp_path / "created-by-the-pickle"
    path = tmp_path / "evil.ckpt"
    torch.save({**write_and_load(tmp_path), "hook": Exploit(open, str(target), "w")}, path)
    with pytest.raises(pickle.UnpicklingError):
        damage_of(path, TRAINING_STATE)
    assert checkpoint_damage(str(path)) == "was refused: loading it would run code from the file"
    assert not target.exists()


def write_and_load(tmp_path: Path) -> dict:
    return torch.load(write_checkpoint(tmp_path / "template.ckpt"), weights_only=True)


def test_the_newest_whole_checkpoint_is_taken_and_the_damaged_newer_ones_named(tmp_path):
    folder = tmp_path / "checkpoints"
    write_checkpoint(folder / "epoch_000.ckpt", step=6, mtime=1000)
    write_checkpoint(folder / "last-step.ckpt", step=8, mtime=1001)
    damage(write_checkpoint(folder / "last.ckpt", step=9, mtime=1002), "cut in half")
    (folder / "last.ckpt.1a2b3c.tmp").write_bytes(b"")  # a save killed at its start: never a candidate
    candidates = checkpoints_in(str(folder))
    assert [Path(p).name for p in candidates] == ["last.ckpt", "last-step.ckpt", "epoch_000.ckpt"]
    path, passed = newest_whole(candidates)
    assert path == str(folder / "last-step.ckpt")
    assert [(Path(p).name, "cut short" in why) for p, why in passed] == [("last.ckpt", True)]
    damage(folder / "last-step.ckpt", "a tensor record cut short")
    assert newest_whole(checkpoints_in(str(folder)))[0] == str(folder / "epoch_000.ckpt")


def _resume_cfg(cfg_train, tmp_path, *overrides):
    from omegaconf import open_dict

    cfg = cfg_train(list(overrides))
    with open_dict(cfg):
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.output_dir = str(tmp_path / "logs" / "train" / "runs" / "new")
    return cfg


def test_ckpt_path_last_falls_back_and_says_so_in_one_line(cfg_train, tmp_path, caplog):
    from nfnet.app.resume import resolve_checkpoint

    cfg = _resume_cfg(cfg_train, tmp_path, "ckpt_path=last")
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    write_checkpoint(folder / "epoch_000.ckpt", mtime=1000)
    damage(write_checkpoint(folder / "last.ckpt", mtime=1001), "empty")
    with caplog.at_level("INFO", logger="nfnet.app.resume"):
        assert resolve_checkpoint(cfg) == str(folder / "epoch_000.ckpt")
    lines = [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert f"ckpt_path=last: resuming from {folder / 'epoch_000.ckpt'}" in lines[0]
    assert f"passed over 1 damaged: {folder / 'last.ckpt'} is empty (0 bytes)" in lines[0]


def test_when_every_checkpoint_is_damaged_resume_true_stops_in_one_line(cfg_train, tmp_path):
    from nfnet.app.resume import resolve_checkpoint

    cfg = _resume_cfg(cfg_train, tmp_path, "resume=true")
    earlier = tmp_path / "logs" / "train" / "runs" / "earlier" / "checkpoints"
    damage(write_checkpoint(earlier / "last.ckpt"), "no data.pkl")
    with pytest.raises(ConfigError) as error:
        resolve_checkpoint(cfg)
    message = str(error.value)
    assert message.startswith("resume=true: no checkpoint can continue the run: ")
    assert str(earlier / "last.ckpt") in message and "without the data.pkl record" in message
    assert "\n" not in message


@pytest.mark.parametrize("kind", ["cut in half", "random bytes"])
def test_a_damaged_ckpt_path_given_to_train_is_one_line(cfg_train, tmp_path, kind):
    from nfnet.app import tasks

    path = damage(write_checkpoint(tmp_path / "given.ckpt"), kind)
    cfg = cfg_train([f"ckpt_path={path}", "test=false"])
    with pytest.raises(ConfigError) as error:
        tasks.train(cfg)
    message = str(error.value)
    assert message.startswith(f"ckpt_path={str(path)!r} ") and DAMAGE[kind] in message
    assert "run code" not in message and "\n" not in message
    assert not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------- eval, predict, export
def _compose(entry: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(entry, overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


def _entry_overrides(entry: str, tmp_path: Path) -> list[str]:
    image = tmp_path / "image.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    return {"eval": ["num_workers=0"], "predict": [f"input={image}", "device=cpu"],
            "export": [f"output_dir={tmp_path / 'export'}", "formats=[safetensors]"]}[entry]


@pytest.mark.parametrize("entry", ["eval", "predict", "export"])
@pytest.mark.parametrize("kind", ["cut in half", "a tensor record missing", "random bytes"])
def test_a_damaged_checkpoint_given_to_eval_predict_or_export_is_one_line(tmp_path, entry, kind):
    from nfnet.app.tasks import TASKS

    path = damage(write_checkpoint(tmp_path / "last.ckpt"), kind)
    cfg = _compose(entry, [f"ckpt_path={path}", f"paths.output_dir={tmp_path}", *_entry_overrides(entry, tmp_path)])
    with pytest.raises(ConfigError) as error:
        TASKS[entry](cfg)
    message = str(error.value)
    assert message.startswith(f"ckpt_path={str(path)!r}: ") and DAMAGE[kind] in message
    assert "run code" not in message and "\n" not in message
    assert not (tmp_path / "export").exists()


# --------------------------------------------------------------------------- weights files
def _wrong_keys(path: Path) -> Path:
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    return path


def _wrong_shapes(path: Path) -> Path:
    from nfnet.models import create_model

    torch.save({k: torch.zeros(2) for k in create_model("nfnet_tiny", num_classes=10).state_dict()}, path)
    return path


def _weights_only_checkpoint_of_another_model(path: Path) -> Path:
    torch.save({"state_dict": {"net.encoder.weight": torch.zeros(3)}, "hyper_parameters": {}}, path)
    return path


NO_HEAD = "has no classifier.weight matrix"
WEIGHTS = {  # name -> (maker, what train's line says, what eval's says)
    "np.savez zip": (npz_weights, "without the data.pkl record", "without the data.pkl record"),
    "pickle named .safetensors": (pickle_named_safetensors, "cannot be read as weights (Error while deserializing", None),
    "state dict with other keys": (_wrong_keys, "does not fit nfnet_tiny: missing stem.conv0.weight", NO_HEAD),
    "state dict with other shapes": (_wrong_shapes, "does not fit nfnet_tiny: stem.conv0.weight: checkpoint (2,)", NO_HEAD),
    "checkpoint of another model": (_weights_only_checkpoint_of_another_model, "does not fit nfnet_tiny: missing", NO_HEAD),
    "cut in half": (lambda p: damage(write_checkpoint(p), "cut in half"), "is cut short", None),
}
NAMES = {"np.savez zip": "w.npz", "pickle named .safetensors": "w.safetensors"}


@pytest.mark.parametrize("case", list(WEIGHTS))
def test_weights_files_that_are_not_weights_of_the_model_are_one_line_for_train_and_eval(cfg_train, tmp_path, case):
    from nfnet.app import tasks
    from nfnet.app.inference_tasks import load_classifier

    maker, train_says, eval_says = WEIGHTS[case]
    path = maker(tmp_path / NAMES.get(case, "w.pt"))
    cfg = cfg_train([f"model.pretrained={path}", "trainer.fast_dev_run=true", "test=false"])
    with pytest.raises(ConfigError) as error:
        tasks.train(cfg)
    assert str(error.value).startswith(f"model.pretrained={str(path)!r}: ") and train_says in str(error.value)
    assert "\n" not in str(error.value) and "run code" not in str(error.value)
    cfg = _compose("eval", [f"pretrained={path}", "model_name=nfnet_tiny", "source=imagefolder", f"root={tmp_path}"])
    with pytest.raises(ConfigError) as error:
        load_classifier(cfg)
    assert str(error.value).startswith(f"pretrained={str(path)!r}: ") and (eval_says or train_says) in str(error.value)
    assert "\n" not in str(error.value)
