"""Bits a reader can trust: ``bits`` and ``bits_per_weight`` hold every bit the packed file
stores (the biases the selected layers have included, whatever ``--include-bias`` says; it
decides only the ratios, both sides or neither), ``model_bits_per_weight`` spreads every bit of
the model over its Linear and Conv2d weights, and ``ratio_file`` divides only the biases that
exist. Every figure is counted by hand on a network small enough to count."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import timm
import torch
from torch import nn

from compression import compress, make_config
from lora.inits import FitConfig
from lora.reconstruction import NO_RECONSTRUCTION
from tests.conftest import run_driver, run_folder
from train_evaluate.inputs import images as image_cache
from train_evaluate.inputs import selection as layer_selection
from train_evaluate.inputs.selection import LayerInfo
from train_evaluate.outputs.accounting import Accounting
from train_evaluate.outputs.checkpoint import write_packed
from train_evaluate.outputs.report import file_columns
from train_evaluate.runtime.files import read_safetensors
from train_evaluate.search.sweep import SweepConfig
from train_evaluate.training import network
from train_evaluate.training.training import FeatureSplit


class Small(nn.Module):
    """A bias-free stem before a BatchNorm, a depthwise conv (``all`` leaves it uncompressed),
    a pointwise conv and an FC with biases: every case of the bias rule."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(torch.relu(self.bn(self.stem(x))))
        return self.fc(self.pw(x).mean(dim=(2, 3)))


# By hand, int4 (4 bits per weight, one fp32 scale per row) at rank 2 with fp16 adapters
# (r * (out + in*kh*kw) at 16 bits), each layer's fp32 bias where it has one:
STEM = 8 * 27 * 4 + 8 * 32 + 2 * (8 + 27) * 16  # no bias
PW = 16 * 8 * 4 + 16 * 32 + 2 * (16 + 8) * 16 + 16 * 32
FC = 5 * 16 * 4 + 5 * 32 + 2 * (5 + 16) * 16 + 5 * 32
BIASES = 16 + 5  # the biases that exist among the selected layers (the stem has none)
SELECTED_WEIGHTS = 8 * 27 + 16 * 8 + 5 * 16
# the rest at fp32: BatchNorm's weight, bias, running mean and variance, the depthwise conv
OTHER_BITS = 4 * 8 * 32 + 8 * 9 * 32
MODEL_WEIGHTS = SELECTED_WEIGHTS + 8 * 9


def small_setup(include_bias: bool, kind: type[nn.Module] | None = None) -> network.NetworkSetup:
    """The tool's own setup of ``--layers all`` on ``Small`` (or on ``kind``), adapters at
    fp16."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = image_cache.ImageModel((kind or Small)(), (0.5,) * 3, (0.5,) * 3).eval()
    model.requires_grad_(False)
    names = layer_selection.select_layers(model.model, ["all"], skip_grouped=True)
    if kind is None:  # --skip-depthwise: the depthwise conv stays as it is
        assert names == ["stem", "pw", "fc"]
    plan = SimpleNamespace(
        network=SimpleNamespace(
            layers=names,
            calib_images=4,
            calib_augment=1,
            selection="all",
            calibration="symmetric",
            reconstruction=NO_RECONSTRUCTION,
        ),
        sweep=SimpleNamespace(seed=0, use_dora=False),
        include_bias=include_bias,
        fit=FitConfig(),
    )
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    train = FeatureSplit(images, torch.zeros(4, dtype=torch.long))
    return network.NetworkSetup.create(plan, model, train, "fp16")


@pytest.mark.parametrize("include_bias", [False, True])
def test_whole_network_bits_count_every_stored_bias_and_only_the_existing_ones(include_bias):
    setup = small_setup(include_bias)
    method = setup.method("int4", make_config("int4"))
    accounting = setup.accounting(method)
    row = accounting.columns(method.cost, 2)
    stored = STEM + PW + FC
    assert row["bits"] == stored
    assert row["bits_per_weight"] == stored / SELECTED_WEIGHTS
    assert [r["bits"] for r in accounting.layer_rows("int4", 2)] == [STEM, PW, FC]
    assert row["model_bits_per_weight"] == (OTHER_BITS + stored) / MODEL_WEIGHTS
    # the ratios: the existing biases on both sides, or on neither
    if include_bias:
        assert row["ratio"] == 32 * (SELECTED_WEIGHTS + BIASES) / stored
    else:
        assert row["ratio"] == 32 * SELECTED_WEIGHTS / (stored - 32 * BIASES)
    assert row["bias_counted"] is include_bias
    original = accounting.columns(accounting.original_cost(), 0)
    dense = 32 * (SELECTED_WEIGHTS + BIASES)
    assert original["bits"] == dense and original["ratio"] == 1
    assert original["bits_per_weight"] == dense / SELECTED_WEIGHTS
    assert original["model_bits_per_weight"] == (OTHER_BITS + dense) / MODEL_WEIGHTS


def test_ratio_file_divides_the_biases_the_packed_file_holds(tmp_path):
    setup = small_setup(include_bias=False)
    method = setup.method("int4", make_config("int4"))
    accounting = setup.accounting(method)
    adapted = method.adapted(2, 8.0, SweepConfig(init="svd_init"), seed=0)
    path = tmp_path / "small.safetensors"
    size = write_packed(path, adapted.adapters(), "fp16", {"model": "small"})
    assert size == path.stat().st_size
    _, tensors = read_safetensors(path)
    biases = sum(t.numel() for name, t in tensors.items() if name.endswith("/bias"))
    assert biases == BIASES  # the stem has no bias, and the file stores none for it
    assert accounting.dense_bytes == 4 * (SELECTED_WEIGHTS + BIASES)
    with open(path, "rb") as handle:
        container = 8 + int.from_bytes(handle.read(8), "little")
    payload = (size - container) * 8
    # the file holds what ``bits`` counts, up to 7 bits of padding per bit-packed tensor
    assert 0 <= payload - accounting.columns(method.cost, 2)["bits"] < 8 * len(tensors)
    columns = file_columns({"file": {"bytes": size, "test_acc": 0.0}}, accounting.dense_bytes)
    assert columns["ratio_file"] == 4 * (SELECTED_WEIGHTS + BIASES) / size


@pytest.mark.parametrize("has_bias", [True, False])
def test_the_fc_study_counts_its_stored_bias_in_bits_and_only_an_existing_one(has_bias):
    weight = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))
    base = compress(weight, make_config("int4")).cost
    layer = LayerInfo("fc", "linear", (10, 64), 1, has_bias)
    accounting = Accounting((layer,), (base,), "fp32", False, False, 1000, "head (1 layer)",
                            model_weights=640 + 100)  # fmt: skip
    row = accounting.columns(base, 4)
    bias = 10 * 32 if has_bias else 0
    layer = 10 * 64 * 4 + 10 * 32 + 4 * (10 + 64) * 32  # int4 + row scales + fp32 adapter
    assert row["bits"] == layer + bias
    assert row["bits_per_weight"] == (layer + bias) / 640
    assert row["model_bits_per_weight"] == (1000 + layer + bias) / 740
    assert row["ratio"] == 32 * 640 / layer  # --include-bias off: on neither side
    assert accounting.dense_bytes == 4 * (640 + (10 if has_bias else 0))


def test_the_demo_fc_study_reports_model_bits_per_weight(tmp_path, demo_cache, capsys):
    """The driver's own rows on the demo: its 10 x 64 FC (with bias) inside a ViT whose every
    tensor is fp32."""
    import train_evaluate.inputs.demo  # noqa: F401  (registers digits_vit with timm)

    results = tmp_path / "results"
    code, _, err = run_driver(
        capsys, "--epochs", "0", "--ranks", "2", "--methods", "int1", "--results-dir", results,
        "--cache-dir", demo_cache,
    )  # fmt: skip
    assert code == 0, err
    frame = pd.read_csv(run_folder(results, "paper_init") / "evaluation.csv")
    model = timm.create_model("digits_vit", pretrained=False)
    state = model.state_dict()
    # every float tensor at 32 bits; the Linear and conv weights are the 2-D and 4-D "weight"s
    # (a norm's weight is 1-D)
    every = 32 * sum(t.numel() for t in state.values() if t.is_floating_point())
    weights = sum(t.numel() for k, t in state.items() if k.endswith("weight") and t.dim() > 1)
    fc_dense = 32 * (10 * 64 + 10)
    original = frame[frame["lora_rank"] == "original"].iloc[0]
    assert original["bits_per_weight"] == pytest.approx(fc_dense / 640, rel=1e-5)
    assert original["model_bits_per_weight"] == pytest.approx(every / weights, rel=1e-5)
    for _, row in frame.iterrows():  # quantized and rank rows: the FC as the file stores it
        expected = (every - fc_dense + row["bits"]) / weights
        assert row["model_bits_per_weight"] == pytest.approx(expected, rel=1e-5)
    ranked = frame[frame["lora_rank"] == "2"].iloc[0]
    assert ranked["ratio_file"] == pytest.approx(4 * (640 + 10) / ranked["file_bytes"], 1e-5)
