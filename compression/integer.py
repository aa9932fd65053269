"""N-bit integer weights (N = 2, 4, 8), symmetric, one scale per output row.

Row i is stored as codes q_ij in [-(2^(N-1) - 1), 2^(N-1) - 1] and a scale s_i = max_j |W_ij| /
(2^(N-1) - 1), so W_c = s_i * q_ij: at most 2^N - 1 levels per row (int2 is ternary). This is
the per-channel symmetric scheme common in post-training quantization (e.g. Krishnamoorthi 2018,
"Quantizing deep convolutional networks for efficient inference"). The max-based scale is not
the L2-optimal one, so ``loftq_init`` does not guarantee a monotone error with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from compression.registry import (
    CompressedWeight,
    StorageCost,
    dtype_bits,
    register_compressor,
    register_expander,
    register_method,
)

INT_BITS = (2, 4, 8)


@dataclass(frozen=True)
class IntNConfig:
    name: ClassVar[str] = "int"
    bits: int = 4

    def __post_init__(self) -> None:
        if self.bits not in INT_BITS:
            raise ValueError(
                f"int bits must be one of {', '.join(map(str, INT_BITS))}; got {self.bits}"
            )

    def describe(self) -> str:
        return f"int{self.bits}(per-row symmetric)"


@register_compressor(IntNConfig)
def quantize(weight: torch.Tensor, config: IntNConfig) -> CompressedWeight:
    rows, cols = weight.shape
    levels = 2 ** (config.bits - 1) - 1
    scale = weight.abs().amax(dim=1, keepdim=True) / levels
    # an all-zero row has scale 0: its codes are 0 whatever we divide by
    codes = torch.round(weight / torch.where(scale > 0, scale, 1)).clamp(-levels, levels)
    codes = codes + 0.0  # -0.0 -> +0.0: the stored code cannot carry a sign for zero
    cost = StorageCost(
        value_bits=rows * cols * config.bits,
        index_bits=0,
        scale_bits=rows * dtype_bits(weight.dtype),
        macs=rows * cols,
    )
    # stored: codes shifted to 0..2 * levels (N bits each) and the row scales
    parts = {"codes": (codes + levels).to(torch.uint8).flatten(), "scale": scale}
    return CompressedWeight(codes * scale, cost, parts, codes={"codes": config.bits})


@register_expander(IntNConfig)
def expand_int(parts: dict[str, torch.Tensor], config: IntNConfig, shape) -> torch.Tensor:
    levels = 2 ** (config.bits - 1) - 1
    scale = parts["scale"]
    codes = parts["codes"].reshape(shape).to(scale.dtype) - levels
    return codes * scale


for _bits in INT_BITS:
    register_method(f"int{_bits}", IntNConfig, bits=_bits)
