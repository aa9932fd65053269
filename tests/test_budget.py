"""``--bits-budget``: the knapsack solvers against every combination on small problems, the
measured options against the run's own accounting, and one budgeted run end to end (its bits
within the budget, its layers as chosen, its checkpoint reproduced)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import random
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compression import make_config
from compression.budget import (
    BudgetError,
    Option,
    SensitivityError,
    brute_force,
    solve,
    solve_exact,
    solve_greedy,
)
from compression.modules import replace_submodule
from lora.cut import boundaries
from lora.reconstruction import ReconstructionConfig, reconstruct, reconstruction_units
from tests.conftest import run_driver, run_folder
from tests.test_bits import MODEL_WEIGHTS, OTHER_BITS, small_setup
from tests.test_network import RESNET, resnet_weights  # noqa: F401 (a fixture)
from train_evaluate.outputs.network_checkpoint import read_packed_network
from train_evaluate.search.sweep import SweepConfig
from train_evaluate.training import budget, budget_store

# --------------------------------------------------------------------------- the solvers


def random_problem(seed: int, layers: int = 5, options: int = 4) -> list[list[Option]]:
    """Layers of up to ``options`` options, bits and sensitivity drawn independently: many
    an option is beaten by a cheaper one, which must never be taken over it."""
    rng = random.Random(seed)
    problem = []
    for i in range(layers):
        layer = []
        for k in range(rng.randint(1, options)):
            layer.append(Option(f"{i}/{k}", rng.randint(1, 40), rng.uniform(0.0, 1.0)))
        problem.append(layer)
    return problem


def budgets(problem: list[list[Option]]) -> list[int]:
    """From the cheapest combination to past the dearest: every regime of the problem."""
    low = sum(min(o.bits for o in layer) for layer in problem)
    high = sum(max(o.bits for o in layer) for layer in problem)
    span = high - low
    return sorted({low, low + 1, low + span // 3, low + span // 2, high - 1, high, high + 5})


@pytest.mark.parametrize("seed", range(40))
def test_the_exact_solver_finds_the_best_combination(seed):
    problem = random_problem(seed)
    for bits in budgets(problem):
        exact, best = solve_exact(problem, bits), brute_force(problem, bits)
        assert exact.exact and exact.bits <= bits
        assert exact.sensitivity == pytest.approx(best.sensitivity, rel=1e-12, abs=1e-12)
        assert exact.bound == exact.sensitivity and exact.gap == 0.0
        # the choice is what it claims: its bits and sum recomputed from the options
        picked = [layer[k] for layer, k in zip(problem, exact.choice, strict=True)]
        assert exact.bits == sum(o.bits for o in picked)
        assert exact.sensitivity == pytest.approx(math.fsum(o.sensitivity for o in picked))


@pytest.mark.parametrize("seed", range(40))
def test_the_greedy_solver_fits_and_brackets_the_optimum(seed):
    problem = random_problem(seed, layers=6)
    for bits in budgets(problem):
        greedy, best = solve_greedy(problem, bits), brute_force(problem, bits)
        assert not greedy.exact and greedy.bits <= bits
        picked = [layer[k] for layer, k in zip(problem, greedy.choice, strict=True)]
        assert greedy.bits == sum(o.bits for o in picked)
        # the bound is below the optimum, the greedy sum above it, the gap covers the distance
        assert greedy.bound <= best.sensitivity + 1e-12
        assert greedy.sensitivity >= best.sensitivity - 1e-12
        assert greedy.sensitivity - best.sensitivity <= greedy.gap + 1e-12


def test_the_greedy_solver_never_takes_a_later_upgrade_before_an_earlier_one():
    # three points collinear to within rounding: the second step's rate, divided out in
    # floating point, comes out above the first's although the hull says it is not
    layer = [Option("a", 0, 0.6487856106256564), Option("b", 9, 0.3955117901285266),
             Option("c", 23, 0.0015302915774357273)]  # fmt: skip
    for bits in range(0, 30):
        greedy, best = solve_greedy([layer], bits), brute_force([layer], bits)
        assert greedy.bits <= bits and greedy.sensitivity >= best.sensitivity
        assert greedy.bound <= best.sensitivity


def test_with_room_for_every_best_option_the_greedy_solver_is_exact():
    problem = random_problem(7, layers=8)
    roomy = sum(max(o.bits for o in layer) for layer in problem)
    greedy = solve_greedy(problem, roomy)
    best = [min(o.sensitivity for o in layer) for layer in problem]
    assert greedy.sensitivity == pytest.approx(math.fsum(best))
    assert greedy.gap == pytest.approx(0.0, abs=1e-12)


def test_past_its_state_limit_the_exact_solver_gives_way_to_the_greedy_one():
    problem = random_problem(3, layers=8, options=6)
    bits = budgets(problem)[3]
    assert solve_exact(problem, bits, max_states=2) is None
    fallback = solve(problem, bits, max_states=2)
    assert not fallback.exact and fallback.bits <= bits
    assert solve(problem, bits).exact


def test_a_budget_below_the_cheapest_combination_is_refused_with_its_price():
    problem = random_problem(11)
    cheapest = sum(min(o.bits for o in layer) for layer in problem)
    for solver in (brute_force, solve_exact, solve_greedy, solve):
        with pytest.raises(BudgetError) as refused:
            solver(problem, cheapest - 1)
        assert refused.value.cheapest_bits == cheapest
        assert solver(problem, cheapest).bits == cheapest


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_sensitivity_that_is_not_a_finite_number_is_refused_by_name(bad):
    problem = random_problem(5)
    layer = next(i for i, options in enumerate(problem) if len(options) > 1)
    broken = problem[layer][1]
    problem[layer][1] = Option(broken.label, broken.bits, bad)
    bits = budgets(problem)[3]
    for solver in (solve_exact, solve_greedy, solve):
        with pytest.raises(SensitivityError, match=f"option {broken.label} has sensitivity"):
            solver(problem, bits)


# --------------------------------------------------------------------------- the options


def test_the_sensitivity_is_the_relative_output_error_on_the_inputs():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 10, generator=generator, dtype=torch.float64)
    approximation = weight + 0.1 * torch.randn(6, 10, generator=generator, dtype=torch.float64)
    inputs = torch.randn(50, 10, generator=generator, dtype=torch.float64) * torch.linspace(
        0.1, 3.0, 10, dtype=torch.float64
    )  # unequal input scales: a plain weight error would not match
    moment = inputs.T @ inputs / len(inputs)
    expected = (inputs @ (weight - approximation).T).square().sum() / (
        (inputs @ weight.T).square().sum()
    )
    got = budget.relative_output_error(weight, approximation, moment)
    assert got == pytest.approx(float(expected), rel=1e-10)


COMPRESSIONS = {"int2": make_config("int2"), "int4": make_config("int4")}
# 0: no adapter; on the small network 8 and 16 clamp to one rank in two layers
RANKS = (0, 1, 2, 8, 16)


@pytest.fixture(scope="module")
def small():
    setup = small_setup(include_bias=False)
    sweep = SweepConfig(init="act_svd_init", seed=0)
    return setup, sweep, budget.measure_options(setup, COMPRESSIONS, RANKS, sweep)


def test_each_option_is_priced_as_the_run_prices_that_method_at_that_rank(small):
    setup, _, options = small
    for info, layer in zip(setup.layers, options, strict=True):
        # one option per method and distinct rank the layer takes: none clamped twice
        taken = [(c.method, info.rank(c.rank)) for c in layer]
        assert len(taken) == len(set(taken))
        assert set(taken) == {(m, info.rank(r)) for m in COMPRESSIONS for r in RANKS}
    assert any(len(layer) < len(COMPRESSIONS) * len(RANKS) for layer in options)
    for name, config in COMPRESSIONS.items():
        method = setup.method(name, config)
        for rank in RANKS:
            priced = setup.accounting(method).per_layer(rank)
            run_bits = [p.stored_bits for _, _, p in priced]
            budget_bits = [
                next(c.bits for c in layer
                     if c.method == name and info.rank(c.rank) == info.rank(rank))
                for info, layer in zip(setup.layers, options, strict=True)
            ]  # fmt: skip
            assert budget_bits == run_bits


def test_the_cheapest_price_from_shapes_alone_is_the_measured_options_cheapest(small):
    # the plan refuses a budget from the layers' shapes before any work; the measured options
    # (real weights, calibrated compressors, initialised adapters) must agree with it
    setup, _, options = small
    measured = sum(min(c.bits for c in layer) for layer in options)
    assert budget.cheapest_bits(setup.template, COMPRESSIONS, RANKS) == measured


def errors(options) -> list[dict[tuple[str, int], float]]:
    return [{(c.method, c.rank): c.sensitivity for c in layer} for layer in options]


def test_the_sensitivity_is_measured_in_the_norm_the_act_aware_init_minimises(small):
    # the act-aware init is the best rank-r correction in the input-weighted norm the
    # sensitivity measures: a larger rank cannot do worse, nor can the plain SVD init, which
    # is the best in the unweighted norm instead
    setup, _, options = small
    plain = budget.measure_options(setup, COMPRESSIONS, RANKS, SweepConfig(init="svd_init"))
    for act, svd in zip(errors(options), errors(plain), strict=True):
        assert act.keys() == svd.keys()
        for method in COMPRESSIONS:
            by_rank = [act[key] for key in sorted(k for k in act if k[0] == method)]
            assert all(b <= a * (1 + 1e-9) + 1e-12 for a, b in itertools.pairwise(by_rank))
        # (at full rank both are rounding error, about 1e-15)
        assert all(act[key] <= svd[key] * (1 + 1e-9) + 1e-12 for key in act)
        assert act[("int4", 1)] < act[("int2", 1)]
        assert all(0.0 <= value < 1.0 for value in act.values())
    # the two inits differ somewhere: the comparison can fail
    assert errors(options) != errors(plain)


def test_the_allocation_is_the_best_combination_of_the_measured_options(small):
    setup, sweep, options = small
    problem = [
        [Option(f"{c.method}/{c.rank}", c.bits, c.sensitivity) for c in layer] for layer in options
    ]
    cheapest = sum(min(o.bits for o in layer) for layer in problem)
    dearest = sum(max(o.bits for o in layer) for layer in problem)
    # a budget bounds the whole model's bits per weight: the rest of the model (counted by
    # hand in test_bits) takes its share first; a fraction of a bit left rounds down
    for selected in (cheapest + 0.25, cheapest + 0.75, (cheapest + dearest) // 2 + 0.5, dearest):
        bits_per_weight = (OTHER_BITS + selected) / MODEL_WEIGHTS
        solved = budget.allocate(setup, COMPRESSIONS, RANKS, bits_per_weight, sweep)
        assert solved.budget_bits == math.floor(selected)
        assert (OTHER_BITS + solved.allocation.bits) / MODEL_WEIGHTS <= bits_per_weight
        best = brute_force(problem, solved.budget_bits)
        assert solved.allocation.exact and solved.allocation.bits <= solved.budget_bits
        assert solved.allocation.sensitivity == pytest.approx(best.sensitivity, rel=1e-9)
        assert [c.layer for c in solved.chosen] == [info.name for info in setup.layers]
        if selected < cheapest + 1:  # the cheapest option of a layer has no adapter
            assert {(c.method, c.rank) for c in solved.chosen} == {("int2", 0)}
        # the budgeted model, priced layer by layer with its own ranks, stores those bits
        plan = solved.layer_plan("budget", setup.template.adapter_dtype)
        method = setup.planned_method(plan, COMPRESSIONS)
        largest = max(c.rank for c in solved.chosen)
        priced = setup.accounting(method).per_layer(largest)
        assert sum(p.stored_bits for _, _, p in priced) == solved.allocation.bits
    with pytest.raises(BudgetError):
        below = (OTHER_BITS + cheapest - 1) / MODEL_WEIGHTS
        budget.allocate(setup, COMPRESSIONS, RANKS, below, sweep)


def test_the_kl_sensitivity_is_the_network_kl_with_that_layer_alone_replaced(small):
    setup, sweep, _ = small
    before = {k: v.clone() for k, v in setup.model.state_dict().items()}
    stem_passes = []
    stem = setup.model.model.get_submodule("stem")
    handle = stem.register_forward_hook(lambda *_: stem_passes.append(1))
    try:
        measured = budget.measure_options(setup, COMPRESSIONS, RANKS, sweep, sensitivity="kl")
    finally:
        handle.remove()
    # the passes for the later layers' options start at their blocks: the stem runs fewer times
    # than one pass per option would take (every chunk of the calibration images is one call)
    assert len(setup.calibration) <= budget.CHUNK
    assert len(stem_passes) < sum(map(len, measured))
    # the network is left as it was
    after = setup.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        teacher = F.log_softmax(setup.model(setup.calibration).double(), dim=-1)
    full_rank = []
    for (info, _, _, options), layer in zip(
        budget.layer_options(setup, COMPRESSIONS, RANKS, sweep), measured, strict=True
    ):
        for (method, rank, bits, adapter), choice in zip(options, layer, strict=True):
            assert (choice.layer, choice.method, choice.rank, choice.bits) == (
                info.name, method, rank, bits
            )  # fmt: skip
            # by hand: a copy of the network, this one layer's weight replaced
            replaced = copy.deepcopy(setup.model)
            module = replaced.model.get_submodule(info.name)
            with torch.no_grad():
                module.weight.copy_(budget.merged(adapter).reshape(module.weight.shape))
                student = F.log_softmax(replaced(setup.calibration).double(), dim=-1)
            expected = float((teacher.exp() * (teacher - student)).sum(-1).mean())
            assert choice.sensitivity == pytest.approx(expected, rel=1e-6, abs=1e-12)
            if info.rank(rank) == min(info.matrix):
                full_rank.append(choice.sensitivity)
    # at full rank the act-aware adapter restores the weight: the network is the original
    # (its KL is float rounding, about 1e-17; int2 at rank 1 moves the logits far more)
    assert full_rank and max(abs(value) for value in full_rank) < 1e-12
    assert max(c.sensitivity for layer in measured for c in layer) > 1e-6


class Block(nn.Module):
    """Two pointwise convs, one after the other: a block that reconstruction trains whole."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(width, width, 1)
        self.b = nn.Conv2d(width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class Blocky(nn.Module):
    """A stem, two blocks of two layers each in a Sequential, an FC."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(torch.relu(self.stem(x))).mean(dim=(2, 3)))


@pytest.mark.parametrize("kind", [None, Blocky], ids=["layers-alone", "blocks"])
def test_kl_reconstructed_is_the_kl_after_each_options_block_is_reconstructed(kind):
    setup = small_setup(include_bias=False, kind=kind)
    sweep = SweepConfig(init="act_svd_init", seed=0)
    config = ReconstructionConfig(mode="block", block_steps=4, lr=1e-2, held_out=0.25)
    rebuilt = dataclasses.replace(setup, reconstruction=config)
    learned = {"int2": make_config("int2", quantizer="adaround")}  # rank 0 learns its rounding
    before = {k: v.clone() for k, v in setup.model.state_dict().items()}
    measured = budget.measure_options(
        rebuilt, learned, (0, 2), sweep, sensitivity="kl-reconstructed"
    )
    after = setup.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the network as it was
    plain = budget.measure_options(setup, learned, (0, 2), sweep, sensitivity="kl")
    # by hand, on a copy from the images: the option's adapter in its layer, its block
    # reconstructed inside the whole network against the clean one, then the KL of the
    # adapted network itself
    model, calibration = setup.model, setup.calibration
    inputs = model.preprocess(calibration)
    units = reconstruction_units([info.name for info in setup.layers], boundaries(model.model))
    assert (kind is None) == all(unit == names[0] for unit, names in units)
    with torch.no_grad():
        teacher = F.log_softmax(model(calibration).double(), dim=-1)
    for (info, _, _, options), layer in zip(
        budget.layer_options(setup, learned, (0, 2), sweep), measured, strict=True
    ):
        (unit,) = [unit for unit, names in units if info.name in names]
        for (*_, adapter), choice in zip(options, layer, strict=True):
            network = copy.deepcopy(model)
            replace_submodule(network.model, info.name, adapter)
            reconstruct(network.model, model.model, [(unit, [info.name])], inputs, config)
            with torch.no_grad():
                student = F.log_softmax(network(calibration).double(), dim=-1)
            expected = float((teacher.exp() * (teacher - student)).sum(-1).mean())
            # the merged weight against the adapter's own forward: float32 rounding of logits
            # that differ by about 1e-3 moves a KL this small by about 1e-4 of itself
            assert choice.sensitivity == pytest.approx(expected, rel=1e-3, abs=1e-12)
    assert errors(measured) != errors(plain)  # reconstruction moved the sensitivities
    with pytest.raises(ValueError, match="--reconstruct"):
        budget.measure_options(setup, learned, (0,), sweep, sensitivity="kl-reconstructed")


def test_kl_reconstructed_prices_its_options_after_the_sensitivity_steps(tmp_path):
    from data import SplitFractions
    from lora.inits import FitConfig
    from train_evaluate.config.network_plan import NetworkPlan
    from train_evaluate.search.sweep_all import solve_budget

    setup = small_setup(include_bias=False, kind=Blocky)
    sweep = SweepConfig(init="act_svd_init", seed=0)
    learned = {"int2": make_config("int2", quantizer="adaround")}
    run_steps = ReconstructionConfig(mode="block", block_steps=6, lr=1e-2, held_out=0.25)
    short = dataclasses.replace(run_steps, block_steps=1)

    def measured(steps: ReconstructionConfig) -> list:
        return budget.measure_options(
            dataclasses.replace(setup, reconstruction=steps), learned, (0, 2), sweep,
            sensitivity="kl-reconstructed",
        )  # fmt: skip

    def network(proxy_steps: int | None) -> NetworkPlan:
        return NetworkPlan(
            layers=(), selection="all", calib_images=8, input_size=(3, 8, 8), cut=None,
            image_bytes=0, state_bytes=0, why_input="", epoch_seconds=0.0, left_out={},
            reconstruction=run_steps, budget_sensitivity="kl-reconstructed",
            budget_sensitivity_steps=proxy_steps,
        )  # fmt: skip

    keys, solved = [], []
    for proxy_steps in (None, 1):
        plan = SimpleNamespace(
            compressions=learned, ranks=(0, 2), sweep=sweep, out=tmp_path / str(proxy_steps),
            fractions=SplitFractions(0.8, 0.1, 0.1), adapter_dtype="fp32", include_bias=False,
            fit=FitConfig(), device=torch.device("cpu"), network=network(proxy_steps),
        )  # fmt: skip
        plan.out.mkdir()
        runs = dataclasses.replace(setup, reconstruction=run_steps)
        solved.append([list(layer) for layer in solve_budget(plan, runs, 8.0, [], "f").options])
        prices = budget.shape_prices(setup.template, learned, (0, 2))
        keys.append(budget_store.measurement_key(plan, "f", prices))
    # the run's own steps where none are given, the proxy's where they are; each kept apart
    assert solved == [measured(run_steps), measured(short)]
    assert errors(solved[0]) != errors(solved[1]) and keys[0] != keys[1]


def test_a_pass_from_a_later_block_skips_the_ones_before_and_answers_the_same(small):
    setup = small[0]
    model, calibration = setup.model, setup.calibration
    structure = [(name, type(m)) for name, m in model.named_modules()]
    with torch.no_grad():  # in the chunks the passes take: the same sums, bit for bit
        teacher = torch.cat([model(rows) for rows in calibration.split(3)])
    shapes = budget.output_shapes(model, ["stem", "pw"], calibration[:1])
    calls = []
    stem = model.model.get_submodule("stem")
    handle = stem.register_forward_hook(lambda *_: calls.append(1))
    pw = model.model.get_submodule("pw")
    kept = pw.weight.detach().clone()
    try:
        for unit, before in (("pw", ["stem"]), ("fc", ["stem", "pw"])):
            stand_ins = [(name, shapes[name]) for name in before]
            start = budget.FromUnit(model, unit, stand_ins, calibration, chunk=3)
            calls.clear()  # (taking the unit's clean input ran the stem)
            with start:
                assert start.reproduces(calibration, teacher)
                assert not calls  # the units before it did not run
        # a changed layer inside the unit: the KL is the full pass's
        with torch.no_grad():
            pw.weight.mul_(0.5)
        changed = torch.cat([model(rows) for rows in calibration.split(3)])
        full = budget.network_kl(model, calibration, teacher, chunk=3)
        start = budget.FromUnit(model, "pw", [("stem", shapes["stem"])], calibration, 3)
        calls.clear()
        with start:
            assert start.kl(calibration, teacher) == pytest.approx(full, rel=1e-9)
            assert not calls
        assert full > 1e-6 and not torch.equal(changed, teacher)
    finally:
        handle.remove()
        with torch.no_grad():
            pw.weight.copy_(kept)
    # the network is whole again
    assert [(name, type(m)) for name, m in model.named_modules()] == structure
    assert torch.equal(torch.cat([model(rows) for rows in calibration.split(3)]), teacher)


def test_the_command_line_offers_every_sensitivity_the_budget_measures():
    from train_evaluate.config.cli import build_parser

    (action,) = [a for a in build_parser()._actions if a.dest == "budget_sensitivity"]
    assert tuple(action.choices) == budget.SENSITIVITIES
    assert action.default == budget.SENSITIVITIES[0]


def test_the_requested_sensitivity_is_the_one_the_budget_minimises(small, tmp_path):
    from data import SplitFractions
    from lora.inits import FitConfig
    from train_evaluate.search.sweep_all import solve_budget

    setup, sweep, output = small
    kl = budget.measure_options(setup, COMPRESSIONS, RANKS, sweep, sensitivity="kl")
    weights = setup.template.weights()
    middle = sum(max(c.bits for c in layer) + min(c.bits for c in layer) for layer in kl) / 2
    for name, options in (("output", output), ("kl", kl)):
        plan = SimpleNamespace(
            compressions=COMPRESSIONS, ranks=RANKS, sweep=sweep, out=tmp_path,
            fractions=SplitFractions(0.8, 0.1, 0.1), adapter_dtype="fp32", include_bias=False,
            fit=FitConfig(), device=torch.device("cpu"),
            network=SimpleNamespace(budget_sensitivity=name, calibration="symmetric"),
        )  # fmt: skip
        solved = solve_budget(plan, setup, middle / weights, [], "features")
        assert [list(layer) for layer in solved.options] == options
    assert errors(kl) != errors(output)


class Stop(Exception):
    pass


def test_a_measurement_stopped_after_two_layers_resumes_to_the_same_options(small):
    """What a run stopped during the measurement resumes from: the layers kept are not
    measured again, and the options come out as an uninterrupted measurement's."""
    setup, sweep, whole = small
    kept = []

    def stop_after_two(layers):
        kept.append(dict(layers))
        if len(layers) == 2:
            raise Stop

    with pytest.raises(Stop):
        budget.measure_options(setup, COMPRESSIONS, RANKS, sweep, on_layer=stop_after_two)
    measured, ticks = [], []
    resumed = budget.measure_options(
        setup, COMPRESSIONS, RANKS, sweep, lambda: ticks.append(1),
        measured_before=kept[-1], on_layer=lambda layers: measured.append(set(layers)),
    )  # fmt: skip
    assert resumed == whole
    names = [info.name for info in setup.layers]
    assert len(names) == 3 and measured == [set(names)]  # the third layer alone measured
    assert len(ticks) == len(names)


def test_kept_options_are_read_back_only_under_their_key_and_undamaged(small, tmp_path):
    whole = small[2]
    layers = {options[0].layer: options for options in whole}
    path = tmp_path / budget_store.FILE
    budget_store.write_measured(path, "key", layers)
    assert budget_store.read_measured(path, "key") == layers
    assert budget_store.read_measured(path, "another key") == {}
    text, first = path.read_text(), whole[0][0].sensitivity
    assert text.count(json.dumps(first)) == 1
    damaged = {
        "a sensitivity edited": text.replace(json.dumps(first), json.dumps(first * 2)),
        "cut short": text[: len(text) // 2],
    }
    for case, content in damaged.items():
        path.write_text(content)
        assert budget_store.read_measured(path, "key") == {}, case
    not_measured = budget.LayerChoice("stem", "int2", 1, 10, "a text")
    budget_store.write_measured(path, "key", {"stem": [not_measured]})
    assert budget_store.read_measured(path, "key") == {}


# --------------------------------------------------------------------------- a budgeted run

BUDGETS = (4.0, 3.5)  # given largest first: the run takes the smallest first


@pytest.fixture(scope="module")
def budgeted_run(tmp_path_factory, image_folder, resnet_weights):  # noqa: F811 (imported above)
    from train_evaluate.train_model import main

    root = tmp_path_factory.mktemp("budget")
    results, cache = root / "results", root / "cache"
    code = main([str(a) for a in (
        "--model", RESNET, "--weights", resnet_weights, "--data-dir", image_folder,
        "--layers", "all", "--init", "svd_init", "--methods", "int2", "int4",
        "--ranks", "1", "2", "--epochs", "0", "--calib-images", "8", "--bits-budget", *BUDGETS,
        "--budget-sensitivity", "kl", "--results-dir", results,
        "--cache-dir", cache,
    )])  # fmt: skip
    assert code == 0
    return run_folder(results, "svd_init_layers-all"), cache


def test_each_budgeted_model_stays_within_its_bits_and_stores_what_it_chose(budgeted_run):
    folder, _ = budgeted_run
    rows = pd.read_csv(folder / "evaluation.csv")
    layers = pd.read_csv(folder / "layers.csv")
    summed = {}
    for bits_budget in BUDGETS:
        budgeted = rows[rows["quant"] == f"budget{bits_budget:g}"]
        (row,) = [r for _, r in budgeted.iterrows() if str(r["lora_rank"]).isdigit()]
        chosen = layers[layers["quant"] == row["quant"]]
        # every selected layer once, its bits the row's bits, the whole within B per weight
        assert chosen["layer"].is_unique and len(chosen) == len(layers["layer"].unique())
        assert int(chosen["bits"].sum()) == int(row["bits"])
        assert row["model_bits_per_weight"] <= bits_budget  # every bit of the model counted
        assert set(chosen["choice"]) <= {"int2", "int4"}
        assert (chosen["sensitivity"] >= -1e-12).all()  # a KL, up to float rounding
        summed[bits_budget] = chosen["sensitivity"].sum()
        # the largest chosen rank names the row; the checkpoint holds each layer as chosen
        assert int(row["lora_rank"]) == chosen["rank"].max()
        ckpt = folder / "checkpoints" / (
            f"quant={row['quant']}_r={int(row['lora_rank'])}.safetensors"
        )  # fmt: skip
        stored = read_packed_network(ckpt).info["layers"]
        for layer, method, rank in zip(
            chosen["layer"], chosen["choice"], chosen["rank"], strict=True
        ):
            assert (stored[layer]["method"], stored[layer]["rank"]) == (method, rank)
    # one set of measured options, solved exactly: more bits never cost sensitivity
    assert summed[max(BUDGETS)] <= summed[min(BUDGETS)] + 1e-12


@pytest.mark.parametrize("bits_budget", BUDGETS)
def test_each_budgeted_checkpoint_reproduces_its_row(budgeted_run, capsys, bits_budget):
    from train_evaluate.evaluate import main as evaluate_main

    folder, cache = budgeted_run
    (ckpt,) = (folder / "checkpoints").glob(f"quant=budget{bits_budget:g}_r=*.safetensors")
    assert evaluate_main(["--checkpoint", str(ckpt), "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "reproduced exactly" in out, out


def test_budget_only_builds_the_budgeted_models_alone_and_the_same_ones(
    budgeted_run, image_folder, resnet_weights, tmp_path,  # noqa: F811
):  # fmt: skip
    from train_evaluate.train_model import main

    full, cache = budgeted_run
    results = tmp_path / "results"
    code = main([str(a) for a in (
        "--model", RESNET, "--weights", resnet_weights, "--data-dir", image_folder,
        "--layers", "all", "--init", "svd_init", "--methods", "int2", "int4",
        "--ranks", "1", "2", "--epochs", "0", "--calib-images", "8", "--bits-budget", *BUDGETS,
        "--budget-sensitivity", "kl", "--budget-only", "--results-dir", results,
        "--cache-dir", cache,
    )])  # fmt: skip
    assert code == 0
    folder = run_folder(results, "svd_init_layers-all")
    alone = pd.read_csv(folder / "evaluation.csv")
    # the options each run kept for a resume: the same key, the same numbers
    kept = budget_store.FILE
    assert (folder / kept).read_text() == (full / kept).read_text()
    assert set(alone["quant"]) == {f"budget{b:g}" for b in BUDGETS}
    every = pd.read_csv(full / "evaluation.csv")
    every = every[every["quant"].isin(alone["quant"])].reset_index(drop=True)
    columns = [c for c in every.columns if c != "seconds"]
    pd.testing.assert_frame_equal(alone[columns], every[columns], check_dtype=False)


ALL_AT_4 = ("--layers", "all", "--bits-budget", "4")
RECONSTRUCTED_AT_4 = (
    *ALL_AT_4,
    "--budget-sensitivity",
    "kl-reconstructed",
    "--reconstruct",
    "block",
)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (("--layers", "all", "--budget-only"), "add --bits-budget"),
        (("--layers", "all", "--bits-budget", "0.5"), "stored outside the selected layers"),
        (("--layers", "all", "--bits-budget", "4", "0.5"), "--bits-budget 0.5: the cheapest"),
        (("--bits-budget", "4"), "with the classifier alone"),
        (("--layers", "all", "--bits-budget", "-1"), "positive number"),
        (
            ("--layers", "all", "--bits-budget", "4", "--search", "pareto", "--epochs", "1"),
            "drop --search",
        ),
        (("--layers", "all", "--bits-budget", "4", "--workers", "2"), "drop --search"),
        (("--layers", "all", "--budget-sensitivity", "kl"), "add --bits-budget"),
        (
            ("--layers", "all", "--bits-budget", "4", "--budget-sensitivity", "kl-reconstructed"),
            "add --reconstruct block",
        ),
        (
            (*ALL_AT_4, "--budget-sensitivity", "kl", "--budget-sensitivity-steps", "5"),
            "add that, or drop --budget-sensitivity-steps",
        ),
        (
            (*RECONSTRUCTED_AT_4, "--budget-sensitivity-steps", "0"),
            "must be at least 1; got 0",
        ),
    ],
)
def test_an_impossible_budget_is_refused_in_one_line(
    budgeted_run, image_folder, resnet_weights, tmp_path, capsys, extra, says,  # noqa: F811
):  # fmt: skip
    _, cache = budgeted_run
    results = tmp_path / "results"
    code, _, err = run_driver(
        capsys, "--model", RESNET, "--weights", resnet_weights, "--data-dir", image_folder,
        "--methods", "int2", "int4", "--ranks", "1", "--epochs", "0", "--calib-images", "8",
        "--results-dir", results, "--cache-dir", cache, *extra,
    )  # fmt: skip
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0]
    # refused before any work: no file at all (no run.json, split, study or lock)
    assert not results.exists() or not any(results.rglob("*")), sorted(results.rglob("*"))
