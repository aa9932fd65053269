"""The driver end to end: a tiny timm model from a local weights file on generated images under
real synset names, the offline demo, reproducibility, and one-line errors for bad input."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import optuna
import pandas as pd
import pytest

from tests.conftest import TINY_MODEL, run_driver, run_folder, write_image
from train_evaluate.outputs.network_checkpoint import read_packed
from train_evaluate.outputs.report import COLUMNS, TIMING_COLUMNS

RANK_COLUMNS = [
    "evaluation", "init_only", "drop", "ratio", "ratio_seed", "ratio_model", "compute_ratio",
    "bits", "best_val_acc", "best_epoch", "optimizer", "lr", "batch_size", "lora_alpha",
    "trials_complete", "compression", "seed", "base_only",
]  # fmt: skip


def tiny_args(image_folder, weights, results, cache, *extra):
    return [
        "--model", TINY_MODEL, "--weights", weights, "--data-dir", image_folder,
        "--methods", "sparse", "int1", "--ranks", "2", "4", "--trials", "2", "--epochs", "2",
        "--results-dir", results, "--cache-dir", cache, *extra,
    ]  # fmt: skip


def digest(folder: Path) -> dict[str, str]:
    """Every file's hash, but SQLite's: reading a database in WAL mode rewrites its files."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith("optuna.sqlite3")
    }


def studies(folder: Path) -> dict[str, int]:
    storage = f"sqlite:///{folder / 'optuna.sqlite3'}"
    return {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}


@pytest.fixture(scope="module")
def svd_run(tmp_path_factory, image_folder, tiny_weights, shared_cache):
    """One svd_init run of 2 methods x 2 ranks x 2 trials x 2 epochs."""
    from train_evaluate.train_model import main

    results = tmp_path_factory.mktemp("results")
    args = tiny_args(image_folder, tiny_weights, results, shared_cache, "--init", "svd_init")
    assert main([str(a) for a in args]) == 0
    return results


def test_every_row_column_and_artifact_is_written(svd_run, image_folder):
    out = run_folder(svd_run, "svd_init")
    frame = pd.read_csv(out / "evaluation.csv")
    assert list(frame.columns) == COLUMNS
    assert list(frame.columns[:3]) == ["quant", "lora_rank", "evaluation"]  # the original's
    expected = [(m, r) for m in ("sparse", "int1") for r in ("original", "quantized", "2", "4")]
    assert list(zip(frame["quant"], frame["lora_rank"].astype(str), strict=True)) == expected
    ranked = frame[frame["lora_rank"].isin(["2", "4"])]
    assert ranked[RANK_COLUMNS].notna().all().all()
    # every row, original and quantized too: top-5 and the test-sampling interval
    assert frame[["top5", "test_images", "ci95_test_low", "ci95_test_high"]].notna().all().all()
    assert (frame["init"] == "svd_init").all() and (frame["status"] == "ok").all()
    assert (frame.loc[frame["lora_rank"] == "original", "ratio"] == 1).all()

    for method in ("sparse", "int1"):
        for rank in (2, 4):
            stem = f"quant={method}_r={rank}"
            names = (f"acc_{stem}.png", f"loss_{stem}.png", f"{stem}_optimization_history.html")
            for name in names:
                assert (out / name).stat().st_size > 0, name
            checkpoint = read_packed(out / "checkpoints" / f"{stem}.safetensors")
            assert checkpoint.info["init"] == "svd_init" and checkpoint.info["method"] == method
            assert checkpoint.layer.lora_A.shape == (rank, 64)
            assert checkpoint.layer.lora_B.shape == (1000, rank)
    assert (out / "accuracy_vs_rank.png").stat().st_size > 0
    assert (out / "run.json").exists()


def test_split_lists_are_disjoint_and_cover_every_image(svd_run, image_folder):
    lists = {
        name: (run_folder(svd_run, "svd_init") / "split" / f"{name}.txt").read_text().splitlines()
        for name in ("train", "val", "test")
    }
    every = sorted(f"{p.parent.name}/{p.name}" for p in image_folder.glob("*/*.JPEG"))
    assert sorted(name for names in lists.values() for name in names) == every
    assert len(set(lists["train"]) | set(lists["val"]) | set(lists["test"])) == len(every)
    assert [len(v) for v in lists.values()] == [25, 6, 9]


def test_optuna_studies_are_in_sqlite_with_a_report_per_epoch(svd_run):
    storage = f"sqlite:///{run_folder(svd_run, 'svd_init') / 'optuna.sqlite3'}"
    summaries = optuna.get_all_study_summaries(storage)
    assert sorted(s.study_name.rsplit("_", 1)[0] for s in summaries) == [
        "int1_r2", "int1_r4", "sparse_r2", "sparse_r4",
    ]  # fmt: skip
    for summary in summaries:
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        assert len(study.trials) == 2
        for trial in study.trials:
            assert trial.state == optuna.trial.TrialState.COMPLETE
            assert sorted(trial.intermediate_values) == [0, 1, 2]  # epoch 0 = the init
            assert trial.value == max(trial.intermediate_values.values())


def test_the_same_seed_gives_the_same_evaluation_csv(
    svd_run, tmp_path, image_folder, tiny_weights, shared_cache, capsys
):
    args = tiny_args(image_folder, tiny_weights, tmp_path, shared_cache, "--init", "svd_init")
    code, out, _ = run_driver(capsys, *args)
    assert code == 0 and "reusing the feature cache" in out
    first = pd.read_csv(run_folder(svd_run, "svd_init") / "evaluation.csv").drop(
        columns=TIMING_COLUMNS
    )
    second = pd.read_csv(run_folder(tmp_path, "svd_init") / "evaluation.csv").drop(
        columns=TIMING_COLUMNS
    )
    pd.testing.assert_frame_equal(first, second)


def test_paper_init_afterwards_leaves_the_svd_init_results_intact(
    svd_run, image_folder, tiny_weights, shared_cache, capsys
):
    before = digest(run_folder(svd_run, "svd_init")), studies(run_folder(svd_run, "svd_init"))
    args = tiny_args(image_folder, tiny_weights, svd_run, shared_cache, "--init", "paper_init")
    code, _, _ = run_driver(capsys, *args)
    assert code == 0
    assert (
        digest(run_folder(svd_run, "svd_init")),
        studies(run_folder(svd_run, "svd_init")),
    ) == before
    for init in ("svd_init", "paper_init"):
        frame = pd.read_csv(run_folder(svd_run, init) / "evaluation.csv")
        assert (frame["init"] == init).all()
        checkpoints = list((run_folder(svd_run, init) / "checkpoints").glob("*.safetensors"))
        assert len(checkpoints) == 4
        for checkpoint in checkpoints:
            assert read_packed(checkpoint).info["init"] == init


def test_the_offline_demo_runs_end_to_end_and_reuses_its_cache(tmp_path, capsys, demo_cache):
    # the demo classifier as the session trained it (``demo_cache`` trains it from nothing
    # through the driver), in the cache's default place under the results folder
    shutil.copytree(demo_cache, tmp_path / "cache")
    code, out, _ = run_driver(capsys, "--init", "svd_init", "--results-dir", tmp_path)
    assert code == 0
    assert "DEMO RUN" in out and "--data-dir" in out
    results = run_folder(tmp_path, "svd_init")
    frame = pd.read_csv(results / "evaluation.csv")
    ranks = ["original", "quantized", "2", "4", "8"]  # ranks that fit the demo's 10 x 64 FC
    assert list(frame["lora_rank"].astype(str)) == ranks * 2
    original = frame.loc[frame["lora_rank"] == "original", "evaluation"].iloc[0]
    assert original > 90  # the demo classifier is a real digits classifier
    for method in ("sparse", "int1"):
        for rank in (2, 4, 8):
            stem = f"quant={method}_r={rank}"
            for name in (f"acc_{stem}.png", f"loss_{stem}.png", f"{stem}_optimization_history.html",
                         f"checkpoints/{stem}.safetensors"):  # fmt: skip
                assert (results / name).exists(), name
    assert (results / "accuracy_vs_rank.png").exists()

    # a second run (a small one, elsewhere) reads the cache and leaves it as it was
    cache = tmp_path / "cache"
    written = {file: file.stat().st_mtime_ns for file in cache.rglob("*") if file.is_file()}
    code, out, _ = run_driver(capsys, "--init", "svd_init", "--methods", "sparse", "--ranks", "2",
                              "--trials", "1", "--epochs", "1", "--results-dir", tmp_path / "again",
                              "--cache-dir", cache)  # fmt: skip
    assert code == 0
    assert "reusing the feature cache" in out and "demo classifier: reusing" in out
    assert written and written == {
        file: file.stat().st_mtime_ns for file in cache.rglob("*") if file.is_file()
    }


def folder_without_synsets(tmp: Path) -> Path:
    (tmp / "no-synsets" / "cats").mkdir(parents=True)
    write_image(tmp / "no-synsets" / "cats" / "a.jpg", seed=0)
    return tmp / "no-synsets"


def a_file(tmp: Path) -> Path:
    (tmp / "a-file").write_text("")
    return tmp / "a-file"


def random_bytes(tmp: Path) -> Path:
    path = tmp / "random.pth"
    path.write_bytes(bytes(range(256)) * 64)
    return path


# case -> (arguments given the image folder and a scratch folder, what the message must say)
BAD_INPUT = {
    "missing data dir": (lambda data, tmp: ["--data-dir", tmp / "nowhere"], "offline demo"),
    "no synset folders": (lambda data, tmp: ["--data-dir", folder_without_synsets(tmp)], "synset"),
    "unknown model": (lambda data, tmp: ["--data-dir", data, "--model", "resnet_nonexistent"],
                      "unknown timm model"),
    "unknown method": (lambda data, tmp: ["--methods", "sparse", "int9"], "valid methods"),
    "unknown init": (lambda data, tmp: ["--init", "xavier"], "valid: paper_init"),
    "unknown preset": (lambda data, tmp: ["--preset", "fast"], "valid presets"),
    "bad block": (lambda data, tmp: ["--block", "4by4"], "HxW"),
    "rank negative": (lambda data, tmp: ["--ranks", "-1"], "at least 0 (0: no adapter)"),
    "rank too large": (lambda data, tmp: ["--data-dir", data, "--model", TINY_MODEL,
                                          "--ranks", "65"], "between 0 (no adapter) and 64"),
    "split sum": (lambda data, tmp: ["--split", "0.5", "0.3", "0.3"], "sum to 1"),
    "split empty": (lambda data, tmp: ["--data-dir", data, "--split", "0.98", "0.01", "0.01"],
                    "empty"),
    "zero trials": (lambda data, tmp: ["--trials", "0"], "--trials"),
    "negative epochs": (lambda data, tmp: ["--epochs", "-1"], "--epochs"),
    "infinite lr": (lambda data, tmp: ["--lr-range", "1e-4", "inf"], "--lr-range"),
    "nan temperature": (lambda data, tmp: ["--objective", "kd", "--kd-temperature", "nan"],
                        "temperature"),
    "unwritable output": (lambda data, tmp: ["--out", a_file(tmp) / "run"], "is a file"),
    "missing weights": (lambda data, tmp: ["--data-dir", data, "--model", TINY_MODEL,
                                           "--weights", tmp / "w.pth"], "weights"),
    "unknown flag": (lambda data, tmp: ["--colour", "blue"], "unrecognized arguments"),
    "21k head": (lambda data, tmp: ["--data-dir", data, "--model",
                                    "vit_base_patch16_224.augreg_in21k"], "21843 outputs"),
    "10-class head": (lambda data, tmp: ["--data-dir", data, "--model", "digits_vit"],
                      "10 outputs"),
    "random weights": (lambda data, tmp: ["--data-dir", data, "--model", TINY_MODEL,
                                          "--weights", random_bytes(tmp)], "weights"),
    "negative threads": (lambda data, tmp: ["--threads", "0"], "--threads"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gives_one_line_and_exit_code_2_and_writes_nothing(
    case, tmp_path, image_folder, capsys
):
    make_args, fragment = BAD_INPUT[case]
    results = tmp_path / "results"
    code, _, err = run_driver(capsys, *make_args(image_folder, tmp_path), "--results-dir", results)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0] and "Traceback" not in err
    assert not results.exists()


def test_packed_checkpoints_reproduce_the_recorded_accuracy_and_size(svd_run, shared_cache, capsys):
    out = run_folder(svd_run, "svd_init")
    frame = pd.read_csv(out / "evaluation.csv")
    ranked = frame[frame["lora_rank"].isin(["2", "4"])]
    # the model rebuilt from each file scores exactly what the trained one scored
    assert (ranked["file_evaluation"] == ranked["evaluation"]).all()
    for _, row in ranked.iterrows():
        path = out / "checkpoints" / f"quant={row['quant']}_r={row['lora_rank']}.safetensors"
        assert path.stat().st_size == row["file_bytes"]
        with open(path, "rb") as handle:
            container = 8 + int.from_bytes(handle.read(8), "little")
        counted = row["bits"]  # every stored bit: the bias too, counted in the ratios or not
        assert 0 <= (row["file_bytes"] - container) * 8 - counted < 8 * 4
        assert row["ratio_file"] == pytest.approx(4 * (64 * 1000 + 1000) / row["file_bytes"], 1e-5)

    from train_evaluate.evaluate import main as evaluate_main

    checkpoint = out / "checkpoints" / "quant=int1_r=4.safetensors"
    merged = svd_run / "merged.safetensors"
    cache = ["--cache-dir", str(shared_cache)]
    assert evaluate_main(["--checkpoint", str(checkpoint), "--merge", str(merged), *cache]) == 0
    printed = capsys.readouterr().out
    assert "reproduced exactly" in printed and "gives up the compression" in printed
    assert merged.stat().st_size > checkpoint.stat().st_size

    broken = svd_run / "broken.safetensors"
    broken.write_bytes(checkpoint.read_bytes()[:-50])
    assert evaluate_main(["--checkpoint", str(broken), *cache]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "safetensors header" in lines[0]


def test_a_rerun_replaces_a_ranks_files_and_evaluate_refuses_a_foreign_split(
    tmp_path, image_folder, tiny_weights, shared_cache, capsys
):
    from train_evaluate.evaluate import main as evaluate_main

    common = ["--methods", "int1", "--ranks", "2", "--trials", "1", "--epochs", "1",
              "--init", "svd_init"]  # fmt: skip
    args = tiny_args(image_folder, tiny_weights, tmp_path, shared_cache, *common)
    assert run_driver(capsys, *args)[0] == 0
    out = run_folder(tmp_path, "svd_init")
    checkpoint = out / "checkpoints" / "quant=int1_r=2.safetensors"
    assert checkpoint.exists() and (out / "acc_quant=int1_r=2.png").exists()
    # the same folder again (replaced), another split, and a search where every trial diverges
    code, _, _ = run_driver(
        capsys, *args, "--seed", "1", "--lr-range", "1e25", "1e30", "--overwrite"
    )
    assert code == 0
    assert pd.read_csv(out / "evaluation.csv")["status"].iloc[-1] == "no_complete_trial"
    assert not checkpoint.exists() and not (out / "acc_quant=int1_r=2.png").exists()

    # a checkpoint kept from the first run is not scored against the second run's split
    assert run_driver(capsys, *args, "--overwrite")[0] == 0
    kept = tmp_path / "kept.safetensors"
    kept.write_bytes(checkpoint.read_bytes())
    assert run_driver(capsys, *args, "--seed", "1", "--overwrite")[0] == 0
    foreign = out / "checkpoints" / "foreign.safetensors"
    foreign.write_bytes(kept.read_bytes())
    code = evaluate_main(["--checkpoint", str(foreign), "--cache-dir", str(shared_cache)])
    assert code == 2
    assert "not the test split this checkpoint was scored on" in capsys.readouterr().err
