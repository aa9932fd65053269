"""Optuna per (method, rank), then the final model and the training-free baseline.

For every rank of every compression method:

1. init-only: the adapter as its init makes it, evaluated on val and test with no training
   (the baseline every trained number is compared with);
2. an Optuna study (TPE, median pruner, SQLite) over the original search space, trained on train
   and scored on val: each trial's value is its best val accuracy over epochs 0..E;
3. the final model: the best trial's hyper-parameters, retrained on train (best epoch on val),
   then read on test once; with ``final_seeds`` K > 1, K final models with different seeds
   (init draw and batch order), each read on test once, to measure seed-to-seed spread.

Reproducible and resumable: each trial draws its sampler seed and its training seed from
(seed, method, rank, index of the trial among the finished ones), so a study that was killed and
resumed proposes and trains exactly what an uninterrupted one would. Trials left RUNNING by a
killed run are marked FAIL and run again; only COMPLETE and PRUNED trials count as finished.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import optuna
import torch
from torch import nn

from lora import LoraLinear
from lora.rounding import round_stored_
from train_evaluate.search import workers
from train_evaluate.search.storage import open_study
from train_evaluate.search.study import (
    TrialBatch,
    WarmedUpMedianPruner,
    best_trial,
    counted_trials,
    run_study,
    seeded_sampler,
    trial_counts,
)
from train_evaluate.training.batched import Run, batchable, train_adapters
from train_evaluate.training.target import Target
from train_evaluate.training.training import (
    FeatureSplit,
    Splits,
    TrainConfig,
    TrainResult,
    derive_seed,
    evaluate,
    train_adapter,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchSpace:
    """The original study's search space (its optimizer, lr, batch and alpha choices)."""

    optimizers: tuple[str, ...] = ("Adam", "SGD")
    lr: tuple[float, float] = (1e-4, 1e-2)
    batch_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    alphas: tuple[int, ...] = (8, 16, 24, 32, 40, 48)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        return {
            "optimizer": trial.suggest_categorical("optimizer", list(self.optimizers)),
            "lr": trial.suggest_float("lr", *self.lr, log=True),
            "batch_size": trial.suggest_categorical("batch_size", list(self.batch_sizes)),
            "lora_alpha": trial.suggest_categorical("lora_alpha", list(self.alphas)),
        }


@dataclass(frozen=True)
class SweepConfig:
    """What every rank of a run shares. epochs = 0: init-only, no search and no training."""

    init: str = "svd_init"
    trials: int = 10
    epochs: int = 10
    seed: int = 0
    final_seeds: int = 1
    pruning: bool = True
    use_dora: bool = False
    loftq_iters: int = 5
    objective: str = "ce"
    kd_temperature: float = 2.0
    kd_weight: float = 0.5
    space: SearchSpace = field(default_factory=SearchSpace)

    def train_config(self, params: dict[str, Any], seed: int) -> TrainConfig:
        """A training run with a trial's (or the best trial's) hyper-parameters."""
        return TrainConfig(
            epochs=self.epochs,
            optimizer=params["optimizer"],
            lr=params["lr"],
            batch_size=params["batch_size"],
            seed=seed,
            objective=self.objective,
            kd_temperature=self.kd_temperature,
            kd_weight=self.kd_weight,
        )


@dataclass
class RankOutcome:
    """What one rank produced: a JSON-able record, the final layer (holding the adapter of the
    selected epoch of the first final seed; the init for init-only runs; None when no trial
    completed), and the study."""

    record: dict[str, Any]
    layer: LoraLinear | None
    study: optuna.Study | None
    claim: Any = None  # many workers: the held claim on the rank's finals (workers.FinalClaim)


@dataclass(frozen=True)
class Sharing:
    """Many workers on one storage: its heartbeat-enabled handle, the beat in seconds, and
    whether each rank is one worker's whole (its final claim taken before its first trial)
    instead of its trials going to any worker."""

    storage: optuna.storages.BaseStorage
    heartbeat: int
    whole_ranks: bool = False


def steps_per_rank(sweep: SweepConfig) -> int:
    """Progress units of one rank: its trials and final models, or 1 for init only."""
    return sweep.trials + sweep.final_seeds if sweep.epochs > 0 else 1


# Train TPE's start-up trials of a rank together (``batched.train_adapters``), then its other
# trials together (asked with the constant liar). False: one trial at a time, the study a
# sequential sweep records. None: together on CUDA only, where one step of one small run is
# bound by kernel launches; on a CPU a step is bound by its arithmetic and memory traffic, and
# batching is slower than the engine's runs one at a time (1.31x against today's loop, the
# engine alone 1.44x, scaled down; benchmarks/bench_full_protocol.py, README "Benchmarks").
BATCHED: bool | None = None
# Train a run (a trial alone, a final model) with the hand-written engine of ``batched`` (one
# run), not ``train_adapter``'s autograd loop: the same numbers up to float summation order, in
# fewer and leaner passes. DoRA and whole networks always use ``train_adapter``.
ENGINE = True


def use_batched(data: Splits) -> bool:
    if BATCHED is not None:
        return BATCHED
    return data.train.features.device.type == "cuda"


def use_engine(data: Splits, layer: nn.Module) -> bool:
    return (ENGINE or use_batched(data)) and batchable(layer)


def same_base(layer: nn.Module, probe: nn.Module) -> bool:
    """Whether two adapted models hold the same stored base (every compressed weight equal):
    a final model must be trained on the base its rank's baseline was scored with."""
    bases = [dict(m.base_layer.named_parameters()) for m in (layer, probe)]
    return bases[0].keys() == bases[1].keys() and all(
        torch.equal(t, bases[1][name]) for name, t in bases[0].items()
    )


def test_scores(metrics: dict[str, float]) -> dict[str, float]:
    """A final model's test numbers: top-1 and top-5 (%) and the top-1 count behind them."""
    return {
        "test_acc": metrics["acc"],
        "test_top5": metrics["top5"],
        "test_correct": metrics["correct"],
    }


def test_facts(init: dict[str, float], probe: LoraLinear, test: FeatureSplit) -> dict[str, Any]:
    """Test-split numbers the rows of a rank need besides top-1: the split's size (the n of a
    binomial interval), the init's top-5 and count (``init``: its metrics), and ``base_only``:
    the stored base of this rank with no adapter. For loftq_init / act_loftq_init that base is
    refitted per rank, so it is not the compressor's W_c that the ``quantized`` row scores."""
    base = evaluate(probe.base_layer, replace(test, base_logits=None))
    return {
        "images": len(test),
        "init_only": {"top5": init["top5"], "correct": init["correct"]},
        "base_only": {"acc": base["acc"], "top5": base["top5"], "correct": base["correct"]},
    }


def train_one(
    layer: LoraLinear,
    data: Splits,
    config: TrainConfig,
    on_epoch: Callable[[int, float], None] | None = None,
    curves: bool = True,
) -> TrainResult:
    """One training run: the batched engine with one run when ``use_engine`` (not DoRA), else
    ``train_adapter``; the same numbers up to float summation order. An exception raised by
    ``on_epoch`` (a pruned trial) propagates, as from ``train_adapter``."""
    if not use_engine(data, layer):
        return train_adapter(layer, data.train, data.val, config, on_epoch, curves)
    (outcome,) = train_adapters([Run(layer, config, on_epoch, curves)], data.train, data.val)
    if outcome.error is not None:
        raise outcome.error
    return outcome.result


def run_rank(
    method: Target,
    rank: int,
    splits: Splits,
    sweep: SweepConfig,
    storage: optuna.storages.BaseStorage | None,
    study_name: str,
    on_step: Callable[[], None] = lambda: None,
    adapter_dtype: str = "fp32",
    sharing: Sharing | None = None,
) -> RankOutcome | None:
    """Init-only baseline, Optuna study and final model for one (method, rank).

    ``adapter_dtype``: the run's; a layer whose plan stores its adapter as int8 / int4 is
    scored, in the init and each final model, with its factors rounded to integer codes
    (``round_stored_``), as the packed file stores them; training and the choice of the best
    epoch see the float factors.

    ``sharing`` (many workers, see ``workers``): this worker runs the trials that are still
    free and, once all have finished, the finals if it claims them first (whole ranks: it
    claims the finals first, then runs every trial); None when there is nothing (more) for it
    to do on this rank now. The outcome then holds the claim, which the caller releases once
    the rank's files are written."""
    started = time.perf_counter()
    if rank == 0 and sweep.epochs > 0:
        # no layer has an adapter: nothing to train, the rank is its init (the compressed
        # model); its progress is the steps a trained rank would take
        steps, step = steps_per_rank(sweep), on_step

        def on_step() -> None:
            for _ in range(steps):
                step()

        sweep = replace(sweep, epochs=0)
    dtypes = method.layer_plan(rank, adapter_dtype).adapter_dtypes()

    def round_stored(model: nn.Module) -> None:
        round_stored_(method.adapters_of(model), dtypes)

    study = None
    if sweep.epochs > 0:
        study = open_study(
            storage,
            study_name,
            direction="maximize",
            pruner=WarmedUpMedianPruner() if sweep.pruning else optuna.pruners.NopPruner(),
        )
    claim = None
    if sharing is not None and sharing.whole_ranks:
        # the rank's final claim, taken first, makes its trials this worker's alone too
        claim = workers.FinalClaim(sharing.storage, study_name, sharing.heartbeat)
        if not claim.acquire():
            return None  # another worker's rank, running or finished
        if study is not None:
            # trials a dead holder of the claim left running: asked again, as by one process
            workers.take_over(study, claim)
        if study is not None and workers.running_elsewhere(study, sweep.trials):
            # a dead worker's trial, not yet stale: come back later, before any costly work
            claim.release(False)
            return None
    elif sharing is not None:
        # cheap checks first: a rank with no free trial and no claimable final is left alone
        if study is not None and workers.running_elsewhere(study, sweep.trials):
            return None
        if study is None or workers.finished_count(study) >= sweep.trials:
            claim = workers.FinalClaim(sharing.storage, study_name, sharing.heartbeat)
            if not claim.acquire():
                return None
    held = [claim] if claim is not None else []  # a claim _run_rank takes is added
    try:
        return _run_rank(
            method, rank, splits, sweep, study, on_step, round_stored, sharing, held, started
        )
    except BaseException:
        for taken in held:
            if taken.trial is not None:
                taken.release(False)
        raise


def init_record(
    method: Target, rank: int, sweep: SweepConfig, probe: nn.Module, data: Splits, splits: Splits
) -> dict[str, Any]:
    """A rank's record as far as its init goes: what it is, the init scored on val and test
    (``data``: the splits with ``probe``'s base; ``splits``: without), and its reconstruction's
    stages, kept with the rank so that layers.csv is the same when the rank is reused."""
    init_test = evaluate(probe, data.test)
    record: dict[str, Any] = {
        "method": method.name,
        "rank": rank,
        "init": sweep.init,
        "compression": method.config.describe(),
        "objective": sweep.objective,
        "dora": sweep.use_dora,
        "seed": sweep.seed,
        "init_only": {"val_acc": evaluate(probe, data.val)["acc"], "test_acc": init_test["acc"]},
        "test": test_facts(init_test, probe, splits.test),
    }
    if method.records.get(rank):
        record["reconstruction"] = [asdict(stage) for stage in method.records[rank]]
    return record


def rank_seed_parts(sweep: SweepConfig, method: Target, rank: int) -> tuple:
    """What every seed of a (method, rank) derives from: its trials', its finals', its init's."""
    return (sweep.seed, method.name, rank)


@dataclass
class RankTrials:
    """The Optuna trials of one (method, rank): each built from its own seed, trained alone
    (``objective``) or with others (``prepare_batched``, ``train_batched``), and told to Optuna
    epoch by epoch, so that the median pruner decides as in a sequential sweep."""

    method: Target
    rank: int
    sweep: SweepConfig
    data: Splits
    seed_parts: tuple

    def prepare(self, trial: optuna.Trial, index: int) -> Run:
        params = self.sweep.space.suggest(trial)
        seed = derive_seed(*self.seed_parts, "trial", index)
        trial.set_user_attr("seed", seed)
        layer = self.method.adapted(self.rank, params["lora_alpha"], self.sweep, seed)
        # a trial's train curve is never drawn: it is not measured
        return Run(layer, self.sweep.train_config(params, seed), curves=False)

    @staticmethod
    def reporter(trial: optuna.Trial) -> Callable[[int, float], None]:
        def report(epoch: int, val_acc: float) -> None:
            trial.report(val_acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        return report

    @staticmethod
    def conclude(trial: optuna.Trial, result: TrainResult) -> float:
        trial.set_user_attr("best_epoch", result.best_epoch)
        if result.diverged_at is not None:
            trial.set_user_attr("diverged_at_epoch", result.diverged_at)
            raise optuna.TrialPruned(f"loss diverged in epoch {result.diverged_at}")
        return result.best_val_acc

    def objective(self, trial: optuna.Trial, index: int) -> float:
        run = self.prepare(trial, index)
        result = train_one(run.layer, self.data, run.config, self.reporter(trial), run.curves)
        return self.conclude(trial, result)

    def prepare_batched(self, trial: optuna.Trial, index: int) -> tuple[optuna.Trial, Run]:
        return trial, self.prepare(trial, index)

    def train_batched(self, prepared: list[tuple[optuna.Trial, Run]]) -> list[Callable[[], float]]:
        outcomes = train_adapters([run for _, run in prepared], self.data.train, self.data.val)

        def replay(trial: optuna.Trial, result: TrainResult) -> float:
            report = self.reporter(trial)
            for epoch, val_acc in enumerate(result.history["val_acc"]):
                report(epoch, val_acc)
            return self.conclude(trial, result)

        return [
            lambda t=trial, o=outcome: replay(t, o.result)
            for (trial, _), outcome in zip(prepared, outcomes, strict=True)
        ]


def train_finals(
    method: Target,
    rank: int,
    params: dict[str, Any],
    data: Splits,
    sweep: SweepConfig,
    probe: nn.Module,
    round_stored: Callable[[nn.Module], None],
    on_step: Callable[[], None],
) -> tuple[list[dict[str, Any]], nn.Module | None]:
    """The rank's final models, one per final seed, trained with the best trial's ``params``;
    each scored on the test split once. Returns their facts and the first seed's model (the
    one the checkpoint holds)."""
    seed_parts = rank_seed_parts(sweep, method, rank)
    finals, kept = [], None
    for index in range(sweep.final_seeds):
        seed = derive_seed(*seed_parts, "final", index)
        layer = method.adapted(rank, params["lora_alpha"], sweep, seed)
        assert same_base(layer, probe)
        result = train_one(layer, data, sweep.train_config(params, seed))
        round_stored(layer)
        finals.append(
            {
                "seed": seed,
                "best_epoch": result.best_epoch,
                "best_val_acc": result.best_val_acc,
                "diverged_at": result.diverged_at,
                # the test split is read here, once, for the model that the val split selected
                **test_scores(evaluate(layer, data.test)),
                "history": result.history,
            }
        )
        if index == 0:
            kept = layer
        on_step()
    return finals, kept


def _run_rank(
    method: Target,
    rank: int,
    splits: Splits,
    sweep: SweepConfig,
    study: optuna.Study | None,
    on_step: Callable[[], None],
    round_stored: Callable[[nn.Module], None],
    sharing: Sharing | None,
    held: list,
    started: float,
) -> RankOutcome | None:
    seed_parts = rank_seed_parts(sweep, method, rank)
    claim = held[0] if held else None
    # The base (W_c and b) does not depend on alpha or seed, so its logits serve every trial.
    probe = method.adapted(rank, sweep.space.alphas[0], sweep, derive_seed(*seed_parts, "init"))
    data = splits.with_base(probe)
    round_stored(probe)
    record = init_record(method, rank, sweep, probe, data, splits)
    if sweep.epochs == 0:
        record.update(status="init_only", test_acc=record["init_only"]["test_acc"], finals=[])
        record["seconds"] = time.perf_counter() - started
        on_step()
        return RankOutcome(record, probe, None, claim)

    trials_of_rank = RankTrials(method, rank, sweep, data, seed_parts)

    if sharing is None:
        # a whole adapted network (not one LoraLinear) trains its trials one at a time
        batched = use_batched(data) and not sweep.use_dora and isinstance(probe, LoraLinear)
        batch = (
            TrialBatch(trials_of_rank.prepare_batched, trials_of_rank.train_batched)
            if batched
            else None
        )
        run_study(study, trials_of_rank.objective, sweep.trials, seed_parts, on_step, batch)
    elif sharing.whole_ranks or claim is None:
        # a whole rank's trials run here under its claim; shared trials, then the claim
        ready = workers.run_shared_study(
            study,
            trials_of_rank.objective,
            sweep.trials,
            lambda i: seeded_sampler(seed_parts, i),
            on_step,
        )
        if not ready:
            if claim is not None:  # another worker's last trials (one dividing trials)
                claim.release(False)
                held.remove(claim)
            return None
        if claim is None:
            claim = workers.FinalClaim(sharing.storage, study.study_name, sharing.heartbeat)
            if not claim.acquire():
                return None
            held.append(claim)
    trials = counted_trials(study, sweep.trials)
    record["trials"] = trial_counts(trials)
    record["study"] = study.study_name
    best = best_trial(trials)
    if best is None:
        log.warning("%s r=%d: no trial completed (all pruned or diverged); no final model",
                    method.name, rank)  # fmt: skip
        record.update(status="no_complete_trial", test_acc=None, finals=[])
        record["seconds"] = time.perf_counter() - started
        for _ in range(sweep.final_seeds):
            on_step()
        return RankOutcome(record, None, study, claim)

    finals, kept = train_finals(
        method, rank, best.params, data, sweep, probe, round_stored, on_step
    )
    record.update(
        status="ok",
        best_params=best.params,
        best_trial={"number": best.number, "val_acc": best.value},
        finals=finals,
        test_acc=sum(f["test_acc"] for f in finals) / len(finals),
    )
    record["seconds"] = time.perf_counter() - started
    return RankOutcome(record, kept, study, claim)
