"""`python update.py`: one round (nfnet.app.rounds), or, with `watch=true`, a round each time
`min_new_images` images have arrived, bounded by `max_rounds` rounds and `max_wait_seconds`
without one (for tests and job schedulers)."""

from __future__ import annotations

import logging
import time
from typing import Any

from omegaconf import DictConfig

from nfnet.app.checks import check_update_config
from nfnet.app.reports import print_config
from nfnet.app.rounds import run_round
from nfnet.data.rounds import new_files
from nfnet.data.sources import root_of
from nfnet.inference.registry import Registry

log = logging.getLogger(__name__)


def unseen_images(cfg: DictConfig) -> set[str]:
    """Images in data.root (relative paths, from a listing) that no round has trained or validated
    on: those the newest version's manifest does not list."""
    registry = Registry(cfg.registry)
    versions = registry.versions()
    known = {row.relpath for row in registry.manifest(versions[-1])} if versions else set()
    return set(new_files(root_of(cfg.data), known, cfg.data.follow_links))


def watch(cfg: DictConfig) -> list[dict[str, Any]]:
    """Rounds as images arrive; returns their records."""
    records: list[dict[str, Any]] = []
    # Files a round left out (bad images, skipped by the scan): they never count again.
    left_out: set[str] = set()
    idle_since, said = time.monotonic(), None
    while cfg.max_rounds is None or len(records) < cfg.max_rounds:
        unseen = unseen_images(cfg) - left_out
        if len(unseen) >= cfg.min_new_images:
            log.info("watch: %d new image(s) in data.root: a round starts", len(unseen))
            record = run_round(cfg)
            if record["decision"] != "none":
                records.append(record)
            # What the round saw but did not take (the scan's bad files); later arrivals still count.
            left_out |= unseen & unseen_images(cfg)
            idle_since, said = time.monotonic(), None
            continue
        if cfg.max_wait_seconds is not None and time.monotonic() - idle_since >= cfg.max_wait_seconds:
            log.info("watch: no round for max_wait_seconds=%g; stopping after %d round(s)", cfg.max_wait_seconds,
                     len(records))
            break
        if said != len(unseen):  # one line per change, not one per poll
            log.info("watch: %d new image(s) in data.root, waiting for min_new_images=%d (polling every %g s)",
                     len(unseen), cfg.min_new_images, cfg.poll_seconds)
            said = len(unseen)
        time.sleep(cfg.poll_seconds)
    return records


def update(cfg: DictConfig) -> dict[str, Any]:
    """update.py's task: returns the round's record, or {"rounds": [records]} in watch mode."""
    check_update_config(cfg)
    if cfg.print_config:
        print_config(cfg)
    if not cfg.watch:
        return run_round(cfg)
    return {"rounds": watch(cfg)}
