"""The whole model compressed: a stem, a depthwise conv and the FC through the driver, each
BatchNorm after a selected conv folded into it, every stored bit of the model counted by hand,
and the packed file scored again by evaluate.py on a fresh backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from torch import nn

from tests.conftest import run_driver, run_folder
from train_evaluate.outputs.checkpoint import read_safetensors

MODEL = "test_efficientnet"  # a stem, depthwise and pointwise convs, BatchNormAct2d, SE, an FC
SELECTED = ("conv_stem", "blocks.3.0.conv_dw", "classifier")
FOLDED = {"conv_stem": "bn1", "blocks.3.0.conv_dw": "blocks.3.0.bn2"}


def bare() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return timm.create_model(MODEL, pretrained=False).eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("efficientnet") / f"{MODEL}.pth"
    model = bare()
    with torch.no_grad():  # BatchNorms that are not the identity, so that folding shows
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        model.get_classifier().bias[[0, 1, 100, 500, 999]] += 3.0
    torch.save(model.state_dict(), path)
    return path


def float_bits(module: nn.Module) -> int:
    return sum(32 * t.numel() for t in module.state_dict().values() if t.dtype == torch.float32)


def test_a_stem_a_depthwise_conv_and_the_fc_folded_compressed_and_counted_by_hand(
    tmp_path, image_folder, weights, shared_cache, capsys
):
    from train_evaluate.evaluate import main as evaluate_main

    results = tmp_path / "results"
    code, _, err = run_driver(
        capsys, "--model", MODEL, "--weights", weights, "--data-dir", image_folder,
        "--layers", *SELECTED, "--methods", "int4-affine", "--ranks", "0", "2",
        "--trials", "1", "--epochs", "1", "--init", "svd_init", "--calib-images", "8",
        "--quantizer", "gptq", "--results-dir", results, "--cache-dir", shared_cache,
    )  # fmt: skip
    assert code == 0, err
    out = run_folder(results, "svd_init_layers-*")
    frame = pd.read_csv(out / "evaluation.csv").set_index("lora_rank")
    model = bare()
    model.load_state_dict(torch.load(weights))
    layers = {name: model.get_submodule(name) for name in SELECTED}

    # by hand, from the unfolded model: int4 affine codes, an fp32 scale and a 4-bit zero
    # point per row; the folded convs gain an fp32 bias each, and their BatchNorms are gone
    # from what the backbone stores; rank 2 adds fp32 adapters r * (out + in/groups*kh*kw)
    def stored(rank: int) -> int:
        bits = 0
        for layer in layers.values():
            rows, columns = layer.weight.shape[0], layer.weight[0].numel()
            bits += rows * columns * 4 + rows * (32 + 4) + 32 * rows  # every one has a bias
            bits += 32 * min(rank, rows, columns) * (rows + columns)
        return bits

    outside = float_bits(model) - sum(float_bits(layer) for layer in layers.values())
    outside -= sum(float_bits(model.get_submodule(norm)) for norm in FOLDED.values())
    weights_count = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)
    )
    for rank in ("0", "2"):
        expected = (outside + stored(int(rank))) / weights_count
        assert frame.loc[rank, "model_bits_per_weight"] == pytest.approx(expected, rel=1e-5)

    checkpoint = out / "checkpoints" / "quant=int4-affine_r=2.safetensors"
    metadata, tensors = read_safetensors(checkpoint)
    info = json.loads(metadata["checkpoint"])
    assert info["folded_batchnorm"] == FOLDED
    assert info["layers"]["blocks.3.0.conv_dw"]["conv"]["groups"] == 128
    assert not any(norm in key for key in tensors for norm in FOLDED.values())
    # the file read back on a fresh backbone, whose BatchNorms it takes out, scores as the run
    assert evaluate_main(["--checkpoint", str(checkpoint), "--cache-dir", str(shared_cache)]) == 0
    assert "reproduced exactly" in capsys.readouterr().out
    scored = frame[frame["file_evaluation"].notna()]
    assert len(scored) >= 2 and (scored["file_evaluation"] == scored["evaluation"]).all()
