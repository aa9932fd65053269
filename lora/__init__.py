"""LoRA adapters for a compressed Linear layer: the layer, its config and named inits.

>>> layer = attach_lora(model, make_config("int1"), LoraConfig(r=8, lora_alpha=16, init="svd_init"))
"""

from lora.attach import attach_lora, make_init_context, make_lora_linear
from lora.config import LoraConfig
from lora.inits import LORA_INITS, InitContext, get_init, register_init
from lora.layer import LoraLinear, check_rank

__all__ = [
    "LORA_INITS",
    "InitContext",
    "LoraConfig",
    "LoraLinear",
    "attach_lora",
    "check_rank",
    "get_init",
    "make_init_context",
    "make_lora_linear",
    "register_init",
]
