"""``--search pareto``: one multi-objective Optuna study over compressor, rank and training.

Instead of one study per (method, rank), a single study asks for every parameter at once: the
method (one of ``--methods``, each with the options given on the command line: bits, block,
scale, quantizer), the rank (one of ``--ranks``) and the training settings of the usual search
space. Its two objectives are the val accuracy (maximised) and the stored bits of the
compressed layers with their adapters (minimised, the ``bits`` column, every bit counted).
The sampler is multi-objective TPE, seeded. Trials run one after another, so the same seed
gives the same study and the same front.

In whole-network mode a trial chooses one method and one rank for every selected layer (a
global choice; per-layer choices would multiply the search space by the number of layers,
far beyond a trial budget of tens).

The Pareto-optimal trials (no other trial has at least their val accuracy with at most their
bits, and is better in one; of trials with the same two values, the first) each get a final
model: trained again with the trial's own
parameters and seed, so it is the trial's model; then scored once on test, written as a packed
checkpoint and read back. Outputs: ``pareto.csv`` (one row per front trial), Optuna's
Pareto-front page and ``pareto.png`` (test accuracy against bits per weight, log x axis, with
the fp32 line and each method's compressed-only point).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from matplotlib.figure import Figure

from train_evaluate.runtime.files import atomic_path
from train_evaluate.training.training import derive_seed, evaluate

log = logging.getLogger(__name__)

STUDY = "pareto"
COLUMNS = (
    "trial", "quant", "compression", "lora_rank", "val_acc", "final_val_acc", "bits",
    "bits_per_weight", "ratio", "test_acc", "file", "file_bytes", "file_test_acc", "optimizer",
    "lr", "batch_size", "lora_alpha", "best_epoch", "seed",
)  # fmt: skip


@dataclass
class Candidate:
    """One method of the search: its compressor shared by every rank, how its rows are priced,
    and its compressed-only test accuracy (a reference point of the figure)."""

    method: Any
    accounting: Any
    compressed_acc: float


def non_dominated(points: list[tuple[float, float]]) -> list[bool]:
    """For (accuracy, bits) points: whether no other point has at least the accuracy with at
    most the bits and is strictly better in one."""

    def beats(other: tuple[float, float], point: tuple[float, float]) -> bool:
        (a, b), (acc, bits) = other, point
        return a >= acc and b <= bits and (a > acc or b < bits)

    return [not any(beats(other, point) for other in points) for point in points]


def run_search(
    candidates: dict[str, Candidate],
    ranks: list[int],
    splits: Any,
    sweep: Any,
    storage: Any,
    train_one,
    on_trial=lambda: None,
) -> optuna.Study:
    """The study, continued until ``sweep.trials`` trials have finished (a rerun resumes it)."""
    sampler = optuna.samplers.TPESampler(
        seed=derive_seed(sweep.seed, "pareto", "sampler"), n_startup_trials=5
    )
    study = optuna.create_study(
        storage=storage,
        study_name=STUDY,
        directions=["maximize", "minimize"],
        sampler=sampler,
        load_if_exists=True,
    )
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)  # a killed run's

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        name = trial.suggest_categorical("method", list(candidates))
        rank = trial.suggest_categorical("rank", list(ranks))
        params = sweep.space.suggest(trial)
        seed = derive_seed(sweep.seed, "pareto", "trial", trial.number)
        trial.set_user_attr("seed", seed)
        candidate = candidates[name]
        layer = candidate.method.adapted(rank, params["lora_alpha"], sweep, seed)
        data = splits.with_base(layer)
        result = train_one(layer, data, sweep.train_config(params, seed), curves=False)
        trial.set_user_attr("best_epoch", result.best_epoch)
        columns = candidate.accounting.columns(candidate.method.cost, rank)
        trial.set_user_attr("bits_per_weight", columns["bits_per_weight"])
        trial.set_user_attr("ratio", columns["ratio"])
        if result.diverged_at is not None:
            trial.set_user_attr("diverged_at_epoch", result.diverged_at)
            raise optuna.TrialPruned(f"loss diverged in epoch {result.diverged_at}")
        return result.best_val_acc, float(columns["bits"])

    def finished() -> int:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return len(study.get_trials(deepcopy=False, states=states))

    for _ in range(finished()):
        on_trial()
    while finished() < sweep.trials:
        study.optimize(objective, n_trials=1)
        on_trial()
    return study


def front(study: optuna.Study, trials: int) -> list[optuna.trial.FrozenTrial]:
    """The non-dominated completed trials among the first ``trials`` finished ones, by number;
    of trials with the very same (val accuracy, bits), the first only."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    counted = sorted(study.get_trials(deepcopy=False, states=states), key=lambda t: t.number)
    complete = [t for t in counted[:trials] if t.state == optuna.trial.TrialState.COMPLETE]
    firsts = list({(t.values[0], t.values[1]): t for t in reversed(complete)}.values())[::-1]
    keep = non_dominated([(t.values[0], t.values[1]) for t in firsts])
    return sorted((t for t, kept in zip(firsts, keep, strict=True) if kept), key=lambda t: t.number)


def final_rows(
    chosen: list[optuna.trial.FrozenTrial],
    candidates: dict[str, Candidate],
    splits: Any,
    sweep: Any,
    train_one,
    out: Path,
    write_checkpoint,
    device: Any,
    round_stored=lambda layer, method, rank: None,
) -> list[dict[str, Any]]:
    """Each front trial's model, trained again with its parameters and seed, scored on test
    once, written, read back and scored again."""
    rows = []
    for trial in chosen:
        name, rank = trial.params["method"], trial.params["rank"]
        params = {k: v for k, v in trial.params.items() if k not in ("method", "rank")}
        seed = trial.user_attrs["seed"]
        candidate = candidates[name]
        layer = candidate.method.adapted(rank, params["lora_alpha"], sweep, seed)
        data = splits.with_base(layer)
        result = train_one(layer, data, sweep.train_config(params, seed))
        round_stored(layer, candidate.method, rank)  # integer adapters, as the file has them
        test_acc = evaluate(layer, data.test)["acc"]
        path = out / "checkpoints" / f"pareto_trial={trial.number}.safetensors"
        metrics = {"trial": trial.number, "test_acc": test_acc}
        size = write_checkpoint(path, layer, metrics, candidate.method, rank)
        rebuilt = candidate.method.load(path, device)
        rows.append(
            {
                "trial": trial.number,
                "quant": name,
                "compression": candidate.method.config.describe(),
                "lora_rank": rank,
                "val_acc": trial.values[0],
                "final_val_acc": result.best_val_acc,
                "bits": int(trial.values[1]),
                "bits_per_weight": trial.user_attrs["bits_per_weight"],
                "ratio": trial.user_attrs["ratio"],
                "test_acc": test_acc,
                "file": str(path.relative_to(out)),
                "file_bytes": size,
                "file_test_acc": evaluate(rebuilt, splits.test.with_base(rebuilt))["acc"],
                **params,
                "best_epoch": result.best_epoch,
                "seed": seed,
            }
        )
        if not math.isclose(result.best_val_acc, trial.values[0], abs_tol=1e-9):
            log.warning(
                "pareto trial %d: retrained to val %.4f, the trial had %.4f (a device or "
                "library difference)",
                trial.number,
                result.best_val_acc,
                trial.values[0],
            )
    return rows


def write_outputs(
    out: Path,
    study: optuna.Study,
    rows: list[dict[str, Any]],
    candidates: dict[str, Candidate],
    original_acc: float,
    title: str,
) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(COLUMNS)).sort_values(["bits", "trial"])
    with atomic_path(out / "pareto.csv") as path:
        frame.to_csv(path, index=False, float_format="%.6g")
    from train_evaluate.outputs.figures import save_figure
    from train_evaluate.outputs.report import PLOTLY_BUNDLE, write_plotly_bundle

    page = optuna.visualization.plot_pareto_front(study, target_names=["val top-1 (%)", "bits"])
    page.update_layout(title=f"Pareto front: val top-1 against stored bits; {title}")
    write_plotly_bundle(out)
    with atomic_path(out / "pareto_front.html") as path:
        page.write_html(path, include_plotlyjs=PLOTLY_BUNDLE)
    save_figure(front_figure(frame, candidates, original_acc, title), out / "pareto.png")
    return frame


def front_figure(
    frame: pd.DataFrame, candidates: dict[str, Candidate], original_acc: float, title: str
) -> Figure:
    figure = Figure(figsize=(6.5, 4.5))
    axes = figure.subplots()
    for name, part in frame.groupby("quant"):
        axes.plot(part["bits_per_weight"], part["test_acc"], "o", label=f"{name} + adapter")
    for name, candidate in candidates.items():
        bits = candidate.accounting.columns(candidate.method.cost, 0)["bits_per_weight"]
        axes.plot([bits], [candidate.compressed_acc], "x", label=f"{name}, compressed only")
    axes.axhline(original_acc, color="grey", linestyle="--", label="fp32 original")
    axes.set_xscale("log")
    axes.set_xlabel("bits per weight (every stored bit, adapters included)")
    axes.set_ylabel("test top-1 (%)")
    axes.set_title(f"Pareto-optimal trials (chosen on val); {title}")
    axes.legend(fontsize="small")
    return figure
