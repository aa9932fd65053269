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

from compression.registry import (
    CompressedWeight,
    StorageCost,
    dtype_bits,
    register_compressor,
    register_expander,
)

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


def scale_of(weight: torch.Tensor, scale: str) -> torch.Tensor:
    if scale == "none":
        return torch.ones((), dtype=weight.dtype, device=weight.device)
    if scale == "tensor":
        return weight.abs().mean()
    return weight.abs().mean(dim=1, keepdim=True)


@register_compressor(Int1Config, "int1")
def binarize(weight: torch.Tensor, config: Int1Config) -> CompressedWeight:
    rows, cols = weight.shape
    alpha = scale_of(weight, config.scale)
    # stored: one bit per weight (1 = +), and the scale unless it is the constant 1
    parts = {"signs": (weight >= 0).to(torch.uint8).flatten()}
    if config.scale != "none":
        parts["scale"] = alpha
    # Every weight is read, sign-flipped and added: in * out adds per input row, no fewer.
    cost = StorageCost(
        value_bits=rows * cols,
        index_bits=0,
        scale_bits=0 if config.scale == "none" else alpha.numel() * dtype_bits(weight.dtype),
        macs=rows * cols,
    )
    compressed = alpha * signs(weight)
    return CompressedWeight(compressed, cost, parts, codes={"signs": 1})


@register_expander(Int1Config)
def expand_int1(parts: dict[str, torch.Tensor], config: Int1Config, shape) -> torch.Tensor:
    positive = parts["signs"].reshape(shape).bool()
    dtype = parts["scale"].dtype if "scale" in parts else torch.float32
    one = torch.ones((), dtype=dtype, device=positive.device)
    alpha = parts.get("scale", one)
    # the same product the compressor formed, so the same bits
    return alpha * torch.where(positive, one, -one)
