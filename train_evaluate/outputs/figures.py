"""The run's figures: each final model's curves per epoch and the summary of test accuracy
against rank (matplotlib Figure objects, no pyplot state), written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from train_evaluate.runtime.files import atomic_path

# One (colour, marker) per series, distinct for the first 100 series: the marker index steps
# once more every 10 series, so two series with the same colour never get the same marker.
COLOURS = [f"C{i}" for i in range(10)]
MARKERS = "osD^v<>ph*"


def series_style(index: int) -> dict[str, str]:
    return {"color": COLOURS[index % 10], "marker": MARKERS[(index + index // 10) % 10]}


def save_figure(figure: Figure, target: Path) -> None:
    # Figure objects, not pyplot: no GUI backend, no global state to close.
    with atomic_path(target) as path:
        figure.savefig(path, format="png", dpi=110, bbox_inches="tight")


def stack_histories(finals: list[dict[str, Any]], key: str) -> np.ndarray:
    """seeds x epochs, NaN-padded where a run stopped early (diverged)."""
    length = max(len(f["history"][key]) for f in finals)
    table = np.full((len(finals), length), np.nan)
    for row, final in enumerate(finals):
        values = final["history"][key]
        table[row, : len(values)] = values
    return table


def plot_epochs(finals: list[dict[str, Any]], metric: str, title: str) -> Figure:
    """Train and val ``metric`` per epoch (0 = the init) of the final model, the selected epoch
    marked; with several final seeds, their mean and a +-1 std band."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for split in ("train", "val"):
        table = stack_histories(finals, f"{split}_{metric}")
        if np.isnan(table).all():  # e.g. train accuracy when the train labels are hidden (kd)
            continue
        with np.errstate(all="ignore"):  # all-NaN columns after a diverged seed
            mean, std = np.nanmean(table, axis=0), np.nanstd(table, axis=0)
        epochs = np.arange(table.shape[1])
        label = split if len(finals) == 1 else f"{split} (mean of {len(finals)} seeds)"
        axes.plot(epochs, mean, marker="o", label=label)
        if len(finals) > 1:
            axes.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    best_epoch = finals[0]["best_epoch"]
    which = "selected" if len(finals) == 1 else "selected for seed 1"
    axes.axvline(best_epoch, color="grey", linestyle=":", label=f"{which} (epoch {best_epoch})")
    # epochs are whole numbers: with few of them matplotlib would tick 0.5, 1.5, ...
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch (0 = init, before training)")
    axes.set_ylabel("top-1 accuracy (%)" if metric == "acc" else "cross-entropy loss")
    axes.set_title(title)
    axes.legend()
    return figure


def interval_bars(rows: pd.DataFrame, value: str, low: str, high: str) -> np.ndarray | None:
    """``errorbar``'s yerr (2 x rows: below, above) from interval columns; None if all empty."""
    if low not in rows or not rows[low].notna().any():
        return None
    values = pd.to_numeric(rows[value], errors="coerce").to_numpy(float)
    below = values - pd.to_numeric(rows[low], errors="coerce").to_numpy(float)
    above = pd.to_numeric(rows[high], errors="coerce").to_numpy(float) - values
    # a bar never reaches negative length: rows written rounded (%.6g) may sit a hair outside
    return np.clip(np.nan_to_num(np.vstack([below, above])), 0, None)


def dodge(ranks: np.ndarray, index: int, count: int) -> np.ndarray:
    """Ranks shifted a little (on the log2 axis) per series, so that error bars of series at
    the same rank do not hide each other; all of them within 0.4 octave (x 1.32)."""
    step = min(0.06, 0.4 / max(count - 1, 1))
    return ranks * 2.0 ** (step * (index - (count - 1) / 2))


def rank_ticks(axes, ranks: pd.Series) -> None:
    ticks = sorted(ranks.astype(int).unique())
    if ticks[0] == 0:  # rank 0 (no adapter) has no place on a log axis: linear up to 1
        axes.set_xscale("symlog", base=2, linthresh=1, linscale=0.5)
    else:
        axes.set_xscale("log", base=2)
    axes.set_xticks(ticks, [str(t) for t in ticks])
    axes.minorticks_off()


def plot_summary(frame: pd.DataFrame, title: str) -> Figure:
    """Test accuracy vs rank per method, with 95% Wilson error bars (test sampling) and, with
    several final seeds, the seeds' 95% interval as a wide pale bar; the original and
    compressed-only levels as lines. ``title`` should name the model and the init."""
    figure = Figure(figsize=(8.5, 4.5), layout="constrained")
    axes = figure.subplots()
    legend = []  # in drawing order, method by method (matplotlib's own order groups by kind)
    ranked = frame[pd.to_numeric(frame["lora_rank"], errors="coerce").notna()]
    original = frame.loc[frame["lora_rank"] == "original", "evaluation"]
    if len(original):
        legend.append(
            axes.axhline(original.iloc[0], color="black", linestyle="--", label="original")
        )
    methods = list(ranked.groupby("quant", sort=False))
    for index, (method, rows) in enumerate(methods):
        style = series_style(index)
        ranks = dodge(rows["lora_rank"].astype(int).to_numpy(), index, len(methods))
        bars = interval_bars(rows, "evaluation", "ci95_test_low", "ci95_test_high")
        legend.append(
            axes.errorbar(ranks, rows["evaluation"], yerr=bars, capsize=3,
                          label=f"{method} + LoRA", **style)
        )  # fmt: skip
        seeds = interval_bars(rows, "evaluation", "ci95_low", "ci95_high")
        if seeds is not None:
            legend.append(
                axes.errorbar(ranks, rows["evaluation"], yerr=seeds, fmt="none", elinewidth=7,
                              alpha=0.25, color=style["color"],
                              label=f"{method}: 95% interval over final seeds")
            )  # fmt: skip
        if rows["init_only"].notna().any():
            (line,) = axes.plot(ranks, rows["init_only"], marker=".", linestyle=":",
                                color=style["color"], alpha=0.6,
                                label=f"{method} + LoRA init only")  # fmt: skip
            legend.append(line)
        level = frame.loc[(frame["quant"] == method) & (frame["lora_rank"] == "quantized")]
        if len(level):
            legend.append(
                axes.axhline(level["evaluation"].iloc[0], color=style["color"], linestyle="-.",
                             alpha=0.6, label=f"{method} compressed only")
            )  # fmt: skip
    if len(ranked):
        rank_ticks(axes, ranked["lora_rank"])
    axes.set_xlabel("LoRA rank")
    axes.set_ylabel("test top-1 accuracy (%)")
    axes.set_title(title)
    outside_legend(figure, legend)
    return figure


def outside_legend(figure, handles) -> None:
    """The legend outside the data area (inside, it hides points wherever it is placed), with
    what the error bars are."""
    figure.legend(
        handles=handles,
        loc="outside right upper",
        fontsize=8,
        title="error bars: 95% Wilson interval\nover the test images",
        title_fontsize=8,
    )
