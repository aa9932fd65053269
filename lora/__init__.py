"""LoRA adapters for compressed Linear and Conv2d layers: the layers, their config, named inits,
and the calibrated, sequential initialisation of a whole network.

>>> layer = attach_lora(model, make_config("int1"), LoraConfig(r=8, lora_alpha=16, init="svd_init"))
"""

from lora.attach import (
    attach_adapters_,
    attach_lora,
    make_adapter,
    make_init_context,
    make_lora_conv2d,
    make_lora_linear,
)
from lora.calibration import MomentAccumulator, calibrate_sequentially
from lora.capture import forward_order
from lora.config import LoraConfig
from lora.conv import LoraConv2d
from lora.inits import ACTIVATION_AWARE_INITS, LORA_INITS, InitContext, get_init, register_init
from lora.layer import LoraLinear, check_rank

__all__ = [
    "ACTIVATION_AWARE_INITS",
    "LORA_INITS",
    "InitContext",
    "LoraConfig",
    "LoraConv2d",
    "LoraLinear",
    "MomentAccumulator",
    "attach_adapters_",
    "attach_lora",
    "calibrate_sequentially",
    "check_rank",
    "forward_order",
    "get_init",
    "make_adapter",
    "make_init_context",
    "make_lora_conv2d",
    "make_lora_linear",
    "register_init",
]
