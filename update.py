"""Keep a deployed NFNet current: `python update.py data.root=DIR registry=MODELS` (see README.md)."""

from nfnet.app.cli import run_entry_point

if __name__ == "__main__":
    run_entry_point(__file__, "update")
