"""BatchNorm folded into the conv before it (``lora.folding``): the folded network computes what
the original did up to float rounding and holds no BatchNorm for the folded convs; a conv whose
output something else also reads keeps its BatchNorm."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from lora.folding import conv_batchnorm_pairs, fold_batchnorm_
from train_evaluate.inputs.backbone import tensor_bits


class Small(nn.Module):
    """A stem with timm's BatchNormAct2d, a depthwise conv with a plain BatchNorm, a pointwise
    conv with a bias whose output also feeds a side branch (so its BatchNorm cannot fold) and an
    FC."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn_stem = BatchNormAct2d(8, act_layer=nn.ReLU)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn_dw = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.bn_pw = nn.BatchNorm2d(16)
        self.side = nn.Identity()
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_dw(self.dw(self.bn_stem(self.stem(x))))
        y = self.pw(x)
        return self.fc((self.bn_pw(y) + self.side(y)).mean(dim=(2, 3)))


def randomised(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters far from the identity, so that a fold that
    forgets any of them changes the outputs."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator))
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.randn(n, generator=generator))
                module.bias.copy_(torch.randn(n, generator=generator))
    return model.eval()


def test_folding_keeps_the_outputs_and_removes_the_folded_batchnorms():
    torch.manual_seed(0)
    model = randomised(Small())
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    pairs = conv_batchnorm_pairs(model, x)
    # the pointwise conv's output is read by the side branch too: its BatchNorm stays
    assert pairs == {"stem": "bn_stem", "dw": "bn_dw"}
    bits = tensor_bits(model)
    fold_batchnorm_(model, pairs)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    kinds = {name: type(module) for name, module in model.named_modules()}
    assert kinds["bn_dw"] is nn.Identity and isinstance(model.bn_stem[0], nn.ReLU)
    assert isinstance(model.bn_pw, nn.BatchNorm2d)
    # each folded BatchNorm's four numbers per channel become one bias value per channel
    assert bits - tensor_bits(model) == 32 * (8 * 4 - 8) * 2


@pytest.mark.parametrize("model_name", ["test_efficientnet", "resnet18"])
def test_a_timm_model_folds_every_batchnorm_after_a_conv(model_name):
    model = randomised(timm.create_model(model_name, pretrained=False, num_classes=10))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
    pairs = conv_batchnorm_pairs(model, x)
    fold_batchnorm_(model, pairs)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
