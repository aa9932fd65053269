"""1-bit weights: W_c = alpha * sign(W), with sign(0) = +1 so that every weight is one bit.

Scales (``alpha``):
- ``none``: alpha = 1, the original study's choice (``torch.sign``, which also mapped 0 to 0);
- ``tensor``: alpha = mean |W|, one number for the matrix;
- ``row``: alpha_i = mean_j |W_ij| for each output row i. For a fixed sign pattern this is the
  alpha that minimises ||W_i - alpha * sign(W_i)||_2 (XNOR-Net, Rastegari et al. 2016, eq. 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from compression.registry import CompressedWeight, StorageCost, dtype_bits, register_compressor

INT1_SCALES = ("none", "tensor", "row")


@dataclass(frozen=True)
class Int1Config:
    """Sign of each weight times a scale: ``none``, ``tensor`` or ``row`` (see module doc)."""

    name: ClassVar[str] = "int1"
    scale: str = "row"

    def __post_init__(self) -> None:
        if self.scale not in INT1_SCALES:
            raise ValueError(f"unknown int1 scale {self.scale!r}; valid: {', '.join(INT1_SCALES)}")

    def describe(self) -> str:
        return f"int1(scale={self.scale})"


def signs(weight: torch.Tensor) -> torch.Tensor:
    """+1 where w >= 0 (zero included), -1 elsewhere, in the weight's dtype."""
    one = torch.ones((), dtype=weight.dtype)
    return torch.where(weight >= 0, one, -one)


@register_compressor(Int1Config, "int1")
def binarize(weight: torch.Tensor, config: Int1Config) -> CompressedWeight:
    rows, cols = weight.shape
    bits = dtype_bits(weight.dtype)
    if config.scale == "none":
        alpha, scale_bits = torch.ones((), dtype=weight.dtype), 0
    elif config.scale == "tensor":
        alpha, scale_bits = weight.abs().mean(), bits
    else:
        alpha, scale_bits = weight.abs().mean(dim=1, keepdim=True), rows * bits
    # Every weight is read, sign-flipped and added: in * out adds per input row, no fewer.
    cost = StorageCost(
        value_bits=rows * cols, index_bits=0, scale_bits=scale_bits, macs=rows * cols
    )
    return CompressedWeight(weight=alpha * signs(weight), cost=cost)
