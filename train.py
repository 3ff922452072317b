"""Train an NFNet: `python train.py [group=option ...] [key=value ...]` (see README.md)."""

from nfnet.app.cli import run_entry_point

if __name__ == "__main__":
    run_entry_point(__file__, "train")
