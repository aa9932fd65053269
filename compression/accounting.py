"""Storage and compute of one compressed Linear layer with a LoRA adapter, against the dense one.

Two storage ratios, both dense / compressed:
- ``ratio``: every bit. Kept values at their dtype, block indices, scales, adapter factors at
  their stored dtype (and DoRA's magnitude vector when there is one).
- ``ratio_seed``: the original study's formula. Stored values and adapter parameters at 32 bits
  each (int1 codes at 1 bit), no block indices, no scales.

The bias is the same on both sides (fp32, never compressed). ``include_bias`` adds it to both
sides or to neither; results say which. For the resnet18 FC (1000 x 512) with bias excluded:
sparse 1x16 + r128 gives ratio_seed 2.27 and ratio 2.23 (the 4-bit block indices).

Compute is counted in multiply-adds per input row: dense in*out; block-sparse one per kept
entry; int1 in*out (each is a sign-flip and add, so no fewer operations, only cheaper ones);
the adapter r*(in+out).
"""

from __future__ import annotations

from dataclasses import dataclass

from compression.registry import StorageCost

SEED_BITS = 32  # the original formula counts every stored float at 32 bits
ADAPTER_SCALE_BITS = 32  # integer adapters: one fp32 scale per row of each factor


@dataclass(frozen=True)
class LayerAccounting:
    out_features: int
    in_features: int
    rank: int
    include_bias: bool
    dense_bits: int
    compressed_bits: int
    seed_bits: int
    base_bits: int
    adapter_bits: int
    dense_macs: int
    compressed_macs: int

    @property
    def ratio(self) -> float:
        return self.dense_bits / self.compressed_bits

    @property
    def ratio_seed(self) -> float:
        return self.dense_bits / self.seed_bits

    @property
    def compute_ratio(self) -> float:
        return self.dense_macs / self.compressed_macs


def adapter_params(out_features: int, in_features: int, rank: int) -> int:
    """Parameters of B (out x r) and A (r x in)."""
    return rank * (in_features + out_features)


def account_layer(
    out_features: int,
    in_features: int,
    cost: StorageCost,
    rank: int = 0,
    *,
    adapter_dtype_bits: int = 32,
    extra_adapter_params: int = 0,
    include_bias: bool = False,
    dense_dtype_bits: int = 32,
    adapter_code_bits: int = 0,
) -> LayerAccounting:
    """Bits and multiply-adds of a compressed layer plus a rank-``rank`` adapter (0 = none).

    ``extra_adapter_params``: trained parameters beyond A and B (DoRA's magnitude vector),
    stored at ``adapter_dtype_bits`` like the factors. ``adapter_code_bits`` > 0: the factors
    are stored as codes of that many bits with one fp32 scale per row of A (rank) and of B
    (out), the extra parameters at fp32 (``--adapter-dtype int8`` / ``int4``).
    """
    adapter = adapter_params(out_features, in_features, rank) + extra_adapter_params
    bias_bits = out_features * dense_dtype_bits if include_bias else 0
    dense_bits = out_features * in_features * dense_dtype_bits + bias_bits
    if adapter_code_bits:
        scales = (rank + out_features) if rank else 0
        adapter_bits = (
            adapter_params(out_features, in_features, rank) * adapter_code_bits
            + (scales + extra_adapter_params) * ADAPTER_SCALE_BITS
        )
    else:
        adapter_bits = adapter * adapter_dtype_bits
    return LayerAccounting(
        out_features=out_features,
        in_features=in_features,
        rank=rank,
        include_bias=include_bias,
        dense_bits=dense_bits,
        compressed_bits=cost.total_bits + adapter_bits + bias_bits,
        seed_bits=cost.value_bits + adapter * SEED_BITS + bias_bits,
        base_bits=cost.total_bits,
        adapter_bits=adapter_bits,
        dense_macs=out_features * in_features,
        compressed_macs=cost.macs + rank * (in_features + out_features),
    )


def model_ratio(other_bits: int, layer: LayerAccounting) -> float:
    """Whole-model storage ratio when only this layer is compressed.

    ``other_bits``: every other parameter of the model at its stored dtype (the backbone).
    """
    return (other_bits + layer.dense_bits) / (other_bits + layer.compressed_bits)


def dense_cost(out_features: int, in_features: int) -> StorageCost:
    """The uncompressed fp32 layer, in the same terms as a compressor's cost."""
    weights = out_features * in_features
    return StorageCost(value_bits=weights * 32, index_bits=0, scale_bits=0, macs=weights)
