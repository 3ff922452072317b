"""Export a checkpoint to ONNX / torch.export / safetensors: `python export.py ckpt_path=<file>` (see README.md)."""

from nfnet.cli import run_entry_point
from nfnet.entry_checks import check_export_config

if __name__ == "__main__":
    run_entry_point(__file__, "export", "export", check_export_config)
