"""Packed checkpoints written by an earlier version (before layer plans were recorded), kept as
files: each still loads, checked as any file is, and goes into its model. Written with commit
f215bfa's ``write_packed``: a 10 x 16 FC at int4 with a rank-2 adapter, and test_resnet's
``layer1.0`` convs at int2 with rank-1 adapters."""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from lora import LoraConv2d, LoraLinear
from train_evaluate.outputs.network_checkpoint import (
    install_network,
    read_packed,
    read_packed_network,
)

LEGACY = Path(__file__).resolve().parent / "data" / "legacy"


def test_a_one_layer_file_from_before_layer_plans_loads():
    packed = read_packed(LEGACY / "fc_int4_r2.safetensors")
    assert isinstance(packed.layer, LoraLinear) and "layer_plan" not in packed.info
    assert (packed.info["method"], packed.layer.r, packed.info["shape"]) == ("int4", 2, [10, 16])
    assert torch.isfinite(packed.layer(torch.randn(4, 16))).all()


def test_a_network_file_from_before_layer_plans_loads_into_its_model():
    packed = read_packed_network(LEGACY / "network_test_resnet_int2_r1.safetensors")
    assert "layer_plan" not in packed.info
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model(packed.info["model"], pretrained=False).eval()
    installed = install_network(model, packed)
    for name in ("layer1.0.conv1", "layer1.0.conv2"):
        layer = installed.get_submodule(name)
        assert isinstance(layer, LoraConv2d) and layer.r == 1
        assert packed.info["layers"][name]["method"] == "int2"
    assert torch.isfinite(installed(torch.randn(1, 3, 32, 32))).all()
