"""update.py's checks: those of a training run, one growing folder of class folders, and a model
registry that this round can continue (nfnet.inference.registry); before any work, one line."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from nfnet.app.checks import (_check_data, _check_model, _check_outputs, _check_ra_level, _check_requires,
                              check_schema_values, unwritable_reason)
from nfnet.app.machine import check_trainer
from nfnet.app.values import read, require
from nfnet.errors import ConfigError, InputError


def check_update_config(cfg: DictConfig, this_machine: bool = True) -> None:
    """update.py: the training run's checks, one growing folder, and a registry this round can continue."""
    check_schema_values(cfg, "update")
    source = read(cfg, "data.source")
    require(source == "imagefolder", f"data.source={source!r}: update.py learns from one folder of class folders that "
                                     "grows, data=imagefolder (its default) with data.root=<folder>")
    _check_model(cfg, this_machine)
    _check_data(cfg, this_machine)
    _check_ra_level(cfg)
    check_trainer(cfg, this_machine)
    _check_requires(cfg)
    _check_outputs(cfg, this_machine)
    if this_machine:
        try:
            _check_registry(cfg)
        except InputError as error:  # the registry's or the class set's own one line
            raise ConfigError(str(error)) from None


def _check_registry(cfg: DictConfig) -> None:
    from nfnet.data.class_set import evolve_classes
    from nfnet.inference.registry import MODEL_INFO, Registry, read_json

    path = os.path.expanduser(str(read(cfg, "registry")))
    reason = unwritable_reason(path)
    require(reason is None, f"registry={path!r} cannot hold the model registry: {reason}")
    registry = Registry(path)
    require(registry.exists() or not os.path.isdir(path) or not os.listdir(path),
            f"registry={path!r} is a folder with other files in it, not a model registry (no versions/ folder); "
            "give a new or empty folder")
    current = registry.current()
    if current is None:
        return
    name, variant = read(cfg, "model.name"), read_json(registry.folder(current) / MODEL_INFO)["model"]["name"]
    require(name == variant, f"model.name={name!r}, but version {current}, in service in registry={path!r}, is a "
                             f"{variant}, which a round continues; add model={variant}")
    pretrained = read(cfg, "model.pretrained", None)
    require(pretrained is None, f"model.pretrained={str(pretrained)!r} starts an empty registry; registry={path!r} has "
                                f"version {current} in service, which this round starts from: drop model.pretrained")
    root = os.path.expanduser(str(read(cfg, "data.root")))
    with os.scandir(root) as entries:
        folders = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    evolve_classes(registry.classes(current), folders, read(cfg, "data.class_map", None))
