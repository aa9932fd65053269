"""CompressedLinear / CompressedConv2d and compress_, which swaps them into a whole model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compression import (
    CompressedConv2d,
    CompressedLinear,
    compress,
    compress_,
    compressible,
    list_methods,
    make_config,
    weight_matrix,
)


def seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return module


@pytest.mark.parametrize("method", list_methods())
def test_compressed_linear_stores_parts_that_rebuild_its_weight(method):
    linear = seeded(nn.Linear(37, 20))
    config = make_config(method)
    layer = CompressedLinear.from_dense(linear, config)
    w_c = compress(linear.weight.detach(), config).weight
    assert torch.equal(layer.weight, w_c)
    assert torch.equal(layer.expand(), layer.weight)
    assert layer.cost == layer.compressed.cost
    assert not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(5, 37)
    assert torch.equal(layer(x), F.linear(x, w_c, linear.bias))
    # the state dict is a plain Linear's, so a compressed model still loads timm weights
    assert set(layer.state_dict()) == {"weight", "bias"}
    # expand() reads the stored parts, not the weight
    with torch.no_grad():
        layer.weight.zero_()
    assert torch.equal(layer.expand(), w_c)


@pytest.mark.parametrize("method", list_methods())
def test_compressed_conv_sees_the_matrix_view_and_rebuilds_its_weight(method):
    conv = seeded(nn.Conv2d(5, 12, 3, stride=2, padding=1, dilation=1))
    config = make_config(method)
    layer = CompressedConv2d.from_dense(conv, config)
    w_c = compress(conv.weight.detach().reshape(12, -1), config).weight.reshape(conv.weight.shape)
    assert torch.equal(layer.weight, w_c)
    assert torch.equal(layer.expand(), layer.weight)
    assert layer.compressed.weight.shape == (12, 45)
    x = torch.randn(2, 5, 9, 9)
    assert torch.equal(layer(x), F.conv2d(x, w_c, conv.bias, stride=2, padding=1))
    with torch.no_grad():
        layer.weight.zero_()
    assert torch.equal(layer.expand(), w_c)


def test_set_compressed_replaces_weight_and_parts_in_place():
    linear = seeded(nn.Linear(16, 8))
    layer = CompressedLinear.from_dense(linear, make_config("int4"))
    weight = layer.weight
    other = compress(torch.randn(8, 16), make_config("int4"))
    layer.set_compressed(other)
    assert layer.weight is weight and torch.equal(weight, other.weight)
    assert torch.equal(layer.expand(), other.weight)
    with pytest.raises(ValueError, match="cannot replace"):
        layer.set_compressed(compress(torch.randn(8, 15), make_config("int4")))


class DoubledConv(nn.Conv2d):
    """A conv with a forward of its own, which a compressed conv would not compute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def small_net() -> nn.Sequential:
    return seeded(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            DoubledConv(8, 8, 3, padding=1, groups=8),  # depthwise, with its own forward
            nn.Conv2d(8, 16, 1),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 10),
        )
    )


def test_compress_swaps_exactly_the_filtered_modules():
    model = small_net()
    before = dict(model.named_children())
    x = torch.randn(2, 3, 4, 4)
    swapped = compress_(model, make_config("int2"), lambda m, name: name in {"3", "5"})
    assert sorted(swapped) == ["3", "5"]
    assert isinstance(model[3], CompressedConv2d) and isinstance(model[5], CompressedLinear)
    for name in ("0", "1", "2", "4"):
        assert model.get_submodule(name) is before[name]
    reference = small_net()
    expected = reference[:3](x)
    w3 = compress(weight_matrix(reference[3]).detach(), make_config("int2")).weight
    expected = F.conv2d(expected, w3.reshape(16, 8, 1, 1), reference[3].bias).flatten(1)
    w5 = compress(reference[5].weight.detach(), make_config("int2")).weight
    assert torch.equal(model(x), F.linear(expected, w5, reference[5].bias))


def test_compress_by_default_takes_every_compressible_layer_with_its_own_config():
    model = small_net()
    configs = {"0": make_config("int1"), "3": make_config("int4"), "5": make_config("sparse")}
    swapped = compress_(model, configs.__getitem__)
    assert sorted(swapped) == ["0", "3", "5"]  # not the conv with a forward of its own
    assert {name: layer.compressed.config for name, layer in swapped.items()} == configs
    assert type(model[2]) is DoubledConv


def test_what_compressible_refuses_it_names():
    assert compressible(nn.Conv2d(8, 8, 3, groups=8)) is None  # depthwise: out x kh*kw
    assert compressible(nn.Conv2d(8, 8, 3)) is None
    assert compressible(nn.Linear(3, 4)) is None
    assert "overrides Conv2d.forward" in compressible(DoubledConv(8, 8, 3))
    assert "not a Linear or Conv2d" in compressible(nn.ReLU())
    already = CompressedLinear.from_dense(nn.Linear(3, 4), make_config("int8"))
    assert "already compressed" in compressible(already)


def test_compress_on_a_selected_conv_it_cannot_replace_raises_and_changes_nothing():
    model = small_net()
    before = dict(model.named_children())
    with pytest.raises(ValueError, match=r"cannot compress 2: DoubledConv overrides"):
        compress_(model, make_config("int4"), lambda m, name: name in {"0", "2"})
    assert dict(model.named_children()) == before
