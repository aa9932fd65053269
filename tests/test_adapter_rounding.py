"""Integer adapters (``--adapter-dtype int8`` / ``int4``): every stored bit counted, the file
holds exactly the rounded numbers that were scored, and the driver scores the rounded model."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from compression import StorageCost, account_layer, make_config
from lora import LoraConfig, make_init_context, make_lora_conv2d, make_lora_linear
from lora.rounding import FACTORS, round_adapter_
from tests.conftest import run_driver, run_folder
from train_evaluate.outputs.checkpoint import write_packed
from train_evaluate.outputs.network_checkpoint import read_packed, read_packed_network
from train_evaluate.search import sweep
from train_evaluate.search.storage import open_storage
from train_evaluate.training import fc_method
from train_evaluate.training.synthetic import synthetic_features

NO_BASE = StorageCost(0, 0, 0, 0)


@pytest.mark.parametrize("bits,dora", [(8, False), (4, False), (4, True)])
def test_integer_adapter_bits_counted_by_hand(bits, dora, tmp_path):
    """The adapter bits the accounting reports are the bits of the adapter tensors that the
    packed file stores (codes at their packed width, fp32 row scales, DoRA's magnitudes)."""
    from safetensors import safe_open

    torch.manual_seed(0)
    dense = nn.Linear(64, 10)  # out 10, in 64, rank 3
    config = LoraConfig(r=3, lora_alpha=8, init="svd_init", use_dora=dora)
    layer = trained_looking(
        make_lora_linear(dense, config, make_init_context(dense, make_config("int4")))
    )
    round_adapter_(layer, bits)
    path = tmp_path / "layer.safetensors"
    write_packed(path, layer, f"int{bits}")
    stored = 0
    with safe_open(str(path), framework="pt") as packed:
        # the layer's tensors, under its name in the file ("layer/lora_A.codes", ...)
        names = [n.removeprefix("layer/") for n in sorted(packed.keys())]
        names = [name for name in names if name.startswith("lora_")]
        for name in names:
            tensor = packed.get_tensor(f"layer/{name}")
            stored += tensor.numel() * tensor.element_size() * 8
    assert any(name.endswith(".codes") for name in names)
    assert any(name.endswith(".scale") for name in names)
    assert ("lora_magnitude" in names) == dora
    counted = account_layer(10, 64, NO_BASE, 3, adapter_code_bits=bits,
                            extra_adapter_params=10 if dora else 0)  # fmt: skip
    assert counted.adapter_bits == stored
    # no adapter, nothing counted
    assert account_layer(10, 64, NO_BASE, 0, adapter_code_bits=bits).adapter_bits == 0


def distinct_per_row(matrix: torch.Tensor) -> int:
    return max(len(torch.unique(row)) for row in matrix)


def trained_looking(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        layer.lora_A.add_(0.1 * torch.randn_like(layer.lora_A))
        layer.lora_B.add_(0.1 * torch.randn_like(layer.lora_B))
    return layer


@pytest.mark.parametrize("dtype,bits", [("int8", 8), ("int4", 4)])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_rounded_adapter_is_on_its_grid_and_its_file_holds_exactly_it(
    kind, dtype, bits, tmp_path
):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, init="svd_init", use_dora=kind == "linear")
    if kind == "linear":
        dense = nn.Linear(32, 12)
        layer = make_lora_linear(dense, config, make_init_context(dense, make_config("int4")))
        inputs = torch.randn(5, 32)
    else:
        dense = nn.Conv2d(6, 10, 3, padding=1)
        layer = make_lora_conv2d(dense, config, make_init_context(dense, make_config("int4")))
        inputs = torch.randn(2, 6, 8, 8)
    trained_looking(layer)
    before = layer.lora_A.detach().clone()
    round_adapter_(layer, bits)
    assert not torch.equal(layer.lora_A, before)
    for factor in (layer.lora_A, layer.lora_B):
        assert distinct_per_row(factor.detach().flatten(1)) <= 2**bits - 1
    path = tmp_path / "layer.safetensors"
    if kind == "linear":
        write_packed(path, layer, dtype)
        loaded = read_packed(path).layer
    else:  # a conv, stored under its module's name
        write_packed(path, {"conv": layer}, dtype)
        loaded = read_packed_network(path).layers["conv"]
    with torch.no_grad():
        assert torch.equal(loaded(inputs), layer(inputs))


def test_the_sweep_scores_the_rounded_adapters(tmp_path):
    head, splits = synthetic_features(400, 100, in_features=24, classes=10)
    method = fc_method.Method.create("int1", make_config("int1"), head, splits.train.features)
    config = sweep.SweepConfig(init="svd_init", trials=2, epochs=2)
    storage = open_storage(tmp_path / "s.sqlite3")
    outcome = sweep.run_rank(method, 4, splits, config, storage, "s", adapter_dtype="int4")
    layer = outcome.layer
    for factor in (layer.lora_A, layer.lora_B):
        assert distinct_per_row(factor.detach()) <= 15
    data = splits.with_base(layer)
    assert outcome.record["test_acc"] == sweep.evaluate(layer, data.test)["acc"]


@pytest.mark.parametrize("selection", [[], ["--layers", "blocks.1.*"]], ids=["fc", "network"])
def test_the_driver_reports_the_rounded_model_and_its_file_reproduces_it(
    selection, tmp_path, own_demo_cache, capsys
):
    code, _, err = run_driver(
        capsys, "--init", "svd_init", "--adapter-dtype", "int4", "--ranks", "2", "--trials",
        "2", "--epochs", "1", "--results-dir", tmp_path, "--cache-dir", own_demo_cache, *selection,
    )  # fmt: skip
    assert code == 0, err
    name = "svd_init" if not selection else "svd_init_layers-blocks.1"
    frame = pd.read_csv(run_folder(tmp_path, name) / "evaluation.csv")
    ranks = frame[frame["lora_rank"] == "2"]
    assert len(ranks) == 2
    assert (ranks["file_evaluation"] == ranks["evaluation"]).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_rounding_rounded_factors_again_changes_no_number(bits):
    """What lets the file round the factors it is given: rounded ones come back unchanged."""
    from compression import IntNConfig, compress

    generator = torch.Generator().manual_seed(bits)
    for _ in range(100):
        scale = torch.rand(12, 1, generator=generator) * 10 ** torch.randint(-4, 3, (12, 1))
        matrix = torch.randn(12, 40, generator=generator) * scale
        once = compress(matrix, IntNConfig(bits)).weight
        assert torch.equal(compress(once, IntNConfig(bits)).weight, once)


def test_a_plan_rounds_each_layer_as_it_stores_it_and_only_those():
    """In the sweep, a layer whose plan stores its adapter as int4 is scored rounded to its
    codes; the layers stored at fp32 keep their trained floats."""
    import copy

    from lora.plan import LayerPlan, LayerSpec
    from tests.test_bits import small_setup
    from train_evaluate.training.training import FeatureSplit, Splits

    setup = small_setup(include_bias=False)
    own = {"pw": LayerSpec("int4", 2, adapter_dtype="int4")}
    layers = tuple((n, own.get(n, LayerSpec("int4", 2))) for n in ("stem", "pw", "fc"))
    method = setup.planned_method(LayerPlan("mixed", layers), {"int4": make_config("int4")})
    generator = torch.Generator().manual_seed(0)
    parts = [
        FeatureSplit(
            torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=generator),
            torch.randint(0, 5, (n,), generator=generator),
        )
        for n in (16, 8, 8)
    ]
    config = sweep.SweepConfig(init="svd_init", trials=1, epochs=1)
    outcome = sweep.run_rank(method, 2, Splits(*parts), config, None, "s", adapter_dtype="fp32")
    for name, layer in method.adapters_of(outcome.layer).items():
        # rounding is idempotent: a rounded adapter comes back unchanged, a float one does not
        again = copy.deepcopy(layer)
        round_adapter_(again, 4)
        unchanged = all(torch.equal(getattr(again, f), getattr(layer, f)) for f in FACTORS)
        assert unchanged == (name == "pw"), name
