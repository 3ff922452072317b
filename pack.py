"""Pack images into shards for data=streaming: `python pack.py source=imagefolder|imagenet root=<images> output_dir=<shards>` (see README.md)."""

from nfnet.app.cli import run_entry_point

if __name__ == "__main__":
    run_entry_point(__file__, "pack")
