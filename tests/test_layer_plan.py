"""Per-layer plans as data (``lora.plan``, ``--layer-plan``): how patterns resolve, the plan
every run writes, fed back to rebuild the same checkpoint byte for byte (a bit budget's on a
network, the FC study's), the checkpoint's copy checked against its layers, and each bad plan
refused in one line before any work."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from safetensors import safe_open

from lora.plan import LayerPlanError, read_plan_file, resolve_plan
from tests.conftest import run_driver, run_folder
from tests.test_network import RESNET, resnet_weights  # noqa: F401 (a fixture)
from train_evaluate.outputs.checkpoint import CheckpointError
from train_evaluate.outputs.network_checkpoint import read_packed, read_packed_network
from train_evaluate.runtime.files import digest, write_safetensors

# ------------------------------------------------------------------------ resolving a plan


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(RESNET, pretrained=False)


def test_an_exact_name_wins_over_patterns_and_the_first_pattern_over_later_ones(resnet):
    raw = {
        "layers": {
            "layer1.*": {"method": "int2", "rank": 1},
            "layer1.0.conv*": {"method": "int8", "rank": 3},  # later: loses to layer1.*
            "layer1.0.conv2": {"method": "int4", "rank": 2},  # exact: wins wherever it stands
        }
    }
    plan, _ = resolve_plan(raw, resnet)
    specs = {name: (s.method, s.rank) for name, s in plan.layers}
    assert specs["layer1.0.conv2"] == ("int4", 2)
    assert specs["layer1.0.conv1"] == ("int2", 1)
    # every Linear and Conv2d the patterns reach, in the model's order, and nothing else
    modules = [
        n for n, m in resnet.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    ]
    assert list(specs) == [n for n in modules if n.startswith("layer1.")]
    assert plan.name == "plan" and plan.rank == 2 and plan.uniform is None


class DoubledConv(torch.nn.Conv2d):
    """A conv with a forward of its own, which a compressed conv would not compute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_a_pattern_passes_over_layers_no_compressor_handles_and_a_name_does_not():
    with torch.device("meta"):
        model = timm.create_model("test_efficientnet", pretrained=False)
    depthwise = "blocks.3.0.conv_dw"
    plan, _ = resolve_plan({"layers": {"blocks.3.0.*": {"method": "int4", "rank": 1}}}, model)
    assert depthwise in plan.names  # a depthwise conv is compressed as any other
    model.blocks[3][0].conv_dw = DoubledConv(128, 128, 3, groups=128, device="meta")
    plan, _ = resolve_plan({"layers": {"blocks.3.0.*": {"method": "int4", "rank": 1}}}, model)
    assert plan.names and depthwise not in plan.names
    with pytest.raises(LayerPlanError, match=re.escape("selects blocks.3.0.conv_dw")):
        resolve_plan({"layers": {depthwise: {"method": "int4", "rank": 1}}}, model)
    with pytest.raises(LayerPlanError, match=re.escape("selects blocks.3.0.conv_dw")):
        resolve_plan({"layers": {"blocks.3.0.conv_d?": {"method": "int4", "rank": 1}}}, model)


def test_a_yaml_plan_reads_as_the_same_json_plan(tmp_path, resnet):
    as_json = tmp_path / "plan.json"
    as_json.write_text(
        json.dumps({"name": "mine", "layers": {"fc": {"method": "int4", "rank": 4}}})
    )
    as_yaml = tmp_path / "plan.yaml"
    as_yaml.write_text("name: mine\nlayers:\n  fc: {method: int4, rank: 4}\n")
    assert resolve_plan(read_plan_file(as_yaml), resnet) == resolve_plan(
        read_plan_file(as_json), resnet
    )


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({"layers": {"layer9.*": {"method": "int4", "rank": 2}}}, "'layer9.*' names no Linear"),
        ({"layers": {"fc": {"method": "int9", "rank": 2}}}, "unknown method 'int9'"),
        ({"layers": {"fc": {"method": "int4", "rank": -1}}}, "rank -1"),
        ({"layers": {"fc": {"method": "int4", "rank": 2.5}}}, "rank 2.5"),
        ({"layers": {"fc": {"method": "int4", "rank": True}}}, "rank True"),
        ({"layers": {"fc": {"method": "int4", "rank": 2, "alpha": 8}}}, "unknown key 'alpha'"),
        ({"layers": {"fc": "int4"}}, "must map to {method, rank}"),
        ({"layers": {}}, "'layers' must map"),
        ({"layer": {"fc": {"method": "int4", "rank": 2}}}, "unknown key 'layer'"),
        ({"name": "a/b", "layers": {"fc": {"method": "int4", "rank": 2}}}, "name 'a/b'"),
        ({"format": "other/1", "layers": {"fc": {"method": "int4", "rank": 2}}}, "format"),
        ({"name": "int4", "layers": {"fc": {"method": "int2", "rank": 2}}}, "is a method's"),
        (
            {
                "name": "int4",
                "layers": {"fc": {"method": "int4", "rank": 2, "adapter_dtype": "int8"}},
            },
            "is a method's",
        ),
        ({"layers": {"fc": {"method": "int4", "rank": 2, "adapter_dtype": "int3"}}}, "'int3'"),
        ({"adapter_dtype": "fp64", "layers": {"fc": {"method": "int4", "rank": 2}}}, "'fp64'"),
    ],
)
def test_a_bad_plan_is_refused_in_one_line_naming_what_is_wrong(resnet, raw, says):
    with pytest.raises(LayerPlanError) as caught:
        resolve_plan(raw, resnet)
    message = str(caught.value)
    assert says in message and "\n" not in message, message


# ------------------------------------------------------------- a plan fed back, byte for byte


def common(weights, image_folder, cache):
    return ("--model", RESNET, "--weights", weights, "--data-dir", image_folder,
            "--init", "svd_init", "--epochs", "1", "--trials", "2", "--calib-images", "8",
            "--cache-dir", cache)  # fmt: skip


@pytest.fixture(scope="module")
def budget_and_replay(tmp_path_factory, image_folder, resnet_weights):  # noqa: F811
    """A budgeted run (trained: the plan must give the trials the same seeds), then its plan
    fed back with --layer-plan in another results folder."""
    from train_evaluate.train_model import main

    root = tmp_path_factory.mktemp("plan")
    cache = root / "cache"
    base = common(resnet_weights, image_folder, cache)
    code = main([str(a) for a in (
        *base, "--layers", "all", "--methods", "int2", "int4", "--ranks", "1", "2",
        "--bits-budget", "3.5", "--budget-only", "--results-dir", root / "budget",
    )])  # fmt: skip
    assert code == 0
    budgeted = run_folder(root / "budget", "svd_init_layers-all")
    (plan,) = (budgeted / "plans").glob("*.json")
    code = main([str(a) for a in (
        *base, "--layer-plan", plan, "--results-dir", root / "replay",
    )])  # fmt: skip
    assert code == 0
    (replayed,) = [p.parent for p in (root / "replay").glob("*/*/*/run.json")]
    return budgeted, replayed, plan, cache


def test_a_budgets_plan_fed_back_rebuilds_its_checkpoint_byte_for_byte(budget_and_replay):
    budgeted, replayed, plan, _ = budget_and_replay
    written = json.loads(plan.read_text())
    # a mix the budget chose: more than one (method, rank), so it runs as a per-layer plan
    assert len({(e["method"], e["rank"]) for e in written["layers"].values()}) > 1
    assert written["origin"].startswith("bit budget 3.5")
    (first,) = (budgeted / "checkpoints").glob("*.safetensors")
    (second,) = (replayed / "checkpoints").glob("*.safetensors")
    assert first.name == second.name
    assert first.read_bytes() == second.read_bytes()
    # and the same rows: every column but the time and the selection's name (layers)
    rows = [pd.read_csv(folder / "evaluation.csv") for folder in (budgeted, replayed)]
    columns = [c for c in rows[0].columns if c not in ("seconds", "layers")]
    pd.testing.assert_frame_equal(rows[0][columns], rows[1][columns])
    # the replay wrote the same plan again
    assert (replayed / "plans" / plan.name).read_text() == plan.read_text()


def test_the_checkpoint_holds_its_plan_and_evaluate_reads_it(budget_and_replay, capsys):
    from train_evaluate.evaluate import main as evaluate_main

    budgeted, _, plan, cache = budget_and_replay
    (ckpt,) = (budgeted / "checkpoints").glob("*.safetensors")
    assert read_packed_network(ckpt).info["layer_plan"] == json.loads(plan.read_text())
    assert evaluate_main(["--checkpoint", str(ckpt), "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "layer plan budget3.5 (bit budget 3.5" in out and "reproduced exactly" in out, out


def rewritten(path: Path, target: Path, edit) -> Path:
    """``path`` with its metadata edited by ``edit`` and the digest recomputed (a careful
    forger's file: only the checks on the content can catch it)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    info = json.loads(metadata["checkpoint"])
    edit(info)
    text = json.dumps(info)
    metadata = dict(metadata, checkpoint=text, sha256=digest(tensors, text))
    write_safetensors(target, tensors, metadata)
    return target


def test_a_checkpoint_whose_plan_disagrees_with_its_layers_is_refused(budget_and_replay, tmp_path):
    budgeted, _, _, _ = budget_and_replay
    (ckpt,) = (budgeted / "checkpoints").glob("*.safetensors")

    def other_method(info):
        entry = next(iter(info["layer_plan"]["layers"].values()))
        entry["method"] = "int8" if entry["method"] != "int8" else "int2"

    def one_layer_less(info):
        info["layer_plan"]["layers"].popitem()

    def other_adapter_dtype(info):
        next(iter(info["layer_plan"]["layers"].values()))["adapter_dtype"] = "int4"

    for edit, says in (
        (other_method, "its layer plan gives"),
        (one_layer_less, "names"),
        (other_adapter_dtype, "its layer plan stores"),
    ):
        forged = rewritten(ckpt, tmp_path / "forged.safetensors", edit)
        with pytest.raises(CheckpointError, match=says):
            read_packed_network(forged)
    # a file from before plans were recorded has none, and still loads
    old = rewritten(ckpt, tmp_path / "old.safetensors", lambda info: info.pop("layer_plan"))
    assert set(read_packed_network(old).layers) == set(read_packed_network(ckpt).layers)


def test_the_fc_studys_plan_fed_back_rebuilds_its_checkpoint(demo_cache, tmp_path, capsys):
    base = ("--methods", "int4", "--epochs", "1", "--trials", "2", "--cache-dir", demo_cache)
    code, _, err = run_driver(capsys, *base, "--ranks", "2", "--results-dir", tmp_path / "a")
    assert code == 0, err
    first = run_folder(tmp_path / "a", "paper_init")
    plan = first / "plans" / "quant=int4_r=2.json"
    written = json.loads(plan.read_text())
    assert list(written["layers"]) == ["head"] and written["name"] == "int4"
    code, _, err = run_driver(capsys, *base, "--layer-plan", plan, "--results-dir", tmp_path / "b")
    assert code == 0, err
    second = run_folder(tmp_path / "b", "paper_init")
    ckpt = "checkpoints/quant=int4_r=2.safetensors"
    assert (first / ckpt).read_bytes() == (second / ckpt).read_bytes()
    # one layout for one layer or many: the FC stored under its module's name
    packed = read_packed(first / ckpt)
    assert packed.info["layer_plan"] == written and packed.info["layer"] == "head"
    assert set(read_packed_network(first / ckpt).layers) == {"head"}


# ------------------------------------------------------- each layer's own adapter dtype

MIXED = {
    "name": "mixed",
    "layers": {
        "layer1.0.conv1": {"method": "int4", "rank": 2, "adapter_dtype": "int4"},
        "layer2.0.conv1": {"method": "int3-affine", "rank": 2},  # and a grid of its own
        "layer1.*": {"method": "int4", "rank": 2},
    },
}


@pytest.fixture(scope="module")
def mixed_dtypes(tmp_path_factory, image_folder, resnet_weights):  # noqa: F811
    """A plan storing one layer's adapter as int4 codes and the others' at fp32, trained,
    then the plan it wrote fed back."""

    root = tmp_path_factory.mktemp("dtypes")
    given = root / "mixed.json"
    given.write_text(json.dumps(MIXED))
    base = common(resnet_weights, image_folder, root / "cache")
    first = run_plan(given, base, root / "first")
    return first, run_plan(first / "plans" / "quant=mixed_r=2.json", base, root / "replay")


def run_plan(plan: Path, base: tuple, results: Path) -> Path:
    """The run folder of a driver run of ``plan`` with the options ``base``."""
    from train_evaluate.train_model import main

    code = main([str(a) for a in (*base, "--layer-plan", plan, "--results-dir", results)])
    assert code == 0
    (folder,) = [p.parent for p in results.glob("*/*/*/run.json")]
    return folder


def check_the_file_holds_the_counted_bits(ckpt: Path, row: pd.Series) -> None:
    """The tensors of ``ckpt`` hold the bits ``row`` counts, but for each code tensor's padding
    to a whole byte."""
    with safe_open(str(ckpt), framework="pt") as handle:
        codes = sum(name.endswith(".codes") for name in handle.keys())  # noqa: SIM118
    with open(ckpt, "rb") as handle:
        container = 8 + int.from_bytes(handle.read(8), "little")
    assert 0 <= (row["file_bytes"] - container) * 8 - row["bits"] < 8 * codes


def test_a_layer_stores_its_adapter_as_its_plan_says_and_every_bit_is_counted(mixed_dtypes):
    first, replayed = mixed_dtypes
    ckpt = first / "checkpoints" / "quant=mixed_r=2.safetensors"
    with safe_open(str(ckpt), framework="pt") as handle:
        names = set(handle.keys())
    assert "layer1.0.conv1/lora_A.codes" in names and "layer1.0.conv1/lora_A" not in names
    assert "layer1.0.conv2/lora_A" in names and "layer1.0.conv2/lora_A.codes" not in names
    # each layer on its plan's grid: zero points only where the plan says affine
    assert "layer2.0.conv1/base.zero" in names and "layer1.0.conv2/base.zero" not in names
    packed = read_packed_network(ckpt)
    # the int4 layer's factors are on their grid: at most 15 values per row
    factor = packed.layers["layer1.0.conv1"].lora_A.detach().flatten(1)
    assert max(len(row.unique()) for row in factor) <= 15
    # the row prices what the file holds, layer by layer: the tensors' bytes are the counted
    # bits, but for each code tensor's padding to a whole byte (and fp32 biases: none here)
    row = pd.read_csv(first / "evaluation.csv").set_index("lora_rank").loc["2"]
    check_the_file_holds_the_counted_bits(ckpt, row)
    # the model scored is the one the file holds (its int4 layer rounded as stored)
    assert row["file_evaluation"] == row["evaluation"]
    # the plan written says so, and fed back rebuilds the same file
    written = json.loads((first / "plans" / "quant=mixed_r=2.json").read_text())
    assert written["layers"]["layer1.0.conv1"]["adapter_dtype"] == "int4"
    assert "adapter_dtype" not in written["layers"]["layer1.0.conv2"]
    assert (replayed / "checkpoints" / ckpt.name).read_bytes() == ckpt.read_bytes()


# --------------------------------------------------------------- refused before any work

INT4_RTN = "int4(per-row symmetric)"  # how a plan written by a run with default options says it


@pytest.mark.parametrize(
    ("plan", "extra", "says"),
    [
        ({"layers": {"layer9.conv": {"method": "int4", "rank": 2}}}, (), "names no Linear"),
        ({"layers": {"fc": {"method": "int9", "rank": 2}}}, (), "unknown method 'int9'"),
        ({"layers": {"fc": {"method": "int4", "rank": -2}}}, (), "rank -2"),
        ("{not json", (), "not valid JSON"),
        (
            {"layers": {"layer1.*": {"method": "int4", "rank": 1}}},
            ("--bits-budget", "4"),
            "give one of the two",
        ),
        (
            {"adapter_dtype": "fp16", "layers": {"layer1.*": {"method": "int4", "rank": 1}}},
            (),
            "pass --adapter-dtype fp16",
        ),
        (
            {"layers": {"layer1.*": {"method": "int4", "rank": 1, "compression": INT4_RTN}}},
            ("--quantizer", "gptq"),
            "give the options it was written with",
        ),
        (
            {"layers": {"layer1.*": {"method": "int4", "rank": 1}}},
            ("--int-grid", "affine"),
            "its int4 is int4-affine under this run's --int-grid",
        ),
    ],
)
def test_a_bad_layer_plan_is_refused_before_any_work(
    image_folder, resnet_weights, tmp_path, capsys, plan, extra, says,  # noqa: F811
):  # fmt: skip
    path = tmp_path / "plan.json"
    path.write_text(plan if isinstance(plan, str) else json.dumps(plan))
    results = tmp_path / "results"
    code, _, err = run_driver(
        capsys, *common(resnet_weights, image_folder, tmp_path / "cache"),
        "--layer-plan", path, "--results-dir", results, *extra,
    )  # fmt: skip
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], err
    assert not results.exists() or not any(results.rglob("*")), sorted(results.rglob("*"))


# ------------------------------------------------------------------- reproducible files


def test_the_same_tensors_and_metadata_always_make_the_same_file(tmp_path):
    # safetensors orders its metadata as a Rust HashMap does, differently from map to map
    tensors = {"b": torch.ones(3), "a": torch.arange(4.0)}
    metadata = {"format": "f", "checkpoint": json.dumps({"x": 'a "quoted" \\ é'}), "sha256": "s"}
    digests = set()
    for index in range(12):
        target = tmp_path / f"{index}.safetensors"
        write_safetensors(target, tensors, metadata)
        digests.add(hashlib.sha256(target.read_bytes()).hexdigest())
        with safe_open(str(target), framework="pt") as handle:
            assert handle.metadata() == metadata
            assert torch.equal(handle.get_tensor("a"), tensors["a"])
    assert len(digests) == 1
