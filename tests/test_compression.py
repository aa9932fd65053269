"""Compressors: what they keep, and that bad names fail with the valid ones listed."""

import itertools

import pytest
import torch

from compression import Int1Config, SparseConfig, build_configs, compress, make_config
from compression.sparse import block_sizes


def reference_kept(weight: torch.Tensor, block: tuple[int, int], keep: str):
    """Per tile, by plain loops: (row, col) of the first entry that ``keep`` selects."""
    rows, cols = weight.shape
    bh, bw = block
    kept = set()
    for r0, c0 in itertools.product(range(0, rows, bh), range(0, cols, bw)):
        best, where = None, None
        for r, c in itertools.product(range(r0, min(r0 + bh, rows)), range(c0, min(c0 + bw, cols))):
            score = abs(weight[r, c].item()) if keep == "absmax" else weight[r, c].item()
            if best is None or score > best:
                best, where = score, (r, c)
        kept.add(where)
    return kept


def nonzero_positions(weight: torch.Tensor):
    return {tuple(p) for p in weight.nonzero().tolist()}


@pytest.mark.parametrize("block", [(4, 4), (1, 16)])
@pytest.mark.parametrize("keep", ["absmax", "max"])
def test_sparse_keeps_one_entry_per_block_on_resnet18_fc_shape(block, keep):
    weight = torch.randn(1000, 512, generator=torch.Generator().manual_seed(0))
    result = compress(weight, SparseConfig(block=block, keep=keep))
    assert result.weight.shape == weight.shape and result.weight.dtype == weight.dtype
    assert int((result.weight != 0).sum()) == 32_000
    tiles = result.weight.reshape(1000 // block[0], block[0], 512 // block[1], block[1])
    original = weight.reshape_as(tiles)
    if keep == "absmax":
        expected = original.abs().amax(dim=(1, 3))
        assert torch.equal(tiles.abs().amax(dim=(1, 3)), expected)
    else:
        expected = original.amax(dim=(1, 3))
        # the kept entry is the only non-zero of its tile, so the tile's sum is its value
        assert torch.equal(tiles.sum(dim=(1, 3)), expected)
    # kept values are copied, not recomputed
    mask = result.weight != 0
    assert torch.equal(result.weight[mask], weight[mask])


def test_sparse_block_shapes_select_different_entries():
    weight = torch.randn(1000, 512, generator=torch.Generator().manual_seed(1))
    square = compress(weight, SparseConfig(block=(4, 4))).weight != 0
    row = compress(weight, SparseConfig(block=(1, 16))).weight != 0
    assert int(square.sum()) == int(row.sum()) == 32_000
    assert not torch.equal(square, row)


@pytest.mark.parametrize("block", [(4, 4), (1, 16), (3, 3), (2, 5)])
@pytest.mark.parametrize("keep", ["absmax", "max"])
def test_sparse_edge_blocks_match_a_loop_reference(block, keep):
    weight = torch.randn(10, 7, generator=torch.Generator().manual_seed(2))
    result = compress(weight, SparseConfig(block=block, keep=keep))
    assert nonzero_positions(result.weight) == reference_kept(weight, block, keep)
    tiles = len(block_sizes(10, block[0])) * len(block_sizes(7, block[1]))
    assert int((result.weight != 0).sum()) == tiles


def test_sparse_edge_block_bits_are_counted_at_their_own_size():
    # 10 x 7 in 4x4 tiles: rows 4, 4, 2 and columns 4, 3 -> tiles of 16, 12, 16, 12, 8, 6
    # entries -> 4 + 4 + 4 + 4 + 3 + 3 index bits.
    cost = compress(torch.randn(10, 7), SparseConfig(block=(4, 4))).cost
    assert cost.index_bits == 22
    assert cost.value_bits == 6 * 32
    assert cost.scale_bits == 0
    assert cost.macs == 6


def test_sparse_ties_go_to_the_first_entry_of_the_tile():
    weight = torch.tensor([[1.0, -1.0, 1.0, 0.5]])
    kept = compress(weight, SparseConfig(block=(1, 4))).weight
    assert kept.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_sparse_max_rule_keeps_the_signed_maximum():
    weight = torch.tensor([[-5.0, 1.0, 2.0, -0.5]])
    assert compress(weight, SparseConfig((1, 4), "max")).weight.tolist() == [[0, 0, 2.0, 0]]
    assert compress(weight, SparseConfig((1, 4), "absmax")).weight.tolist() == [[-5.0, 0, 0, 0]]


def test_int1_rows_are_plus_minus_their_scale_and_zero_maps_to_plus():
    weight = torch.randn(64, 48, generator=torch.Generator().manual_seed(3))
    weight[5, 7] = 0.0
    weight[9, :] = 0.0  # an all-zero row: scale 0, still a valid code
    result = compress(weight, Int1Config(scale="row"))
    alpha = weight.abs().mean(dim=1)
    assert torch.equal(result.weight.abs(), alpha.unsqueeze(1).expand_as(weight))
    assert result.weight[5, 7] == alpha[5] > 0
    signs = torch.where(weight >= 0, 1.0, -1.0)
    assert torch.equal(result.weight, alpha.unsqueeze(1) * signs)
    assert result.cost.value_bits == 64 * 48 and result.cost.scale_bits == 64 * 32


@pytest.mark.parametrize("scale,scale_bits", [("none", 0), ("tensor", 32), ("row", 1000 * 32)])
def test_int1_scales_and_their_bits(scale, scale_bits):
    weight = torch.randn(1000, 512, generator=torch.Generator().manual_seed(4))
    weight[0, 0] = 0.0
    result = compress(weight, Int1Config(scale=scale))
    values = result.weight.unique()
    if scale == "none":
        assert values.tolist() == [-1.0, 1.0]
    elif scale == "tensor":
        assert len(values) == 2 and values[1] == -values[0] == weight.abs().mean()
    assert result.weight[0, 0] > 0
    assert result.cost.value_bits == 512_000
    assert result.cost.scale_bits == scale_bits


def test_int1_row_scale_has_the_smallest_error():
    weight = torch.randn(300, 200, generator=torch.Generator().manual_seed(5)) * torch.rand(300, 1)
    errors = {
        scale: torch.linalg.norm(weight - compress(weight, Int1Config(scale=scale)).weight).item()
        for scale in ("none", "tensor", "row")
    }
    assert errors["row"] < errors["tensor"] < errors["none"]
    # and no other per-row scale does better (it is the L2 optimum for the sign pattern)
    signs = torch.where(weight >= 0, 1.0, -1.0)
    for factor in (0.9, 1.1):
        other = factor * weight.abs().mean(dim=1, keepdim=True) * signs
        assert torch.linalg.norm(weight - other).item() > errors["row"]


def test_compress_does_not_modify_its_input():
    weight = torch.randn(20, 16)
    before = weight.clone()
    for config in (SparseConfig(), Int1Config()):
        compress(weight, config)
    assert torch.equal(weight, before)


def test_seed_compat_preset_is_the_original_code():
    configs = build_configs(["sparse", "int1"], preset="seed-compat")
    assert configs["sparse"] == SparseConfig(block=(1, 16), keep="max")
    assert configs["int1"] == Int1Config(scale="none")
    # and an explicit option wins over the preset
    assert build_configs(["sparse"], "seed-compat", block=(4, 4))["sparse"].block == (4, 4)


def test_default_configs():
    assert make_config("sparse") == SparseConfig(block=(4, 4), keep="absmax")
    assert make_config("int1", block=(1, 16)) == Int1Config(scale="row")


@pytest.mark.parametrize(
    "call,fragment",
    [
        (lambda: make_config("int3x"), r"valid methods: (.*, )?int1"),
        (lambda: SparseConfig(block="4by4"), "HxW"),
        (lambda: SparseConfig(block="0x4"), "positive"),
        (lambda: SparseConfig(keep="median"), "valid: absmax, max"),
        (lambda: Int1Config(scale="col"), "valid: none, tensor, row"),
        (lambda: build_configs(["sparse"], preset="fast"), "valid presets: default, seed-compat"),
        (lambda: compress(torch.randn(3, 4, 5), SparseConfig()), "2-D weight"),
    ],
)
def test_bad_compressor_input_raises_value_error_naming_the_fix(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()
