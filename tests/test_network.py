"""Whole-network mode: layer selection, the uint8 image path, accounting by hand, the packed
network checkpoint, frozen BatchNorm, the driver end to end on a small resnet, and the FC study
unchanged through every path (``--layers head``, workers) against the one-process sweep."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from compression import CompressedConv2d, compress, make_config
from tests.conftest import run_driver, run_folder
from train_evaluate.inputs import images as image_cache
from train_evaluate.inputs import selection as layer_selection
from train_evaluate.inputs.backbone import eval_transform
from train_evaluate.outputs import accounting as network_accounting
from train_evaluate.outputs.checkpoint import CheckpointError, write_packed
from train_evaluate.outputs.report import TIMING_COLUMNS
from train_evaluate.search.sweep import SweepConfig
from train_evaluate.training import network
from train_evaluate.training.training import FeatureSplit, TrainConfig, train_adapter

RESNET = "test_resnet"


def bare(name: str) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False).eval()


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory) -> Path:
    """``test_resnet`` (BatchNorm, 3x3 and 1x1 convs, a 96 -> 1000 FC) with fixed weights."""
    path = tmp_path_factory.mktemp("resnet") / "test_resnet.pth"
    model = bare(RESNET)
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        # the images' five classes ahead of the other 995, so that accuracies are not all 0
        model.get_classifier().bias[[0, 1, 100, 500, 999]] += 3.0
    torch.save(model.state_dict(), path)
    return path


def image_model(model: nn.Module) -> image_cache.ImageModel:
    mean, std = image_cache.normalisation(eval_transform(model))
    return image_cache.ImageModel(model, mean, std).eval().requires_grad_(False)


# ------------------------------------------------------------------------------ selection


def test_all_selects_every_linear_and_conv_and_head_is_the_classifier():
    model = bare("test_efficientnet")
    names = layer_selection.select_layers(model, ["all"])
    modules = dict(model.named_modules())
    assert names == [n for n, m in modules.items() if isinstance(m, nn.Linear | nn.Conv2d)]
    assert "classifier" in names
    grouped = [n for n, m in modules.items() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert grouped and set(grouped) <= set(names)
    # --skip-depthwise: today's selection before depthwise convs could be compressed
    skipping = layer_selection.select_layers(model, ["all"], skip_grouped=True)
    assert skipping == [n for n in names if n not in grouped]
    assert layer_selection.left_out(model, skipping) == {
        "grouped (depthwise) convs, left out by --skip-depthwise": grouped
    }
    assert layer_selection.select_layers(model, ["head"]) == ["classifier"]
    assert layer_selection.is_head_only(model, layer_selection.select_layers(model, ["classifier"]))
    assert not layer_selection.is_head_only(model, names)


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ("nothing.*", "matches no module"),
        ("bn1", "not a Linear or Conv2d"),
    ],
)
def test_a_bad_selection_is_refused_by_name(pattern, fragment):
    with pytest.raises(layer_selection.SelectionError, match=fragment):
        layer_selection.select_layers(bare("test_efficientnet"), [pattern])


BAD_SELECTIONS = {
    "matches nothing": (["--layers", "nothing.*"], "matches no module"),
    "depthwise alone, skipped": (
        ["--layers", "blocks.3.0.conv_dw", "--skip-depthwise"],
        "grouped convs alone",
    ),
    "--skip-depthwise on the classifier": (["--skip-depthwise"], "the classifier alone has"),
    "not a layer": (["--layers", "bn1"], "not a Linear or Conv2d"),
    "cache over the limit": (["--layers", "all", "--cache-limit", "0.000001"], "--cache-limit"),
}


@pytest.mark.parametrize("case", list(BAD_SELECTIONS))
def test_bad_selections_stop_in_one_line_before_any_work(case, tmp_path, image_folder, capsys):
    extra, fragment = BAD_SELECTIONS[case]
    results = tmp_path / "results"
    code, _, err = run_driver(
        capsys, "--data-dir", image_folder, "--model", "test_efficientnet", *extra,
        "--results-dir", results,
    )  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0] and "Traceback" not in err
    assert not results.exists()


# ------------------------------------------------------------------------ images and accounting


def test_uint8_images_give_the_float_pipelines_logits_exactly():
    model = bare(RESNET)
    transform = eval_transform(model)
    pixels = torch.randint(0, 256, (40, 50, 3), generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(pixels.to(torch.uint8).numpy())
    stored = image_cache.uint8_transform(transform)(image)
    assert stored.dtype == torch.uint8
    with torch.no_grad():
        expected = model(transform(image).unsqueeze(0))
        got = image_model(model)(stored.unsqueeze(0))
    assert torch.equal(got, expected)


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5, bias=False)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_bits_per_weight_is_every_stored_bit_counted_by_hand():
    model = TwoLayers()
    infos = layer_selection.describe_layers(model, ["conv", "fc"], torch.zeros(1, 3, 6, 6))
    config = make_config("int4")
    costs = tuple(compress(m.weight.flatten(1), config).cost for m in (model.conv, model.fc))
    accounting = network_accounting.Accounting(infos, costs, "fp16", False, False, 1000, "all (2)")
    columns = accounting.columns(costs[0], 4)
    # int4: 4 bits per weight and one fp32 scale per row; conv rank min(4, 8, 27) = 4 and fc
    # rank min(4, 5, 8) = 4; adapters r * (out + in*kh*kw) at 16 bits
    conv_bits = 8 * 27 * 4 + 8 * 32 + 4 * (8 + 27) * 16
    fc_bits = 5 * 8 * 4 + 5 * 32 + 4 * (5 + 8) * 16
    conv_bias = 8 * 32  # stored in the file, so in bits; not in the ratios (include_bias off)
    assert columns["bits"] == conv_bits + conv_bias + fc_bits
    assert columns["bits_per_weight"] == (conv_bits + conv_bias + fc_bits) / (8 * 27 + 5 * 8)
    assert columns["ratio"] == 32 * (8 * 27 + 5 * 8) / (conv_bits + fc_bits)
    original = accounting.columns(accounting.original_cost(), 0)
    assert original["bits_per_weight"] == 32 + conv_bias / (8 * 27 + 5 * 8)
    assert original["ratio"] == 1
    assert [info.positions for info in infos] == [36, 1]
    rows = accounting.layer_rows("int4", 40)
    assert [row["rank"] for row in rows] == [8, 5]  # clamped to min(out, in*kh*kw)


# ------------------------------------------------------------ adapted networks and checkpoints


def resnet_method(init: str = "svd_init") -> tuple[network.NetworkMethod, SweepConfig]:
    model = image_model(bare(RESNET))
    names = layer_selection.select_layers(model.model, ["all"])
    calibration = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8)
    layers = layer_selection.describe_layers(model.model, names, model.preprocess(calibration[:1]))
    method = network.NetworkMethod.create("int4", make_config("int4"), model, layers, calibration)
    return method, SweepConfig(init=init)


def test_a_packed_network_reloads_to_identical_logits(tmp_path):
    method, sweep = resnet_method()
    adapted = method.adapted(4, 16, sweep, seed=1)
    assert any(isinstance(a.base_layer, CompressedConv2d) for a in adapted.adapters().values())
    with torch.no_grad():  # trained-looking adapters: nothing about them is an init identity
        for name, parameter in adapted.named_parameters():
            if "lora_" in name:
                parameter.add_(0.01 * torch.randn_like(parameter))
    path = tmp_path / "network.safetensors"
    write_packed(path, adapted.adapters(), "fp32", {"model": RESNET})
    rebuilt = network.load_adapted(method.model, path)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), adapted(images))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        network.load_adapted(method.model, path)


def test_training_moves_only_the_adapters_and_never_the_batchnorm_statistics():
    method, sweep = resnet_method()
    adapted = method.adapted(2, 8, sweep, seed=0)
    before = {k: v.clone() for k, v in adapted.network.state_dict().items()}
    images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    labels = torch.randint(0, 1000, (16,))
    split = FeatureSplit(images, labels)
    seen = {}

    def snapshot(epoch: int, _val_acc: float) -> None:
        # after epoch 1, before the loop puts the best epoch's adapter back (epoch 0 may win)
        if epoch == 1:
            seen.update({k: v.clone() for k, v in adapted.network.state_dict().items()})

    train_adapter(adapted, split, split, TrainConfig(epochs=2, batch_size=8, lr=1e-2), snapshot)
    after = seen
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]
    assert not any(m.training for m in adapted.network.modules())


def test_activation_aware_init_is_computed_once_per_rank_and_is_deterministic():
    method, sweep = resnet_method("act_svd_init")
    first = method.adapted(2, 8, sweep, seed=0).adapter_state()
    assert len(method._contexts) == 1
    again = method.adapted(2, 8, sweep, seed=0).adapter_state()
    assert len(method._contexts) == 1
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    plain = resnet_method("svd_init")[0].adapted(2, 8, SweepConfig(init="svd_init"), 0)
    plain_state = plain.adapter_state()
    assert any(not torch.allclose(first[k], plain_state[k]) for k in first)


# ------------------------------------------------------------------------------ the driver


def test_layers_all_end_to_end_on_a_small_resnet(
    tmp_path, image_folder, resnet_weights, shared_cache, capsys
):
    from train_evaluate.evaluate import main as evaluate_main

    results = tmp_path / "results"
    code, _, err = run_driver(
        capsys, "--model", RESNET, "--weights", resnet_weights, "--data-dir", image_folder,
        "--layers", "all", "--methods", "int4", "--ranks", "2", "64", "--trials", "2",
        "--epochs", "1", "--init", "act_svd_init", "--calib-images", "8",
        "--results-dir", results, "--cache-dir", shared_cache,
    )  # fmt: skip
    assert code == 0, err
    out = run_folder(results, "act_svd_init_layers-all")
    frame = pd.read_csv(out / "evaluation.csv")
    layers = pd.read_csv(out / "layers.csv")
    model = bare(RESNET)
    names = layer_selection.select_layers(model, ["all"])
    assert set(layers["layer"]) == set(names) and len(layers) == 2 * len(names)
    for row in layers.itertuples():
        weight = model.get_submodule(row.layer).weight
        assert row.rank == min(row.lora_rank, weight.shape[0], weight[0].numel())
    ranks = frame[frame["lora_rank"].isin(["2", "64"])]
    assert (ranks["file_evaluation"] == ranks["evaluation"]).all()
    weights = sum(model.get_submodule(n).weight.numel() for n in names)
    # the CSV keeps 6 significant digits
    assert (frame["bits_per_weight"] * weights).tolist() == pytest.approx(
        frame["bits"].tolist(), rel=1e-5
    )
    for rank in (2, 64):
        bits = frame.loc[frame["lora_rank"] == str(rank), "bits"].item()
        assert bits == layers.loc[layers["lora_rank"] == rank, "bits"].sum()
    checkpoint = out / "checkpoints" / "quant=int4_r=2.safetensors"
    assert evaluate_main(["--checkpoint", str(checkpoint), "--cache-dir", str(shared_cache)]) == 0
    assert "reproduced exactly" in capsys.readouterr().out
    assert frame["evaluation"].max() > 0


# the FC study on the offline demo; paper_init, so that training moves the numbers away from the
# init and a change in the training path shows
FC_STUDY = ("--init", "paper_init", "--ranks", "2", "4", "--trials", "3", "--epochs", "2",
            "--threads", "1")  # fmt: skip


def comparable(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in TIMING_COLUMNS if c in frame]).reset_index(drop=True)


@pytest.fixture(scope="module")
def fc_study(tmp_path_factory, demo_cache) -> pd.DataFrame:
    """evaluation.csv of the FC study by the one-process sweep with no --layers: what every
    other path is compared with, computed in this session, on this machine and these threads."""
    from train_evaluate.train_model import main

    results = tmp_path_factory.mktemp("fc-study")
    assert main([*FC_STUDY, "--results-dir", str(results), "--cache-dir", str(demo_cache)]) == 0
    return pd.read_csv(run_folder(results, "paper_init") / "evaluation.csv")


@pytest.mark.parametrize(
    "selection",
    [["--layers", "head"], ["--storage", "STORAGE"], ["--workers", "2", "--share", "ranks"]],
    ids=["head", "one-worker-on-a-storage", "workers-2-whole-ranks"],
)
def test_the_fc_study_is_the_same_through_every_path(
    selection, fc_study, tmp_path, capsys, demo_cache
):
    """``--layers head`` (the whole-network path with the classifier alone), one worker on a
    shared storage (slots, claims and heartbeats, as many workers run), and two workers that
    each own whole ranks all write the one-process FC study's evaluation.csv, to the last
    digit, with the same --threads on the same machine."""
    storage = f"sqlite:///{tmp_path / 'storage.db'}"
    selection = [storage if part == "STORAGE" else part for part in selection]
    assert fc_study["layers"].eq("head (1 layer)").all()
    # the original 10 x 64 FC at fp32 with its 10 biases, which the packed file stores too
    assert math.isclose(fc_study["bits_per_weight"].iloc[0], 32 * (10 * 64 + 10) / (10 * 64))
    code, out, err = run_driver(
        capsys, *FC_STUDY, "--results-dir", tmp_path / "results", "--cache-dir", demo_cache,
        *selection,
    )  # fmt: skip
    assert code == 0, err
    # a started worker that failed is only warned about (the log goes to stdout)
    assert "warning: worker" not in out + err
    got = pd.read_csv(run_folder(tmp_path / "results", "paper_init") / "evaluation.csv")
    pd.testing.assert_frame_equal(comparable(got), comparable(fc_study), check_exact=True)


def test_a_long_layer_list_gets_a_short_folder_name_and_positions_count_every_layout():
    from train_evaluate.config.network_plan import selection_name

    names = " ".join(f"stages.0.blocks.{i}.mlp.fc1" for i in range(30))
    short = selection_name(names)
    assert len(short) <= 57 and short != selection_name(names.replace("30", "31") + " x")
    assert selection_name("all") == "all"

    class ChannelsLast(nn.Module):  # a Linear on NHWC maps, as ConvNeXt's MLPs
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            return self.fc(x.permute(0, 2, 3, 1))

    (info,) = layer_selection.describe_layers(ChannelsLast(), ["fc"], torch.zeros(1, 4, 5, 7))
    assert info.positions == 35


def test_the_summary_front_compares_an_fc_run_and_a_whole_network_run_separately():
    from train_evaluate.outputs.summary import with_pareto

    frame = pd.DataFrame(
        {
            "group": ["g", "g", "g"],
            "layers": ["head (1 layer)", "all (10 layers)", "all (10 layers)"],
            "accuracy": [90.0, 80.0, 70.0],
            "ratio": [6.0, 5.0, 4.0],
        }
    )
    # the FC row dominates both network rows on (accuracy, ratio), but its ratio is over one
    # layer and theirs over ten: each selection has its own front
    assert with_pareto(frame)["pareto"].tolist() == [True, True, False]


def moments_given_to_compress(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, moment) of every compress call made while calibrating: the real compressor,
    with its arguments kept."""
    import lora.attach
    import lora.calibration

    seen = []

    def kept(weight, config, moment=None):
        seen.append((weight, moment))
        return compress(weight, config, moment)

    monkeypatch.setattr(lora.attach, "compress", kept)
    monkeypatch.setattr(lora.calibration, "compress", kept)
    return seen


def input_moments(model: nn.Module, dense: nn.Module, names, batches) -> dict[str, torch.Tensor]:
    """X^T X / N (float64) of each named layer's inputs in ``model``, every row (every conv
    patch), computed here from forward pre-hooks; ``dense`` gives each layer's conv options."""
    import torch.nn.functional as F

    sums: dict[str, list] = {name: [0, 0] for name in names}

    def hook(name: str):
        def record(module, args) -> None:
            x, conv = args[0].double(), dense.get_submodule(name)
            if isinstance(conv, nn.Conv2d):
                patches = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
                x = patches.transpose(1, 2).reshape(-1, patches.shape[1])
            sums[name][0] += x.T @ x
            sums[name][1] += x.shape[0]

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()
    return {name: total / rows for name, (total, rows) in sums.items()}


def test_a_calibrated_compressor_sees_each_layers_calibration_inputs(monkeypatch):
    """GPTQ in whole-network mode: each layer is quantized with H = X^T X / N of the inputs
    that the layers before it, already compressed (and adapted, for the adapters' bases),
    produce on the calibration images: H is checked against the inputs of the finished model,
    measured here, for the adapters' bases and for the compressed-only model."""
    from dataclasses import replace

    from compression import IntNConfig
    from compression.modules import weight_matrix

    method, sweep = resnet_method()
    # every conv position feeds the moment (no subsampling), so it can be computed here
    gptq = replace(
        network.NetworkMethod.create(
            "int4", IntNConfig(4, quantizer="gptq"), method.model, method.layers,
            method.calibration,
        ),
        positions=10**9,
    )  # fmt: skip
    dense, names = method.model.model, method.names()
    weights = [weight_matrix(dense.get_submodule(name)) for name in names]

    def received(seen) -> dict[str, torch.Tensor]:
        # the moment each layer's compressor got (one call per layer, matched by its weight)
        by_layer = {}
        for weight, moment in seen:
            (name,) = [n for n, w in zip(names, weights, strict=True) if torch.equal(w, weight)]
            by_layer[name] = moment
        assert sorted(by_layer) == sorted(names)
        return by_layer

    def check(given: dict[str, torch.Tensor], measured: dict[str, torch.Tensor]) -> None:
        for name in names:
            assert given[name].shape == measured[name].shape, name
            error = (given[name] - measured[name]).norm() / measured[name].norm()
            assert error < 1e-5, (name, error.item())  # float32 activations summed in float64

    seen = moments_given_to_compress(monkeypatch)
    gptq.contexts(2, sweep)  # the adapters' bases: compressed and adapted in forward order
    adapted = gptq.adapted(2, 8.0, sweep, seed=0).network.model  # the same bases and inits
    check(received(seen), input_moments(adapted, dense, names, gptq._calibration_batches()))
    assert all(torch.equal(gptq.contexts(2, sweep)[n].moment, m) for n, m in received(seen).items())

    seen.clear()
    quantized = gptq.compressed_model().model
    check(received(seen), input_moments(quantized, dense, names, gptq._calibration_batches()))
    rounded = method.compressed_model().model
    differ = [
        name
        for name in names
        if not torch.equal(quantized.get_submodule(name).weight, rounded.get_submodule(name).weight)
    ]
    assert len(differ) > len(names) / 2  # and GPTQ is not round-to-nearest
