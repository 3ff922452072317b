"""Predict the classes of images, a folder, a video or a camera: `python predict.py ckpt_path=<file> input=<path>` (see README.md)."""

from nfnet.app.cli import run_entry_point

if __name__ == "__main__":
    run_entry_point(__file__, "predict")
