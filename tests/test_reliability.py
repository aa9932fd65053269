"""Reliability: a run killed with SIGKILL resumes to the uninterrupted result, Ctrl-C stops
cleanly, diverging trials do not stop the sweep, unreadable images are counted."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from tests.conftest import REPO, SYNSETS, run_driver, run_folder
from tests.test_driver import tiny_args
from train_evaluate.outputs.report import TIMING_COLUMNS

DRIVER = REPO / "train_evaluate" / "train_model.py"
# The demo: a real digits classifier, so every hyper-parameter changes the numbers.
TRIALS = 4  # per rank; 4 ranks
DEMO = ["--init", "svd_init", "--methods", "sparse", "int1", "--ranks", "2", "4",
        "--trials", str(TRIALS), "--epochs", "3"]  # fmt: skip


def finished_trials(database: Path) -> int:
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as connection:
            query = "SELECT COUNT(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')"
            return connection.execute(query).fetchone()[0]
    except sqlite3.Error:  # not created yet, or busy
        return 0


def start(args: list) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(DRIVER), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_after_trials(process: subprocess.Popen, database: Path, count: int, sig: int):
    """Send ``sig`` once ``count`` trials have finished; returns (code, stdout, stderr)."""
    deadline = time.monotonic() + 240
    while finished_trials(database) < count:
        assert process.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)
    process.send_signal(sig)
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def test_a_killed_run_resumes_to_the_uninterrupted_csv(tmp_path, demo_cache, capsys):
    reference = tmp_path / "reference"
    code, _, _ = run_driver(capsys, *DEMO, "--out", reference, "--cache-dir", demo_cache)
    assert code == 0

    resumed = tmp_path / "resumed"
    args = [*DEMO, "--out", resumed, "--cache-dir", demo_cache]
    # 6 of 16 trials: the first rank is done, the second is part-way through its study
    stop_at = TRIALS + 2
    code, _, _ = stop_after_trials(start(args), resumed / "optuna.sqlite3", stop_at, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (resumed / "evaluation.csv").exists()
    finished_before = finished_trials(resumed / "optuna.sqlite3")
    assert stop_at <= finished_before < 4 * TRIALS

    code, out, _ = run_driver(capsys, *args)
    assert code == 0
    assert "finished already (an earlier run, or another worker); reusing its" in out  # sparse r=2
    assert "reusing the feature cache" in out
    assert finished_trials(resumed / "optuna.sqlite3") == 4 * TRIALS  # none was run twice
    expected = pd.read_csv(reference / "evaluation.csv").drop(columns=TIMING_COLUMNS)
    actual = pd.read_csv(resumed / "evaluation.csv").drop(columns=TIMING_COLUMNS)
    pd.testing.assert_frame_equal(actual, expected)


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path, demo_cache):
    out = tmp_path / "run"
    process = start([*DEMO, "--out", out, "--cache-dir", demo_cache])
    code, _, err = stop_after_trials(process, out / "optuna.sqlite3", 1, signal.SIGINT)
    assert code == 130, err[-3000:]
    assert "rerun the same command to resume" in err
    assert "Traceback" not in err


def test_diverging_trials_are_marked_and_the_sweep_completes(tmp_path, demo_cache, capsys):
    # learning rates up to 1e30 make Adam's first steps overflow in about a third of the trials
    args = [*DEMO, "--lr-range", "1e-3", "1e30", "--out", tmp_path, "--cache-dir", demo_cache]
    code, _, _ = run_driver(capsys, *args)
    assert code == 0
    frame = pd.read_csv(tmp_path / "evaluation.csv")
    ranked = frame[frame["lora_rank"].isin(["2", "4"])]
    assert ranked["trials_diverged"].sum() > 0
    assert (
        ranked["trials_complete"] + ranked["trials_pruned"] + ranked["trials_diverged"] == TRIALS
    ).all()
    assert ranked["evaluation"].notna().all()


def test_a_rank_whose_trials_all_diverge_says_so_and_the_run_finishes(tmp_path, demo_cache, capsys):
    args = [*DEMO, "--lr-range", "1e25", "1e30", "--out", tmp_path, "--cache-dir", demo_cache]
    code, out, _ = run_driver(capsys, *args)
    assert code == 0
    frame = pd.read_csv(tmp_path / "evaluation.csv")
    ranked = frame[frame["lora_rank"].isin(["2", "4"])]
    assert len(ranked) == 4
    assert (ranked["status"] == "no_complete_trial").all()
    assert (ranked["trials_diverged"] == TRIALS).all()
    assert ranked["evaluation"].isna().all() and ranked["init_only"].notna().all()
    assert "no trial completed" in out


def test_a_corrupt_jpeg_is_skipped_counted_and_left_out_of_the_split(
    tmp_path, image_folder, tiny_weights, capsys
):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    corrupt = data / SYNSETS[0] / f"{SYNSETS[0]}_0.JPEG"
    corrupt.write_bytes(corrupt.read_bytes()[:50])  # a truncated download
    args = tiny_args(data, tiny_weights, tmp_path / "results", tmp_path / "cache")
    code, out, _ = run_driver(capsys, *args, "--ranks", "2", "--methods", "int1", "--epochs", "0")
    assert code == 0
    assert "1 unreadable images were skipped" in out
    results = run_folder(tmp_path / "results", "paper_init")
    run = json.loads((results / "run.json").read_text())
    assert run["skipped_images"] == 1 and run["images"] == 39
    assert run["skipped_image_ids"] == [f"{SYNSETS[0]}/{SYNSETS[0]}_0.JPEG"]
    ids = [line for path in (results / "split").glob("*.txt") for line in path.read_text().split()]
    assert len(ids) == 39 and f"{SYNSETS[0]}/{SYNSETS[0]}_0.JPEG" not in ids
