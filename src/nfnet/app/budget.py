"""A run's length that fits its dataset: `steps` and `optim.warmup_fraction`.

A fixed number of epochs is the wrong unit for a user's own folder: 12 epochs of 1,000 images are
375 steps at batch 32, too few to train an NFNet from scratch, while 12 epochs of a million images
are far more than a fine-tune needs. With `steps=S` the run is S optimizer steps
(`trainer.max_steps`), and `trainer.max_epochs` becomes the number of epochs of this training
split that holds them, so a small folder runs many epochs and a large one a part of one. With
`optim.warmup_fraction=f` the warmup is that share of the run (f x epochs, in the schedule's
epochs), whatever the dataset's size. Both are applied to the config once the training split's
size is known, before the module and the trainer are built from it.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig, open_dict

from nfnet.app.machine import world_size


def apply_budget(cfg: DictConfig, num_train_examples: int, per_device_batch: int) -> str | None:
    """Sets trainer.max_steps / max_epochs from `steps` and optim.warmup_epochs from
    optim.warmup_fraction, in place; returns a line saying what they became (None: unchanged)."""
    steps, fraction = cfg.get("steps"), cfg.optim.get("warmup_fraction")
    if steps is None and fraction is None:
        return None
    said = []
    with open_dict(cfg):
        if steps is not None:
            global_batch = per_device_batch * (world_size(cfg) or 1)
            cfg.trainer.max_steps = int(steps)
            cfg.trainer.max_epochs = max(1, math.ceil(steps * global_batch / num_train_examples))
            said.append(f"{steps} steps of {global_batch} examples = {cfg.trainer.max_epochs} epoch(s) of "
                        f"{num_train_examples} training images")
        if fraction is not None:
            cfg.optim.warmup_epochs = float(fraction) * cfg.trainer.max_epochs
            said.append(f"warmup {fraction:g} of the run ({cfg.optim.warmup_epochs:.3g} epochs)")
    return "run length: " + "; ".join(said)
