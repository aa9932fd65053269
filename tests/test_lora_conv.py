"""LoraConv2d: PEFT's conv shapes, and every init working on a conv through its matrix view."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compression import CompressedConv2d, compress, make_config
from lora import (
    LORA_INITS,
    LoraConfig,
    LoraConv2d,
    MomentAccumulator,
    make_adapter,
    make_init_context,
)

GEOMETRY = {"stride": 2, "padding": 1, "dilation": 1}


def dense_conv(in_channels=6, out_channels=10, seed=0) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 3, bias=True, **GEOMETRY)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        conv.bias.copy_(torch.randn(out_channels, generator=generator))
    return conv


def images(n=4, channels=6, size=11, seed=1) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def build(conv, compression, moment=None, **lora) -> LoraConv2d:
    context = make_init_context(conv, compression, moment=moment)
    return make_adapter(conv, LoraConfig(**lora), context, torch.Generator().manual_seed(2))


def test_conv_adapter_has_peft_shapes_and_scaling():
    layer = build(dense_conv(), make_config("int4"), r=4, lora_alpha=12)
    assert isinstance(layer, LoraConv2d)
    assert layer.lora_A.shape == (4, 6, 3, 3) and layer.lora_B.shape == (10, 4, 1, 1)
    assert layer.scaling == 3.0
    assert (layer.in_features, layer.out_features) == (54, 10)
    assert isinstance(layer.base_layer, CompressedConv2d)
    assert layer.base_compressed.weight.shape == (10, 54)


def test_paper_init_leaves_the_compressed_convs_output_unchanged():
    conv = dense_conv()
    layer = build(conv, make_config("int1"), r=4, init="paper_init")
    assert layer.lora_A.abs().sum() > 0
    compressed = CompressedConv2d.from_dense(conv, make_config("int1"))
    x = images()
    assert torch.equal(layer(x), compressed(x))


def test_svd_init_at_full_rank_restores_a_strided_padded_conv():
    conv = dense_conv()
    full = min(10, 6 * 3 * 3)
    layer = build(conv, make_config("int2"), r=full, lora_alpha=5, init="svd_init")
    torch.testing.assert_close(layer.merged_weight(), conv.weight.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(images()), conv(images()), atol=1e-5, rtol=1e-5)


def test_forward_is_the_conv_with_the_merged_weight():
    conv = dense_conv()
    layer = build(conv, make_config("sparse"), r=3, lora_alpha=7, init="svd_init")
    with torch.no_grad():  # a trained-looking adapter: nothing about init is assumed
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = images()
    expected = F.conv2d(x, layer.merged_weight(), conv.bias, **GEOMETRY)
    # two convs summed vs one merged conv: fp32 rounding on outputs of size ~100
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(layer(x, base_out=layer.base_layer(x)), layer(x))


@pytest.mark.parametrize("init", ["paper_init", "svd_init", "loftq_init"])
def test_dora_at_init_computes_what_plain_lora_does(init):
    conv = dense_conv()
    plain = build(conv, make_config("int2"), r=3, init=init)
    dora = build(conv, make_config("int2"), r=3, init=init, use_dora=True)
    assert dora.lora_magnitude.shape == (10,)
    x = images()
    torch.testing.assert_close(dora(x), plain(x), atol=1e-5, rtol=1e-5)


def patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 54).double()


@pytest.mark.parametrize("rank", [1, 4])
def test_act_svd_init_on_a_conv_has_at_most_svd_inits_input_error(rank):
    conv = dense_conv()
    # correlated channels: the input moment is far from the identity, so the two inits differ
    mix = torch.randn(6, 6, generator=torch.Generator().manual_seed(3)) * torch.logspace(0, -2, 6)
    x = torch.einsum("ij,njhw->nihw", mix, images(n=16))
    with MomentAccumulator(conv, positions=10_000) as accumulator:
        conv(x)
    weight = conv.weight.detach().reshape(10, -1).double()

    def input_error(layer):
        residual = weight - layer.merged_weight().detach().reshape(10, -1).double()
        return (patches(conv, x) @ residual.T).norm().item()

    svd = build(conv, make_config("int1"), r=rank, init="svd_init")
    act = build(conv, make_config("int1"), moment=accumulator.moment(), r=rank, init="act_svd_init")
    assert input_error(act) <= input_error(svd)
    assert input_error(act) < 0.99 * input_error(svd)


def test_every_init_builds_a_conv_adapter_with_a_consistent_base():
    conv = dense_conv()
    moment = torch.eye(54, dtype=torch.float64)
    first_fit = compress(conv.weight.detach().reshape(10, -1), make_config("int1")).weight
    for init in LORA_INITS:
        layer = build(conv, make_config("int1"), moment=moment, r=3, init=init)
        refitted = not torch.equal(layer.base_layer.weight.reshape(10, -1), first_fit)
        assert refitted == ("loftq" in init)
        # LoftQ refits the base: what a packed file would hold must still rebuild the weight
        assert torch.equal(layer.base_layer.expand(), layer.base_layer.weight)
        assert torch.equal(layer.base_compressed.weight, layer.base_layer.weight.reshape(10, -1))


def test_ranks_past_the_matrix_view_are_refused():
    with pytest.raises(ValueError, match="between 0 \\(no adapter\\) and 10"):
        build(dense_conv(), make_config("int4"), r=11)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [0, (1, 2), "same", "valid"])
@pytest.mark.parametrize(("kernel", "dilation", "stride"), [((3, 3), 1, 2), ((2, 3), 2, 1)])
def test_conv_like_pads_strides_and_dilates_as_the_conv_itself(
    mode, padding, kernel, dilation, stride
):
    """The adapter's A runs with its base's geometry through public functions: the same
    output, to the bit, as the conv's own forward for every padding mode and form."""
    from lora.conv import conv_like

    if padding == "same" and stride != 1:
        pytest.skip("torch refuses padding='same' with a stride")
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel, stride, padding, dilation, padding_mode=mode)
    x = torch.randn(2, 4, 9, 10)
    assert torch.equal(conv_like(conv, x, conv.weight, conv.bias), conv(x))
