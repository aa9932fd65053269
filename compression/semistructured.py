"""N:M semi-structured sparsity: in every group of M consecutive weights of a row, keep the N
largest |w| (2:4 by default: the pattern NVIDIA's Ampere sparse tensor cores run, Mishra et al.
2021, "Accelerating Sparse Deep Neural Networks").

Storage: the kept values at their dtype and, for each, its position in its group at
ceil(log2(M)) bits (the 2-bit metadata per non-zero of the 2:4 format). When the row length is
not a multiple of M, the last group is shorter and keeps min(N, its length) entries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from compression.registry import CompressedWeight, StorageCost, dtype_bits, register_compressor
from compression.sparse import index_bits


def parse_nm(text: str | tuple[int, int]) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``."""
    if isinstance(text, tuple):
        pattern = text
    else:
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
        if match is None:
            raise ValueError(f"N:M pattern must look like 2:4; got {text!r}")
        pattern = (int(match.group(1)), int(match.group(2)))
    n, m = pattern
    if not 1 <= n < m:
        raise ValueError(f"N:M needs 1 <= N < M; got {n}:{m}")
    return pattern


@dataclass(frozen=True)
class NMConfig:
    name: ClassVar[str] = "nm"
    pattern: tuple[int, int] = (2, 4)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", parse_nm(self.pattern))

    def describe(self) -> str:
        return f"nm({self.pattern[0]}:{self.pattern[1]})"


@register_compressor(NMConfig, "nm")
def nm_sparsify(weight: torch.Tensor, config: NMConfig) -> CompressedWeight:
    n, m = config.pattern
    rows, cols = weight.shape
    full, rest = divmod(cols, m)
    # (first column, number of groups, group length): the full groups, then the short one
    segments = [(0, full, m), (full * m, 1 if rest else 0, rest)]
    mask = torch.zeros_like(weight, dtype=torch.bool)
    kept = positions = 0
    for start, count, size in segments:
        if count == 0:
            continue
        stop = start + count * size
        groups = weight[:, start:stop].abs().reshape(rows, count, size)
        keep = min(n, size)
        # a stable sort keeps ties in order: the first entries win, as in block sparsity
        order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :keep]
        chosen = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
        mask[:, start:stop] = chosen.reshape(rows, count * size)
        kept += rows * count * keep
        # a group kept whole needs no positions
        positions += 0 if keep == size else rows * count * keep * index_bits(size)
    cost = StorageCost(
        value_bits=kept * dtype_bits(weight.dtype), index_bits=positions, scale_bits=0, macs=kept
    )
    compressed = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype))
    return CompressedWeight(weight=compressed, cost=cost)
