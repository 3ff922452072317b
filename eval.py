"""Evaluate a checkpoint or pretrained weights: `python eval.py ckpt_path=<file> [weights=raw] [key=value ...]` (see README.md)."""

from nfnet.app.cli import run_entry_point

if __name__ == "__main__":
    run_entry_point(__file__, "eval")
