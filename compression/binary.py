"""1-bit weights: W_c = alpha * sign(W), with sign(0) = +1 so that every weight is one bit.

Scales (``alpha``):
- ``none``: alpha = 1, the original study's choice (``torch.sign``, which also mapped 0 to 0);
- ``tensor``: alpha = mean |W|, one number for the matrix;
- ``row``: alpha_i = mean_j |W_ij| for each output row i. For a fixed sign pattern this is the
  alpha that minimises ||W_i - alpha * sign(W_i)||_2 (XNOR-Net, Rastegari et al. 2016, eq. 4).
- ``rowcol``: W_c = diag(a) sign(W) diag(b), a row and a column scale from the rank-1
  approximation of |W| (OneBit, Xu et al. 2024, arXiv:2402.11295, "SVID"): with sigma, u, v the
  leading singular triple of |W|, a = sqrt(sigma) u and b = sqrt(sigma) v. Because
  W = sign(W) * |W| element-wise and flipping signs keeps the norm,
  ||W - diag(a) sign(W) diag(b)||_F = || |W| - a b^T ||_F, and by Eckart-Young no rank-1 matrix
  is closer to |W|; ``row``'s alpha 1^T is one such matrix, so rowcol's error is never larger
  than row's. It stores both scales in fp32: (rows + cols) * 32 bits.

``quantizer="gptq"`` picks the signs with GPTQ's error feedback when the layer's inputs are
known (``compression.gptq``): the scales are computed from W first, as above, and each column's
signs then round the error-corrected column, keeping per row GPTQ's signs or the weight's own,
whichever leaves the smaller output error; same parts, same bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from compression.gptq import gptq
from compression.integer import QUANTIZERS, better_rows
from compression.registry import (
    CompressedWeight,
    StorageCost,
    dtype_bits,
    register_compressor,
    register_expander,
)

INT1_SCALES = ("none", "tensor", "row", "rowcol")


@dataclass(frozen=True)
class Int1Config:
    """Sign of each weight times a scale: none, tensor, row or rowcol (see module doc)."""

    name: ClassVar[str] = "int1"
    scale: str = "row"
    quantizer: str = "rtn"

    def __post_init__(self) -> None:
        if self.scale not in INT1_SCALES:
            raise ValueError(f"unknown int1 scale {self.scale!r}; valid: {', '.join(INT1_SCALES)}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(
                f"int1 takes the quantizer {' or '.join(QUANTIZERS)}, not {self.quantizer!r}"
            )

    @property
    def uses_inputs(self) -> bool:
        """Whether the result depends on the layer's inputs when they are given."""
        return self.quantizer == "gptq"

    def describe(self) -> str:
        # the rtn form's text is part of run identities made before the quantizer existed
        if self.quantizer == "rtn":
            return f"int1(scale={self.scale})"
        return f"int1(scale={self.scale}, {self.quantizer})"


def signs(weight: torch.Tensor) -> torch.Tensor:
    """+1 where w >= 0 (zero included), -1 elsewhere, in the weight's dtype."""
    one = torch.ones((), dtype=weight.dtype)
    return torch.where(weight >= 0, one, -one)


def rank1_scales(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row scale a (rows x 1) and column scale b (1 x cols) with a b^T the best rank-1 of |W|."""
    # at least fp32: the SVD has no half-precision kernels
    magnitude = weight.abs().to(torch.promote_types(weight.dtype, torch.float32))
    u, sigma, vh = torch.linalg.svd(magnitude, full_matrices=False)
    root = sigma[0].sqrt()
    # |W| is non-negative, so a leading pair can be taken non-negative (Perron-Frobenius); the
    # SVD returns it up to a common sign, which abs removes
    return (root * u[:, :1].abs()).to(weight.dtype), (root * vh[:1, :].abs()).to(weight.dtype)


def scale_of(weight: torch.Tensor, scale: str) -> torch.Tensor:
    if scale == "none":
        return torch.ones((), dtype=weight.dtype, device=weight.device)
    if scale == "tensor":
        return weight.abs().mean()
    return weight.abs().mean(dim=1, keepdim=True)


def gptq_signs(
    weight: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor, moment: torch.Tensor
) -> torch.Tensor:
    """+1 / -1 (rows x cols, the weight's dtype) that GPTQ picks for W_c = a * signs * b, with
    the row scale ``row_scale`` (rows x 1 or a scalar) and ``col_scale`` (1 x cols or a
    scalar) fixed."""
    rows, cols = weight.shape
    picked = torch.empty(weight.shape, dtype=torch.float64, device=weight.device)
    rows_scale = row_scale.double().expand(rows, 1).squeeze(1)
    cols_scale = col_scale.double().expand(1, cols).squeeze(0)

    def round_column(column: torch.Tensor, j: int) -> torch.Tensor:
        picked[:, j] = signs(column)
        return rows_scale * picked[:, j] * cols_scale[j]

    gptq(weight, moment, round_column)
    return picked.to(weight.dtype)


@register_compressor(Int1Config, "int1")
def binarize(
    weight: torch.Tensor, config: Int1Config, moment: torch.Tensor | None = None
) -> CompressedWeight:
    """``moment``: the layer's input second moment, used by GPTQ (without it, or with
    ``rtn``, each sign is the weight's own)."""
    rows, cols = weight.shape
    one = torch.ones((), dtype=weight.dtype, device=weight.device)
    if config.scale == "rowcol":
        row_scale, col_scale = rank1_scales(weight)
    else:
        row_scale, col_scale = scale_of(weight, config.scale), one
    chosen = signs(weight)
    if config.quantizer == "gptq" and moment is not None:
        # per row, GPTQ's signs or the weight's own, whichever leaves the smaller output error
        fed_back = gptq_signs(weight, row_scale, col_scale, moment)
        chosen = better_rows(weight, chosen, fed_back, row_scale, moment, col_scale)
    # stored: one bit per weight (1 = +), and the scale(s) unless the scale is the constant 1
    parts = {"signs": (chosen > 0).to(torch.uint8).flatten()}
    if config.scale == "rowcol":
        parts["scale"], parts["col_scale"] = row_scale, col_scale
        compressed = row_scale * chosen * col_scale
    else:
        if config.scale != "none":
            parts["scale"] = row_scale
        compressed = row_scale * chosen
    scale_count = sum(part.numel() for name, part in parts.items() if name != "signs")
    # Every weight is read, sign-flipped and added: in * out adds per input row, no fewer.
    cost = StorageCost(
        value_bits=rows * cols,
        index_bits=0,
        scale_bits=scale_count * dtype_bits(weight.dtype),
        macs=rows * cols,
    )
    return CompressedWeight(compressed, cost, parts, codes={"signs": 1})


@register_expander(Int1Config)
def expand_int1(parts: dict[str, torch.Tensor], config: Int1Config, shape) -> torch.Tensor:
    positive = parts["signs"].reshape(shape).bool()
    dtype = parts["scale"].dtype if "scale" in parts else torch.float32
    one = torch.ones((), dtype=dtype, device=positive.device)
    alpha = parts.get("scale", one)
    # the same products, in the same order, as the compressor formed, so the same bits
    compressed = alpha * torch.where(positive, one, -one)
    if "col_scale" in parts:
        compressed = compressed * parts["col_scale"]
    return compressed
