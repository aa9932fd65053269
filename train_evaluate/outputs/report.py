"""Everything a run writes into its results folder, and nothing else.

Per rank (names as in the original study): ``acc_quant=<m>_r=<r>.png``,
``loss_quant=<m>_r=<r>.png``, ``quant=<m>_r=<r>_optimization_history.html``,
``quant=<m>_r=<r>_param_importances.html`` and a checkpoint
``checkpoints/quant=<m>_r=<r>.safetensors`` (packed, see checkpoint.py). Per run:
``evaluation.csv``, ``accuracy_vs_rank.png`` and the ``plotly.min.js`` the pages load. Every
file is written atomically (temp file + rename).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import plotly.offline
from scipy import stats
from torch import nn

from compression import StorageCost
from train_evaluate.outputs.accounting import Accounting
from train_evaluate.outputs.checkpoint import write_packed
from train_evaluate.outputs.figures import plot_epochs, save_figure
from train_evaluate.runtime.files import atomic_path, write_text

log = logging.getLogger(__name__)

# evaluation.csv: the original study's three columns first, then ours (README explains each).
COLUMNS = [
    "quant",
    "lora_rank",
    "evaluation",
    "init",
    "init_only",
    "base_only",
    "drop",
    "top5",
    "test_images",
    "ci95_test_low",
    "ci95_test_high",
    "final_seeds",
    "evaluation_std",
    "ci95_low",
    "ci95_high",
    "ratio",
    "ratio_seed",
    "ratio_model",
    "compute_ratio",
    "bits",
    "bits_per_weight",
    "model_bits_per_weight",
    "layers",
    "file_bytes",
    "ratio_file",
    "file_evaluation",
    "best_val_acc",
    "best_epoch",
    "best_epochs",
    "optimizer",
    "lr",
    "batch_size",
    "lora_alpha",
    "status",
    "trials_complete",
    "trials_pruned",
    "trials_diverged",
    "compression",
    "objective",
    "dora",
    "bias_counted",
    "seed",
    "seconds",
]
TIMING_COLUMNS = ["seconds"]
# Two-sided 95% normal quantile, for the Wilson score interval.
Z95 = float(stats.norm.ppf(0.975))
PLOTLY_BUNDLE = "plotly.min.js"


def wilson_interval(correct: float | None, n: int | None) -> tuple[float | None, float | None]:
    """95% Wilson score interval (%, low and high) of a proportion of ``correct`` out of ``n``
    test images: the uncertainty from having sampled these n images, not from training seeds.
    Unlike p +- z sqrt(p(1-p)/n) it stays inside [0, 100] and is not empty at 0 or n correct.
    ``correct`` may be a mean over seeds (fractional)."""
    if correct is None or n is None or not n or math.isnan(correct):
        return None, None
    p, z2 = correct / n, Z95**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # the bounds always hold p; min / max keep that true in floating point too (at k = n the
    # sum comes out a rounding error below 1)
    return 100 * max(0.0, min(p, centre - half)), 100 * min(1.0, max(p, centre + half))


def test_interval_columns(correct: float | None, n: int | None) -> dict[str, Any]:
    low, high = wilson_interval(correct, n)
    return {"test_images": n, "ci95_test_low": low, "ci95_test_high": high}


def stem(method: str, rank: int) -> str:
    return f"quant={method}_r={rank}"


def checkpoint_path(out: Path, method: str, rank: int) -> Path:
    return out / "checkpoints" / f"{stem(method, rank)}.safetensors"


def rank_artifacts(out: Path, method: str, rank: int) -> list[Path]:
    name = stem(method, rank)
    return [
        out / f"acc_{name}.png",
        out / f"loss_{name}.png",
        out / f"{name}_optimization_history.html",
        out / f"{name}_param_importances.html",
        checkpoint_path(out, method, rank),
        plan_path(out, method, rank),
    ]


def plan_path(out: Path, method: str, rank: int) -> Path:
    """Where a rank's layer plan is written (``--layer-plan`` reads it back)."""
    return out / "plans" / f"{stem(method, rank)}.json"


def write_plan(target: Path, layer_plan: dict[str, Any]) -> None:
    """A model's layer plan (``LayerPlan.to_json``) as ``--layer-plan`` reads it, its layers in
    the model's order (``write_json`` would sort them)."""
    write_text(target, json.dumps(layer_plan, indent=2) + "\n")


@functools.cache
def plotly_bundle() -> tuple[bytes, str]:
    """plotly's own bundled plotly.min.js (the bytes plotly itself would write) and its SHA-256."""
    content = plotly.offline.get_plotlyjs().encode("utf-8")
    return content, hashlib.sha256(content).hexdigest()


def write_plotly_bundle(folder: Path) -> Path:
    """``folder/plotly.min.js``, which the Optuna pages load (so they open offline), whole.

    Plotly writes it itself only when it is absent, and not atomically: a copy cut short by a
    full disk or a kill would stay forever. So it is written here through ``atomic_path``, and
    an existing one is kept only when its size and SHA-256 are the bundled file's."""
    target = Path(folder) / PLOTLY_BUNDLE
    content, digest = plotly_bundle()
    try:
        # the size first (a cut copy is shorter), then the bytes
        same_size = target.stat().st_size == len(content)
        if same_size and hashlib.sha256(target.read_bytes()).hexdigest() == digest:
            return target
    except OSError:  # missing or unreadable: write it
        pass
    with atomic_path(target) as path:
        path.write_bytes(content)
    return target


def repair_plotly_bundle(folder: Path) -> None:
    """Check the bundle of a run folder that holds pages: a rerun that reuses every rank writes
    no page, and would otherwise leave a damaged bundle in place."""
    if any(Path(folder).glob("*.html")):
        write_plotly_bundle(folder)


def run_title(info: dict[str, Any], init: str) -> str:
    """``<model>, <init>`` (and the demo flag): what a figure belongs to, for figures that leave
    the folder they were written in."""
    return f"{info.get('model')}, {init}" + (" (digits demo)" if info.get("demo") else "")


def write_optuna_pages(
    out: Path, study: optuna.Study, method: str, rank: int, title: str, seed: int
) -> None:
    """The study's optimization history and, from 2 completed trials on, its parameter
    importances (fANOVA, seeded: the same study gives the same importances)."""
    name = stem(method, rank)
    label = "val top-1 (%)"  # what every trial's value is (its best val accuracy)
    pages = {
        "optimization_history": optuna.visualization.plot_optimization_history(
            study, target_name=label
        ),
    }
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) >= 2:
        try:
            pages["param_importances"] = optuna.visualization.plot_param_importances(
                study,
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed),
                target_name=label,
            )
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            # e.g. every completed trial with the same value: there is nothing to attribute
            log.info("%s: no parameter-importance page (%s)", name, error)
    write_plotly_bundle(out)
    for kind, figure in pages.items():
        words = kind.replace("_", " ").capitalize()
        figure.update_layout(title=f"{words}: quant={method}, rank={rank}; {title}")
        if kind == "param_importances":
            figure.update_xaxes(title_text=f"importance for {label} (fANOVA)")
        with atomic_path(out / f"{name}_{kind}.html") as path:
            # a script tag naming plotly.min.js beside the page; the bundle is ours (above)
            figure.write_html(path, include_plotlyjs=PLOTLY_BUNDLE)


def write_rank_artifacts(
    out: Path,
    record: dict[str, Any],
    layers: Mapping[str, nn.Module] | None,
    study: optuna.Study | None,
    adapter_dtype: str | Mapping[str, str],
    checkpoint_info: dict[str, Any],
) -> Path | None:
    """The per-rank files: curves, Optuna pages, the layer plan and the packed checkpoint of
    ``layers`` (the final model's adapted layers by module name, each adapter stored as
    ``adapter_dtype`` says: one dtype, or module name -> dtype), whatever the rank produced.
    Returns the checkpoint's path, if one was written. Figures are titled with the model
    (``checkpoint_info["model"]``) and the init, as well as the method and rank."""
    method, rank = record["method"], record["rank"]
    name = stem(method, rank)
    title = run_title(checkpoint_info, record["init"])
    # A rerun replaces the rank's files; what it does not produce this time (no final model,
    # no study) must not stay behind from an earlier run, with another split or settings.
    for old in rank_artifacts(out, method, rank):
        old.unlink(missing_ok=True)
    if "layer_plan" in checkpoint_info:
        write_plan(plan_path(out, method, rank), checkpoint_info["layer_plan"])
    if record["finals"]:
        for metric, word in (("acc", "Accuracy"), ("loss", "Loss")):
            figure = plot_epochs(
                record["finals"], metric, f"{word}, quant={method}, rank={rank}\n{title}"
            )
            save_figure(figure, out / f"{metric}_{name}.png")
    if study is not None and study.get_trials(deepcopy=False):
        write_optuna_pages(out, study, method, rank, title, record["seed"])
    if layers is None:
        return None
    metrics = {k: record.get(k) for k in ("status", "test_acc", "objective", "seed")}
    metrics["init_only_test_acc"] = record["init_only"]["test_acc"]
    # the accuracy of the model the file holds: the first final model, or the init itself
    # when the rank was not trained (--epochs 0), so that evaluate can check either
    metrics["this_model_test_acc"] = record["init_only"]["test_acc"]
    if record["finals"]:
        first = record["finals"][0]
        metrics.update(
            this_model_test_acc=first["test_acc"],
            best_epoch=first["best_epoch"],
            best_val_acc=first["best_val_acc"],
            train_seed=first["seed"],
        )
    info = {**checkpoint_info, "init": record["init"], "metrics": metrics}
    path = checkpoint_path(out, method, rank)
    write_packed(path, layers, adapter_dtype, info)
    return path


def level_row(metrics: dict[str, float]) -> dict[str, Any]:
    """The accuracy columns of an ``original`` or ``quantized`` row, from ``evaluate``'s
    metrics of that layer on the test split."""
    return {
        "evaluation": metrics["acc"],
        "top5": metrics["top5"],
        **test_interval_columns(metrics["correct"], metrics["n"]),
    }


def method_rows(
    shared: dict[str, Any],
    original: dict[str, float],
    compressed: dict[str, float],
    cost: StorageCost,
    records: Sequence[dict[str, Any]],
    accounting: Accounting,
) -> list[dict[str, Any]]:
    """The ``original`` and ``quantized`` rows of one method, then one row per rank record.

    shared: the columns every row of the method carries (quant, init, seed, compression);
    original, compressed: ``training.evaluate`` of the uncompressed and of the compressed layer
    on the test split (top-1, top-5 and the counts behind them)."""
    rows = []
    original_acc = original["acc"]
    for lora_rank, level_cost, metrics in (
        ("original", accounting.original_cost(), original),
        ("quantized", cost, compressed),
    ):
        rows.append(
            {**shared, "status": "ok", "lora_rank": lora_rank, **level_row(metrics),
             "drop": original_acc - metrics["acc"], **accounting.columns(level_cost, 0)}
        )  # fmt: skip
    for record in records:
        rows.append(
            {
                **rank_row(record, original_acc, accounting.dense_bytes),
                **accounting.columns(cost, record["rank"]),
            }
        )
    return rows


def evaluation_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows))
    for column in COLUMNS:
        if column not in frame:
            frame[column] = None
    return frame[COLUMNS]


def seed_statistics(values: list[float]) -> dict[str, float]:
    """Mean, sample std and Student-t 95% interval of the final models' test accuracies."""
    count = len(values)
    mean = float(np.mean(values))
    if count < 2:
        return {"evaluation": mean, "evaluation_std": None, "ci95_low": None, "ci95_high": None}
    std = float(np.std(values, ddof=1))
    half = float(stats.t.ppf(0.975, count - 1)) * std / math.sqrt(count)
    return {"evaluation": mean, "evaluation_std": std, "ci95_low": mean - half,
            "ci95_high": mean + half}  # fmt: skip


def rank_test_columns(record: dict[str, Any]) -> dict[str, Any]:
    """top5, base_only and the Wilson interval of a rank's test top-1. With several final seeds,
    top5 and the count are their means (n is the same test split for every seed). Records
    written before these numbers existed give empty columns."""
    test = record.get("test") or {}
    n = test.get("images")
    finals = record["finals"]
    if finals:
        if all("test_correct" in f for f in finals):
            correct = float(np.mean([f["test_correct"] for f in finals]))
            top5 = float(np.mean([f["test_top5"] for f in finals]))
        else:
            correct = top5 = None
    elif record["status"] == "init_only":
        init = test.get("init_only") or {}
        correct, top5 = init.get("correct"), init.get("top5")
    else:  # no final model: no accuracy to put an interval on
        correct = top5 = None
    return {
        "top5": top5,
        "base_only": (test.get("base_only") or {}).get("acc"),
        **test_interval_columns(correct, n),
    }


def rank_row(record: dict[str, Any], original_acc: float, dense_bytes: int) -> dict[str, Any]:
    """One evaluation.csv row from a rank's record (accounting added by the caller).

    dense_bytes: the uncompressed selected layers' weights and existing biases at fp32, for
    ``ratio_file``."""
    finals = record["finals"]
    params = record.get("best_params") or {}
    if finals:
        row = seed_statistics([f["test_acc"] for f in finals])
        best_val = float(np.mean([f["best_val_acc"] for f in finals]))
        epochs = [f["best_epoch"] for f in finals]
    else:  # init only, or no final model
        row = {"evaluation": record["test_acc"]}
        best_val, epochs = record["init_only"]["val_acc"], [0]
    test_acc = row["evaluation"]
    return {
        **row,
        **rank_test_columns(record),
        "quant": record["method"],
        "lora_rank": record["rank"],
        "init": record["init"],
        "init_only": record["init_only"]["test_acc"],
        "drop": None if test_acc is None else original_acc - test_acc,
        "final_seeds": len(finals),
        "best_val_acc": best_val,
        "best_epoch": epochs[0],
        "best_epochs": ";".join(map(str, epochs)),
        "optimizer": params.get("optimizer"),
        "lr": params.get("lr"),
        "batch_size": params.get("batch_size"),
        "lora_alpha": params.get("lora_alpha"),
        "status": record["status"],
        "trials_complete": record.get("trials", {}).get("complete"),
        "trials_pruned": record.get("trials", {}).get("pruned"),
        "trials_diverged": record.get("trials", {}).get("diverged"),
        "compression": record["compression"],
        "objective": record.get("objective"),
        "dora": record.get("dora"),
        "seed": record["seed"],
        "seconds": round(record["seconds"], 3),
        **file_columns(record, dense_bytes),
    }


def file_columns(record: dict[str, Any], dense_bytes: int) -> dict[str, Any]:
    """Size of the packed checkpoint, its ratio to the fp32 selected layers (weights and the
    biases they have), and the test accuracy of the model rebuilt from it."""
    packed = record.get("file")
    if not packed:
        return {}
    return {
        "file_bytes": packed["bytes"],
        "ratio_file": dense_bytes / packed["bytes"],
        "file_evaluation": packed["test_acc"],
    }


def write_evaluation(out: Path, frame: pd.DataFrame) -> Path:
    target = out / "evaluation.csv"
    write_text(target, frame.to_csv(index=False, float_format="%.6g"))
    return target
