"""Rank 0: a layer without adapter (``--ranks 0``, a plan's ``rank: 0``, a bit budget's
choice). It computes the compressed layer alone, its packed file stores no adapter for it, and
its bits are its compressor's alone."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import timm
import torch
from safetensors import safe_open
from torch import nn

from compression import compress, make_config
from compression.modules import weight_matrix
from lora import LoraConfig, make_init_context
from lora.attach import make_adapter
from tests.conftest import run_driver, run_folder
from tests.test_layer_plan import check_the_file_holds_the_counted_bits, common, run_plan
from tests.test_network import RESNET, resnet_weights  # noqa: F401 (a fixture)
from train_evaluate.outputs.network_checkpoint import read_packed_network


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_rank_zero_layer_is_the_compressed_layer_alone(kind):
    torch.manual_seed(0)
    if kind == "linear":
        dense, x = nn.Linear(24, 10), torch.randn(5, 24)
    else:
        dense, x = nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 7, 7)
    config = make_config("int4")
    context = make_init_context(dense, config)
    layer = make_adapter(dense, LoraConfig(r=0, init="svd_init"), context)
    assert layer.r == 0 and all(p.numel() == 0 for p in (layer.lora_A, layer.lora_B))
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))
        assert torch.equal(layer.merged_weight(), layer.base_layer.weight)
    assert torch.equal(
        layer.base_layer.weight.flatten(1), compress(weight_matrix(dense), config).weight
    )
    with pytest.raises(ValueError, match="no DoRA magnitude"):
        make_adapter(dense, LoraConfig(r=0, use_dora=True), context)


PLAN = {
    "name": "some-bare",
    "layers": {
        "layer1.0.conv1": {"method": "int4", "rank": 0},
        "layer1.*": {"method": "int4", "rank": 2},
    },
}


@pytest.fixture(scope="module")
def planned(tmp_path_factory, image_folder, resnet_weights):  # noqa: F811
    """A trained plan giving one layer no adapter, and a plan giving none any."""
    root = tmp_path_factory.mktemp("rank0")
    base = common(resnet_weights, image_folder, root / "cache")
    none = {"name": "bare", "layers": {"layer1.*": {"method": "int4", "rank": 0}}}
    folders = []
    for name, plan in (("some", PLAN), ("none", none)):
        (root / f"{name}.json").write_text(json.dumps(plan))
        folders.append(run_plan(root / f"{name}.json", base, root / name))
    return folders


def test_a_rank_zero_layer_stores_no_adapter_and_its_bits_are_counted_by_hand(planned):
    folder, _ = planned
    ckpt = folder / "checkpoints" / "quant=some-bare_r=2.safetensors"
    with safe_open(str(ckpt), framework="pt") as handle:
        names = set(handle.keys())
    bare = {n.split("/", 1)[1] for n in names if n.startswith("layer1.0.conv1/")}
    # no adapter; the BatchNorm after the conv folded into its (fp32) bias
    assert bare == {"base.codes", "base.scale", "bias"}
    assert "layer1.0.conv2/lora_A" in names
    # by hand: int4, 4 bits per weight, one fp32 scale and one fp32 bias per output channel
    with torch.device("meta"):
        out, cin, kh, kw = timm.create_model(RESNET).get_submodule("layer1.0.conv1").weight.shape
    layers = pd.read_csv(folder / "layers.csv").set_index("layer")
    assert layers.loc["layer1.0.conv1", "rank"] == 0
    assert layers.loc["layer1.0.conv1", "bits"] == out * cin * kh * kw * 4 + out * 32 + out * 32
    assert layers.loc["layer1.0.conv2", "rank"] == 2
    # the file holds what the row counts, and scores what the trained model scored
    row = pd.read_csv(folder / "evaluation.csv").set_index("lora_rank").loc["2"]
    assert row["bits"] == layers["bits"].sum()
    check_the_file_holds_the_counted_bits(ckpt, row)
    assert row["file_evaluation"] == row["evaluation"]
    assert read_packed_network(ckpt).layers["layer1.0.conv1"].r == 0


def test_a_plan_without_any_adapter_is_its_compressed_model_untrained(planned):
    _, folder = planned
    rows = pd.read_csv(folder / "evaluation.csv").set_index("lora_rank")
    ranked = rows.loc["0"]
    assert ranked["status"] == "init_only"
    # nothing to train: the rank is the compressed model, the quantized row, bit for bit
    quantized = rows.loc["quantized"]
    assert ranked["evaluation"] == quantized["evaluation"]
    assert ranked["bits"] == quantized["bits"]


def test_the_fc_study_at_rank_zero_is_its_quantized_row(demo_cache, tmp_path, capsys):
    code, _, err = run_driver(
        capsys, "--methods", "int4", "--ranks", "0", "2", "--epochs", "1", "--trials", "2",
        "--cache-dir", demo_cache, "--results-dir", tmp_path,
    )  # fmt: skip
    assert code == 0, err
    folder = run_folder(tmp_path, "paper_init")
    rows = pd.read_csv(folder / "evaluation.csv").set_index("lora_rank")
    ranked, quantized = rows.loc["0"], rows.loc["quantized"]
    assert ranked["status"] == "init_only" and rows.loc["2", "status"] == "ok"
    assert (ranked["evaluation"], ranked["bits"]) == (quantized["evaluation"], quantized["bits"])
    assert ranked["file_evaluation"] == ranked["evaluation"]
    with safe_open(str(folder / "checkpoints" / "quant=int4_r=0.safetensors"), "pt") as handle:
        assert set(handle.keys()) == {"head/base.codes", "head/base.scale", "head/bias"}


@pytest.mark.parametrize("quantizer", ["gptq", "adaround"])
def test_a_rank_zero_plans_quantized_row_from_its_contexts_is_the_compressed_model(
    quantizer, caplog
):
    """A plan of rank 0 everywhere takes its quantized row from the rank-0 contexts (one
    calibration pass for its two rows): the model compressed on its own, output for output,
    with asymmetric calibration, and the stored codes before reconstruction learns others."""
    from lora.cut import boundaries
    from lora.plan import LayerPlan, LayerSpec
    from lora.reconstruction import ReconstructionConfig, reconstruction_units
    from tests.test_network import bare, image_model
    from train_evaluate.inputs import selection as layer_selection
    from train_evaluate.search.sweep import SweepConfig
    from train_evaluate.training import network
    from train_evaluate.training.budget import PerLayerCompression

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=generator)
    model = image_model(bare(RESNET))
    names = layer_selection.select_layers(model.model, ["all"])
    layers = layer_selection.describe_layers(model.model, names, model.preprocess(images[:1]))
    plan = LayerPlan("budget", tuple((name, LayerSpec("int2", 0)) for name in names))
    compression = PerLayerCompression.of(
        plan, {"int2": make_config("int2", quantizer=quantizer, int_scale="mse")}
    )
    method = network.NetworkMethod.create(
        plan.name, compression, model, tuple(layers), images, asymmetric=True,
        reconstruction=ReconstructionConfig(mode="block", block_steps=10, batch_size=8),
        units=reconstruction_units(names, boundaries(model.model)), plan=plan,
    )  # fmt: skip
    sweep = SweepConfig(init="svd_init")

    def calibration_passes() -> int:  # each logged by the contexts it computes
        return sum("compressed and initialised" in r.getMessage() for r in caplog.records)

    with torch.no_grad(), caplog.at_level("INFO"):
        alone = method.compressed_model()(images)
        shared = method.compressed_model(sweep)(images)
        assert torch.equal(shared, alone)
        assert calibration_passes() == 1  # the rank's, computed for the quantized row
        assert 0 not in method.records  # which reconstructs nothing (a finished rank: no need)
        ranked = method.adapted(0, 8.0, sweep, 0)(images)
        assert calibration_passes() == 1  # and reused by the rank's row
    if quantizer == "adaround":  # the rank's row holds the learned codes, not these
        assert sum(r.codes_changed for r in method.records[0]) > 0
        assert not torch.equal(ranked, alone)
