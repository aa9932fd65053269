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

When the layer's inputs are known (their second moment H, see ``compression.gptq``), ``mse``
minimises the row's output error (W_i - s_i q_i) H (W_i - s_i q_i)^T instead, over a coarser
grid (CLIP_RATIOS_WEIGHTED: each candidate costs a product with H), and ``quantizer="gptq"``
rounds the codes with GPTQ's error feedback on that grid instead of to the nearest level,
keeping per row whichever of the two leaves the smaller output error (``better_rows``).

The field is ``int_scale`` rather than ``scale``: config fields are filled from one pool of
options by name (``make_config``), and ``scale`` is already int1's (``none``/``tensor``/...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from compression.gptq import gptq, weighted_row_errors
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
QUANTIZERS = ("rtn", "gptq")  # round to nearest; GPTQ's error feedback (needs the inputs)
# intN only: rounding learned inside --reconstruct (compression.adaround); compressed alone, it
# is round to nearest, the codes it starts from
INT_QUANTIZERS = (*QUANTIZERS, "adaround")
# mse's clip ratios: 0.01, 0.02, ..., 1.00; the last is exactly 1, the max scale itself
CLIP_RATIOS = tuple(k / 100 for k in range(1, 101))
# with the inputs: 0.05, 0.10, ..., 1.00 (a product with H per candidate)
CLIP_RATIOS_WEIGHTED = tuple(k / 20 for k in range(1, 21))


@dataclass(frozen=True)
class IntNConfig:
    name: ClassVar[str] = "int"
    bits: int = 4
    int_scale: str = "max"
    quantizer: str = "rtn"

    def __post_init__(self) -> None:
        if self.bits not in INT_BITS:
            raise ValueError(
                f"int bits must be one of {', '.join(map(str, INT_BITS))}; got {self.bits}"
            )
        if self.int_scale not in INT_SCALES:
            raise ValueError(
                f"unknown int scale {self.int_scale!r}; valid: {', '.join(INT_SCALES)}"
            )
        if self.quantizer not in INT_QUANTIZERS:
            raise ValueError(
                f"int{self.bits} takes the quantizer {', '.join(INT_QUANTIZERS)}, not "
                f"{self.quantizer!r}"
            )

    @property
    def uses_inputs(self) -> bool:
        """Whether the result depends on the layer's inputs when they are given."""
        return self.int_scale == "mse" or self.quantizer == "gptq"

    def describe(self) -> str:
        # the max, rtn form's text is part of run identities made before these options existed
        options = ["per-row symmetric"]
        if self.int_scale != "max":
            options.append(f"{self.int_scale} scale")
        if self.quantizer != "rtn":
            options.append(self.quantizer)
        return f"int{self.bits}({', '.join(options)})"


def _codes(weight: torch.Tensor, scale: torch.Tensor, levels: int) -> torch.Tensor:
    # an all-zero row has scale 0: its codes are 0 whatever we divide by
    codes = torch.round(weight / torch.where(scale > 0, scale, 1)).clamp(-levels, levels)
    return codes + 0.0  # -0.0 -> +0.0: the stored code cannot carry a sign for zero


def mse_scale(
    weight: torch.Tensor, levels: int, moment: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-row scale (rows x 1) minimising ||W_i - s_i q_i||^2 over the CLIP_RATIOS grid, or,
    given the inputs' ``moment`` H, the output error (W_i - s_i q_i) H (...)^T over
    CLIP_RATIOS_WEIGHTED."""

    def row_errors(scale: torch.Tensor) -> torch.Tensor:
        delta = weight - _codes(weight, scale, levels) * scale
        if moment is None:
            return (delta**2).sum(dim=1)
        return weighted_row_errors(delta, moment)

    ratios = CLIP_RATIOS if moment is None else CLIP_RATIOS_WEIGHTED
    peak = weight.abs().amax(dim=1, keepdim=True)
    best_scale = peak / levels  # c = 1: the max scale, bit for bit
    best_error = row_errors(best_scale)
    # one candidate at a time, all rows at once: a (ratios x rows x cols) tensor would need
    # 100 copies of the layer
    for ratio in reversed(ratios[:-1]):
        scale = peak * ratio / levels
        error = row_errors(scale)
        better = error < best_error  # strict: a tie keeps the larger ratio, tried first
        best_scale = torch.where(better.unsqueeze(1), scale, best_scale)
        best_error = torch.where(better, error, best_error)
    return best_scale


def gptq_codes(
    weight: torch.Tensor, scale: torch.Tensor, levels: int, moment: torch.Tensor
) -> torch.Tensor:
    """The codes (rows x cols) GPTQ picks on the grid of ``scale`` (rows x 1)."""
    codes = torch.empty(weight.shape, dtype=torch.float64, device=weight.device)
    step = scale.double()

    def round_column(column: torch.Tensor, j: int) -> torch.Tensor:
        codes[:, j] = _codes(column.unsqueeze(1), step, levels).squeeze(1)
        return codes[:, j] * step.squeeze(1)

    gptq(weight, moment, round_column)
    return codes.to(weight.dtype)


def better_rows(
    weight: torch.Tensor,
    nearest: torch.Tensor,
    fed_back: torch.Tensor,
    scale: torch.Tensor,
    moment: torch.Tensor,
    col_scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Per row, GPTQ's codes or the nearest ones (W_c = scale * codes * col_scale), whichever
    leaves the smaller output error.
    GPTQ is greedy: on a coarse grid its fed-back error can push later columns past the
    largest level, and a row can end up worse than rounding it to nearest. Rows add up
    independently in the output error, so the choice is made row by row."""
    errors = [
        weighted_row_errors(weight - scale * codes * col_scale, moment)
        for codes in (nearest, fed_back)
    ]
    return torch.where((errors[1] <= errors[0]).unsqueeze(1), fed_back, nearest)


@register_compressor(IntNConfig)
def quantize(
    weight: torch.Tensor, config: IntNConfig, moment: torch.Tensor | None = None
) -> CompressedWeight:
    """``moment``: the layer's input second moment H (cols x cols), used by the mse scale and
    GPTQ; without it both work on the weights alone (GPTQ is then round-to-nearest)."""
    levels = 2 ** (config.bits - 1) - 1
    if config.int_scale == "mse":
        scale = mse_scale(weight, levels, moment)
    else:
        scale = weight.abs().amax(dim=1, keepdim=True) / levels
    codes = _codes(weight, scale, levels)
    if config.quantizer == "gptq" and moment is not None:
        codes = better_rows(weight, codes, gptq_codes(weight, scale, levels, moment), scale, moment)
    return from_codes(codes, scale, config)


def from_codes(codes: torch.Tensor, scale: torch.Tensor, config: IntNConfig) -> CompressedWeight:
    """The stored form of ``codes`` (rows x cols, integers in [-levels, levels]) on the row
    ``scale`` grid: what ``quantize`` returns, and what learned rounding stores."""
    rows, cols = codes.shape
    levels = 2 ** (config.bits - 1) - 1
    cost = StorageCost(
        value_bits=rows * cols * config.bits,
        index_bits=0,
        scale_bits=rows * dtype_bits(scale.dtype),
        macs=rows * cols,
    )
    # stored: codes shifted to 0..2 * levels (N bits each) and the row scales
    parts = {"codes": (codes + levels).to(torch.uint8).flatten(), "scale": scale}
    return CompressedWeight(codes * scale, cost, parts, codes={"codes": config.bits}, config=config)


@register_expander(IntNConfig)
def expand_int(parts: dict[str, torch.Tensor], config: IntNConfig, shape) -> torch.Tensor:
    levels = 2 ** (config.bits - 1) - 1
    scale = parts["scale"]
    codes = parts["codes"].reshape(shape).to(scale.dtype) - levels
    return codes * scale


for _bits in INT_BITS:
    register_method(f"int{_bits}", IntNConfig, bits=_bits)
