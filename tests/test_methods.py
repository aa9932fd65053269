"""Methods beyond the original: intN, N:M, any block shape, LoftQ, DoRA, activation-aware init."""

from itertools import pairwise

import pytest
import torch
from torch import nn

from compression import (
    Int1Config,
    IntNConfig,
    NMConfig,
    SparseConfig,
    account_layer,
    compress,
    make_config,
)
from lora import LoraConfig, make_init_context, make_lora_linear
from lora.inits import alternate

GENERATOR = torch.Generator().manual_seed(0)


def random_weight(out_features=1000, in_features=512, seed=0):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_n_has_at_most_2_to_the_n_levels_per_row(bits):
    weight = random_weight()
    result = compress(weight, make_config(f"int{bits}"))
    for row in result.weight:
        assert len(row.unique()) <= 2**bits
    # symmetric: the largest |w| of each row is kept exactly
    torch.testing.assert_close(result.weight.abs().amax(1), weight.abs().amax(1))
    assert result.cost.value_bits == 512_000 * bits and result.cost.scale_bits == 1000 * 32


def test_more_bits_give_a_smaller_error():
    weight = random_weight()
    errors = [torch.linalg.norm(weight - compress(weight, IntNConfig(b)).weight) for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("pattern", [(2, 4), (1, 4), (2, 8)])
def test_nm_keeps_exactly_n_in_every_group_of_m(pattern):
    n, m = pattern
    weight = random_weight()
    result = compress(weight, NMConfig(pattern))
    groups = result.weight.reshape(1000, 512 // m, m)
    assert ((groups != 0).sum(-1) == n).all()
    # the kept ones are the n largest |w| of their group
    kept_min = groups.abs().masked_fill(groups == 0, float("inf")).amin(-1)
    dropped_max = weight.reshape_as(groups).abs().masked_fill(groups != 0, 0).amax(-1)
    assert (kept_min >= dropped_max).all()
    bits = {4: 2, 8: 3}[m]
    assert result.cost.index_bits == 1000 * (512 // m) * n * bits
    assert result.cost.macs == 1000 * 512 * n // m


def test_nm_with_a_short_last_group():
    result = compress(torch.randn(3, 10), NMConfig((2, 4)))  # groups of 4, 4 and 2
    assert (result.weight != 0).sum() == 3 * 6
    assert result.cost.index_bits == 3 * 2 * 2 * 2  # the group of 2 is kept whole: no positions


def test_three_by_three_blocks_on_the_resnet18_fc_shape():
    weight = random_weight()
    result = compress(weight, SparseConfig(block=(3, 3)))
    tiles = 334 * 171  # ceil(1000 / 3) x ceil(512 / 3)
    assert int((result.weight != 0).sum()) == tiles
    # 333 x 170 full 9-entry tiles (4 bits), 333 edge tiles of 3 x 2 (3 bits), 170 of 1 x 3
    # (2 bits) and the corner 1 x 2 (1 bit)
    assert result.cost.index_bits == 333 * 170 * 4 + 333 * 3 + 170 * 2 + 1


@pytest.mark.parametrize("bad", ["4:2", "2-4", "0:4"])
def test_bad_nm_pattern_is_refused(bad):
    with pytest.raises(ValueError, match="N:M"):
        NMConfig(bad)


def weight_error(weight, base, fit):
    low_rank = (fit.left * fit.singular) @ fit.right
    return torch.linalg.norm(weight.double() - base.double() - low_rank).item()


EXACT_PROJECTIONS = [SparseConfig(), SparseConfig(block=(1, 16)), Int1Config(scale="row"),
                     Int1Config(scale="tensor"), NMConfig()]  # fmt: skip


@pytest.mark.parametrize(
    "compression", [*EXACT_PROJECTIONS, SparseConfig(keep="max"), IntNConfig(2), IntNConfig(4)]
)
@pytest.mark.parametrize("rank", [4, 32])
def test_loftq_error_is_at_most_svd_inits(compression, rank):
    weight = random_weight(200, 96, seed=rank)
    result = alternate(weight, compression, rank, iterations=5)
    linear = nn.Linear(96, 200)
    with torch.no_grad():
        linear.weight.copy_(weight)
    context = make_init_context(linear, compression)
    svd = make_lora_linear(linear, LoraConfig(r=rank, init="svd_init"), context)
    loftq = make_lora_linear(linear, LoraConfig(r=rank, init="loftq_init"), context)
    svd_error = torch.linalg.norm(weight - svd.merged_weight()).item()
    loftq_error = torch.linalg.norm(weight - loftq.merged_weight()).item()
    assert result.errors[0] == pytest.approx(svd_error, rel=1e-5)  # the first iterate is svd_init
    assert loftq_error <= svd_error * (1 + 1e-6)
    assert loftq_error == pytest.approx(min(result.errors), rel=1e-5)
    assert weight_error(weight, result.base.weight, result.fit) == pytest.approx(min(result.errors))


@pytest.mark.parametrize("compression", EXACT_PROJECTIONS)
def test_loftq_error_never_increases_for_exact_projections(compression):
    weight = random_weight(200, 96, seed=7)
    errors = alternate(weight, compression, rank=8, iterations=6).errors
    assert len(errors) == 6
    assert all(b <= a * (1 + 1e-9) for a, b in pairwise(errors)), errors
    assert errors[-1] < errors[0]  # and it does improve


def test_loftq_keeps_the_compressors_storage():
    weight = random_weight(200, 96)
    config = SparseConfig()
    result = alternate(weight, config, rank=8, iterations=3)
    assert ((result.base.weight != 0).sum()) == (compress(weight, config).weight != 0).sum()
    tiles = result.base.weight.reshape(50, 4, 24, 4).ne(0).sum(dim=(1, 3))
    assert (tiles == 1).all()  # still one entry per 4x4 block


@pytest.mark.parametrize("init", ["paper_init", "svd_init", "loftq_init"])
def test_dora_at_init_leaves_the_output_unchanged(init):
    linear = nn.Linear(48, 30)
    context = make_init_context(linear, Int1Config())
    x = torch.randn(20, 48)
    outputs = []
    for use_dora in (False, True):
        config = LoraConfig(r=4, lora_alpha=16, init=init, use_dora=use_dora)
        layer = make_lora_linear(linear, config, context, torch.Generator().manual_seed(0))
        outputs.append(layer(x))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    assert layer.lora_magnitude.requires_grad


def test_dora_magnitude_is_counted():
    cost = compress(random_weight(), SparseConfig()).cost
    plain = account_layer(1000, 512, cost, 8)
    dora = account_layer(1000, 512, cost, 8, extra_adapter_params=1000)
    assert dora.compressed_bits - plain.compressed_bits == 1000 * 32


def input_error(features, weight, layer):
    return torch.linalg.norm(features.double() @ (weight - layer.merged_weight()).double().T).item()


@pytest.mark.parametrize("compression", [SparseConfig(), Int1Config(), IntNConfig(2)])
@pytest.mark.parametrize("rank", [1, 2, 4, 8, 16, 32])
def test_act_svd_init_has_at_most_svd_inits_error_on_the_train_features(compression, rank):
    generator = torch.Generator().manual_seed(rank)
    # features with a few strong directions, as real pre-logits features have
    mixing = torch.randn(64, 64, generator=generator) * torch.logspace(0, -2, 64)
    features = torch.randn(400, 64, generator=generator) @ mixing + 0.3
    linear = nn.Linear(64, 40)
    context = make_init_context(linear, compression, features)
    errors = {}
    for init in ("svd_init", "act_svd_init"):
        layer = make_lora_linear(linear, LoraConfig(r=rank, init=init), context)
        errors[init] = input_error(features, linear.weight, layer)
    assert errors["act_svd_init"] <= errors["svd_init"] * (1 + 1e-6)


def test_act_loftq_starts_from_act_svd():
    features = torch.randn(300, 32) * torch.linspace(2, 0.1, 32)
    linear = nn.Linear(32, 24)
    context = make_init_context(linear, SparseConfig(), features)
    act = make_lora_linear(linear, LoraConfig(r=4, init="act_svd_init"), context)
    both = make_lora_linear(linear, LoraConfig(r=4, init="act_loftq_init"), context)
    assert input_error(features, linear.weight, both) <= input_error(
        features, linear.weight, act
    ) * (1 + 1e-6)


def test_activation_aware_inits_need_features():
    linear = nn.Linear(8, 6)
    context = make_init_context(linear, SparseConfig(block=(2, 2)))
    with pytest.raises(ValueError, match="training inputs"):
        make_lora_linear(linear, LoraConfig(r=2, init="act_svd_init"), context)


def test_dora_with_an_all_zero_row_stays_finite_and_unchanged_at_init():
    linear = nn.Linear(8, 6)
    with torch.no_grad():
        linear.weight[2] = 0.0  # int4 keeps it zero: an all-zero row of W_c
    context = make_init_context(linear, IntNConfig(4))
    x = torch.randn(5, 8)
    plain = make_lora_linear(linear, LoraConfig(r=2, init="paper_init"), context,
                             torch.Generator().manual_seed(0))  # fmt: skip
    dora = make_lora_linear(linear, LoraConfig(r=2, init="paper_init", use_dora=True), context,
                            torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.isfinite(dora(x)).all()
    torch.testing.assert_close(dora(x), plain(x))
