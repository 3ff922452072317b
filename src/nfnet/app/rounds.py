"""One update round: the folder read against the model registry, a candidate trained from the
model in service, both models scored, the candidate promoted or kept out, the round committed.

A round is planned once and then only carried out: its plan (the class set, which files train and
validate, the previous round's validation set, the manifest) and its checkpoints live in the
registry's `.round/` folder, so a killed round rerun with the same data.root resumes where its
last checkpoint left it (Lightning's exact resume), with the same files. Nothing outside `.round/`
changes until the candidate's version folder is complete and renamed into place
(nfnet.inference.registry).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from nfnet.app.machine import per_device_batch_size
from nfnet.app.tasks import _fit, _setup_data, build_run_module, build_trainer, run_callbacks
from nfnet.data import sources
from nfnet.data.class_set import ClassSet, evolve_classes
from nfnet.data.datamodule import ImageDataModule
from nfnet.data.folder import ImageFolderDataset
from nfnet.data.folder_split import read_manifest, write_manifest
from nfnet.data.rounds import RoundData, plan_round, relabel
from nfnet.data.transforms import ResizeCropEval
from nfnet.data.workers import usable_workers
from nfnet.inference.classifier import ARCHITECTURE, from_registry
from nfnet.inference.evaluation import class_hits
from nfnet.inference.promotion import PREVIOUS_VAL, VAL, Decision, Score, decide
from nfnet.inference.registry import MODEL, Registry, read_json, write_json, write_version_files
from nfnet.models import get_variant
from nfnet.models.head import with_rows
from nfnet.models.pretrained import read_weights, save_safetensors
from nfnet.training.checkpoints import checkpoints_in, newest_whole
from nfnet.training.loggers import finish_loggers

log = logging.getLogger(__name__)

PLAN = "plan.json"
PLAN_MANIFEST = "manifest.csv"
START = "start.safetensors"
CHECKPOINTS = "checkpoints"


class RoundDataModule(ImageDataModule):
    """The datamodule of a round: its splits are the plan's (`plan`, the plan file's path), not the
    folder's own split (the plan labels classes in the model's order and chooses what to replay)."""

    def __init__(self, data: Mapping[str, Any], augment: Mapping[str, Any], batch_size: int, plan: str) -> None:
        super().__init__(data, augment, batch_size)

    def read_splits(self, keys) -> sources.Splits:
        payload = read_json(Path(self.hparams.plan))
        data = RoundData.from_json(payload["data"], [])
        return sources.Splits(payload["classes"], data.train, data.val)


# --------------------------------------------------------------------------- planning
def _old_rows(class_set: ClassSet, old: list[str], class_map: Mapping[str, str | None]) -> list[int]:
    """For each output of the model in service, the label it stands for now (-1: a removed class)."""
    labels = [class_set.old_label(name, class_map) for name in old]
    return [-1 if label is None else label for label in labels]


def plan(cfg: DictConfig, registry: Registry) -> dict[str, Any] | None:
    """A new round's plan, written into the registry's `.round/`; None when nothing changed since
    the newest version (and `force` is off)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    root = sources.root_of(data)
    current = registry.current()
    found = sources.splits(data, sources.prepare(data))
    old = registry.classes(current) if current else []
    class_map = data["class_map"]
    class_set = evolve_classes(old, found.classes, class_map)
    train, val = (relabel(s, found.classes, class_set.classes) for s in (found.train, found.val))
    previous = registry.manifest(current) if current else None
    round_data = plan_round(root, train, val, class_set, previous, class_map, cfg.replay.fraction,
                            cfg.replay.new_repeats, data["split_seed"])
    for line in round_data.changes.report():
        log.warning("data.root=%s: %s", root, line)
    newest = registry.versions()[-1] if registry.versions() else None
    if newest is not None and not cfg.force and sorted(round_data.manifest) == sorted(registry.manifest(newest)) \
            and registry.classes(newest) == class_set.classes:
        return None
    work = registry.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if current:
        weights = read_weights(registry.folder(current) / MODEL)
        save_safetensors(with_rows(weights, class_set.rows), work / START, get_variant(cfg.model.name), class_set.classes)
    payload = {
        "version": registry.next_version(), "base": current, "root": root, "classes": class_set.classes,
        "old": [i for i, row in enumerate(class_set.rows) if row is not None],
        "old_rows": _old_rows(class_set, old, class_map), "class_change": class_set.describe(),
        "data": round_data.to_json(root), "planned": time.time(),
    }
    write_manifest(str(work / PLAN_MANIFEST), round_data.manifest)
    write_json(work / PLAN, payload)  # written last: a plan file means a whole plan
    return payload


def resumable(cfg: DictConfig, registry: Registry) -> dict[str, Any] | None:
    """The plan of an interrupted round this one can resume: the same base version and data.root."""
    path = registry.work / PLAN
    if not path.is_file():
        return None
    payload = read_json(path)
    if payload["base"] == registry.current() and payload["root"] == sources.root_of(cfg.data) \
            and payload["version"] not in registry.versions():
        return payload
    log.info("discarding the interrupted round %s in %s: it started from another version or folder",
             payload["version"], registry.work)
    shutil.rmtree(registry.work, ignore_errors=True)
    return None


# --------------------------------------------------------------------------- training
def train_candidate(cfg: DictConfig, registry: Registry, payload: dict[str, Any]) -> torch.nn.Module:
    """Trains the round's candidate (resuming from `.round/checkpoints` when there is one); returns
    the weights it would serve: the EMA where there is one."""
    work = registry.work
    with open_dict(cfg):
        if payload["base"] is not None:
            cfg.model.pretrained = str(work / START)
    datamodule = RoundDataModule(OmegaConf.to_container(cfg.data, resolve=True),
                                 OmegaConf.to_container(cfg.augment, resolve=True), per_device_batch_size(cfg),
                                 str(work / PLAN))
    _setup_data(cfg, datamodule)
    module = build_run_module(cfg, datamodule)
    checkpoints = str(work / CHECKPOINTS)
    resume, _ = newest_whole(checkpoints_in(checkpoints))  # a damaged newest save is passed over
    if resume:
        log.info("resuming round %s, interrupted, from %s", payload["version"], resume)
    callbacks, plugins, loggers = run_callbacks(cfg, module, resume, checkpoint_dir=checkpoints)
    status = "failed"
    try:
        trainer = build_trainer(cfg, module, callbacks, plugins, loggers)
        if "stopped" in _fit(cfg, trainer, module, datamodule, resume):
            raise RuntimeError("the round's training stopped")  # only a multirun job gets here
        status = "success"
    finally:
        finish_loggers(loggers, status)
    return (module.ema_net if module.ema_net is not None else module.net).eval()


# --------------------------------------------------------------------------- judging
def _score(net: torch.nn.Module, samples, payload, size: int, pad: int, cfg: DictConfig,
           rows: list[int] | None = None) -> Score:
    classes = payload["classes"]
    if not samples:
        return Score([0] * len(classes), [0] * len(classes))
    dataset = ImageFolderDataset(samples, classes, ResizeCropEval(size, pad), max_bad_fraction=cfg.data.max_bad_fraction,
                                 name="evaluation")
    batch = cfg.data.eval_batch_size or cfg.data.batch_size
    return Score(*class_hits(net, dataset, len(classes), rows, batch, usable_workers(cfg.data.num_workers)))


def judge(cfg: DictConfig, registry: Registry, payload: dict[str, Any], candidate: torch.nn.Module
          ) -> tuple[dict[str, Any], Decision]:
    """Both models scored on this round's val set and the previous round's; the gate's decision."""
    data = RoundData.from_json(payload["data"], [])
    sets = {VAL: data.val, PREVIOUS_VAL: data.previous_val}
    # Lightning hands the module back on the CPU; where training had a GPU, scoring uses it too.
    device = "cuda" if torch.cuda.is_available() and cfg.trainer.get("accelerator") in ("gpu", "cuda", "auto") else "cpu"
    size, pad = cfg.data.test_size, cfg.data.eval_pad
    new = {key: _score(candidate.to(device), samples, payload, size, pad, cfg) for key, samples in sets.items()}
    old = None
    if payload["base"] is not None:
        served = from_registry(str(registry.folder(payload["base"])))
        served.net.to(device)
        old = {key: _score(served.net, samples, payload, served.image_size, served.eval_pad, cfg, payload["old_rows"])
               for key, samples in sets.items()}
    decision = decide(new, old, payload["classes"], payload["old"], cfg.gate.tolerance, cfg.gate.max_class_drop)
    classes = payload["classes"]
    metrics = {key: score.to_json(classes) for key, score in new.items()}
    metrics["current"] = {"version": payload["base"], **({k: s.to_json(classes) for k, s in old.items()} if old else {})}
    metrics["moved"] = {key: {c: {"current": b, "candidate": a} for c, (b, a) in changes.items()}
                        for key, changes in decision.moved.items()}
    metrics["new_classes"] = [classes[i] for i in range(len(classes)) if i not in payload["old"]]
    # Which files changed content or class since the last round, by name; how many are new.
    metrics["data_changes"] = {**payload["data"]["changes"], "new": len(payload["data"]["changes"]["new"])}
    return metrics, decision


# --------------------------------------------------------------------------- committing
def commit(cfg: DictConfig, registry: Registry, payload: dict[str, Any], candidate: torch.nn.Module,
           metrics: dict[str, Any], decision: Decision, started: float) -> dict[str, Any]:
    """Writes the candidate's version and commits the round (this process's part of it began at
    `started`); returns its history record."""
    version, classes = payload["version"], payload["classes"]
    staging = registry.staging(version)
    state = {k: v.detach().cpu() for k, v in candidate.state_dict().items()}
    save_safetensors(state, staging / MODEL, get_variant(cfg.model.name), classes)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    info = {"model": {"name": model["name"], **{k: model[k] for k in ARCHITECTURE}}, "image_size": cfg.data.test_size,
            "eval_pad": cfg.data.eval_pad, "data": OmegaConf.to_container(cfg.data, resolve=True)}
    resolved = OmegaConf.to_yaml({k: cfg[k] for k in cfg if k != "hydra"}, resolve=True)
    manifest = read_manifest(str(registry.work / PLAN_MANIFEST))
    write_version_files(staging, classes, info, metrics, resolved, manifest)
    record = {
        "round": int(version), "candidate": version, "current": payload["base"],
        "decision": "promote" if decision.promote else "keep", "reason": decision.reason,
        "wall_s": round(time.time() - started, 1), "resumed": started > payload["planned"],
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "data_root": payload["root"],
        "classes": payload["class_change"], "val_top1": metrics[VAL]["top1"],
        "previous_val_top1": metrics[PREVIOUS_VAL]["top1"] if metrics[PREVIOUS_VAL]["images"] else None,
    }
    registry.commit(staging, version, record)
    shutil.rmtree(registry.work, ignore_errors=True)
    return record


def run_round(cfg: DictConfig) -> dict[str, Any]:
    """One round on data.root against registry=; returns its history record (decision "none" when
    nothing changed since the newest version). Prints one line saying what was decided and why."""
    registry, started = Registry(cfg.registry), time.time()
    with registry.lock():
        completed = registry.complete()
        if completed:
            log.info(completed)
        if cfg.seed is not None:
            pl.seed_everything(cfg.seed, workers=True)
        payload = resumable(cfg, registry) or plan(cfg, registry)
        if payload is None:
            newest = registry.versions()[-1]
            line = f"update: nothing to do: data.root holds the files version {newest} was trained on (force=true " \
                   "trains again)"
            print(line, flush=True)
            return {"decision": "none", "reason": line, "candidate": None, "current": registry.current()}
        log.info("round %s: %s, %d training and %d validation images, starting from %s", payload["version"],
                 payload["class_change"], len(payload["data"]["train"]), len(payload["data"]["val"]),
                 f"version {payload['base']}" if payload["base"] else cfg.model.pretrained or "scratch")
        candidate = train_candidate(cfg, registry, payload)
        metrics, decision = judge(cfg, registry, payload, candidate)
        record = commit(cfg, registry, payload, candidate, metrics, decision, started)
    verdict = f"promoted {record['candidate']}" if decision.promote else \
        f"kept {record['current']}, not {record['candidate']}"
    print(f"update: {verdict} ({record['wall_s']:.0f} s): {decision.reason}", flush=True)
    return record
