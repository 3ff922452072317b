"""Evaluate a checkpoint or pretrained weights: `python eval.py ckpt_path=<file> [weights=raw] [key=value ...]` (see README.md)."""

from nfnet.cli import run_entry_point
from nfnet.entry_checks import check_eval_config

if __name__ == "__main__":
    run_entry_point(__file__, "eval", "evaluate", check_eval_config)
