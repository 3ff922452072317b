"""The task of pack.py: an image folder or ILSVRC-2012 -> LitData shards (nfnet.data.packing)."""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig

from nfnet.app.checks import check_pack_config
from nfnet.app.reports import print_table
from nfnet.errors import ConfigError

log = logging.getLogger(__name__)


def pack(cfg: DictConfig) -> dict[str, Any]:
    """Plans the splits as the folder sources read them, packs them, and prints what was written."""
    from nfnet.data import packing

    check_pack_config(cfg)
    root = os.path.expanduser(str(cfg.root))
    try:
        if cfg.source == "imagenet":
            plan = packing.plan_imagenet(root, cfg.imagenet_val_labels, cfg.follow_links)
        else:
            plan = packing.plan_imagefolder(root, cfg.val_fraction, cfg.split_seed, cfg.follow_links)
        meta = packing.pack(plan, str(cfg.output_dir), workers=cfg.workers, chunk_bytes=cfg.chunk_mb << 20,
                            max_bad_fraction=cfg.max_bad_fraction, show_progress=cfg.progress)
    except FileExistsError as error:
        raise ConfigError(f"output_dir={str(cfg.output_dir)!r}: {error}") from None
    except (OSError, ValueError) as error:  # no class folders, no ground truth (its file named), too many bad files
        raise ConfigError(f"root={str(cfg.root)!r}: {' '.join(str(error).split())}") from None
    output = os.path.abspath(os.path.expanduser(str(cfg.output_dir)))
    print_table(f"pack: {output}", {
        "source": f"{cfg.source} {plan.root}", "classes": len(meta["classes"]), "train images": meta["splits"]["train"],
        "val images": meta["splits"]["val"], "bad files skipped": len(meta["bad"]),
        "train with": f"python train.py data=streaming data.root={output}",
    })
    log.info("packed %s into %s", plan.root, output)
    return meta
