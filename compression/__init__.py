"""Compressors for a weight matrix, found by name, with exact storage accounting, and the
compressed Linear / Conv2d modules that hold their results inside a model.

>>> config = make_config("sparse", block=(1, 16))
>>> result = compress(weight, config)        # result.weight: W_c, result.cost: bits
>>> account_layer(*weight.shape, result.cost, rank=8).ratio
>>> compress_(model, config)                 # every compressible Linear / Conv2d, in place
"""

from compression import (  # noqa: F401  (importing registers the compressors)
    binary,
    integer,
    semistructured,
    sparse,
)
from compression.accounting import (
    LayerAccounting,
    account_layer,
    adapter_params,
    dense_cost,
    model_ratio,
)
from compression.binary import Int1Config
from compression.gptq import second_moment
from compression.integer import IntNConfig
from compression.modules import (
    CompressedConv2d,
    CompressedLinear,
    compress_,
    compressible,
    conv_options,
    replace_submodule,
    weight_matrix,
)
from compression.packing import pack_codes, unpack_codes
from compression.presets import PRESETS, build_configs
from compression.registry import (
    CompressedWeight,
    StorageCost,
    compress,
    expand,
    list_methods,
    make_config,
    method_of,
    register_compressor,
    register_method,
    uses_inputs,
)
from compression.semistructured import NMConfig, parse_nm
from compression.sparse import SparseConfig, parse_block

__all__ = [
    "PRESETS",
    "CompressedConv2d",
    "CompressedLinear",
    "CompressedWeight",
    "Int1Config",
    "IntNConfig",
    "LayerAccounting",
    "NMConfig",
    "SparseConfig",
    "StorageCost",
    "account_layer",
    "adapter_params",
    "build_configs",
    "compress",
    "compress_",
    "compressible",
    "conv_options",
    "dense_cost",
    "expand",
    "list_methods",
    "make_config",
    "method_of",
    "model_ratio",
    "pack_codes",
    "parse_block",
    "parse_nm",
    "register_compressor",
    "register_method",
    "replace_submodule",
    "second_moment",
    "unpack_codes",
    "uses_inputs",
    "weight_matrix",
]
