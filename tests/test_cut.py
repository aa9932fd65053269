"""The whole-network cache cut: the deepest block boundary before every selected layer, taken
only when the network cut there gives exactly the full network's logits."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import timm
import torch
from torch import nn

from compression import make_config
from lora.cut import cut_model, find_cut, state_of
from tests.conftest import run_driver, run_folder
from train_evaluate.inputs import images as image_cache
from train_evaluate.inputs import selection as layer_selection
from train_evaluate.inputs.backbone import eval_transform, tensor_bits
from train_evaluate.outputs.report import TIMING_COLUMNS

RESNET = "test_resnet"
RESNET_INPUT = (3, 160, 160)


def bare(name: str) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False).eval()


def test_the_cut_is_the_last_stage_before_the_selection_and_gives_the_full_logits():
    model = bare(RESNET)
    names = layer_selection.select_layers(model, ["layer4.*"])
    cut = find_cut(model, names, RESNET_INPUT)
    assert cut is not None and cut.module == "layer3"
    skipped = [name for name, _ in cut.skipped]
    assert skipped == ["conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3"]
    assert cut.state_shape == (192, 10, 10)

    mean, std = image_cache.normalisation(eval_transform(model))
    full = image_cache.ImageModel(model, mean, std).eval()
    suffix = image_cache.StateModel(cut_model(model, cut, RESNET_INPUT), mean, std, cut.state_shape)
    images = torch.randint(0, 256, (5, *RESNET_INPUT), dtype=torch.uint8)
    with torch.no_grad():
        states = state_of(full.model, cut.module, full.preprocess(images))
        assert torch.equal(suffix(states), full(images))
    # the skipped modules are still inside: the model's size (ratio_model) does not change
    assert tensor_bits(suffix) == tensor_bits(full)


def test_a_shared_cut_runs_as_the_copied_one_and_leaves_its_model_untouched():
    model = bare("test_efficientnet")
    names = layer_selection.select_layers(model, ["blocks.3.*"])
    cut = find_cut(model, names, (3, 160, 160))
    assert cut is not None and "." in cut.module  # a block inside a stage: nested containers
    before = {name: module for name, module in model.named_modules()}
    hooks = {name: len(m._forward_hooks) + len(m._forward_pre_hooks) for name, m in before.items()}
    x = torch.randn(3, 3, 160, 160)
    with torch.no_grad():
        state, logits = state_of(model, cut.module, x), model(x)
        shared = cut_model(model, cut, (3, 160, 160), share=True)
        assert torch.equal(shared(state), cut_model(model, cut, (3, 160, 160))(state))
        assert torch.equal(shared(state), logits)
        assert torch.equal(model(x), logits)  # the model still runs whole
    # no module of the model replaced or hooked, every tensor shared rather than copied
    assert {name: module for name, module in model.named_modules()} == before
    assert {
        n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in before.items()
    } == hooks
    assert {t.data_ptr() for t in shared.state_dict().values()} == {
        t.data_ptr() for t in model.state_dict().values()
    }


class SkipAround(nn.Module):
    """head(a(x) + x): a's output alone does not carry the state the head needs."""

    def __init__(self, skip: bool) -> None:
        super().__init__()
        self.skip = skip
        self.a = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.head(y + x if self.skip else y)


def test_a_boundary_with_a_connection_around_it_is_not_a_cut():
    torch.manual_seed(0)
    assert find_cut(SkipAround(skip=False).eval(), ["head"], (4,)).module == "a"
    assert find_cut(SkipAround(skip=True).eval(), ["head"], (4,)) is None


class SharedActivation(nn.Module):
    """head(act(b(act(a(x))))), one activation module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.b(self.act(self.a(x)))))


def test_a_module_the_suffix_calls_again_is_never_skipped():
    torch.manual_seed(0)
    # b's output is the head's input, but skipping b's prefix would skip act, which runs again
    assert find_cut(SharedActivation().eval(), ["head"], (4,)).module == "a"


def test_a_cut_that_does_not_fit_gives_way_to_a_shallower_one_or_to_the_images():
    model = bare(RESNET)
    names = layer_selection.select_layers(model, ["layer4.*"])
    deepest = find_cut(model, names, RESNET_INPUT)
    assert deepest.module == "layer3"
    # layer3 holds one block: its output is layer3.0's too
    small = find_cut(model, names, RESNET_INPUT, fits=lambda c: not c.module.startswith("layer3"))
    assert small is not None and small.module == "layer2"
    assert find_cut(model, names, RESNET_INPUT, fits=lambda c: False) is None


class WritesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y.relu_()
        return self.head(y)


def test_a_suffix_that_writes_in_place_never_changes_the_cached_states():
    torch.manual_seed(0)
    model = WritesItsInput().eval()
    cut = find_cut(model, ["head"], (4,))
    assert cut is not None and cut.module == "a"
    suffix = cut_model(model, cut, (4,))
    states = torch.randn(6, 4)
    kept = states.clone()
    with torch.no_grad():
        assert torch.equal(suffix(states[:3]), model.head(kept[:3].relu()))
    assert torch.equal(states, kept)


def test_the_demo_gives_the_same_results_cut_at_a_block_as_from_the_images(
    tmp_path, own_demo_cache, capsys
):
    """``--layers blocks.1.*`` caches blocks.0's output; a cache limit that only the images fit
    runs the same study from the images: the same numbers, and the checkpoint still rebuilds
    from the backbone and the images (evaluate.py) to the recorded accuracy."""
    from train_evaluate.evaluate import main as evaluate_main

    frames, logs = {}, {}
    for kind, limit in {"cut": [], "images": ["--cache-limit", "0.001"]}.items():
        results = tmp_path / kind
        code, printed, err = run_driver(
            capsys, "--init", "svd_init", "--layers", "blocks.1.*", "--ranks", "2",
            "--trials", "2", "--epochs", "1", "--results-dir", results,
            "--cache-dir", own_demo_cache, *limit,
        )  # fmt: skip
        assert code == 0, err
        out = run_folder(results, "svd_init_layers-blocks.1")
        frames[kind] = pd.read_csv(out / "evaluation.csv").drop(columns=list(TIMING_COLUMNS))
        logs[kind] = printed
        config = json.loads((out / "run.json").read_text())["config"]["network"]
        assert config.get("cut") == ("blocks.0" if kind == "cut" else None)
        checkpoint = out / "checkpoints" / "quant=int1_r=2.safetensors"
        evaluated = evaluate_main(
            ["--checkpoint", str(checkpoint), "--cache-dir", str(own_demo_cache)]
        )
        assert evaluated == 0 and "reproduced exactly" in capsys.readouterr().out
    assert "cache: cut at the output of blocks.0" in logs["cut"]
    assert "the states at blocks.0 would take" in logs["images"]
    pd.testing.assert_frame_equal(frames["cut"], frames["images"], rtol=1e-6)


@pytest.mark.parametrize("name", [RESNET, "test_efficientnet"])
def test_carried_calibration_passes_see_what_passes_from_the_images_see(name, monkeypatch):
    """calibrate_sequentially with each pass started from the states kept at the last block
    boundary gives every layer the moments (and cross-moments) that passes from the images give,
    across skip connections, squeeze-excite and depthwise convs; and most passes do start from a
    kept boundary."""
    from lora import LoraConfig, calibrate_sequentially
    from lora.cut import CarriedStates

    model = bare(name)
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(3, 3, 64, 64, generator=generator) for _ in range(2)]
    # on the resnet its first three stages: blocks with a skip connection and with a
    # shortcut conv, without the wide last stages' fits (for the suite's time)
    patterns = ["layer1.*", "layer2.*", "layer3.*"] if name == RESNET else ["all"]
    names = layer_selection.select_layers(model, patterns)
    targets = dict.fromkeys(names, make_config("int2"))

    def config_for(_name: str, _module: nn.Module) -> LoraConfig:
        return LoraConfig(r=1, lora_alpha=8, init="act_svd_init")

    started = []
    before = CarriedStates.before

    def counted(self, layer: str):
        found = before(self, layer)
        started.append(self.cut is not None)
        return found

    monkeypatch.setattr(CarriedStates, "before", counted)
    contexts = {}
    for carry in (True, False):
        copied = copy.deepcopy(model)
        results = calibrate_sequentially(
            copied, targets, config_for, batches, asymmetric=True, carry=carry
        )
        contexts[carry] = {layer: context for layer, (_, context) in results.items()}
    assert sum(started[: len(names)]) >= len(names) // 2 and not any(started[len(names) :])
    for layer in names:
        one, other = contexts[True][layer], contexts[False][layer]
        assert one.cross_moment is not None
        for carried, direct in (
            (one.moment, other.moment),
            (one.cross_moment, other.cross_moment),
        ):
            scale = float(direct.abs().max())
            torch.testing.assert_close(carried, direct, rtol=1e-5, atol=1e-6 * scale)
