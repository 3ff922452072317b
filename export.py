"""Export a checkpoint for deployment: `python export.py ckpt_path=<file> [formats=[onnx,torch,safetensors]]` (see README.md)."""

from nfnet.app.cli import run_entry_point

if __name__ == "__main__":
    run_entry_point(__file__, "export")
