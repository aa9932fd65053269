"""N-bit integer weights (N = 2, 4, 8), symmetric, one scale per output row.

Row i is stored as codes q_ij in [-(2^(N-1) - 1), 2^(N-1) - 1] and a scale s_i = max_j |W_ij| /
(2^(N-1) - 1), so W_c = s_i * q_ij: at most 2^N - 1 levels per row (int2 is ternary). This is
the per-channel symmetric scheme common in post-training quantization (e.g. Krishnamoorthi 2018,
"Quantizing deep convolutional networks for efficient inference"). The max-based scale is not
the L2-optimal one, so ``loftq_init`` does not guarantee a monotone error with it.

Scales (``int_scale``):
- ``max``: s_i = max_j |W_ij| / levels, as above (the default);
- ``mse``: s_i = c_i * max_j |W_ij| / levels with the clip ratio c_i taken from a fixed grid in
  (0, 1] that minimises the row's own error ||W_i - s_i q_i||^2. Clipping the few largest weights
  buys finer steps for the rest, which lowers the error on heavy-tailed rows (the MSE-based
  range setting of Nagel et al. 2021, "A White Paper on Neural Network Quantization",
  arXiv:2106.08295, here per row and on the weights alone). The grid includes c = 1, so mse is
  never worse than max on any row; the storage (codes and one scale per row) is the same.

The field is ``int_scale`` rather than ``scale``: config fields are filled from one pool of
options by name (``make_config``), and ``scale`` is already int1's (``none``/``tensor``/...).
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
INT_SCALES = ("max", "mse")
# mse's clip ratios: 0.01, 0.02, ..., 1.00; the last is exactly 1, the max scale itself
CLIP_RATIOS = tuple(k / 100 for k in range(1, 101))


@dataclass(frozen=True)
class IntNConfig:
    name: ClassVar[str] = "int"
    bits: int = 4
    int_scale: str = "max"

    def __post_init__(self) -> None:
        if self.bits not in INT_BITS:
            raise ValueError(
                f"int bits must be one of {', '.join(map(str, INT_BITS))}; got {self.bits}"
            )
        if self.int_scale not in INT_SCALES:
            raise ValueError(
                f"unknown int scale {self.int_scale!r}; valid: {', '.join(INT_SCALES)}"
            )

    def describe(self) -> str:
        # the max form's text is part of run identities made before int_scale existed
        if self.int_scale == "max":
            return f"int{self.bits}(per-row symmetric)"
        return f"int{self.bits}(per-row symmetric, {self.int_scale} scale)"


def _codes(weight: torch.Tensor, scale: torch.Tensor, levels: int) -> torch.Tensor:
    # an all-zero row has scale 0: its codes are 0 whatever we divide by
    codes = torch.round(weight / torch.where(scale > 0, scale, 1)).clamp(-levels, levels)
    return codes + 0.0  # -0.0 -> +0.0: the stored code cannot carry a sign for zero


def mse_scale(weight: torch.Tensor, levels: int) -> torch.Tensor:
    """Per-row scale (rows x 1) minimising ||W_i - s_i q_i||^2 over the CLIP_RATIOS grid."""
    peak = weight.abs().amax(dim=1, keepdim=True)
    best_scale = peak / levels  # c = 1: the max scale, bit for bit
    best_error = ((weight - _codes(weight, best_scale, levels) * best_scale) ** 2).sum(dim=1)
    # one candidate at a time, all rows at once: a (ratios x rows x cols) tensor would need
    # 100 copies of the layer
    for ratio in reversed(CLIP_RATIOS[:-1]):
        scale = peak * ratio / levels
        error = ((weight - _codes(weight, scale, levels) * scale) ** 2).sum(dim=1)
        better = error < best_error  # strict: a tie keeps the larger ratio, tried first
        best_scale = torch.where(better.unsqueeze(1), scale, best_scale)
        best_error = torch.where(better, error, best_error)
    return best_scale


@register_compressor(IntNConfig)
def quantize(weight: torch.Tensor, config: IntNConfig) -> CompressedWeight:
    rows, cols = weight.shape
    levels = 2 ** (config.bits - 1) - 1
    if config.int_scale == "mse":
        scale = mse_scale(weight, levels)
    else:
        scale = weight.abs().amax(dim=1, keepdim=True) / levels
    codes = _codes(weight, scale, levels)
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
