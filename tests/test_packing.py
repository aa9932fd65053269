"""What a compressor stores: parts that rebuild W_c bit for bit, in exactly the bits counted."""

import pytest
import torch

from compression import (
    Int1Config,
    IntNConfig,
    NMConfig,
    SparseConfig,
    compress,
    expand,
    make_config,
    method_of,
    pack_codes,
    unpack_codes,
)

CONFIGS = [
    SparseConfig(),
    SparseConfig(block=(1, 16), keep="max"),
    SparseConfig(block=(3, 3)),
    SparseConfig(block=(1, 1)),
    Int1Config(scale="none"),
    Int1Config(scale="tensor"),
    Int1Config(scale="row"),
    IntNConfig(2),
    IntNConfig(4),
    IntNConfig(8),
    NMConfig(),
    NMConfig((1, 8)),
    SparseConfig(block=(16, 32)),  # 512-entry tiles: 9-bit positions
    NMConfig((2, 300)),  # 9-bit positions
]
SHAPES = [(1000, 512), (10, 7), (13, 30)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parts_rebuild_the_compressed_weight_exactly_in_the_counted_bits(config, shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    weight[0, 0] = 0.0
    result = compress(weight, config)
    assert torch.equal(expand(result.parts, config, shape), result.weight)
    assert result.stored_bits() == result.cost.total_bits


@pytest.mark.parametrize("bits", [*range(1, 10), 12, 16])
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1001])
def test_codes_pack_to_exactly_their_bits_and_back(bits, count):
    codes = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-count * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, count), codes)


def test_signs_pack_eight_to_a_byte_most_significant_first():
    assert pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [129, 128]


def test_codes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        pack_codes(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_codes(torch.zeros(1, dtype=torch.uint8), 3, 3)


@pytest.mark.parametrize("name", ["sparse", "int1", "int2", "int4", "int8", "nm"])
def test_every_config_knows_its_method_name(name):
    assert method_of(make_config(name)) == name
