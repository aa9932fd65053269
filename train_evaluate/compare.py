"""Every run in a results folder side by side: ``summary.csv`` and ``summary.png``.

    python train_evaluate/compare.py [--results-dir results]

The driver writes this report after each run; this command rebuilds it on its own. A run is any
subfolder holding an ``evaluation.csv`` (``results/paper_init``, ``results/svd_init``, ...). The
figure shows test accuracy against rank for every (run, method), and accuracy against the
every-bit storage ratio with the Pareto front marked: the rows that no other row beats on both
accuracy and ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from train_evaluate.files import read_json, write_text
from train_evaluate.report import save_figure

DEFAULT_RESULTS = Path(__file__).resolve().parents[1] / "results"


def collect_runs(results_dir: Path) -> pd.DataFrame:
    """All runs' evaluation rows, each with its run folder, data and model."""
    frames = []
    for csv in sorted(Path(results_dir).glob("*/evaluation.csv")):
        frame = pd.read_csv(csv)
        info = read_json(csv.parent / "run.json") or {}
        frame.insert(0, "run", csv.parent.name)
        frame.insert(1, "data", info.get("data"))
        frame.insert(2, "model", info.get("model"))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def pareto_front(accuracy: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """True where no other point has accuracy >= and ratio >= with one of them strictly."""
    accuracy, ratio = np.asarray(accuracy, float), np.asarray(ratio, float)
    valid = np.isfinite(accuracy) & np.isfinite(ratio)
    front = np.zeros(len(accuracy), dtype=bool)
    for i in np.flatnonzero(valid):
        at_least = valid & (accuracy >= accuracy[i]) & (ratio >= ratio[i])
        strictly = (accuracy > accuracy[i]) | (ratio > ratio[i])
        front[i] = not (at_least & strictly).any()
    return front


def with_pareto(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame["pareto"] = pareto_front(frame["evaluation"], frame["ratio"])
    return frame


def plot_comparison(frame: pd.DataFrame) -> Figure:
    figure = Figure(figsize=(13, 5))
    by_rank, by_ratio = figure.subplots(1, 2)
    ranked = frame[pd.to_numeric(frame["lora_rank"], errors="coerce").notna()]
    original = frame.loc[frame["lora_rank"].astype(str) == "original", "evaluation"]
    for axes in (by_rank, by_ratio):
        if len(original):
            axes.axhline(original.max(), color="black", linestyle="--", label="original")
    groups = list(ranked.groupby(["run", "quant"], sort=False))
    for index, ((run, method), rows) in enumerate(groups):
        style = dict(color=f"C{index % 10}", marker="os^Dv<>ph*"[index % 10])
        ranks = rows["lora_rank"].astype(int)
        spread = None
        if rows["ci95_low"].notna().any():  # several final seeds: 95% intervals
            spread = [rows["evaluation"] - rows["ci95_low"], rows["ci95_high"] - rows["evaluation"]]
        by_rank.errorbar(
            ranks, rows["evaluation"], yerr=spread, capsize=3, label=f"{run}: {method}", **style
        )
        by_ratio.scatter(rows["ratio"], rows["evaluation"], label=f"{run}: {method}", **style)
    compressed = frame[frame["lora_rank"].astype(str) == "quantized"]
    if len(compressed):
        by_ratio.scatter(
            compressed["ratio"], compressed["evaluation"], color="grey", marker="x",
            label="compressed only",
        )  # fmt: skip
    front = frame[frame["pareto"]].sort_values("ratio")
    by_ratio.step(front["ratio"], front["evaluation"], where="post", color="black", alpha=0.5,
                  label="Pareto front")  # fmt: skip
    by_ratio.scatter(front["ratio"], front["evaluation"], s=120, facecolors="none",
                     edgecolors="black")  # fmt: skip
    if len(ranked):
        by_rank.set_xscale("log", base=2)
        ticks = sorted(ranked["lora_rank"].astype(int).unique())
        by_rank.set_xticks(ticks, [str(t) for t in ticks])
    by_ratio.set_xscale("log")
    by_rank.set(xlabel="LoRA rank", ylabel="test top-1 accuracy (%)", title="accuracy vs rank")
    by_ratio.set(
        xlabel="storage ratio of the FC, every bit (log)",
        ylabel="test top-1 accuracy (%)",
        title="accuracy vs compression (circled: Pareto front)",
    )
    by_rank.legend(fontsize=7)
    by_ratio.legend(fontsize=7)
    sources = frame[["data", "model"]].drop_duplicates().dropna()
    if len(sources) > 1:
        figure.suptitle("warning: these runs used different data or models", color="red")
    return figure


def write_report(results_dir: Path) -> tuple[Path, Path] | None:
    """Write ``summary.csv`` and ``summary.png`` in ``results_dir``; None if it holds no run."""
    frame = collect_runs(results_dir)
    if frame.empty:
        return None
    frame = with_pareto(frame)
    csv, png = Path(results_dir) / "summary.csv", Path(results_dir) / "summary.png"
    write_text(csv, frame.to_csv(index=False, float_format="%.6g"))
    save_figure(plot_comparison(frame), png)
    return csv, png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    written = write_report(args.results_dir)
    if written is None:
        print(
            f"error: no run (a folder with evaluation.csv) in {args.results_dir}", file=sys.stderr
        )
        return 2
    print(f"wrote {written[0]} and {written[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
