"""Reconstruction (``--reconstruct block|network``): the adapters trained, label-free, to
reproduce the uncompressed network block by block and then end to end (``lora.reconstruction``).
Checked on the small resnet: the blocks it trains, that a block's error never ends above its
start and that training lowers it, that every trial starts from the reconstructed delta at any
alpha and seed, that labels play no part, and the driver end to end."""

from __future__ import annotations

import copy
import dataclasses
import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn

from compression import compress, make_config
from compression.adaround import SoftRounding
from compression.integer import signed_codes
from lora import LoraConfig
from lora.attach import make_adapter, make_init_context
from lora.cut import boundaries
from lora.inits import FitConfig
from lora.layer import compressed_of
from lora.reconstruction import (
    WEIGHTINGS,
    ReconstructionConfig,
    UnitRecord,
    capture_module_io,
    reconstruct,
    reconstruction_units,
    split_rows,
)
from tests.conftest import run_driver, run_folder
from tests.test_network import RESNET, bare, image_model, resnet_weights  # noqa: F401 (fixture)
from train_evaluate.inputs import selection as layer_selection
from train_evaluate.search.sweep import SweepConfig
from train_evaluate.training import network
from train_evaluate.training.training import FeatureSplit

FAST = ReconstructionConfig(mode="block", block_steps=30, network_steps=20, batch_size=8)


def resnet_setup(
    calibration: torch.Tensor, config: ReconstructionConfig = FAST, compression: str = "int2",
    **options,
):  # fmt: skip
    """The small resnet's every layer compressed, ready to reconstruct on ``calibration``'s
    device."""
    model = image_model(bare(RESNET)).to(calibration.device)
    names = layer_selection.select_layers(model.model, ["all"])
    layers = layer_selection.describe_layers(model.model, names, model.preprocess(calibration[:1]))
    units = reconstruction_units([info.name for info in layers], boundaries(model.model))
    method = network.NetworkMethod.create(
        compression, make_config(compression, **options), model, layers, calibration,
        reconstruction=config, units=units,
    )  # fmt: skip
    return method, units


def images(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, 64, 64), dtype=torch.uint8, generator=generator)


def test_units_are_the_blocks_and_a_shortcut_conv_joins_its_block():
    model = bare(RESNET)
    names = layer_selection.select_layers(model, ["all"])
    units = dict(reconstruction_units(names, boundaries(model)))
    assert [n for layers in units.values() for n in layers] == names  # each layer once, in order
    # the shortcut conv is a child of its own Sequential (a boundary) inside the block
    assert "layer2.0.downsample.1" in units["layer2.0"]
    assert "layer2.0.downsample.1" not in units
    assert units["fc"] == ("fc",)
    efficientnet = bare("test_efficientnet")
    chosen = layer_selection.select_layers(efficientnet, ["all"])
    blocks = dict(reconstruction_units(chosen, boundaries(efficientnet)))
    assert all(u.startswith("blocks.") and u.count(".") == 2 for u in blocks if "." in u), blocks


def unit_error(adapted, reference, unit: str, inputs: torch.Tensor) -> float:
    """A block's relative squared error, measured here from hooks: its input from the adapted
    network's own prefix, its target from the uncompressed network."""
    _, target = capture_module_io(reference, reference.get_submodule(unit), inputs, 8, True)
    x, _ = capture_module_io(adapted, adapted.get_submodule(unit), inputs, 8, False)
    with torch.no_grad():
        out = adapted.get_submodule(unit)(x)
    return float((out - target).double().square().sum() / target.double().square().sum())


def test_each_block_ends_at_most_at_its_start_and_every_trial_starts_there():
    calibration = images(16, 0)
    method, units = resnet_setup(calibration)
    sweep = SweepConfig(init="svd_init")
    # another alpha and seed than the reconstruction's (8 and 0): B is rescaled, A kept
    adapted = method.adapted(4, 32, sweep, seed=5)
    records = method.records[4]
    assert [r.unit for r in records] == [u for u, _ in units]
    assert all(r.error_end <= r.error_start for r in records)
    # training does the work, not only the keeping of the start: most blocks improve a lot
    improved = [r for r in records if r.error_end < 0.9 * r.error_start]
    assert len(improved) >= len(records) // 2, records
    # every record's errors are those of the held-out rows, on which no step trained
    _, held = split_rows(len(calibration), FAST)
    assert 0 < len(held) < len(calibration)
    inputs = method.model.preprocess(calibration)[held]
    plain = method._build(4, 8.0, sweep, 0, method.contexts(4, sweep))  # the init it started at
    for record in records:
        measured = unit_error(adapted.network.model, method.model.model, record.unit, inputs)
        assert measured == pytest.approx(record.error_end, rel=1e-3, abs=1e-9), record.unit
        start = unit_error(plain.network.model, method.model.model, record.unit, inputs)
        if record.unit == records[0].unit:  # the first block's input is the same either way
            assert start == pytest.approx(record.error_start, rel=1e-3, abs=1e-9)


def test_each_units_inputs_carried_from_the_last_boundary_are_those_of_the_whole_prefix():
    """The chain keeps both networks' states at the last block boundary and runs on from there;
    what it hands a unit is what the compressed prefix and the uncompressed network answer
    from the images, even when every unit is changed once its inputs are taken (as
    reconstruction changes it)."""
    from lora.reconstruction import _Chain

    calibration = images(12, 3)
    method, units = resnet_setup(calibration, compression="int4")
    sweep = SweepConfig(init="svd_init")
    adapted = method._build(2, 8.0, sweep, 0, method.contexts(2, sweep)).network.model
    reference = method.model.model
    inputs = method.model.preprocess(calibration)
    chain = _Chain(adapted, reference, inputs, 5)
    carried = 0
    for unit, layers in units:
        x, clean_in, target = chain.unit_io(unit)
        carried += chain.carried.cut is not None
        old_x, _ = capture_module_io(adapted, adapted.get_submodule(unit), inputs, 5, False)
        old_in, old_target = capture_module_io(
            reference, reference.get_submodule(unit), inputs, 5, True
        )
        for new, old in ((x, old_x), (clean_in, old_in), (target, old_target)):
            scale = float(old.abs().max())
            torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6 * scale)
        with torch.no_grad():  # the unit changes after its inputs are taken
            for name in layers:
                adapter = adapted.get_submodule(name)
                adapter.lora_B.add_(0.05 * torch.randn_like(adapter.lora_B))
    assert carried >= len(units) - 2  # all but the first units start from a kept boundary


def test_a_worse_training_keeps_the_start():
    # a learning rate far too large makes a trained state worse than its start
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4)).eval()
    adapted = copy.deepcopy(model)
    for name in ("0", "2"):
        dense = adapted.get_submodule(name)
        context = make_init_context(dense, make_config("int2"))
        setattr(adapted, name, make_adapter(dense, LoraConfig(r=2, init="svd_init"), context))
    inputs = torch.randn(32, 6, generator=generator)
    start = {k: v.clone() for k, v in adapted.state_dict().items()}
    wild = ReconstructionConfig(mode="block", block_steps=20, lr=1e3, batch_size=8)
    records = reconstruct(adapted, model, [("0", ("0",)), ("2", ("2",))], inputs, wild)
    for record in records:
        assert record.error_end <= record.error_start
    kept = [r for r in records if r.kept == "start"]
    assert kept, records
    for record in kept:  # its adapter is exactly the start's
        for key, value in adapted.get_submodule(record.unit).state_dict().items():
            assert torch.equal(value, start[f"{record.unit}.{key}"])


def test_the_network_stage_lowers_the_kl_to_the_uncompressed_logits():
    method, units = resnet_setup(images(16, 0), ReconstructionConfig(
        mode="network", block_steps=10, network_steps=20, batch_size=8))  # fmt: skip
    method.adapted(2, 8, SweepConfig(init="svd_init"), seed=0)
    *blocks, last = method.records[2]
    assert len(blocks) == len(units) and last.unit == "network"
    assert last.error_end < last.error_start


def reconstructed_state(train: FeatureSplit) -> dict[str, torch.Tensor]:
    """The adapters a whole-network setup on ``train`` reconstructs for rank 2."""
    model = image_model(bare(RESNET))
    names = layer_selection.select_layers(model.model, ["all"])
    plan = SimpleNamespace(
        network=SimpleNamespace(layers=names, selection="all", calib_images=12, calib_augment=1,
                                calibration="symmetric", reconstruction=FAST),
        sweep=SweepConfig(init="svd_init", seed=3), include_bias=False, fit=FitConfig(),
    )  # fmt: skip
    setup = network.NetworkSetup.create(plan, model, train, "fp16")
    return setup.method("int2", make_config("int2")).adapted(2, 8, plan.sweep, 0).adapter_state()


def test_reconstruction_never_reads_a_label():
    pictures = images(20, 1)
    labels = torch.arange(20) % 5
    scrambled = labels[torch.randperm(20, generator=torch.Generator().manual_seed(0))]
    assert not torch.equal(labels, scrambled)
    first = reconstructed_state(FeatureSplit(pictures, labels))
    second = reconstructed_state(FeatureSplit(pictures, scrambled))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # the same with other images does change them: the comparison can fail
    other = reconstructed_state(FeatureSplit(images(20, 2), labels))
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_the_command_line_defaults_are_the_configs():
    from train_evaluate.config.run_options import RECONSTRUCT_DEFAULTS

    defaults = ReconstructionConfig()
    assert {k: getattr(defaults, k) for k in RECONSTRUCT_DEFAULTS} == RECONSTRUCT_DEFAULTS


def linear_problem(seed: int) -> tuple[nn.Linear, torch.Tensor]:
    """A bias-free layer and correlated inputs: a block whose rounding matters."""
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(16, 6, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(6, 16, generator=generator))
    x = torch.randn(64, 16, generator=generator) @ torch.randn(16, 16, generator=generator)
    return layer, x


def learn_rounding(layer: nn.Linear, x: torch.Tensor, config: ReconstructionConfig):
    """The layer at int3 with learned rounding (no adapter) reconstructed on ``x`` as a block of
    its own: its record, the codes it starts from and those it ends with."""
    context = make_init_context(layer, make_config("int3", quantizer="adaround"))
    adapter = make_adapter(layer, LoraConfig(r=0, lora_alpha=8.0, init="svd_init"), context)
    nearest = signed_codes(compressed_of(adapter.base_layer)).clone()
    (record,) = reconstruct(adapter, layer, [("", ("",))], x, config)
    return record, nearest, signed_codes(compressed_of(adapter.base_layer))


# AdaRound's relaxation, a regulariser strong enough and a rate fast enough for 100 steps
SOFT = ReconstructionConfig(
    mode="block", held_out=0.0, relaxation="soft", rounding_weight=1.0, rounding_lr=0.1
)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_soft_relaxation_learns_codes_that_beat_round_to_nearest(seed):
    """On its own rows (none held out) the relaxed rounding ends below round to nearest's error
    and keeps what it learned; without the relaxation (straight through) the codes it hardens
    are not those."""
    layer, x = linear_problem(seed)
    record, nearest, learned = learn_rounding(layer, x, SOFT)
    assert record.kept == "trained" and record.error_end < 0.95 * record.error_start
    assert record.codes_changed == int((learned != nearest).sum()) > 0
    through = dataclasses.replace(SOFT, relaxation="straight-through")
    assert not torch.equal(learn_rounding(layer, x, through)[2], learned)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_only_the_relative_weighting_learns_the_same_codes_at_any_output_scale(weighting):
    """The relative weighting divides the error by the target's power: a block whose inputs
    (and so outputs) are 4 times larger trains exactly as before. BRECQ's sums do not: the same
    regulariser then weighs 16 times less against the error, and other codes are learned."""
    layer, x = linear_problem(5)
    config = dataclasses.replace(SOFT, weighting=weighting, rounding_weight=0.1)
    runs = {scale: learn_rounding(layer, scale * x, config) for scale in (1.0, 4.0)}
    learned = {scale: codes for scale, (_, _, codes) in runs.items()}
    record, nearest, _ = runs[1.0]
    assert record.kept == "trained" and not torch.equal(learned[1.0], nearest)  # it learned
    assert torch.equal(learned[1.0], learned[4.0]) == (weighting == "relative")


def test_the_weighting_and_relaxation_are_driver_options():
    from train_evaluate.config.network_plan import reconstruction_config
    from train_evaluate.config.options import parse_args

    chosen = reconstruction_config(parse_args(["--reconstruct", "block"]))
    assert chosen.weighting == "relative"
    brecq = reconstruction_config(
        parse_args(["--reconstruct", "block", "--reconstruct-weighting", "brecq"])
    )
    assert brecq == dataclasses.replace(chosen, weighting="brecq")
    with pytest.raises(ValueError, match="unknown weighting"):
        ReconstructionConfig(mode="block", weighting="sum")
    soft = reconstruction_config(
        parse_args(["--reconstruct", "block", "--rounding-relaxation", "soft",
                    "--rounding-weight", "1", "--rounding-lr", "0.1"])
    )  # fmt: skip
    assert soft == dataclasses.replace(
        chosen, relaxation="soft", rounding_weight=1.0, rounding_lr=0.1
    )
    with pytest.raises(ValueError, match="unknown relaxation"):
        ReconstructionConfig(mode="block", relaxation="hard")
    with pytest.raises(ValueError, match="regulariser's weight"):
        ReconstructionConfig(mode="block", rounding_weight=-1.0)


def test_bad_reconstruction_options_are_refused(capsys):
    with pytest.raises(ValueError, match="unknown reconstruction"):
        ReconstructionConfig(mode="layer")
    with pytest.raises(ValueError, match="at least 1"):
        ReconstructionConfig(mode="block", block_steps=0)
    for bad in ({"held_out": 1.0}, {"held_out": -0.1}, {"drop": 1.5}):
        with pytest.raises(ValueError, match="held-out share"):
            ReconstructionConfig(mode="block", **bad)
    assert isinstance(UnitRecord("u", (), 1.0, 0.5, 1, "trained"), UnitRecord)


def test_the_driver_reconstructs_and_the_checkpoint_scores_what_init_only_reports(
    tmp_path,
    image_folder,
    resnet_weights,  # noqa: F811 (the fixture imported above)
    shared_cache,
    capsys,
):
    from train_evaluate.evaluate import main as evaluate_main

    results = tmp_path / "results"
    common = ("--model", RESNET, "--weights", resnet_weights, "--data-dir", image_folder,
              "--layers", "all", "--methods", "int4", "--ranks", "2", "--trials", "1",
              "--epochs", "0", "--init", "svd_init", "--calib-images", "8",
              "--results-dir", results, "--cache-dir", shared_cache)  # fmt: skip
    head = [*common[:7], "head", *common[8:]]
    code, _, err = run_driver(capsys, *head, "--reconstruct", "block")
    assert code == 2 and err.count("\n") == 1 and "--reconstruct" in err, err
    code, _, err = run_driver(capsys, *common, "--quantizer", "adaround")
    assert code == 2 and err.count("\n") == 1 and "--reconstruct block" in err, err
    code, _, err = run_driver(capsys, *common, "--quantizer", "adaround", "--reconstruct", "block",
                              "--reconstruct-steps", "10", "--reconstruct-batch", "4")  # fmt: skip
    assert code == 0, err
    out = run_folder(results, "svd_init_layers-all_reconstruct-block")
    config = json.loads((out / "run.json").read_text())["config"]["network"]["reconstruct"]
    assert config["mode"] == "block" and config["block_steps"] == 10 and config["batch_size"] == 4
    # the defaults are left out: older runs' folders still match
    assert "weighting" not in config and "relaxation" not in config
    layers = pd.read_csv(out / "layers.csv")
    assert layers["block"].notna().all()
    assert (layers["block_error_end"] <= layers["block_error_start"]).all()
    assert layers["block_codes_changed"].sum() > 0  # the learned codes differ from the nearest
    checkpoint = out / "checkpoints" / "quant=int4_r=2.safetensors"
    frame = pd.read_csv(out / "evaluation.csv").set_index("lora_rank")
    # --epochs 0: the model scored is the reconstructed init, and the packed file holds it
    assert frame.loc["2", "evaluation"] == frame.loc["2", "init_only"]
    assert frame.loc["2", "file_evaluation"] == frame.loc["2", "evaluation"]
    assert evaluate_main(["--checkpoint", str(checkpoint), "--cache-dir", str(shared_cache)]) == 0
    assert f"top-1 {frame.loc['2', 'evaluation']:.4f}%" in capsys.readouterr().out


# ------------------------------------------------------------------------- learned rounding


def test_rounding_starts_at_the_nearest_codes_and_hardens_to_the_floor_or_one_above():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 7, generator=generator)
    scale = weight.abs().amax(dim=1, keepdim=True) / 7  # int4's max grid: nothing clipped
    rounding = SoftRounding(weight, scale, -7, 7)
    # the soft codes start at the weight itself; the codes used, at round to nearest
    assert torch.allclose(rounding.soft_weight(), weight, atol=1e-5)
    assert torch.equal(rounding(weight), compress(weight, make_config("int4")).weight)
    rounding(weight).square().sum().backward()  # straight through to the logits
    assert rounding.logits.grad is not None and rounding.logits.grad.abs().sum() > 0
    with torch.no_grad():
        rounding.logits.normal_(generator=generator)
    codes = rounding.hard_codes()
    floor = (weight / scale).floor()
    # the floor, or one level up where the logit says so, within the 4-bit range
    assert torch.equal(codes, (floor + (rounding.logits >= 0)).clamp(-7, 7))
    assert (codes - floor).abs().le(1).all() and codes.abs().max() <= 7


@pytest.mark.parametrize(("compression", "grid"), [("int4", "symmetric"), ("int3", "affine")])
def test_learned_rounding_codes_are_in_range_rounded_down_or_up_and_the_file_scores_the_same(
    compression, grid, tmp_path
):
    from compression.adaround import learns_rounding
    from compression.integer import row_zero, signed_codes
    from train_evaluate.outputs.checkpoint import write_packed

    bits = int(compression[3:])
    calibration = images(16, 0)
    options = {"compression": compression, "int_grid": grid}
    method, _ = resnet_setup(calibration, quantizer="adaround", **options)
    adapted = method.adapted(4, 16, SweepConfig(init="svd_init"), seed=2)
    records = method.records[4]
    assert all(r.error_end <= r.error_start for r in records)
    assert sum(r.codes_changed for r in records) > 0, records
    rtn = resnet_setup(calibration, **options)[0].compressed_model()
    changed = 0
    for name, adapter in adapted.adapters().items():
        stored = adapter.base_compressed
        assert (
            learns_rounding(stored.config)
            and stored.cost.value_bits == bits * stored.weight.numel()
        )
        codes = signed_codes(stored).double()
        # the grid's range: symmetric 2^N - 1 levels about 0, affine 2^N less the zero point
        half = 2 ** (bits - 1)
        zero = row_zero(stored)
        lo, hi = (-(half - 1), half - 1) if zero is None else (-zero, 2 * half - 1 - zero)
        assert bool(((codes >= lo) & (codes <= hi)).all())
        weight = method.model.model.get_submodule(name).weight.reshape(codes.shape).double()
        floor = (weight / stored.parts["scale"].double()).floor()
        # rounded down or up: the floor or the next level, clamped to the range
        down, up = (torch.clamp(f, lo, hi) for f in (floor, floor + 1))
        assert ((codes == down) | (codes == up)).all(), name
        assert torch.equal(adapter.base_layer.expand(), adapter.base_layer.weight)
        plain = rtn.model.get_submodule(name).compressed
        changed += int((plain.parts["codes"] != stored.parts["codes"]).sum())
    assert changed == sum(r.codes_changed for r in records)
    path = tmp_path / "network.safetensors"
    write_packed(path, adapted.adapters(), "fp32", {"model": RESNET})
    rebuilt = network.load_adapted(method.model, path)
    pictures = images(6, 9)
    with torch.no_grad():
        assert torch.equal(rebuilt(pictures), adapted(pictures))


def test_learned_rounding_from_gptqs_codes_keeps_them_when_it_takes_no_step():
    """GPTQ's codes lie up to several steps from the weight (its fed-back error): learned
    rounding started from them gives them back untouched, and its soft weight lies within a
    step of the weight wherever the code does."""
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(6, 16, generator=generator)
    x = torch.randn(64, 16, generator=generator) @ torch.randn(16, 16, generator=generator)
    moment = x.T.double() @ x.double() / 64
    config = make_config("int3", quantizer="gptq-adaround", int_grid="affine")
    stored = compress(weight, config, moment)
    nearest = compress(weight, make_config("int3", int_grid="affine"))
    from compression.integer import code_bounds, row_zero, signed_codes

    codes = signed_codes(stored)
    assert not torch.equal(codes, signed_codes(nearest))  # GPTQ moved some codes
    lo, hi = code_bounds(stored.config, row_zero(stored))
    rounding = SoftRounding(weight, stored.parts["scale"], lo, hi, codes)
    assert torch.equal(rounding.hard_codes(), codes.to(rounding.hard_codes().dtype))
    assert torch.equal(rounding(weight), stored.weight)
    ratio = weight / stored.parts["scale"].float()
    # within half a step of its code, and inside the grid (a clipped weight stays clipped)
    near = ((ratio - codes).abs() < 0.49) & (ratio >= lo) & (ratio <= hi)
    steps = (rounding.soft_weight() - weight).abs() / stored.parts["scale"].float()
    assert bool((steps[near] < 1e-4).all())


def test_qdrop_trains_each_block_on_its_clean_inputs_mixed_in():
    """With --reconstruct-drop 1 every value a block is trained on comes from the clean
    network: the adapters it learns differ from those trained on the compressed prefix's
    inputs, and the held-out rows still decide what is kept."""
    calibration = images(16, 2)
    sweep = SweepConfig(init="svd_init")
    states = {}
    for drop in (0.0, 1.0):
        config = dataclasses.replace(FAST, drop=drop)
        method, _ = resnet_setup(calibration, config)
        states[drop] = method.adapted(2, 8, sweep, seed=0).adapter_state()
        assert all(r.error_end <= r.error_start for r in method.records[2])
    assert any(not torch.equal(states[0.0][k], states[1.0][k]) for k in states[0.0])
