"""Top-k predictions for images, folders, videos or a camera: `python predict.py ckpt_path=<file> input=<path>` (see README.md)."""

from nfnet.cli import run_entry_point
from nfnet.entry_checks import check_predict_config

if __name__ == "__main__":
    run_entry_point(__file__, "predict", "predict", check_predict_config)
