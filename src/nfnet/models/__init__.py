"""NFNet models: the architecture, its variant table, FLOP counting and weight conversion.

Plain PyTorch; nothing here imports Lightning or Hydra.
"""

from .activations import GAMMAS, GammaAct
from .export import export_onnx, fold_weight_standardization
from .flops import count_flops
from .layers import SameConv2d, SqueezeExcite, StochasticDepth, WSConv2d
from .nfnet import NFBlock, NFNet, create_model
from .pretrained import load_haiku_checkpoint, load_pretrained
from .signal_prop import BlockSignal, signal_propagation
from .timm import from_timm_state_dict, timm_model_kwargs, timm_model_name, to_timm_state_dict
from .timm_hub import push_timm_folder, read_timm_folder, save_timm_folder
from .variants import VARIANTS, Variant, get_variant

__all__ = [
    "GAMMAS", "VARIANTS", "BlockSignal", "GammaAct", "NFBlock", "NFNet", "SameConv2d",
    "SqueezeExcite", "StochasticDepth", "Variant", "WSConv2d", "count_flops", "create_model",
    "export_onnx", "fold_weight_standardization", "from_timm_state_dict", "get_variant",
    "load_haiku_checkpoint", "load_pretrained", "push_timm_folder", "read_timm_folder",
    "save_timm_folder", "signal_propagation", "timm_model_kwargs", "timm_model_name",
    "to_timm_state_dict",
]
