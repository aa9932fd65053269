"""The driver with the methods beyond the original: several final seeds, DoRA, LoftQ,
distillation without train labels, and the comparison report over runs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.conftest import run_driver, run_folder
from tests.test_driver import tiny_args
from train_evaluate.outputs.network_checkpoint import read_packed
from train_evaluate.outputs.report import TIMING_COLUMNS
from train_evaluate.runtime.files import with_digest


def test_final_seeds_give_a_spread_and_intervals(tmp_path, demo_cache, capsys):
    # on the demo: a real classifier, so seeds change the test accuracy
    code, _, err = run_driver(
        capsys, "--init", "paper_init", "--methods", "sparse", "--ranks", "2", "--trials", "2",
        "--epochs", "3", "--final-seeds", "3", "--results-dir", tmp_path,
        "--cache-dir", demo_cache,
    )  # fmt: skip
    assert code == 0, err
    frame = pd.read_csv(run_folder(tmp_path, "paper_init") / "evaluation.csv")
    row = frame[frame["lora_rank"] == "2"].iloc[0]
    assert row["final_seeds"] == 3 and row["evaluation_std"] > 0
    assert row["ci95_low"] < row["evaluation"] < row["ci95_high"]
    assert row["best_epochs"].count(";") == 2
    record = json.loads(
        (run_folder(tmp_path, "paper_init") / "records" / "sparse_r2.json").read_text()
    )
    tests = [final["test_acc"] for final in record["finals"]]
    assert row["evaluation"] == pytest.approx(sum(tests) / 3)
    assert len({final["seed"] for final in record["finals"]}) == 3


def test_dora_loftq_and_ce_plus_kd_through_the_driver(
    tmp_path, image_folder, tiny_weights, shared_cache, capsys
):
    args = tiny_args(image_folder, tiny_weights, tmp_path, shared_cache)
    extra = ["--init", "loftq_init", "--loftq-iters", "3", "--dora", "--objective", "ce+kd",
             "--methods", "nm", "int4", "--ranks", "2"]  # fmt: skip
    code, _, err = run_driver(capsys, *args, *extra)
    assert code == 0, err
    frame = pd.read_csv(run_folder(tmp_path, "loftq_init") / "evaluation.csv")
    ranked = frame[frame["lora_rank"] == "2"]
    assert list(ranked["quant"]) == ["nm", "int4"]
    assert ranked["dora"].all() and (ranked["objective"] == "ce+kd").all()
    assert (ranked["compression"] == ["nm(2:4)", "int4(per-row symmetric)"]).all()
    checkpoint = read_packed(
        run_folder(tmp_path, "loftq_init") / "checkpoints" / "quant=nm_r=2.safetensors"
    )
    assert checkpoint.layer.lora_magnitude.shape == (1000,)
    assert checkpoint.info["init"] == "loftq_init" and checkpoint.info["use_dora"]


def scramble_train_labels(cache_dir, train_ids):
    """Rewrite the feature cache (same key, a valid digest) with the train rows' labels
    shuffled."""
    (path,) = cache_dir.glob("features-*.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    ids = json.loads(metadata["ids"])
    rows = torch.tensor([ids.index(i) for i in train_ids])
    labels = tensors["labels"].clone()
    labels[rows] = (labels[rows] + 1 + torch.arange(len(rows))) % 1000
    tensors["labels"] = labels
    # signed anew on purpose: the cache's digest would otherwise (rightly) reject the edit
    save_file(tensors, str(path), metadata=with_digest(tensors, metadata))


@pytest.mark.parametrize("objective,reads_labels", [("kd", False), ("ce", True)])
def test_kd_never_reads_a_train_label(
    objective, reads_labels, tmp_path, image_folder, tiny_weights, capsys
):
    cache = tmp_path / "cache"
    common = ["--objective", objective, "--init", "svd_init", "--methods", "sparse",
              "--trials", "2", "--epochs", "2", "--ranks", "4"]  # fmt: skip
    code, _, _ = run_driver(capsys, *tiny_args(image_folder, tiny_weights, tmp_path / "a", cache),
                            *common)  # fmt: skip
    assert code == 0
    train_ids = (
        (run_folder(tmp_path / "a", "svd_init") / "split" / "train.txt").read_text().splitlines()
    )
    scramble_train_labels(cache, train_ids)
    code, out, _ = run_driver(capsys, *tiny_args(image_folder, tiny_weights, tmp_path / "b", cache),
                              *common)  # fmt: skip
    assert code == 0 and "reusing the feature cache" in out
    first = pd.read_csv(run_folder(tmp_path / "a", "svd_init") / "evaluation.csv").drop(
        columns=TIMING_COLUMNS
    )
    second = pd.read_csv(run_folder(tmp_path / "b", "svd_init") / "evaluation.csv").drop(
        columns=TIMING_COLUMNS
    )
    # with kd the scrambled train labels change nothing; with ce (the control) they do
    assert first.equals(second) != reads_labels


def test_comparison_report_on_the_demo_with_both_inits_and_three_methods(
    tmp_path, demo_cache, capsys
):
    for init in ("paper_init", "svd_init"):
        code, out, _ = run_driver(
            capsys, "--init", init, "--methods", "sparse", "int1", "int4", "--ranks", "2",
            "--trials", "2", "--epochs", "2", "--results-dir", tmp_path, "--cache-dir", demo_cache,
        )  # fmt: skip
        assert code == 0
    assert "comparison of every run" in out
    summary = pd.read_csv(tmp_path / "summary.csv")
    runs = ["digits_vit/digits/paper_init", "digits_vit/digits/svd_init"]
    assert sorted(summary["run"].unique()) == runs
    assert sorted(summary["quant"].unique()) == ["int1", "int4", "sparse"]
    assert len(summary) == 2 * 3 * 3  # original, quantized and rank 2 per method
    assert summary["pareto"].any() and not summary["pareto"].all()
    front = summary[summary["pareto"]]
    for _, row in summary.iterrows():  # nothing beats a front point on both axes
        beaten = (front["accuracy"] < row["accuracy"]) & (front["ratio"] < row["ratio"])
        assert not beaten.any()
    assert (tmp_path / "summary_digits_vit_digits.png").stat().st_size > 0

    from train_evaluate.compare import main as compare_main

    (tmp_path / "summary.csv").unlink()
    assert compare_main(["--results-dir", str(tmp_path)]) == 0
    assert pd.read_csv(tmp_path / "summary.csv").equals(summary)


def test_epochs_zero_is_a_training_free_run_with_init_only_rows(tmp_path, demo_cache, capsys):
    code, out, _ = run_driver(
        capsys, "--init", "act_svd_init", "--epochs", "0", "--methods", "sparse", "int1",
        "int4", "--results-dir", tmp_path, "--cache-dir", demo_cache,
    )  # fmt: skip
    assert code == 0
    assert "--epochs 0: every rank is the init only (no Optuna search, no training)" in out
    frame = pd.read_csv(run_folder(tmp_path, "act_svd_init") / "evaluation.csv")
    ranked = frame[~frame["lora_rank"].isin(["original", "quantized"])]
    assert len(ranked) == 3 * 3 and (ranked["status"] == "init_only").all()
    assert (ranked["evaluation"] == ranked["init_only"]).all()
    assert (ranked["best_epoch"] == 0).all() and ranked["optimizer"].isna().all()
    assert (ranked["file_evaluation"] == ranked["evaluation"]).all()
    assert not any(
        run_folder(tmp_path, "act_svd_init").glob("*_optimization_history.html")
    )  # no study
