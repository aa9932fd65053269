"""Every run under a results folder side by side: ``summary.csv`` and one
``summary_<model>_<data>.png`` per (model, data).

The driver writes this report after each run; ``python train_evaluate/compare.py`` rebuilds it
on its own. A run is a
folder under ``--results-dir`` (at any depth; the driver's are ``<model>/<data>/<init>``) that
this tool wrote: a ``run.json`` of its format beside an ``evaluation.csv``. Anything else, or an
``evaluation.csv`` that cannot be read as one, is left out with a warning.

Runs are compared only with runs of the same model (and weights) on the same data: each such
group gets its own figure, its own ``original`` line and its own Pareto front (the rows that no
other row of the group beats on both accuracy and the every-bit storage ratio). The accuracy
compared is that of the model rebuilt from the packed file (``file_evaluation``) wherever there
is one: with fp16/bf16 adapters that is the model whose size ``ratio`` counts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from train_evaluate.outputs.figures import (
    dodge,
    interval_bars,
    outside_legend,
    rank_ticks,
    save_figure,
    series_style,
)
from train_evaluate.outputs.report import COLUMNS, wilson_interval
from train_evaluate.outputs.run_folder import FORMAT, folder_name
from train_evaluate.runtime.files import read_json, write_text

log = logging.getLogger(__name__)

# What a row needs to be placed in the summary at all.
REQUIRED = ("quant", "lora_rank", "evaluation", "ratio")
# Columns that come before the evaluation.csv columns in summary.csv (then ``group``).
RUN_COLUMNS = ["run", "model", "data", "data_fingerprint", "weights"]


def find_runs(results_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(folder, run.json) of every run folder of this tool under ``results_dir``, in path order.
    Symbolic links are not followed: a link to another results folder would count runs twice."""
    found = []
    for folder, subfolders, files in os.walk(results_dir):
        subfolders.sort()
        if "run.json" not in files or "evaluation.csv" not in files:
            continue
        info = read_json(Path(folder) / "run.json")
        if not (
            isinstance(info, dict)
            and info.get("format") == FORMAT
            and isinstance(info.get("config"), dict)
        ):
            log.warning("%s: not a run of this tool (no run.json of its format); left out", folder)
            continue
        problem = config_problem(info["config"])
        if problem is not None:
            log.warning("%s: run.json %s; left out of the summary", folder, problem)
            continue
        found.append((Path(folder), info))
    return sorted(found, key=lambda run: run[0])


def config_problem(config: dict[str, Any]) -> str | None:
    """Why a run.json's config cannot place its run in a group, or None. The group's name and
    key come from these fields: a list there fails inside pandas (and takes every other run's
    summary with it), and a missing one would name a figure ``summary_None_None.png``."""
    for key in ("model", "data"):
        value = config.get(key)
        if not (isinstance(value, str) and value):
            return f"config has no {key} name (it holds {value!r})"
    weights = config.get("weights")
    if weights is not None and not isinstance(weights, str):
        return f"config's weights {weights!r} is not an id string"
    return None


def read_evaluation(csv: Path) -> pd.DataFrame | None:
    """A run's evaluation.csv, or None (with a warning) if it is not one: empty, not CSV, or
    without the columns a summary row needs."""
    try:
        frame = pd.read_csv(csv)
    except (OSError, ValueError, UnicodeDecodeError) as error:  # pandas' errors are ValueErrors
        log.warning("%s cannot be read (%s); left out of the summary", csv, error)
        return None
    missing = [c for c in REQUIRED if c not in frame]
    if missing or frame.empty:
        log.warning("%s is not an evaluation.csv of this tool; left out of the summary", csv)
        return None
    for column in COLUMNS:  # columns added since the run was written stay empty
        if column not in frame:
            frame[column] = np.nan
    frame["lora_rank"] = frame["lora_rank"].astype(str)
    return frame


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "unnamed"


def describe_run(results_dir: Path, folder: Path, info: dict[str, Any]) -> dict[str, Any]:
    """The run columns of one run folder. The data's short name is the driver's folder name
    (``<model>/<data>/<init>``) when the run sits in that layout, else its fingerprint."""
    config = info["config"]
    parts = folder.relative_to(results_dir).parts
    model, fingerprint = str(config.get("model")), str(config.get("data"))
    layout = len(parts) >= 3 and parts[-3] == folder_name(model)
    return {
        "run": "/".join(parts) or ".",
        "model": model,
        "data": parts[-2] if layout else fingerprint[:12],
        "data_fingerprint": fingerprint,
        "weights": config.get("weights"),
    }


def collect_runs(results_dir: Path) -> pd.DataFrame:
    """Every run's evaluation rows, each with its run folder, model, data and group."""
    results_dir = Path(results_dir)
    frames = []
    for folder, info in find_runs(results_dir):
        frame = read_evaluation(folder / "evaluation.csv")
        if frame is None:
            continue
        run = describe_run(results_dir, folder, info)
        for position, column in enumerate(RUN_COLUMNS):
            frame.insert(position, column, run[column])
        frames.append(frame)
    if not frames:
        return pd.DataFrame()
    frame = pd.concat(frames, ignore_index=True)
    frame.insert(len(RUN_COLUMNS), "group", group_names(frame))
    return frame


def group_names(frame: pd.DataFrame) -> pd.Series:
    """``summary_<model>_<data>`` per row; where two groups (other weights, or other data under
    the same folder name) would share a name, a short hash of their identity is added."""
    keys = list(
        zip(frame["model"], frame["weights"], frame["data_fingerprint"], frame["data"], strict=True)
    )
    plain = {key: f"summary_{slug(key[0])}_{slug(key[3])}" for key in keys}
    taken: dict[str, set] = {}
    for key, name in plain.items():
        taken.setdefault(name, set()).add(key[:3])
    names = {}
    for key, name in plain.items():
        if len(taken[name]) > 1:
            name += "_" + hashlib.sha256(repr(key[:3]).encode()).hexdigest()[:8]
        names[key] = name
    return pd.Series([names[key] for key in keys], index=frame.index)


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


def with_accuracy(frame: pd.DataFrame) -> pd.DataFrame:
    """``accuracy``: the packed file's test top-1 where there is one, else ``evaluation``;
    ``accuracy_from`` says which, and ``accuracy_ci95_low/high`` is its Wilson interval over the
    test images (the run's own ``ci95_test_*`` for ``evaluation``; for the file, from its count,
    whole since the file holds one model)."""
    frame = frame.copy()
    file_acc = pd.to_numeric(frame["file_evaluation"], errors="coerce")
    from_file = file_acc.notna()
    frame["accuracy"] = file_acc.where(from_file, pd.to_numeric(frame["evaluation"], "coerce"))
    frame["accuracy_from"] = np.where(from_file, "file_evaluation", "evaluation")
    frame["accuracy_ci95_low"] = pd.to_numeric(frame["ci95_test_low"], errors="coerce")
    frame["accuracy_ci95_high"] = pd.to_numeric(frame["ci95_test_high"], errors="coerce")
    images = pd.to_numeric(frame["test_images"], errors="coerce")
    for index in frame.index[from_file & images.notna()]:
        n = int(images[index])
        low, high = wilson_interval(round(file_acc[index] * n / 100), n)
        frame.loc[index, ["accuracy_ci95_low", "accuracy_ci95_high"]] = [low, high]
    return frame


def with_pareto(frame: pd.DataFrame) -> pd.DataFrame:
    """``pareto``: on the front of its own (model, data) group, on ``accuracy`` and ``ratio``."""
    frame = frame.copy()
    frame["pareto"] = False
    # an FC run's ratio covers the FC, a whole-network run's every selected layer: one front each
    keys = ["group", "layers"] if "layers" in frame else ["group"]
    for _, rows in frame.groupby(keys, sort=False, dropna=False):
        front = pareto_front(rows["accuracy"], pd.to_numeric(rows["ratio"], errors="coerce"))
        frame.loc[rows.index, "pareto"] = front
    return frame


def series_labels(runs: list[str]) -> dict[str, str]:
    """Run names without the folders every run of the group shares (``<model>/<data>/``)."""
    split = [run.split("/") for run in runs]
    shared = 0
    while all(len(parts) > shared + 1 for parts in split) and len({p[shared] for p in split}) == 1:
        shared += 1
    return {run: "/".join(parts[shared:]) for run, parts in zip(runs, split, strict=True)}


def plot_group(rows: pd.DataFrame, title: str) -> Figure:
    """One (model, data) group: accuracy against rank, and against the every-bit ratio with the
    group's Pareto front; 95% Wilson error bars over the test images on every point."""
    figure = Figure(figsize=(13, 5), layout="constrained")
    by_rank, by_ratio = figure.subplots(1, 2)
    legend = []  # one entry per series, in drawing order
    ranked = rows[pd.to_numeric(rows["lora_rank"], errors="coerce").notna()]
    labels = series_labels(list(dict.fromkeys(rows["run"])))
    # runs on the same test split share one original; runs with another split (seed) get theirs
    originals = rows[rows["lora_rank"] == "original"].drop_duplicates("accuracy")
    for index, (_, original) in enumerate(originals.iterrows()):
        label = "original" if len(originals) == 1 else f"original ({labels[original['run']]})"
        style = dict(color="black", linestyle=("--", ":", "-.")[index % 3])
        legend.append(by_rank.axhline(original["accuracy"], label=label, **style))
        by_ratio.axhline(original["accuracy"], **style)
    series = list(ranked.groupby(["run", "quant"], sort=False))
    # where each row is drawn on the ratio axis: runs of one method share their ratios, so each
    # series is spread a little apart, as on the rank axis (the Pareto circles follow)
    at = pd.to_numeric(rows["ratio"], errors="coerce").astype(float)
    for index, ((run, method), _) in enumerate(series):
        mine = (rows["run"] == run) & (rows["quant"] == method) & (rows["lora_rank"] != "original")
        at[mine] = dodge(at[mine].to_numpy(), index, len(series))
    for index, ((run, method), part) in enumerate(series):
        style = series_style(index)
        bars = interval_bars(part, "accuracy", "accuracy_ci95_low", "accuracy_ci95_high")
        ranks = dodge(part["lora_rank"].astype(int).to_numpy(), index, len(series))
        legend.append(
            by_rank.errorbar(ranks, part["accuracy"], yerr=bars, capsize=3,
                             label=f"{labels[run]}: {method}", **style)
        )  # fmt: skip
        by_ratio.errorbar(at[part.index], part["accuracy"], yerr=bars, capsize=3, linestyle="none",
                          **style)  # fmt: skip
        level = rows[(rows["run"] == run) & (rows["quant"] == method)]
        level = level[level["lora_rank"] == "quantized"]
        if len(level):  # the compressed layer alone: an x in the series' colour
            by_ratio.errorbar(
                at[level.index], level["accuracy"],
                yerr=interval_bars(level, "accuracy", "accuracy_ci95_low", "accuracy_ci95_high"),
                capsize=2, marker="x", markersize=8, linestyle="none", color=style["color"],
            )  # fmt: skip
    if series:
        (compressed,) = by_ratio.plot([], [], marker="x", linestyle="none", color="grey")
        compressed.set_label("compressed only (right; series colour)")
        legend.append(compressed)
    front = rows[rows["pareto"]].sort_values("ratio")
    by_ratio.step(at[front.index], front["accuracy"], where="post", color="black", alpha=0.5)
    legend.append(
        by_ratio.scatter(at[front.index], front["accuracy"], s=140, facecolors="none",
                         edgecolors="black", label="Pareto front of this group (right)")
    )  # fmt: skip
    if len(ranked):
        rank_ticks(by_rank, ranked["lora_rank"])
    by_ratio.set_xscale("log")
    # plain numbers at 1, 2, 5, 10, ...: a span under a decade otherwise gets long "3x10^0"
    # labels on its minor ticks, which run into each other
    by_ratio.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    by_ratio.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    by_ratio.xaxis.set_minor_formatter(NullFormatter())
    ylabel = "test top-1 accuracy (%)"
    if (rows["accuracy_from"] == "file_evaluation").any():
        ylabel += "\nof the model rebuilt from its packed file"
    by_rank.set(xlabel="LoRA rank", ylabel=ylabel, title="accuracy vs rank")
    by_ratio.set(
        xlabel="storage ratio of the FC, every bit (log; series spread slightly apart)",
        ylabel=ylabel,
        title="accuracy vs compression (circled: Pareto front)",
    )
    figure.suptitle(title)
    outside_legend(figure, legend)
    return figure


def group_figures(frame: pd.DataFrame) -> dict[str, Figure]:
    """One figure per (model, weights, data) group, by the group's name, from its rows only."""
    figures = {}
    for name, rows in frame.groupby("group", sort=True):
        # not run.json's description of the data: the driver writes it only when the run ends,
        # after this report, so the report would depend on when it was made
        figures[name] = plot_group(rows, f"{rows['model'].iloc[0]} on {rows['data'].iloc[0]}")
    return figures


def write_report(results_dir: Path) -> tuple[Path, list[Path]] | None:
    """Write ``summary.csv`` and one ``summary_<model>_<data>.png`` per group in
    ``results_dir``; None if it holds no run. Figures of groups no longer there are removed."""
    results_dir = Path(results_dir)
    frame = collect_runs(results_dir)
    if frame.empty:
        return None
    frame = with_pareto(with_accuracy(frame))
    csv = results_dir / "summary.csv"
    write_text(csv, frame.to_csv(index=False, float_format="%.6g"))
    figures = []
    for name, figure in group_figures(frame).items():
        save_figure(figure, results_dir / f"{name}.png")
        figures.append(results_dir / f"{name}.png")
    # A figure of a group whose runs are gone (or the one summary.png of older versions) would
    # be taken for a current one.
    for old in [*results_dir.glob("summary_*.png"), results_dir / "summary.png"]:
        if old not in figures:
            old.unlink(missing_ok=True)
    return csv, figures
