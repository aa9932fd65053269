"""Storage accounting reproduces the original study's ratios and counts every other bit."""

import pytest
import torch

from compression import Int1Config, SparseConfig, account_layer, compress, model_ratio

FC = (1000, 512)  # resnet18's classifier: out x in


def fc_cost(config):
    return compress(torch.randn(*FC), config).cost


@pytest.mark.parametrize(
    "config,rank,published",
    [
        (SparseConfig(block=(1, 16), keep="max"), 128, 2.27),
        (SparseConfig(block=(4, 4)), 128, 2.27),
        (Int1Config(scale="none"), 2, 26.91),
        (Int1Config(scale="none"), 128, 2.44),
    ],
)
def test_ratio_seed_reproduces_the_published_ratios(config, rank, published):
    layer = account_layer(*FC, fc_cost(config), rank)
    assert round(layer.ratio_seed, 2) == published


def test_every_bit_ratio_adds_exactly_the_index_bits_for_sparse():
    cost = fc_cost(SparseConfig(block=(1, 16), keep="max"))
    layer = account_layer(*FC, cost, 128)
    assert layer.compressed_bits - layer.seed_bits == 32_000 * 4 == cost.index_bits
    assert round(layer.ratio, 2) == 2.23
    # the hand count: 32,000 fp32 values + 32,000 4-bit indices + 128 * (512 + 1000) fp32
    assert layer.compressed_bits == 32_000 * 32 + 32_000 * 4 + 128 * 1512 * 32
    assert layer.dense_bits == 512_000 * 32


@pytest.mark.parametrize("scale,extra", [("none", 0), ("tensor", 32), ("row", 1000 * 32)])
def test_every_bit_ratio_adds_exactly_the_scale_bits_for_int1(scale, extra):
    layer = account_layer(*FC, fc_cost(Int1Config(scale=scale)), 2)
    assert layer.compressed_bits - layer.seed_bits == extra
    assert layer.compressed_bits == 512_000 + extra + 2 * 1512 * 32


def test_bias_is_counted_on_both_sides_or_neither():
    cost = fc_cost(Int1Config(scale="row"))
    without = account_layer(*FC, cost, 8)
    with_bias = account_layer(*FC, cost, 8, include_bias=True)
    assert with_bias.dense_bits - without.dense_bits == 1000 * 32
    assert with_bias.compressed_bits - without.compressed_bits == 1000 * 32
    assert with_bias.seed_bits - without.seed_bits == 1000 * 32
    assert with_bias.ratio < without.ratio


def test_adapter_dtype_and_dora_magnitude_are_counted():
    cost = fc_cost(SparseConfig())
    fp32 = account_layer(*FC, cost, 16)
    fp16 = account_layer(*FC, cost, 16, adapter_dtype_bits=16)
    assert fp32.adapter_bits - fp16.adapter_bits == 16 * 1512 * 16
    dora = account_layer(*FC, cost, 16, extra_adapter_params=1000)
    assert dora.adapter_bits - fp32.adapter_bits == 1000 * 32
    # the original formula stores the adapter at 32 bits whatever its dtype
    assert fp16.seed_bits == fp32.seed_bits


def test_compute_counts_kept_entries_and_adapter():
    sparse = account_layer(*FC, fc_cost(SparseConfig()), 8)
    assert sparse.dense_macs == 512_000
    assert sparse.compressed_macs == 32_000 + 8 * 1512
    int1 = account_layer(*FC, fc_cost(Int1Config()), 8)
    assert int1.compressed_macs == 512_000 + 8 * 1512
    assert int1.compute_ratio < 1  # binarising saves storage, not operations


def test_whole_model_ratio_counts_the_backbone():
    layer = account_layer(*FC, fc_cost(Int1Config(scale="none")), 2)
    backbone_bits = 11_176_512 * 32  # resnet18 without its FC
    whole = model_ratio(backbone_bits, layer)
    assert 1 < whole < layer.ratio
    expected = (backbone_bits + 512_000 * 32) / (backbone_bits + 512_000 + 2 * 1512 * 32)
    assert whole == pytest.approx(expected)
