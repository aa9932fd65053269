"""Block sparsity: tile W into blocks and keep one entry per block.

Block ``4x4`` tiles W (out x in) into 2-D tiles of 4 rows x 4 columns (the original study's
README); ``1x16`` keeps one of 16 consecutive weights of a row (what the original code did, since
it walked the flattened matrix in chunks of 16). When a dimension is not a multiple of the block,
the last row / column of tiles is smaller; each still keeps exactly one entry.

Storage: one value per tile at the weight's dtype, plus the kept entry's position inside its
tile, ceil(log2(tile size)) bits (a 16-entry tile needs 4 bits; a 1-entry tile needs none).
"""

from __future__ import annotations

import math
import re
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

KEEP_RULES = ("absmax", "max")


def parse_block(text: str | tuple[int, int]) -> tuple[int, int]:
    """``"4x4"`` -> ``(4, 4)``; tuples pass through after the same checks."""
    if isinstance(text, tuple):
        block = text
    else:
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
        if match is None:
            raise ValueError(
                "block shape must be HxW with positive integers (e.g. 4x4, 1x16, 3x3); "
                f"got {text!r}"
            )
        block = (int(match.group(1)), int(match.group(2)))
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"block shape must be two positive integers (e.g. 4x4); got {block!r}")
    return block


def index_bits(entries: int) -> int:
    """Bits to name one of ``entries`` positions: ceil(log2(entries)), 0 for a single entry."""
    return (entries - 1).bit_length()


@dataclass(frozen=True)
class SparseConfig:
    """Keep one entry per ``block`` tile: the largest |w| (``absmax``) or largest w (``max``)."""

    name: ClassVar[str] = "sparse"
    block: tuple[int, int] = (4, 4)
    keep: str = "absmax"

    def __post_init__(self) -> None:
        object.__setattr__(self, "block", parse_block(self.block))
        if self.keep not in KEEP_RULES:
            raise ValueError(f"unknown keep rule {self.keep!r}; valid: {', '.join(KEEP_RULES)}")

    def describe(self) -> str:
        return f"sparse(block={self.block[0]}x{self.block[1]}, keep={self.keep})"


def block_sizes(length: int, block: int) -> list[int]:
    """Sizes of the tiles along one dimension: full blocks, then the remainder (if any)."""
    full, rest = divmod(length, block)
    return [block] * full + ([rest] if rest else [])


def sparse_storage(shape: tuple[int, int], config: SparseConfig, value_bits: int) -> StorageCost:
    """Exact storage of a block-sparse matrix of ``shape``; edge tiles counted at their size."""
    heights = block_sizes(shape[0], config.block[0])
    widths = block_sizes(shape[1], config.block[1])
    tiles = len(heights) * len(widths)
    idx = sum(index_bits(h * w) for h in heights for w in widths)
    return StorageCost(value_bits=tiles * value_bits, index_bits=idx, scale_bits=0, macs=tiles)


def tile_shapes(shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """(tile rows, tile cols, 2): the height and width of every tile (edge tiles smaller)."""
    heights = torch.tensor(block_sizes(shape[0], block[0]))
    widths = torch.tensor(block_sizes(shape[1], block[1]))
    return torch.stack(torch.broadcast_tensors(heights[:, None], widths[None, :]), dim=-1)


def choose_in_tiles(weight: torch.Tensor, config: SparseConfig) -> torch.Tensor:
    """(tile rows, tile cols): the position that ``keep`` selects in each tile, counted in the
    padded bh x bw tile (row-major).

    Ties go to the first entry of the tile in row-major order (``torch.argmax`` returns the
    first maximum). Padding for edge tiles is -inf, so it is never selected.
    """
    rows, cols = weight.shape
    bh, bw = config.block
    tile_rows, tile_cols = math.ceil(rows / bh), math.ceil(cols / bw)
    score = weight.abs() if config.keep == "absmax" else weight
    padded = score.new_full((tile_rows * bh, tile_cols * bw), float("-inf"))
    padded[:rows, :cols] = score
    # (tile_rows, bh, tile_cols, bw) -> (tile_rows, tile_cols, bh * bw): one row per tile.
    tiles = padded.view(tile_rows, bh, tile_cols, bw).permute(0, 2, 1, 3)
    return tiles.reshape(tile_rows, tile_cols, bh * bw).argmax(dim=-1)


def kept_coordinates(
    shape: tuple[int, int], block: tuple[int, int], row_in: torch.Tensor, col_in: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrix row and column of each tile's kept entry, from its row and column in the tile."""
    bh, bw = block
    tile_rows, tile_cols = row_in.shape
    rows = torch.arange(tile_rows)[:, None] * bh + row_in
    cols = torch.arange(tile_cols)[None, :] * bw + col_in
    return rows.flatten(), cols.flatten()


@register_compressor(SparseConfig, "sparse")
def sparsify(weight: torch.Tensor, config: SparseConfig) -> CompressedWeight:
    shape = tuple(weight.shape)
    chosen = choose_in_tiles(weight, config).cpu()
    row_in, col_in = chosen // config.block[1], chosen % config.block[1]
    rows, cols = kept_coordinates(shape, config.block, row_in, col_in)
    rows, cols = rows.to(weight.device), cols.to(weight.device)
    values = weight[rows, cols]
    compressed = torch.zeros_like(weight)
    compressed[rows, cols] = values
    # Stored: the kept values in tile order, and for every class of tile shape (full, right
    # edge, bottom edge, corner) the kept entry's row-major index in its own, smaller tile.
    sizes = tile_shapes(shape, config.block)
    index_in_tile = row_in * sizes[..., 1] + col_in
    parts, codes = {"values": values}, {}
    for height, width in sizes.reshape(-1, 2).unique(dim=0).tolist():
        if height * width > 1:
            same = (sizes[..., 0] == height) & (sizes[..., 1] == width)
            name = f"positions_{height}x{width}"
            parts[name] = index_in_tile[same]
            codes[name] = index_bits(height * width)
    cost = sparse_storage(shape, config, dtype_bits(weight.dtype))
    return CompressedWeight(weight=compressed, cost=cost, parts=parts, codes=codes)


@register_expander(SparseConfig)
def expand_sparse(parts: dict[str, torch.Tensor], config: SparseConfig, shape) -> torch.Tensor:
    sizes = tile_shapes(shape, config.block)
    index_in_tile = torch.zeros(sizes.shape[:2], dtype=torch.int64)
    for height, width in sizes.reshape(-1, 2).unique(dim=0).tolist():
        name = f"positions_{height}x{width}"
        if name in parts:
            same = (sizes[..., 0] == height) & (sizes[..., 1] == width)
            index_in_tile[same] = parts[name].to(torch.int64).cpu()
    width = sizes[..., 1]
    rows, cols = kept_coordinates(
        shape, config.block, index_in_tile // width, index_in_tile % width
    )
    values = parts["values"]
    weight = torch.zeros(shape, dtype=values.dtype, device=values.device)
    weight[rows, cols] = values
    return weight
