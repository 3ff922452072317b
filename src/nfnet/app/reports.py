"""What the entry points show and write: the config tree, a result table, a JSON report."""

from __future__ import annotations

import json
import os
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf


@rank_zero_only
def print_config(cfg: DictConfig) -> None:
    import rich
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    order = ["model", "data", "augment", "optim", "trainer", "callbacks", "logger", "paths"]
    keys = order + [k for k in cfg if k not in order and k not in ("hydra", "module", "datamodule")]
    for key in keys:
        if key not in cfg:
            continue
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=True) if OmegaConf.is_config(node) else str(node)
        tree.add(key, style="bold").add(Syntax(text, "yaml", theme="ansi_dark"))
    rich.print(tree)


def print_table(title: str, values: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in values.items():
        text = f"{value:.4f}" if isinstance(value, float) else json.dumps(value) if isinstance(value, dict) else str(value)
        table.add_row(key, text)
    Console(stderr=False).print(table)


def write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
