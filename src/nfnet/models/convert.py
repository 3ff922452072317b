"""Convert DeepMind or timm NFNet weights to this project's safetensors, once:

    python -m nfnet.models.convert F0_haiku.npz nfnet_f0.safetensors
    python -m nfnet.models.convert dm_nfnet_f1.pth nfnet_f1.safetensors --variant nfnet_f1

The source may be a DeepMind Haiku pickle (read without running any code from it), a timm
`dm_nfnet_*` state dict (.pth/.bin/.safetensors) or this project's own weights.
"""

from __future__ import annotations

import argparse
import pickle
import sys

from .matching import check_state_dict, infer_variant
from .pretrained import read_weights, save_safetensors
from .variants import VARIANTS, get_variant


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nfnet.models.convert",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="DeepMind F*_haiku.npz, timm dm_nfnet_* .pth/.bin/"
                                    ".safetensors, or this project's weights")
    parser.add_argument("dst", help="output .safetensors file")
    parser.add_argument("--variant", choices=list(VARIANTS),
                        help="check against this variant (default: inferred from the weights)")
    args = parser.parse_args(argv)
    try:
        state_dict = read_weights(args.src)
        variant = get_variant(args.variant) if args.variant else infer_variant(state_dict)
        check_state_dict(state_dict, variant)
    except (ValueError, OSError, pickle.UnpicklingError) as e:
        print(f"convert: {e}", file=sys.stderr)
        return 1
    save_safetensors(state_dict, args.dst, variant)
    params = sum(t.numel() for t in state_dict.values())
    print(f"wrote {args.dst}: {variant.name}, {len(state_dict)} tensors, {params:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
