"""Storage and compute of one compressed Linear layer with a LoRA adapter, against the dense one.

Two storage ratios, both dense / compressed:
- ``ratio``: every bit. Kept values at their dtype, block indices, scales, adapter factors at
  their stored dtype (and DoRA's magnitude vector when there is one).
- ``ratio_seed``: the original study's formula. Stored values and adapter parameters at 32 bits
  each (int1 codes at 1 bit), no block indices, no scales.

The bias is the same on both sides (fp32, never compressed). ``include_bias`` adds it to both
sides of the ratios or to neither; results say which. A layer without a bias (``has_bias``
False: a conv followed by BatchNorm) has none to add. For the resnet18 FC (1000 x 512) with
bias excluded: sparse 1x16 + r128 gives ratio_seed 2.27 and ratio 2.23 (the 4-bit block
indices).

``stored_bits`` is what the packed file holds for the layer, whatever ``include_bias`` says:
base, adapter and the bias the layer has. It is not a ratio, so there is no other side for the
bias to cancel against; bits per weight are counted from it.

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
    stored_bias_bits: int = 0  # the bias the file stores, in the ratios or not

    @property
    def stored_bits(self) -> int:
        """Every bit the packed file holds for this layer: base, adapter and its bias."""
        return self.base_bits + self.adapter_bits + self.stored_bias_bits

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
    has_bias: bool = True,
) -> LayerAccounting:
    """Bits and multiply-adds of a compressed layer plus a rank-``rank`` adapter (0 = none).

    ``extra_adapter_params``: trained parameters beyond A and B (DoRA's magnitude vector),
    stored at ``adapter_dtype_bits`` like the factors. ``adapter_code_bits`` > 0: the factors
    are stored as codes of that many bits with one fp32 scale per row of A (rank) and of B
    (out), the extra parameters at fp32 (``--adapter-dtype int8`` / ``int4``). ``has_bias``:
    whether the layer has a bias at all; one it lacks is counted nowhere.
    """
    adapter = adapter_params(out_features, in_features, rank) + extra_adapter_params
    stored_bias_bits = out_features * dense_dtype_bits if has_bias else 0
    bias_bits = stored_bias_bits if include_bias else 0
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
        stored_bias_bits=stored_bias_bits,
    )


def model_ratio(other_bits: int, layer: LayerAccounting) -> float:
    """Whole-model storage ratio when only this layer is compressed.

    ``other_bits``: every other parameter of the model at its stored dtype (the backbone).
    """
    return (other_bits + layer.dense_bits) / (other_bits + layer.compressed_bits)


def model_bits_per_weight(
    other_bits: int, stored_bits: int, model_weights: int | None
) -> float | None:
    """Every bit of the model as a run stores it over the model's Linear and Conv2d weight
    count: ``other_bits`` (every parameter and float buffer outside the selected layers at its
    dtype: stem, depthwise convs, norms, their biases) plus ``stored_bits`` (the selected
    layers as the packed file holds them). None when the weight count is not known."""
    if not model_weights:
        return None
    return (other_bits + stored_bits) / model_weights


def dense_cost(out_features: int, in_features: int) -> StorageCost:
    """The uncompressed fp32 layer, in the same terms as a compressor's cost."""
    weights = out_features * in_features
    return StorageCost(value_bits=weights * 32, index_bits=0, scale_bits=0, macs=weights)
