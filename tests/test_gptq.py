"""Calibrated rounding: GPTQ's error feedback and the input-weighted mse scale, and that the
inputs they need reach them (the FC's train features, a whole network's calibration pass)."""

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from compression import (
    Int1Config,
    IntNConfig,
    build_configs,
    compress,
    expand,
    second_moment,
    uses_inputs,
)
from compression.gptq import weighted_row_errors
from compression.integer import INT_QUANTIZERS
from lora.calibration import compress_sequentially
from train_evaluate.config import cli
from train_evaluate.training.fc_method import Method

CONFIGS = [IntNConfig(4), IntNConfig(2), Int1Config("row"), Int1Config("rowcol")]


def correlated_inputs(cols=48, rows=2000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator)
    return torch.randn(rows, cols, generator=generator) @ mixing


def heavy_tailed(rows=64, cols=48, seed=1):
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, cols, generator=generator)
    chi2 = torch.randn(2, rows, cols, generator=generator).pow(2).sum(0)
    return normal / (chi2 / 2).sqrt()


def output_errors(weight, compressed, moment):
    return weighted_row_errors(weight - compressed.weight, moment)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_gptq_lowers_the_output_error_and_never_leaves_a_row_worse(config):
    weight, moment = heavy_tailed(), second_moment(correlated_inputs())
    nearest = compress(weight, config, moment)  # rtn ignores the inputs
    fed_back = compress(weight, replace(config, quantizer="gptq"), moment)
    before, after = output_errors(weight, nearest, moment), output_errors(weight, fed_back, moment)
    assert (after <= before).all()
    assert after.sum() < 0.99 * before.sum()


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_gptq_stores_what_round_to_nearest_stores_and_expands_bit_for_bit(config):
    weight, moment = heavy_tailed(), second_moment(correlated_inputs())
    gptq = replace(config, quantizer="gptq")
    result = compress(weight, gptq, moment)
    assert result.cost == compress(weight, config).cost
    assert result.stored_bits() == result.cost.total_bits
    assert torch.equal(expand(result.parts, gptq, tuple(weight.shape)), result.weight)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_gptq_with_white_inputs_or_none_is_round_to_nearest(config):
    weight = heavy_tailed()
    gptq = replace(config, quantizer="gptq")
    nearest = compress(weight, config).weight
    assert torch.equal(compress(weight, gptq, torch.eye(48, dtype=torch.float64)).weight, nearest)
    assert torch.equal(compress(weight, gptq).weight, nearest)


@pytest.mark.parametrize("bits", [2, 4])
def test_the_input_weighted_mse_scale_is_never_worse_than_max_in_output_error(bits):
    weight, moment = heavy_tailed(), second_moment(correlated_inputs())
    peak = compress(weight, IntNConfig(bits), moment)
    clipped = compress(weight, IntNConfig(bits, int_scale="mse"), moment)
    before, after = output_errors(weight, peak, moment), output_errors(weight, clipped, moment)
    assert (after <= before).all() and after.sum() < before.sum()
    # it is the inputs' error it minimises, not the weights': another scale than without them
    assert not torch.equal(
        clipped.weight, compress(weight, IntNConfig(bits, int_scale="mse")).weight
    )


def test_only_calibrated_options_read_the_inputs_and_the_cli_names_match():
    assert [uses_inputs(c) for c in CONFIGS] == [False] * 4
    assert uses_inputs(IntNConfig(4, quantizer="gptq")) and uses_inputs(
        Int1Config(quantizer="gptq")
    )
    assert uses_inputs(IntNConfig(4, int_scale="mse"))
    configs = build_configs(["int4", "int1", "sparse"], quantizer="gptq")
    assert configs["int4"].describe() == "int4(per-row symmetric, gptq)"
    assert configs["int1"].describe() == "int1(scale=row, gptq)"
    assert list(cli.QUANTIZER_NAMES) == list(INT_QUANTIZERS)
    with pytest.raises(ValueError, match=r"takes the quantizer .*, not 'obq'"):
        IntNConfig(4, quantizer="obq")


def test_the_fc_is_quantized_with_the_moment_of_its_train_features():
    torch.manual_seed(3)
    head = nn.Linear(48, 20)
    features = correlated_inputs(rows=500)
    config = IntNConfig(2, quantizer="gptq")
    method = Method.create("int2", config, head, features)
    expected = compress(head.weight.detach(), config, second_moment(features))
    assert torch.equal(method.context.base_weight, expected.weight)
    assert not torch.equal(method.context.base_weight, compress(head.weight, IntNConfig(2)).weight)


def test_a_network_is_compressed_in_order_each_layer_on_the_compressed_prefix_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    inputs = torch.randn(256, 16) @ torch.randn(16, 16)
    config = IntNConfig(2, quantizer="gptq")
    first = compress(model[0].weight.detach(), config, second_moment(inputs))
    hidden = torch.relu(inputs @ first.weight.T + model[0].bias.detach())
    second = compress(model[2].weight.detach(), config, second_moment(hidden))
    compressed = copy.deepcopy(model)
    compress_sequentially(compressed, {"0": config, "2": config}, [inputs[:128], inputs[128:]])
    assert torch.equal(compressed[0].weight, first.weight)
    assert torch.equal(compressed[2].weight, second.weight)


@pytest.mark.parametrize("config", [IntNConfig(2, quantizer="gptq"), Int1Config(quantizer="gptq")])
def test_a_gptq_layer_round_trips_through_its_packed_file(config, tmp_path):
    from lora import LoraConfig, make_init_context, make_lora_linear
    from train_evaluate.outputs.checkpoint import pack_layer, write_packed
    from train_evaluate.outputs.network_checkpoint import read_packed

    torch.manual_seed(0)
    linear = nn.Linear(48, 20)
    features = correlated_inputs(rows=300)
    context = make_init_context(linear, config, features=features)
    expected = compress(linear.weight.detach(), config, second_moment(features))
    assert torch.equal(context.base_weight, expected.weight)
    layer = make_lora_linear(linear, LoraConfig(r=4, init="svd_init"), context)
    assert pack_layer(layer)[1]["compression"]["quantizer"] == "gptq"
    path = tmp_path / "layer.safetensors"
    write_packed(path, layer)
    loaded = read_packed(path)
    assert loaded.layer.base_compressed.config == config
    with torch.no_grad():
        assert torch.equal(loaded.layer(features), layer(features))


def test_a_calibrated_layer_the_forward_never_calls_is_refused_not_left_uncompressed():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.used(x)

    config = IntNConfig(4, quantizer="gptq")
    with pytest.raises(ValueError, match="never calls spare"):
        compress_sequentially(Unused(), {"used": config, "spare": config}, [torch.randn(4, 8)])
