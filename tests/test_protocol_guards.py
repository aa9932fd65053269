"""Guards of the protocol itself: the defects of the original study that must never come back
(DESIGN.md section 1), each tested directly, so that putting one back makes a test fail.

- Defect 1, the best epoch chosen on test: the test labels are scrambled; nothing the search or
  the final run selects may change, only the test accuracy.
- Defect 2, the final model always built with svd_init: the final run's epoch 0 must be the
  adapter that the requested init makes.
- Defect 3, svd_init ignoring alpha: at full rank svd_init must restore the original layer for an
  alpha whose scaling is far from 1.

Most tests run ``run_rank`` on a seeded synthetic problem (seconds in all); the driver tests
run ``main(argv)`` on the cached digits demo. Each was checked by putting its defect back.
"""

from __future__ import annotations

import ast
import functools
import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open

from compression import make_config
from tests.conftest import REPO
from train_evaluate.outputs.network_checkpoint import read_packed
from train_evaluate.search.sweep import (
    RankOutcome,
    SearchSpace,
    Splits,
    SweepConfig,
    run_rank,
)
from train_evaluate.training.fc_method import Method
from train_evaluate.training.synthetic import synthetic_features
from train_evaluate.training.training import FeatureSplit, evaluate

RANK = 4
# Enough trials and epochs for TPE and the pruner to act and for the val curves to move: a run
# that read test where it should read val would pick other trials and epochs.
SWEEP = SweepConfig(init="paper_init", trials=4, epochs=6, space=SearchSpace(lr=(1e-3, 1e-1)))


@functools.cache
def problem(method_name: str = "sparse") -> tuple[Method, Splits]:
    """20 classes, 32 features; 800 train, 400 val and 400 test rows. The labels are the dense
    layer's own predictions (100%); sparse 4x4 leaves about 37% on val, int1 about 54%."""
    head, splits = synthetic_features(800, 400, in_features=32, classes=20, test=400)
    method = Method.create(method_name, make_config(method_name), head, splits.train.features)
    return method, splits


def scramble_test_labels(splits: Splits) -> Splits:
    """The same splits with the test rows' labels permuted among themselves (seeded)."""
    test = splits.test
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(1))
    return replace(splits, test=FeatureSplit(test.features, test.labels[order]))


@functools.cache
def swept(init: str = "paper_init", scrambled: bool = False) -> RankOutcome:
    """One (sparse, rank 4) sweep, in an in-memory study; cached: outcomes are only read."""
    method, splits = problem()
    if scrambled:
        splits = scramble_test_labels(splits)
    return run_rank(method, RANK, splits, replace(SWEEP, init=init), None, "guard")


def without_test(value):
    """A record with every number read on test (and wall times) removed: what the search and
    the final run selected. The records name each test number ``test...`` (``test_acc``,
    ``test_top5``, the ``test`` section)."""
    if isinstance(value, dict):
        return {
            k: without_test(v)
            for k, v in value.items()
            if not k.startswith("test") and k != "seconds"
        }
    if isinstance(value, list):
        return [without_test(v) for v in value]
    return value


def trial_values(outcome: RankOutcome) -> list:
    return [
        (t.number, t.state, t.params, t.value, t.intermediate_values, t.user_attrs)
        for t in outcome.study.trials
    ]


# -- defect 1: the test split never selects anything ------------------------------------------


def test_scrambled_test_labels_change_the_test_accuracy_and_nothing_selected():
    plain, scrambled = swept(), swept(scrambled=True)
    # the scramble reaches the test read (else the comparison below would prove nothing) ...
    assert scrambled.record["test_acc"] != plain.record["test_acc"]
    # ... and nothing else: best params, best trial, trial counts, each final's best epoch,
    # best val accuracy and curves, the init's val accuracy
    assert without_test(scrambled.record) == without_test(plain.record)


def test_scrambled_test_labels_leave_every_trial_value_and_report_unchanged():
    # trial values and the per-epoch reports the pruner acts on are val accuracies
    assert trial_values(swept(scrambled=True)) == trial_values(swept())


def test_scrambled_test_labels_leave_the_final_adapter_unchanged():
    plain, scrambled = swept().layer, swept(scrambled=True).layer
    assert torch.equal(scrambled.lora_A, plain.lora_A)
    assert torch.equal(scrambled.lora_B, plain.lora_B)


# -- defect 2: the requested init is the one trained and reported -----------------------------


def test_paper_init_final_run_starts_at_the_compressed_layers_val_accuracy():
    method, splits = problem()
    compressed = evaluate(method.compressed_model(), splits.val)["acc"]
    # paper_init has B = 0: epoch 0 of the final run is the compressed layer, exactly
    assert swept("paper_init").record["finals"][0]["history"]["val_acc"][0] == compressed


def test_paper_init_only_test_accuracy_is_the_compressed_layers():
    method, splits = problem()
    compressed = evaluate(method.compressed_model(), splits.test)["acc"]
    assert swept("paper_init").record["init_only"]["test_acc"] == compressed


@pytest.mark.parametrize("init", ["paper_init", "svd_init"])
def test_the_final_model_trains_from_the_requested_init(init):
    method, splits = problem()
    record = swept(init).record
    final = record["finals"][0]

    def epoch_zero(name: str) -> dict[str, float]:
        """Val metrics of the adapter that init ``name`` gives the final model (same alpha,
        same seed), before any step."""
        sweep = replace(SWEEP, init=name)
        layer = method.adapted(RANK, record["best_params"]["lora_alpha"], sweep, final["seed"])
        return evaluate(layer, splits.val.with_base(layer))

    requested = epoch_zero(init)
    other = epoch_zero("svd_init" if init == "paper_init" else "paper_init")
    # on this problem the two inits start apart (svd_init wins back part of the loss), so the
    # curve's first point tells which init was trained
    assert other["acc"] != requested["acc"] and other["loss"] != pytest.approx(requested["loss"])
    assert record["init"] == init
    assert final["history"]["val_acc"][0] == requested["acc"]
    assert final["history"]["val_loss"][0] == pytest.approx(requested["loss"], rel=1e-6)


# -- defect 3: svd_init's alpha -----------------------------------------------------------------


@pytest.mark.parametrize("method_name", ["sparse", "int1"])
def test_svd_init_at_full_rank_scores_what_the_original_layer_scores(method_name):
    method, splits = problem(method_name)
    full = min(method.head.weight.shape)  # 20
    # alpha 40 at rank 20: scaling 2, so an init that did not divide by the scaling (the
    # original's alpha = 1) would add twice the residual and miss W
    sweep = SweepConfig(init="svd_init", epochs=0, space=SearchSpace(alphas=(40,)))
    record = run_rank(method, full, splits, sweep, None, "full").record
    original = {
        "val_acc": evaluate(method.head, splits.val)["acc"],
        "test_acc": evaluate(method.head, splits.test)["acc"],
    }
    compressed = evaluate(method.compressed_model(), splits.test)["acc"]
    assert compressed < original["test_acc"]  # the compression costs accuracy to win back
    assert record["init_only"] == original


# -- the same, through the driver on the digits demo (10 x 64 classifier: full rank is 10) ------
# Only through main(argv), with --out, so that the tests hold whatever the driver's internals.

DEMO_SWEEP = ("--init", "paper_init", "--methods", "sparse", "int1", "--ranks", "2",
              "--trials", "2", "--epochs", "3")  # fmt: skip


def run_demo(out: Path, cache: Path, *args: str) -> Path:
    """``main(argv)`` on the demo into ``out``; returns ``out``."""
    from train_evaluate.train_model import main

    argv = [*args, "--out", out, "--results-dir", out.parent, "--cache-dir", cache]
    assert main([str(a) for a in argv]) == 0
    return out


def evaluation(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "evaluation.csv", dtype={"lora_rank": str})


def records(out: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))}


@pytest.fixture(scope="module")
def demo_paper_run(tmp_path_factory, demo_cache) -> Path:
    """paper_init on the demo: 2 methods x rank 2, 2 trials of 3 epochs."""
    return run_demo(tmp_path_factory.mktemp("paper") / "run", demo_cache, *DEMO_SWEEP)


def test_driver_paper_init_only_column_is_the_quantized_rows_evaluation(demo_paper_run):
    frame = evaluation(demo_paper_run)
    for method in ("sparse", "int1"):
        rows = frame[frame["quant"] == method].set_index("lora_rank")
        quantized = rows.loc["quantized", "evaluation"]
        assert rows.loc["2", "init_only"] == quantized, method


def test_driver_paper_init_final_run_starts_at_the_init_only_val_accuracy(demo_paper_run):
    # init_only is scored on the adapter that the requested init makes; the final model must
    # start from that adapter (with paper_init: B = 0, whatever the seed and alpha)
    found = records(demo_paper_run)
    assert len(found) == 2
    for name, record in found.items():
        assert record["init"] == "paper_init", name
        first_epoch = record["finals"][0]["history"]["val_acc"][0]
        assert first_epoch == record["init_only"]["val_acc"], name


def test_driver_svd_init_at_full_rank_reports_the_original_accuracy(tmp_path, demo_cache):
    # --alphas 40 at rank 10: scaling 4, far from the alpha = 1 that the original forced
    args = ("--init", "svd_init", "--methods", "sparse", "int1", "--ranks", "10",
            "--alphas", "40", "--epochs", "0")  # fmt: skip
    frame = evaluation(run_demo(tmp_path / "run", demo_cache, *args))
    for method in ("sparse", "int1"):
        rows = frame[frame["quant"] == method].set_index("lora_rank")
        assert rows.loc["quantized", "evaluation"] < rows.loc["original", "evaluation"], method
        assert rows.loc["10", "init_only"] == rows.loc["original", "evaluation"], method


def permute_cached_test_labels(cache_dir: Path, test_ids: list[str]) -> None:
    """Rewrite the feature cache, through the product's own writer (same key, valid digest, so
    the driver reuses it), with the test rows' labels permuted among themselves."""
    from train_evaluate.inputs.features import CachedFeatures, save_features

    (path,) = cache_dir.glob("features-*.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        features, labels = handle.get_tensor("features"), handle.get_tensor("labels").clone()
    ids = json.loads(metadata["ids"])
    rows = torch.tensor([ids.index(i) for i in test_ids])
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(1))
    labels[rows] = labels[rows[order]]
    skipped = tuple(json.loads(metadata["skipped"]))
    save_features(path, metadata["key"], CachedFeatures(features, labels, tuple(ids), skipped))


def selected(record: dict) -> dict:
    """What the search and the final runs of a rank's record chose, and their val numbers."""
    return {
        "best_params": record["best_params"],
        "best_trial": record["best_trial"],
        "trials": record["trials"],
        "init_only_val_acc": record["init_only"]["val_acc"],
        "finals": [without_test(final) for final in record["finals"]],
    }


def test_driver_scrambled_test_labels_change_only_test_numbers(
    tmp_path, demo_cache, demo_paper_run
):
    # a private copy of the demo cache, whose test rows' labels are then permuted
    cache = tmp_path / "cache"
    cache.mkdir()
    for file in demo_cache.glob("*.safetensors"):
        (cache / file.name).write_bytes(file.read_bytes())
    test_ids = (demo_paper_run / "split" / "test.txt").read_text().splitlines()
    permute_cached_test_labels(cache, test_ids)
    out = run_demo(tmp_path / "run", cache, *DEMO_SWEEP)
    assert (out / "split" / "test.txt").read_text().splitlines() == test_ids
    plain, scrambled = records(demo_paper_run), records(out)
    assert plain.keys() == scrambled.keys()
    for name, record in plain.items():
        # the scramble reaches the test read (a cache rebuilt from the images would not) ...
        assert scrambled[name]["test_acc"] != record["test_acc"], name
        # ... and changes nothing that val selected
        assert selected(scrambled[name]) == selected(record), name
        stem = f"quant={record['method']}_r={record['rank']}.safetensors"
        kept = read_packed(demo_paper_run / "checkpoints" / stem).layer
        again = read_packed(out / "checkpoints" / stem).layer
        assert torch.equal(again.lora_A, kept.lora_A), name
        assert torch.equal(again.lora_B, kept.lora_B), name


# -- tests depend on the product, never on the benchmark scripts ------------------------------


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` statement of the file names, at any
    depth (imports inside functions count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_test_imports_the_benchmarks():
    files = sorted((REPO / "tests").glob("*.py"))
    assert Path(__file__).resolve() in files  # the scan sees the test files (this one at least)
    offenders = {
        path.name: sorted(m for m in imported_modules(path) if m.split(".")[0] == "benchmarks")
        for path in files
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}
