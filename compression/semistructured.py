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

from compression.registry import (
    CompressedWeight,
    StorageCost,
    dtype_bits,
    register_compressor,
    register_expander,
)
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


def segments(cols: int, m: int) -> list[tuple[str, int, int, int]]:
    """(part suffix, first column, groups, group length): the full groups of M, then the short
    last group when the row length is not a multiple of M."""
    full, rest = divmod(cols, m)
    found = [("", 0, full, m)] if full else []
    return found + ([("_tail", full * m, 1, rest)] if rest else [])


@register_compressor(NMConfig, "nm")
def nm_sparsify(weight: torch.Tensor, config: NMConfig) -> CompressedWeight:
    n, m = config.pattern
    rows, cols = weight.shape
    compressed = torch.zeros_like(weight)
    parts, codes = {}, {}
    kept = positions = 0
    for suffix, start, count, size in segments(cols, m):
        stop = start + count * size
        groups = weight[:, start:stop].reshape(rows, count, size)
        keep = min(n, size)
        # a stable sort keeps ties in order: the first entries win, as in block sparsity;
        # the kept positions are then stored in increasing order
        order = torch.sort(groups.abs(), dim=-1, descending=True, stable=True).indices
        chosen = order[..., :keep].sort(dim=-1).values
        values = groups.gather(-1, chosen)
        compressed[:, start:stop] = torch.zeros_like(groups).scatter(-1, chosen, values).flatten(1)
        parts[f"values{suffix}"] = values.flatten()
        if keep < size:  # a group kept whole needs no positions
            parts[f"positions{suffix}"] = chosen.flatten()
            codes[f"positions{suffix}"] = index_bits(size)
            positions += chosen.numel() * index_bits(size)
        kept += values.numel()
    cost = StorageCost(
        value_bits=kept * dtype_bits(weight.dtype), index_bits=positions, scale_bits=0, macs=kept
    )
    return CompressedWeight(compressed, cost, parts, codes)


@register_expander(NMConfig)
def expand_nm(parts: dict[str, torch.Tensor], config: NMConfig, shape) -> torch.Tensor:
    n, m = config.pattern
    rows, cols = shape
    dtype = parts["values" if cols >= m else "values_tail"].dtype
    weight = torch.zeros(shape, dtype=dtype, device=next(iter(parts.values())).device)
    for suffix, start, count, size in segments(cols, m):
        keep = min(n, size)
        values = parts[f"values{suffix}"].reshape(rows, count, keep)
        if f"positions{suffix}" in parts:
            chosen = parts[f"positions{suffix}"].to(torch.int64).reshape(rows, count, keep)
        else:
            chosen = torch.arange(size, device=values.device).expand(rows, count, size)
        group = torch.zeros(rows, count, size, dtype=dtype, device=values.device)
        weight[:, start : start + count * size] = group.scatter(-1, chosen, values).flatten(1)
    return weight
