"""The network and its math, plain PyTorch (no Lightning, no Ray)."""

from model.config import NextDiTConfig, config_names, get_config
from model.flops import executed_flops_per_token, flops_per_token
from model.nextdit import NextDiT, count_parameters
from model.rope import RopeScaling

__all__ = [
    "NextDiT",
    "NextDiTConfig",
    "RopeScaling",
    "config_names",
    "count_parameters",
    "executed_flops_per_token",
    "flops_per_token",
    "get_config",
]
