"""LoraLinear, its named inits, and attaching it to a timm model."""

import pytest
import timm
import torch
from torch import nn

from compression import Int1Config, SparseConfig, compress, make_config
from lora import (
    LORA_INITS,
    LoraConfig,
    LoraLinear,
    attach_adapters_,
    attach_lora,
    make_adapter,
    make_init_context,
    make_lora_linear,
)

torch.manual_seed(0)


def dense_layer(out_features=40, in_features=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=generator))
        layer.bias.copy_(torch.randn(out_features, generator=generator))
    return layer


def build(linear, compression, features=None, **lora):
    config = LoraConfig(**lora)
    context = make_init_context(linear, compression, features)
    return make_lora_linear(linear, config, context, torch.Generator().manual_seed(1))


def test_shapes_scaling_and_forward_follow_peft():
    linear = dense_layer()
    layer = build(linear, Int1Config(), r=4, lora_alpha=12, init="paper_init")
    assert layer.lora_A.shape == (4, 24) and layer.lora_B.shape == (40, 4)
    assert layer.scaling == 3.0
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(7, 24)
    w_c = layer.base_layer.weight
    expected = x @ w_c.T + linear.bias + 3.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer(x), x @ layer.merged_weight().T + linear.bias)
    # a precomputed base output gives the same result
    torch.testing.assert_close(layer(x, base_out=layer.base_layer(x)), layer(x))


def test_the_base_holds_the_compressed_weight_and_the_untouched_bias():
    linear = dense_layer()
    before = linear.weight.detach().clone()
    layer = build(linear, SparseConfig(block=(2, 2)), r=2)
    assert torch.equal(layer.base_layer.weight, compress(before, SparseConfig(block=(2, 2))).weight)
    assert torch.equal(layer.base_layer.bias, linear.bias)
    assert torch.equal(linear.weight, before)  # the source layer is not modified


@pytest.mark.parametrize("compression", [SparseConfig(), Int1Config(scale="none")])
def test_paper_init_leaves_the_compressed_output_unchanged(compression):
    linear = dense_layer()
    layer = build(linear, compression, r=8, lora_alpha=32, init="paper_init")
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()  # A is random, not zero
    bound = 1 / 24**0.5  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.abs().max() <= bound
    x = torch.randn(16, 24)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_paper_init_is_reproducible_from_its_generator():
    linear = dense_layer()
    first = build(linear, SparseConfig(), r=4)
    second = build(linear, SparseConfig(), r=4)
    assert torch.equal(first.lora_A, second.lora_A)


@pytest.mark.parametrize("alpha", [1, 8, 48])
@pytest.mark.parametrize("compression", [SparseConfig(), Int1Config(scale="row")])
def test_svd_init_at_full_rank_restores_the_weight(alpha, compression):
    linear = dense_layer(out_features=40, in_features=24)
    layer = build(linear, compression, r=24, lora_alpha=alpha, init="svd_init")
    torch.testing.assert_close(layer.merged_weight(), linear.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [1, 8, 48])
@pytest.mark.parametrize("rank", [1, 5, 12])
def test_svd_init_error_is_the_residual_tail(alpha, rank):
    linear = dense_layer(out_features=40, in_features=24)
    compression = SparseConfig(block=(4, 4))
    layer = build(linear, compression, r=rank, lora_alpha=alpha, init="svd_init")
    residual = linear.weight - compress(linear.weight, compression).weight
    tail = torch.linalg.svdvals(residual.double())[rank:]
    error = torch.linalg.norm((linear.weight - layer.merged_weight()).double())
    assert error.item() == pytest.approx(torch.sqrt((tail**2).sum()).item(), rel=1e-5)
    # the alpha-independence: B @ A carries 1/scaling
    torch.testing.assert_close(
        layer.delta_weight(),
        build(linear, compression, r=rank, lora_alpha=1, init="svd_init").delta_weight(),
        rtol=1e-4,
        atol=1e-5,
    )


def test_svd_init_on_the_resnet18_fc_shape_at_full_rank():
    linear = dense_layer(out_features=1000, in_features=512)
    layer = build(linear, Int1Config(scale="none"), r=512, lora_alpha=48, init="svd_init")
    torch.testing.assert_close(layer.merged_weight(), linear.weight, rtol=1e-5, atol=1e-5)


def test_attach_lora_on_a_timm_model_trains_only_the_adapter():
    model = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    original_fc = model.get_classifier()
    layer = attach_lora(model, make_config("sparse"), LoraConfig(r=4, init="svd_init"))
    assert model.get_classifier() is layer and model.fc is layer
    assert layer.base_layer.weight.shape == original_fc.weight.shape
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["fc.lora_A", "fc.lora_B"]
    model.eval()
    loss = model(torch.randn(2, 3, 64, 64)).logsumexp(dim=1).sum()
    loss.backward()
    with_grad = sorted(n for n, p in model.named_parameters() if p.grad is not None)
    assert with_grad == ["fc.lora_A", "fc.lora_B"]
    assert all(p.grad.abs().sum() > 0 for p in (layer.lora_A, layer.lora_B))


def test_adapters_attached_by_name_take_their_own_rank_and_draw_in_the_given_order():
    model = timm.create_model("test_resnet", pretrained=False).eval()
    names = ["layer1.0.conv2", "layer1.0.conv1", "fc"]  # not the model's order: the given one
    ranks = dict(zip(names, (1, 2, 3), strict=True))
    configs = {name: LoraConfig(r=ranks[name], init="paper_init") for name in names}
    contexts = {
        name: make_init_context(model.get_submodule(name), make_config("int4"), None)
        for name in names
    }
    alone = torch.Generator().manual_seed(5)
    expected = {
        name: make_adapter(model.get_submodule(name), configs[name], contexts[name], alone)
        for name in names
    }
    adapters = attach_adapters_(model, configs, contexts, torch.Generator().manual_seed(5))
    for name in names:
        assert model.get_submodule(name) is adapters[name]
        assert adapters[name].r == configs[name].r
        assert torch.equal(adapters[name].lora_A, expected[name].lora_A)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.{t}" for name in names for t in ("lora_A", "lora_B")}


def test_attach_lora_finds_classifiers_that_are_not_called_fc():
    model = timm.create_model("test_vit", pretrained=False, num_classes=10)
    layer = attach_lora(model, make_config("int1"), LoraConfig(r=2))
    assert model.head is layer and isinstance(layer, LoraLinear)


@pytest.mark.parametrize("rank", [-1, 25, 1000])
def test_rank_outside_the_valid_range_is_refused(rank):
    with pytest.raises(ValueError, match=r"between 0 \(no adapter\) and 24 .* got"):
        build(dense_layer(40, 24), SparseConfig(), r=rank)


@pytest.mark.parametrize(
    "call,fragment",
    [
        (lambda: LoraConfig(r=2, init="xavier"), "valid inits: paper_init, svd_init"),
        (lambda: LoraConfig(r=2, lora_alpha=0), "positive"),
        (
            lambda: attach_lora(
                timm.create_model("resnet18", num_classes=0), SparseConfig(), LoraConfig(r=2)
            ),
            "num_classes",
        ),
    ],
)
def test_bad_lora_input_raises_value_error(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()


def test_every_registered_init_builds_a_layer():
    linear = dense_layer()
    features = torch.randn(100, 24)
    for name in LORA_INITS:
        layer = build(linear, SparseConfig(), features, r=3, init=name)
        assert torch.isfinite(layer.merged_weight()).all()
