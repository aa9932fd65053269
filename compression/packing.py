"""Bit packing: small non-negative integers stored at exactly ``bits`` bits each.

Codes are laid out most-significant bit first, one after the other, and the last byte is padded
with zeros: n codes of b bits take ceil(n * b / 8) bytes. int1 signs pack 8 to a byte, 4-bit
block positions 2 to a byte, 3-bit ones across byte boundaries.
"""

from __future__ import annotations

import torch


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """1-D uint8 tensor holding ``codes`` (each in [0, 2**bits)) at ``bits`` bits each."""
    if not 1 <= bits <= 62:
        raise ValueError(f"codes must take 1 to 62 bits; got {bits}")
    codes = codes.flatten().to(torch.int64).cpu()
    if codes.numel() and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes do not fit in {bits} bits")
    shifts = torch.arange(bits - 1, -1, -1)
    stream = ((codes[:, None] >> shifts) & 1).flatten()
    stream = torch.cat([stream, stream.new_zeros(-len(stream) % 8)])
    weights = 2 ** torch.arange(7, -1, -1)
    return (stream.view(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes of ``bits`` bits from ``pack_codes``' output (int64)."""
    if packed.numel() * 8 < count * bits:
        raise ValueError(f"{packed.numel()} bytes cannot hold {count} codes of {bits} bits")
    stream = (packed.to(torch.int64)[:, None] >> torch.arange(7, -1, -1)) & 1
    stream = stream.flatten()[: count * bits].view(count, bits)
    return (stream * 2 ** torch.arange(bits - 1, -1, -1)).sum(dim=1)
