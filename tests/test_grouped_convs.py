"""Depthwise and grouped convs, and timm's ``Conv2dSame``, as compressed layers: the matrix view
out x (in/groups*kh*kw), one input moment per group, GPTQ fed back group by group, adapters
computing with their merged weight, and the padding TensorFlow's SAME takes from each input."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn

from compression import CompressedConv2d, compress, compress_, make_config
from compression.gptq import gptq, weighted_row_errors
from lora import LoraConfig, MomentAccumulator, make_adapter, make_init_context


def seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return module.eval()


def images(channels: int, size: int = 9, n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


CONVS = {
    "depthwise": lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False),
    "grouped": lambda: nn.Conv2d(6, 9, 3, stride=2, groups=3),
    "same, strided": lambda: Conv2dSame(4, 5, 3, stride=2),
    "same, depthwise": lambda: Conv2dSame(6, 6, 5, stride=2, groups=6, bias=False),
}


@pytest.mark.parametrize("kind", CONVS)
@pytest.mark.parametrize("method", ["int4", "int2-affine", "int1", "sparse", "nm"])
@pytest.mark.parametrize("size", [9, 10])  # SAME pads an odd and an even input differently
def test_a_compressed_conv_computes_what_the_conv_computes_with_its_compressed_weight(
    kind, method, size
):
    conv = seeded(CONVS[kind]())
    layer = CompressedConv2d.from_dense(conv, make_config(method))
    assert layer.weight.shape == conv.weight.shape
    assert layer.compressed.weight.shape == (conv.out_channels, conv.weight[0].numel())
    with_compressed = seeded(CONVS[kind]())
    with torch.no_grad():
        with_compressed.weight.copy_(layer.weight)
        if conv.bias is not None:
            with_compressed.bias.copy_(conv.bias)
    x = images(conv.in_channels, size)
    with torch.no_grad():
        assert torch.equal(layer(x), with_compressed(x))
    assert torch.equal(layer.expand(), layer.weight)


def test_compress_takes_every_conv_of_a_network_with_depthwise_and_same_convs():
    model = seeded(nn.Sequential(CONVS["same, strided"](), nn.ReLU(), CONVS["grouped"]()))
    model[2] = seeded(nn.Conv2d(5, 5, 3, groups=5))
    replaced = compress_(model, make_config("int8"))
    assert set(replaced) == {"0", "2"}
    assert replaced["0"].pads_from_input and not replaced["2"].pads_from_input


@pytest.mark.parametrize("kind", CONVS)
def test_an_adapter_on_a_grouped_conv_adds_its_matrix_product_to_the_weight(kind):
    conv = seeded(CONVS[kind]())
    context = make_init_context(conv, make_config("int2"))
    layer = make_adapter(conv, LoraConfig(r=2, lora_alpha=4, init="paper_init"), context,
                         torch.Generator().manual_seed(3))  # fmt: skip
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape))
    matrix = layer.base_compressed.weight + layer.scaling * (
        layer.lora_B.flatten(1) @ layer.lora_A.flatten(1)
    )
    dense = seeded(CONVS[kind]())
    with torch.no_grad():
        dense.weight.copy_(matrix.view_as(conv.weight))
        if conv.bias is not None:
            dense.bias.copy_(conv.bias)
        x = images(conv.in_channels, 10)
        assert torch.allclose(layer(x), dense(x), rtol=1e-5, atol=1e-5)


def test_svd_init_at_full_rank_gives_back_a_depthwise_conv():
    conv = seeded(CONVS["same, depthwise"]())  # matrix 6 x 25: full rank is 6
    context = make_init_context(conv, make_config("int2"))
    layer = make_adapter(conv, LoraConfig(r=6, lora_alpha=6, init="svd_init"), context)
    x = images(6, 11)
    with torch.no_grad():
        assert not torch.allclose(layer.base_layer(x), conv(x), atol=1e-2)
        assert torch.allclose(layer(x), conv(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["depthwise", "grouped", "same, depthwise"])
def test_a_grouped_convs_moment_is_the_diagonal_block_of_each_group(kind):
    """A grouped conv's moment, one c x c block per group, is what the same layer with one
    group (every channel's patch in one row) measures on its diagonal blocks."""
    conv = CONVS[kind]()
    whole = type(conv)(conv.in_channels, conv.groups, conv.kernel_size, stride=conv.stride,
                       padding=conv.padding, bias=False)  # fmt: skip
    x = images(conv.in_channels, 10)
    moments = []
    for layer in (conv, whole):
        with MomentAccumulator(layer, positions=1000) as accumulator:
            layer(x)
        moments.append(accumulator.moment())
    grouped, full = moments
    columns = conv.weight[0].numel()
    assert grouped.shape == (conv.groups, columns, columns)
    for group in range(conv.groups):
        block = slice(group * columns, (group + 1) * columns)
        torch.testing.assert_close(grouped[group], full[block, block], rtol=1e-12, atol=1e-12)


def random_moments(groups: int, columns: int, seed: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, 50, columns, generator=generator, dtype=torch.float64)
    x[:, :, 0] *= 5  # one strong input per group, so that feedback matters
    return x.transpose(1, 2) @ x / 50


def test_gptq_over_groups_is_gptq_on_each_group_with_its_own_moment():
    """Rows 2g and 2g+1 belong to group g: run as one grouped call or group by group, GPTQ
    rounds every row the same (the step of a 4-level grid, so that feedback changes codes)."""
    groups, per_group, columns = 3, 2, 9
    weight = torch.randn(groups * per_group, columns, generator=torch.Generator().manual_seed(5))
    moments = random_moments(groups, columns)
    step = 0.5

    def nearest(column: torch.Tensor, _j: int) -> torch.Tensor:
        return (column / step).round().clamp(-2, 1) * step

    # blocks of 4 columns: the in-block and the trailing feedback both take part
    together = gptq(weight, moments, nearest, block=4)
    apart = torch.cat(
        [
            gptq(weight[g * per_group : (g + 1) * per_group], moments[g], nearest, block=4)
            for g in range(groups)
        ]
    )
    assert torch.equal(together, apart)
    assert not torch.equal(together, nearest(weight.double(), 0))  # the feedback did act
    errors = weighted_row_errors(weight.double() - together, moments)
    by_group = torch.cat(
        [
            weighted_row_errors(
                weight[g * per_group : (g + 1) * per_group].double()
                - together[g * per_group : (g + 1) * per_group],
                moments[g],
            )
            for g in range(groups)
        ]
    )
    torch.testing.assert_close(errors, by_group, rtol=1e-12, atol=1e-12)


def test_gptq_on_a_depthwise_conv_lowers_its_output_error():
    """Both with the same input-weighted scales; smooth inputs (neighbouring pixels alike), as
    images are, so that a weight's rounding error can be made up by its neighbours'."""
    conv = seeded(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False))
    x = F.avg_pool2d(images(8, 14, n=16), 3, stride=1)
    with MomentAccumulator(conv, positions=1000) as accumulator:
        conv(x)
    weight = conv.weight.flatten(1).detach()
    nearest, fed_back = (
        compress(weight, make_config("int3", int_scale="mse", quantizer=q), accumulator.moment())
        for q in ("rtn", "gptq")
    )
    with torch.no_grad():
        errors = [
            (F.conv2d(x, c.weight.view_as(conv.weight), None, 1, 1, 1, 8) - conv(x)).pow(2).sum()
            for c in (nearest, fed_back)
        ]
    assert errors[1] < errors[0]


def test_a_packed_file_rebuilds_same_and_depthwise_convs_and_a_plain_conv_refuses_them(tmp_path):
    from train_evaluate.outputs.checkpoint import CheckpointError, write_packed
    from train_evaluate.outputs.network_checkpoint import install_network, read_packed_network

    def network() -> nn.Module:
        return seeded(nn.Sequential(Conv2dSame(4, 6, 3, stride=2), nn.ReLU(),
                                    CONVS["same, depthwise"]()))  # fmt: skip

    model, adapted = network(), network()
    for name in ("0", "2"):
        conv = model.get_submodule(name)
        context = make_init_context(conv, make_config("int3-affine"))
        adapted[int(name)] = make_adapter(
            conv, LoraConfig(r=2, lora_alpha=2, init="svd_init"), context
        )
    adapters = {"0": adapted[0], "2": adapted[2]}
    path = tmp_path / "same.safetensors"
    write_packed(path, adapters, "fp32")
    packed = read_packed_network(path)
    installed = install_network(model, packed)
    x = images(4, 13)
    with torch.no_grad():
        assert torch.equal(installed(x), adapted(x))
    # the same geometry with a fixed padding of 0 is another layer: refused, not run
    plain = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(), CONVS["same, depthwise"]())
    with pytest.raises(CheckpointError, match="pads_from_input"):
        install_network(plain, packed)


def test_act_svd_init_on_a_depthwise_conv_fits_its_groups_mean_moment():
    """A rank-r fit whitened group by group would not be of rank r: a grouped conv's fit is
    whitened by its groups' mean moment. In that error it beats the data-free SVD and the fit
    whitened by any one group's moment."""
    conv = seeded(nn.Conv2d(6, 6, 5, groups=6, bias=False))
    moments = random_moments(6, 25)
    moments[3] *= 50  # groups far apart: the fit must weigh them by their mean
    mean = moments.mean(dim=0)

    def error(init: str, moment: torch.Tensor) -> torch.Tensor:
        context = make_init_context(conv, make_config("int2"), moment=moment)
        layer = make_adapter(conv, LoraConfig(r=2, lora_alpha=2, init=init), context)
        left = (conv.weight - layer.merged_weight()).flatten(1).double().detach()
        return ((left @ mean) * left).sum()

    fitted = error("act_svd_init", moments)
    assert fitted < 0.99 * error("svd_init", moments)
    for group in range(6):
        assert fitted <= error("act_svd_init", moments[group]) * (1 + 1e-9)
