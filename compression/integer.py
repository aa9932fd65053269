"""N-bit integer weights (N = 2 to 8), one scale per output row, on one of three grids.

Row i is stored as N-bit codes u_ij in [0, 2^N - 1] and a scale s_i; the weight is
W_c = s_i * (u_ij - z_i), i.e. a signed code q_ij = u_ij - z_i on s_i's grid. The grids
(``int_grid``) differ in which codes a row may take and where its zero lies:

- ``symmetric`` (the default): q in [-(2^(N-1) - 1), 2^(N-1) - 1], 2^N - 1 levels (int2 is
  ternary), z fixed; s_i = max_j |W_ij| / (2^(N-1) - 1). The per-channel symmetric scheme common
  in post-training quantization (e.g. Krishnamoorthi 2018, "Quantizing deep convolutional
  networks for efficient inference").
- ``full``: the whole signed range, q in [-2^(N-1), 2^(N-1) - 1], 2^N levels, z fixed, as
  PyTorch's qint types; s_i the smallest scale that holds the row's largest and its most
  negative weight on that uneven range (a row as large on both sides then leaves the lowest
  code unused, unless the mse scale clips it).
- ``affine``: 2^N levels per row with a zero point z_i in [0, 2^N - 1], stored at N bits per row
  (as BRECQ and AdaRound quantize weights): the grid spans [min(W_i, 0), max(W_i, 0)],
  s_i = (max - min) / (2^N - 1), z_i = round(-min / s_i).

Scales are stored at ``scale_dtype``: fp32 (the weight's own dtype, as computed), or fp16 (half
the scale bits; a scale is rounded to fp16 before any code is chosen, so the codes are those of
the stored scale).

Scales (``int_scale``):
- ``max``: the row's whole range, as above (the default);
- ``mse``: the scale above times a clip ratio c_i from a fixed grid in (0, 1] that minimises the
  row's own error ||W_i - W_c,i||^2 (affine: the zero point stays). Clipping the few largest
  weights buys finer steps for the rest, which lowers the error on heavy-tailed rows (the
  MSE-based range setting of Nagel et al. 2021, "A White Paper on Neural Network Quantization",
  arXiv:2106.08295, here per row and on the weights alone). The grid includes c = 1, so mse is
  never worse than max on any row; the storage is the same.

When the layer's inputs are known (their second moment H, see ``compression.gptq``), ``mse``
minimises the row's output error (W_i - W_c,i) H (W_i - W_c,i)^T instead, over a coarser
grid (CLIP_RATIOS_WEIGHTED: each candidate costs a product with H), and ``quantizer="gptq"``
rounds the codes with GPTQ's error feedback on that grid instead of to the nearest level,
keeping per row whichever of the two leaves the smaller output error (``better_rows``).

The field is ``int_scale`` rather than ``scale``: config fields are filled from one pool of
options by name (``make_config``), and ``scale`` is already int1's (``none``/``tensor``/...).
"""

from __future__ import annotations

from collections.abc import Callable
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

INT_BITS = tuple(range(2, 9))
INT_SCALES = ("max", "mse")
INT_GRIDS = ("symmetric", "full", "affine")
SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
QUANTIZERS = ("rtn", "gptq")  # round to nearest; GPTQ's error feedback (needs the inputs)
# intN only: rounding learned inside --reconstruct (compression.adaround), from the codes
# compressing alone stores: round to nearest (adaround) or GPTQ's (gptq-adaround)
INT_QUANTIZERS = (*QUANTIZERS, "adaround", "gptq-adaround")
FED_BACK = ("gptq", "gptq-adaround")  # the quantizers whose stored codes are GPTQ's
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
    int_grid: str = "symmetric"
    scale_dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.bits not in INT_BITS:
            raise ValueError(f"int bits must be one of 2 to 8; got {self.bits}")
        if self.int_scale not in INT_SCALES:
            raise ValueError(
                f"unknown int scale {self.int_scale!r}; valid: {', '.join(INT_SCALES)}"
            )
        if self.quantizer not in INT_QUANTIZERS:
            raise ValueError(
                f"int{self.bits} takes the quantizer {', '.join(INT_QUANTIZERS)}, not "
                f"{self.quantizer!r}"
            )
        if self.int_grid not in INT_GRIDS:
            raise ValueError(f"unknown int grid {self.int_grid!r}; valid: {', '.join(INT_GRIDS)}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(
                f"unknown scale dtype {self.scale_dtype!r}; valid: {', '.join(SCALE_DTYPES)}"
            )

    @property
    def uses_inputs(self) -> bool:
        """Whether the result depends on the layer's inputs when they are given."""
        return self.int_scale == "mse" or self.quantizer in FED_BACK

    def describe(self) -> str:
        # the symmetric, fp32, max, rtn form's text is part of run identities made before
        # these options existed
        grid = {"symmetric": "symmetric", "full": "full-range", "affine": "affine"}
        options = [f"per-row {grid[self.int_grid]}"]
        if self.scale_dtype != "fp32":
            options.append(f"{self.scale_dtype} scales")
        if self.int_scale != "max":
            options.append(f"{self.int_scale} scale")
        if self.quantizer != "rtn":
            options.append(self.quantizer)
        return f"int{self.bits}({', '.join(options)})"


def stored_scale_dtype(config: IntNConfig, dtype: torch.dtype) -> torch.dtype:
    """The dtype the scales of a weight of ``dtype`` are stored at."""
    return dtype if config.scale_dtype == "fp32" else SCALE_DTYPES[config.scale_dtype]


def code_bounds(
    config: IntNConfig, zero: torch.Tensor | None = None
) -> tuple[torch.Tensor | int, torch.Tensor | int]:
    """The signed codes a row may take, [lo, hi]: numbers for a fixed grid, (rows x 1)
    tensors from the row zero points ``zero`` for the affine one."""
    half = 2 ** (config.bits - 1)
    if config.int_grid == "affine":
        return -zero, 2**config.bits - 1 - zero
    if config.int_grid == "full":
        return -half, half - 1
    return -(half - 1), half - 1


def _codes(weight: torch.Tensor, scale: torch.Tensor, lo, hi) -> torch.Tensor:
    # an all-zero row has scale 0: its codes are 0 whatever we divide by
    codes = torch.round(weight / torch.where(scale > 0, scale, 1)).clamp(lo, hi)
    return codes + 0.0  # -0.0 -> +0.0: the stored code cannot carry a sign for zero


def row_grid(
    weight: torch.Tensor, config: IntNConfig
) -> tuple[Callable[[float], torch.Tensor], torch.Tensor | None]:
    """``scale_at(c)``: the row scales (rows x 1) at clip ratio c, rounded to the stored dtype
    (c = 1: the row's whole range); and the affine grid's zero points (rows x 1), else None."""
    stored = stored_scale_dtype(config, weight.dtype)
    zero = None
    if config.int_grid == "symmetric":
        levels = 2 ** (config.bits - 1) - 1
        peak = weight.abs().amax(dim=1, keepdim=True)
        exact = lambda ratio: peak * ratio / levels  # noqa: E731
    elif config.int_grid == "full":
        half = 2 ** (config.bits - 1)
        top = weight.amax(dim=1, keepdim=True).clamp(min=0)
        bottom = (-weight.amin(dim=1, keepdim=True)).clamp(min=0)
        exact = lambda ratio: torch.maximum(top * ratio / (half - 1), bottom * ratio / half)  # noqa: E731
    else:
        steps = 2**config.bits - 1
        top = weight.amax(dim=1, keepdim=True).clamp(min=0)
        bottom = weight.amin(dim=1, keepdim=True).clamp(max=0)
        span = top - bottom
        zero = torch.where(span > 0, torch.round(-bottom / span * steps), 0.0).clamp(0, steps)
        exact = lambda ratio: span * ratio / steps  # noqa: E731
    return lambda ratio: exact(ratio).to(stored).to(weight.dtype), zero


def mse_scale(
    weight: torch.Tensor,
    scale_at: Callable[[float], torch.Tensor],
    lo,
    hi,
    moment: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row scale (rows x 1) minimising ||W_i - s_i q_i||^2 over the CLIP_RATIOS grid, or,
    given the inputs' ``moment`` H, the output error (W_i - s_i q_i) H (...)^T over
    CLIP_RATIOS_WEIGHTED."""

    def row_errors(scale: torch.Tensor) -> torch.Tensor:
        delta = weight - _codes(weight, scale, lo, hi) * scale
        if moment is None:
            return (delta**2).sum(dim=1)
        return weighted_row_errors(delta, moment)

    ratios = CLIP_RATIOS if moment is None else CLIP_RATIOS_WEIGHTED
    best_scale = scale_at(1)  # c = 1: the max scale, bit for bit
    best_error = row_errors(best_scale)
    # one candidate at a time, all rows at once: a (ratios x rows x cols) tensor would need
    # 100 copies of the layer
    for ratio in reversed(ratios[:-1]):
        scale = scale_at(ratio)
        error = row_errors(scale)
        better = error < best_error  # strict: a tie keeps the larger ratio, tried first
        best_scale = torch.where(better.unsqueeze(1), scale, best_scale)
        best_error = torch.where(better, error, best_error)
    return best_scale


def gptq_codes(weight: torch.Tensor, scale: torch.Tensor, lo, hi, moment: torch.Tensor):
    """The codes (rows x cols) GPTQ picks on the grid of ``scale`` (rows x 1) and the code
    bounds ``lo``, ``hi``."""
    codes = torch.empty(weight.shape, dtype=torch.float64, device=weight.device)
    step = scale.double()
    lo, hi = (b.double() if isinstance(b, torch.Tensor) else b for b in (lo, hi))

    def round_column(column: torch.Tensor, j: int) -> torch.Tensor:
        codes[:, j] = _codes(column.unsqueeze(1), step, lo, hi).squeeze(1)
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
    scale_at, zero = row_grid(weight, config)
    lo, hi = code_bounds(config, zero)
    if config.int_scale == "mse":
        scale = mse_scale(weight, scale_at, lo, hi, moment)
    else:
        scale = scale_at(1)
    codes = _codes(weight, scale, lo, hi)
    if config.quantizer in FED_BACK and moment is not None:
        fed_back = gptq_codes(weight, scale, lo, hi, moment)
        codes = better_rows(weight, codes, fed_back, scale, moment)
    return from_codes(codes, scale, config, zero)


def from_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    config: IntNConfig,
    zero: torch.Tensor | None = None,
) -> CompressedWeight:
    """The stored form of ``codes`` (rows x cols, integers within ``code_bounds``) on the row
    ``scale`` grid (and the affine grid's row ``zero`` points): what ``quantize`` returns, and
    what learned rounding stores. Zero points are counted with the scales."""
    rows, cols = codes.shape
    lo, _ = code_bounds(config, zero)
    stored_scale = scale.to(stored_scale_dtype(config, scale.dtype))
    zero_bits = rows * config.bits if zero is not None else 0
    cost = StorageCost(
        value_bits=rows * cols * config.bits,
        index_bits=0,
        scale_bits=rows * dtype_bits(stored_scale.dtype) + zero_bits,
        macs=rows * cols,
    )
    # stored: codes shifted to 0..2^N - 1 (N bits each), the row scales and zero points
    parts = {"codes": (codes - lo).to(torch.uint8).flatten(), "scale": stored_scale}
    packed = {"codes": config.bits}
    if zero is not None:
        parts["zero"] = zero.to(torch.uint8).flatten()
        packed["zero"] = config.bits
    weight = codes * stored_scale.to(codes.dtype)
    return CompressedWeight(weight, cost, parts, codes=packed, config=config)


def signed_codes(compressed: CompressedWeight) -> torch.Tensor:
    """The signed codes q (rows x cols, float) of a stored intN weight: W_c = scale * q."""
    lo, _ = code_bounds(compressed.config, row_zero(compressed))
    rows = compressed.parts["scale"].shape[0]
    return compressed.parts["codes"].reshape(rows, -1).float() + lo


def row_zero(compressed: CompressedWeight) -> torch.Tensor | None:
    """The affine grid's row zero points (rows x 1, float), else None."""
    zero = compressed.parts.get("zero")
    return None if zero is None else zero.reshape(-1, 1).float()


@register_expander(IntNConfig)
def expand_int(parts: dict[str, torch.Tensor], config: IntNConfig, shape) -> torch.Tensor:
    scale = parts["scale"]
    if config.scale_dtype != "fp32":
        scale = scale.float()  # fp16 scales of an fp32 weight
    zero = parts.get("zero")
    if zero is not None:
        zero = zero.reshape(-1, 1).to(scale.dtype)
    lo, _ = code_bounds(config, zero)
    codes = parts["codes"].reshape(shape).to(scale.dtype) + lo
    return codes * scale


for _bits in INT_BITS:
    register_method(f"int{_bits}", IntNConfig, bits=_bits)
# a width on another grid has a name of its own (``int3-affine``), so that one run (a bit
# budget, a layer plan) can give each layer its grid as well as its width
for _grid in INT_GRIDS[1:]:
    for _bits in INT_BITS:
        register_method(f"int{_bits}-{_grid}", IntNConfig, bits=_bits, int_grid=_grid)
