"""Input moments from hooks, forward order, and the sequential calibrated initialisation."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compression import CompressedLinear, Int1Config, make_config
from lora import (
    LoraConfig,
    LoraLinear,
    MomentAccumulator,
    calibrate_sequentially,
    forward_order,
    make_adapter,
)


def test_conv_moment_is_that_of_the_unfolded_patches():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=2)
    x = torch.randn(4, 3, 13, 11, generator=torch.Generator().manual_seed(0))
    with MomentAccumulator(conv, positions=10_000) as accumulator:
        conv(x)
        conv(x[:2])
    rows = torch.cat([x, x[:2]])
    patches = F.unfold(rows, 3, dilation=2, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)
    patches = patches.double()
    assert accumulator.rows == patches.shape[0]
    torch.testing.assert_close(accumulator.moment(), patches.T @ patches / patches.shape[0])
    # the patch order is the weight's: a conv is its matrix view times the patches
    output = conv(x).flatten(2).transpose(1, 2).reshape(-1, 5)
    expected = patches[: output.shape[0]].float() @ conv.weight.reshape(5, -1).T + conv.bias
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_linear_moment_on_token_input():
    linear = nn.Linear(8, 3)
    tokens = torch.randn(5, 7, 8, generator=torch.Generator().manual_seed(1))
    accumulator = MomentAccumulator(linear, positions=7).attach()
    linear(tokens)
    accumulator.detach()
    linear(tokens)  # detached: not counted
    rows = tokens.reshape(-1, 8).double()
    assert accumulator.rows == 35
    torch.testing.assert_close(accumulator.moment(), rows.T @ rows / 35)


def test_positions_bound_the_rows_per_sample_deterministically():
    conv = nn.Conv2d(2, 4, 3, padding=1)
    x = torch.randn(3, 2, 10, 10)
    moments = []
    for _ in range(2):
        with MomentAccumulator(conv, positions=16, seed=7) as accumulator:
            conv(x)
        assert accumulator.rows == 3 * 16
        moments.append(accumulator.moment())
    assert torch.equal(moments[0], moments[1])


class Block(nn.Module):
    """Children declared in the reverse of the order forward calls them."""

    def __init__(self) -> None:
        super().__init__()
        self.second = nn.Conv2d(4, 4, 3, padding=1)
        self.first = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.second(torch.relu(self.first(x)))


def test_forward_order_is_the_order_of_calls():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Block(), Block(), nn.Flatten(), nn.Linear(64, 2))
    names = ["4", "2.second", "1.first", "2.first", "0", "1.second"]
    order = forward_order(model, torch.randn(1, 3, 4, 4), names)
    assert order == ["0", "1.first", "1.second", "2.first", "2.second", "4"]


def toy(seed: int):
    """Linear 32 -> 32, ReLU, Linear 32 -> 10 fed inputs that live near an 8-dim subspace."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        for parameter in model.parameters():
            scale = parameter.shape[-1] ** 0.5 if parameter.ndim == 2 else 10
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / scale)
    mix = torch.randn(32, 8, generator=generator)

    def data(n: int) -> torch.Tensor:
        noise = 0.01 * torch.randn(n, 32, generator=generator)
        return torch.randn(n, 8, generator=generator) @ mix.T + noise

    return model.eval(), [data(256) for _ in range(4)], data(2048)


# The original study's int1 (sign, no scale) inflates every weight: layer 1's error reaches
# layer 2 in directions its uncompressed inputs never had, where only a moment measured on the
# compressed prefix tells the init to correct layer 2.
TARGETS = {"0": Int1Config(scale="none"), "2": Int1Config(scale="none")}


def act_svd(rank: int):
    return lambda name, module: LoraConfig(r=rank, lora_alpha=8, init="act_svd_init")


def calibrated(model, calibration, sequential):
    model = copy.deepcopy(model)
    results = calibrate_sequentially(model, TARGETS, act_svd(4), calibration, sequential=sequential)
    return model, results


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sequential_calibration_has_a_lower_output_error_than_one_pass(seed):
    model, calibration, held_out = toy(seed)
    with torch.no_grad():
        reference = model(held_out)
    errors, factors = {}, {}
    for sequential in (True, False):
        compressed, results = calibrated(model, calibration, sequential)
        assert isinstance(compressed[0], LoraLinear) and isinstance(compressed[2], LoraLinear)
        with torch.no_grad():
            errors[sequential] = (compressed(held_out) - reference).norm().item()
        factors[sequential] = {name: layer.lora_A for name, (layer, _) in results.items()}
    # layer 1 sees the same inputs either way; layer 2 does not
    assert torch.equal(factors[True]["0"], factors[False]["0"])
    assert not torch.allclose(factors[True]["2"], factors[False]["2"])
    assert errors[True] < 0.9 * errors[False]


def test_calibration_is_deterministic_and_keeps_the_moments():
    model, calibration, held_out = toy(3)
    first, results = calibrated(model, calibration, sequential=True)
    second, _ = calibrated(model, calibration, sequential=True)
    with torch.no_grad():
        assert torch.equal(first(held_out), second(held_out))
    # another lora_alpha from the kept contexts, with no forward pass: the same merged weight
    layer, context = results["2"]
    assert context.moment is not None
    config = LoraConfig(r=4, lora_alpha=2, init="act_svd_init")
    rebuilt = make_adapter(layer.base_layer, config, context)
    torch.testing.assert_close(rebuilt.merged_weight(), layer.merged_weight())
    assert rebuilt.scaling != layer.scaling


def test_inits_that_do_not_read_inputs_need_no_forward_pass():
    model, _, _ = toy(0)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    svd = lambda name, module: LoraConfig(r=2, init="svd_init")  # noqa: E731
    results = calibrate_sequentially(model, {"2": make_config("int2")}, svd, [])
    assert calls == []
    assert isinstance(model[2].base_layer, CompressedLinear) and results["2"][0] is model[2]
    assert isinstance(model[0], nn.Linear) and not isinstance(model[0], CompressedLinear)


def test_a_moment_pass_stops_at_its_layer():
    model, calibration, _ = toy(0)
    calls = []
    model[2].register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    calibrate_sequentially(model, {"0": TARGETS["0"]}, act_svd(4), calibration)
    assert isinstance(model[0], LoraLinear)
    # no calibration batch (256 rows) went past layer 0, in the order pass or the moment pass;
    # only the probes that look for a block boundary (2 random rows) run the whole network
    assert set(calls) <= {2}


def test_a_rank_past_a_layer_is_refused_before_anything_changes():
    model, calibration, _ = toy(0)
    before = list(model)
    with pytest.raises(ValueError, match="between 0 \\(no adapter\\) and 10"):
        calibrate_sequentially(model, TARGETS, act_svd(11), calibration)
    assert list(model) == before
