"""Adapters stored as integers: ``--adapter-dtype int8`` and ``int4``.

An adapter trains in float. At the end its factors are rounded once: each of A (r x in; a
conv's r x in*kh*kw) and B (out x r) gets the tool's own per-row symmetric intN quantizer
(``IntNConfig``: codes in [-(2^(N-1) - 1), 2^(N-1) - 1], one fp32 scale per row, the max scale),
so the file holds N bits per factor entry plus (r + out) fp32 scales. DoRA's magnitude vector
stays fp32. The model that is scored is the rounded one: ``round_adapter_`` puts the rounded
values in place, and the packed file holds exactly those numbers (tested).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from compression import CompressedWeight, IntNConfig, compress

ADAPTER_INT_BITS = {"int8": 8, "int4": 4}
ADAPTER_FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# every way an adapter may be stored: float dtypes, then integer codes with row scales
ADAPTER_FORMATS = (*ADAPTER_FLOAT_DTYPES, *ADAPTER_INT_BITS)
FACTORS = ("lora_A", "lora_B")


def adapter_storage(adapter_dtype: str) -> tuple[int, int]:
    """(bits per adapter value, bits per code) of an adapter stored as ``adapter_dtype``:
    a float one at its dtype (no codes); an int8 / int4 one as codes with fp32 row scales."""
    code_bits = ADAPTER_INT_BITS.get(adapter_dtype, 0)
    return (32 if code_bits else ADAPTER_FLOAT_DTYPES[adapter_dtype].itemsize * 8), code_bits


def factor_config(bits: int) -> IntNConfig:
    return IntNConfig(bits=bits)


def rounded_factors(layer: nn.Module, bits: int) -> dict[str, CompressedWeight]:
    """A and B of ``layer`` (as matrices) rounded to ``bits``-bit codes with row scales."""
    config = factor_config(bits)
    return {
        name: compress(getattr(layer, name).detach().flatten(1).float(), config) for name in FACTORS
    }


def round_adapter_(layer: nn.Module, bits: int) -> None:
    """Round the adapter of ``layer`` (an adapted layer) in place. Rounding is idempotent (a
    row's largest entry lands on the largest code, so the scale comes out the same), so the
    file, which rounds the factors it is given, holds these very numbers."""
    with torch.no_grad():
        for name, result in rounded_factors(layer, bits).items():
            factor = getattr(layer, name)
            factor.copy_(result.weight.reshape(factor.shape).to(factor.dtype))


def round_stored_(adapters: Mapping[str, nn.Module], adapter_dtypes: Mapping[str, str]) -> None:
    """Round each adapted layer of ``adapters`` (module name -> layer) as its own dtype in
    ``adapter_dtypes`` stores it: int8 / int4 ones to their codes, float ones left as they are
    (the float the file holds is the trained one, cast)."""
    for name, layer in adapters.items():
        bits = ADAPTER_INT_BITS.get(adapter_dtypes[name])
        if bits:
            round_adapter_(layer, bits)
