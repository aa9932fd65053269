"""Adapters stored as integers: ``--adapter-dtype int8`` and ``int4``.

An adapter trains in float. At the end its factors are rounded once: each of A (r x in; a
conv's r x in*kh*kw) and B (out x r) gets the tool's own per-row symmetric intN quantizer
(``IntNConfig``: codes in [-(2^(N-1) - 1), 2^(N-1) - 1], one fp32 scale per row, the max scale),
so the file holds N bits per factor entry plus (r + out) fp32 scales. DoRA's magnitude vector
stays fp32. The model that is scored is the rounded one: ``round_adapter_`` puts the rounded
values in place, and the packed file holds exactly those numbers (tested).
"""

from __future__ import annotations

import torch
from torch import nn

from compression import CompressedWeight, IntNConfig, compress

ADAPTER_INT_BITS = {"int8": 8, "int4": 4}
FACTORS = ("lora_A", "lora_B")


def factor_config(bits: int) -> IntNConfig:
    return IntNConfig(bits=bits)


def rounded_factors(layer: nn.Module, bits: int) -> dict[str, CompressedWeight]:
    """A and B of ``layer`` (as matrices) rounded to ``bits``-bit codes with row scales."""
    config = factor_config(bits)
    return {
        name: compress(getattr(layer, name).detach().flatten(1).float(), config) for name in FACTORS
    }


def round_adapter_(module: nn.Module, bits: int) -> None:
    """Round the adapter of ``module`` (an adapted layer, or a network of them: anything with
    ``adapters()``) in place. Rounding is idempotent (a row's largest entry lands on the
    largest code, so the scale comes out the same), so the file, which rounds the factors it
    is given, holds these very numbers."""
    layers = module.adapters().values() if hasattr(module, "adapters") else [module]
    for layer in layers:
        with torch.no_grad():
            for name, result in rounded_factors(layer, bits).items():
                factor = getattr(layer, name)
                factor.copy_(result.weight.reshape(factor.shape).to(factor.dtype))
