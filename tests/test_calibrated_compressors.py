"""Calibrated weight-only compressors: intN's mse scale and int1's rowcol scale."""

import pytest
import torch
from torch import nn

from compression import Int1Config, IntNConfig, build_configs, compress, expand, make_config
from compression.binary import INT1_SCALES
from compression.integer import INT_SCALES
from lora import LoraConfig, make_init_context, make_lora_linear
from train_evaluate.config import cli
from train_evaluate.outputs.checkpoint import (
    FORMAT,
    CheckpointError,
    pack_layer,
    save_packed,
    write_packed,
)
from train_evaluate.outputs.network_checkpoint import read_packed


def gaussian(rows=64, cols=96, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def student_t(rows=64, cols=96, seed=1):
    # t with 2 degrees of freedom: a normal over the root of a chi-square(2) / 2
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, cols, generator=generator)
    chi2 = torch.randn(2, rows, cols, generator=generator).pow(2).sum(0)
    return normal / (chi2 / 2).sqrt()


def row_errors(weight, config):
    return ((weight - compress(weight, config).weight) ** 2).sum(dim=1)


def frobenius_error(weight, config):
    return torch.linalg.norm(weight - compress(weight, config).weight).item()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("matrix", [gaussian, student_t])
def test_mse_scale_is_never_worse_than_max_on_any_row(bits, matrix):
    weight = matrix()
    mse = row_errors(weight, IntNConfig(bits, int_scale="mse"))
    maximum = row_errors(weight, IntNConfig(bits))
    assert torch.all(mse <= maximum)


def test_mse_scale_is_strictly_better_on_heavy_tails_at_int4():
    weight = student_t()
    mse = row_errors(weight, IntNConfig(4, int_scale="mse"))
    maximum = row_errors(weight, IntNConfig(4))
    assert (mse < maximum).float().mean() > 0.9  # almost every row gains from clipping
    assert mse.sum() < 0.95 * maximum.sum()


def test_mse_scale_stores_the_same_bits_and_expands_bit_for_bit():
    rows, cols = 24, 40
    weight = student_t(rows, cols)
    weight[3] = 0.0  # a zero row: scale 0, codes 0
    config = IntNConfig(4, int_scale="mse")
    result = compress(weight, config)
    assert result.cost.total_bits == rows * cols * 4 + rows * 32  # 4-bit codes, fp32 row scales
    assert result.stored_bits() == result.cost.total_bits
    assert result.cost == compress(weight, IntNConfig(4)).cost
    rebuilt = expand(result.parts, config, (rows, cols))
    assert torch.equal(rebuilt.view(torch.int32), result.weight.view(torch.int32))
    assert torch.equal(result.weight[3], torch.zeros(cols))


def test_max_scale_describe_and_numbers_are_unchanged():
    assert IntNConfig(4).describe() == "int4(per-row symmetric)"
    assert IntNConfig(2, int_scale="mse").describe() == "int2(per-row symmetric, mse scale)"
    weight = student_t()
    levels = 7
    scale = weight.abs().amax(dim=1, keepdim=True) / levels
    expected = torch.round(weight / scale).clamp(-levels, levels) * scale
    assert torch.equal(compress(weight, IntNConfig(4)).weight, expected)
    with pytest.raises(ValueError, match="valid: max, mse"):
        IntNConfig(4, int_scale="mean")


def column_structured(rows=48, cols=80, seed=2):
    # W = diag(r) G diag(c): row and column magnitudes that one row scale cannot follow
    generator = torch.Generator().manual_seed(seed)
    r = torch.rand(rows, 1, generator=generator) * 3 + 0.1
    c = torch.rand(1, cols, generator=generator) * 3 + 0.1
    return r * torch.randn(rows, cols, generator=generator) * c


@pytest.mark.parametrize("matrix", [gaussian, student_t, column_structured])
def test_rowcol_error_is_never_larger_than_row(matrix):
    weight = matrix()
    rowcol = frobenius_error(weight, Int1Config(scale="rowcol"))
    assert rowcol <= frobenius_error(weight, Int1Config(scale="row")) * (1 + 1e-6)


def test_rowcol_is_strictly_better_with_column_structure():
    weight = column_structured()
    rowcol = frobenius_error(weight, Int1Config(scale="rowcol"))
    assert rowcol < 0.9 * frobenius_error(weight, Int1Config(scale="row"))


def test_rowcol_scales_are_the_rank1_of_the_magnitudes():
    # an exactly rank-1 |W| is rebuilt exactly: W_c = W up to rounding
    generator = torch.Generator().manual_seed(3)
    a = torch.rand(10, 1, generator=generator) + 0.5
    b = torch.rand(1, 14, generator=generator) + 0.5
    signs = torch.where(torch.rand(10, 14, generator=generator) < 0.5, -1.0, 1.0)
    weight = a * signs * b
    result = compress(weight, Int1Config(scale="rowcol"))
    torch.testing.assert_close(result.weight, weight)
    assert torch.all(result.parts["scale"] >= 0) and torch.all(result.parts["col_scale"] >= 0)


def test_rowcol_bits_by_hand_and_bit_exact_expand():
    rows, cols = 30, 50
    weight = column_structured(rows, cols)
    config = Int1Config(scale="rowcol")
    result = compress(weight, config)
    assert result.cost.value_bits == rows * cols  # one sign bit per weight
    assert result.cost.scale_bits == (rows + cols) * 32  # fp32 row and column scales
    assert result.cost.total_bits == 1500 + 2560
    assert result.stored_bits() == result.cost.total_bits
    assert result.parts["scale"].shape == (rows, 1)
    assert result.parts["col_scale"].shape == (1, cols)
    rebuilt = expand(result.parts, config, (rows, cols))
    assert torch.equal(rebuilt.view(torch.int32), result.weight.view(torch.int32))


def lora_layer(compression, shape=(40, 24)):
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(shape[1], shape[0])
    with torch.no_grad():  # heavy tails and column structure, so both options do something
        linear.weight.copy_(student_t(*shape) * torch.linspace(0.1, 2.0, shape[1]))
    features = torch.randn(64, shape[1], generator=generator)
    context = make_init_context(linear, compression, features)
    layer = make_lora_linear(linear, LoraConfig(r=4, lora_alpha=8, init="svd_init"), context,
                             generator)  # fmt: skip
    return layer, features


@pytest.mark.parametrize(
    "compression", [IntNConfig(4, int_scale="mse"), Int1Config(scale="rowcol")], ids=str
)
def test_packed_checkpoint_round_trip(compression, tmp_path):
    layer, features = lora_layer(compression)
    path = tmp_path / "layer.safetensors"
    write_packed(path, layer)
    loaded = read_packed(path)
    assert loaded.layer.base_compressed.config == compression
    assert torch.equal(loaded.layer.base_layer.weight, layer.base_layer.weight)
    with torch.no_grad():
        assert torch.equal(loaded.layer(features), layer(features))


def test_a_file_written_before_int_scale_and_quantizer_loads_as_max_rtn(tmp_path):
    layer, features = lora_layer(IntNConfig(4))
    tensors, info = pack_layer(layer)
    assert info["compression"] == {"bits": 4, "int_scale": "max"}  # quantizer rtn: left out
    info["compression"] = {"bits": 4}  # what write_packed stored before the fields existed
    path = tmp_path / "old.safetensors"
    save_packed(path, tensors, info, FORMAT)
    loaded = read_packed(path)
    assert loaded.layer.base_compressed.config == IntNConfig(4)
    with torch.no_grad():
        assert torch.equal(loaded.layer(features), layer(features))


@pytest.mark.parametrize(
    "method,fields",
    [("int2", {"int_scale": "max"}),  # bits absent: int2's 2 is not the field's default 4
     ("int4", {"bits": 4, "int_scale": "mse", "extra": 1})],  # a field no config has
)  # fmt: skip
def test_only_absent_fields_at_their_default_are_filled_in(method, fields, tmp_path):
    layer, _ = lora_layer(make_config(method))
    tensors, info = pack_layer(layer)
    info["compression"] = fields
    path = tmp_path / "edited.safetensors"
    save_packed(path, tensors, info, FORMAT)
    with pytest.raises(CheckpointError, match=f"is not what method {method} stores"):
        read_packed(path)


def test_options_reach_the_configs_and_the_cli_names_match():
    configs = build_configs(["int4", "int1", "sparse"], int_scale="mse", scale="rowcol")
    assert configs["int4"] == IntNConfig(4, int_scale="mse")
    assert configs["int1"] == Int1Config(scale="rowcol")
    # int1's scale and seed-compat's scale=none do not leak into the int configs
    assert build_configs(["int2"], "seed-compat")["int2"] == IntNConfig(2)
    assert make_config("int8", scale="row") == IntNConfig(8)
    assert list(cli.INT_SCALE_NAMES) == list(INT_SCALES)
    assert list(cli.INT1_SCALE_NAMES) == list(INT1_SCALES)
    args = cli.build_parser().parse_args(["--int-scale", "mse", "--int1-scale", "rowcol"])
    assert (args.int_scale, args.int1_scale) == ("mse", "rowcol")
