"""``--search pareto``: one multi-objective study; its front is mutually non-dominated, every
front trial has a final model whose file reloads to its test accuracy, and the same seed gives
the same front."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.conftest import run_driver, run_folder
from train_evaluate.outputs.network_checkpoint import read_packed
from train_evaluate.search.pareto import non_dominated


def test_non_dominated_keeps_exactly_the_points_no_other_point_beats():
    points = [(90.0, 100.0), (95.0, 200.0), (94.0, 250.0), (90.0, 150.0), (97.0, 200.0),
              (80.0, 50.0), (80.0, 50.0)]  # fmt: skip
    # (95, 200) and (94, 250) lose to (97, 200); (90, 150) to (90, 100); ties beat neither
    assert non_dominated(points) == [True, False, False, False, True, True, True]


def pareto_run(tmp_path, cache, capsys, name: str, *extra: str) -> pd.DataFrame:
    results = tmp_path / name
    code, _, err = run_driver(
        capsys, "--init", "paper_init", "--search", "pareto", "--methods", "sparse", "int1",
        "int4", "--ranks", "2", "4", "8", "--trials", "8", "--epochs", "2",
        "--lr-range", "0.001", "0.01", "--results-dir", results, "--cache-dir", cache, *extra,
    )  # fmt: skip
    assert code == 0, err
    return results


def test_the_demo_front_is_non_dominated_reloads_from_its_files_and_repeats(
    tmp_path, demo_cache, capsys
):
    # sparse alone: compressed only it keeps about 74% of the demo's 96%, so the best of the
    # study's trained models beats its init (epoch 0) by many images, on any CPU
    results = pareto_run(tmp_path, demo_cache, capsys, "first", "--methods", "sparse")
    out = run_folder(results, "paper_init_pareto")
    front = pd.read_csv(out / "pareto.csv")
    assert len(front) >= 1
    assert all(non_dominated(list(zip(front["val_acc"], front["bits"], strict=True))))
    assert not front.duplicated(["val_acc", "bits"]).any()
    assert (front["file_test_acc"] == front["test_acc"]).all()
    # each final model is its trial's model: trained again to the same val accuracy
    assert (front["final_val_acc"] == front["val_acc"]).all()
    best = front.loc[front["val_acc"].idxmax()]
    assert best["best_epoch"] > 0  # trained models, not the init alone
    for row in front.itertuples():
        layer = read_packed(out / row.file).layer
        assert row.lora_rank == layer.r
        recorded = read_packed(out / row.file).info["metrics"]["test_acc"]
        assert recorded == pytest.approx(row.test_acc, rel=1e-5)  # the CSV keeps 6 digits
    for name in ("pareto.png", "pareto_front.html", "evaluation.csv"):
        assert (out / name).is_file()
    again = pareto_run(tmp_path, demo_cache, capsys, "again", "--methods", "sparse")
    again = run_folder(again, "paper_init_pareto")
    pd.testing.assert_frame_equal(pd.read_csv(again / "pareto.csv"), front)


def test_a_whole_network_pareto_search_chooses_one_method_and_rank_for_every_layer(
    tmp_path, own_demo_cache, capsys
):
    results = pareto_run(
        tmp_path, own_demo_cache, capsys, "network", "--layers", "blocks.1.*", "--trials", "4",
        "--ranks", "2", "4",
    )  # fmt: skip
    out = run_folder(results, "paper_init_layers-blocks.1_pareto")
    front = pd.read_csv(out / "pareto.csv")
    assert len(front) >= 1 and (front["file_test_acc"] == front["test_acc"]).all()
    # each front model's plan, in its file and beside it: one method and rank everywhere
    from train_evaluate.outputs.network_checkpoint import read_packed_network

    for _, row in front.iterrows():
        file = out / row["file"]
        plan = json.loads((out / "plans" / f"{file.stem}.json").read_text())
        assert read_packed_network(file).info["layer_plan"] == plan
        choices = {(e["method"], e["rank"]) for e in plan["layers"].values()}
        assert choices == {(row["quant"], row["lora_rank"])}


def test_pareto_needs_training(tmp_path, capsys):
    code, _, err = run_driver(capsys, "--search", "pareto", "--epochs", "0",
                              "--results-dir", tmp_path)  # fmt: skip
    assert code == 2 and "--search pareto" in err and len(err.strip().splitlines()) == 1


def test_pareto_runs_in_one_process(tmp_path, capsys):
    code, _, err = run_driver(capsys, "--search", "pareto", "--workers", "2",
                              "--results-dir", tmp_path)  # fmt: skip
    assert code == 2 and "one process" in err and len(err.strip().splitlines()) == 1
