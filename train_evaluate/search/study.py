"""The Optuna side of a rank's search: seeded samplers, trials asked and told (one at a time, or
a batch trained together and replayed so the median pruner sees what a sequential study
shows it), and which finished trials count."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from train_evaluate.runtime import interrupt
from train_evaluate.search import workers
from train_evaluate.training.training import derive_seed

# TPE samples at random for its first trials; fixed (not a fraction of --trials) so that a study
# extended with more trials repeats its first ones exactly. Optuna's default is 10, which with
# the original 10 trials per rank would make the whole search random.
SAMPLER_STARTUP_TRIALS = 5
# trials after the start-up ones that the batched path asks and trains together: few enough
# that TPE still learns from one batch to the next
TRIAL_BATCH = 5
# Median pruning: compare only once 3 trials have finished and 2 epochs have trained.
PRUNER = dict(n_startup_trials=3, n_warmup_steps=2)


class WarmedUpMedianPruner(optuna.pruners.MedianPruner):
    """Optuna's median pruner with ``PRUNER``'s settings, which answers "no" before the warm-up
    epochs without reading the study: Optuna's answer there is always "no" too, but it first
    reads the study's trials back from the storage, at every epoch of every trial (skipping
    that read took the offline demo from 15.1 to 14.2 s on 2 cores, the same evaluation.csv)."""

    def __init__(self) -> None:
        super().__init__(**PRUNER)

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < PRUNER["n_warmup_steps"]:
            return False
        return super().prune(study, trial)


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def fail_interrupted(study: optuna.Study) -> None:
    """Trials a killed run left RUNNING are marked FAIL (they will be run again)."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)


Objective = Callable[[optuna.Trial, int], float]


@dataclass(frozen=True)
class TrialBatch:
    """How ``run_study`` trains trials together (the start-up trials, then the others).

    prepare(trial, index): called right after the trial is asked (so it samples with the
    sampler seeded for its index): suggests its parameters and returns what ``train`` needs.
    train(prepared): trains them all and returns, per trial, a replay that reports its epochs to
    the trial and returns its value (or raises TrialPruned), as the sequential objective would."""

    prepare: Callable[[optuna.Trial, int], Any]
    train: Callable[[list[Any]], list[Callable[[], float]]]


def seeded_sampler(
    seed_parts: tuple, index: int, constant_liar: bool = False
) -> optuna.samplers.TPESampler:
    """TPE seeded for trial ``index``. ``constant_liar``: trials still running count as the
    worst value so far, so trials asked together do not all sample the same place (without
    running trials it changes nothing)."""
    return optuna.samplers.TPESampler(
        seed=derive_seed(*seed_parts, "sampler", index),
        n_startup_trials=SAMPLER_STARTUP_TRIALS,
        constant_liar=constant_liar,
    )


def tell(study: optuna.Study, trial: optuna.Trial, replay: Callable[[], float]) -> None:
    """Finish ``trial`` as ``study.optimize`` would: its value, PRUNED, or FAIL and re-raise."""
    try:
        value = replay()
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    else:
        study.tell(trial, value)


def run_trial_batch(
    study: optuna.Study,
    batch: TrialBatch,
    first: int,
    count: int,
    seed_parts: tuple,
    on_trial: Callable[[], None],
) -> None:
    """Ask ``count`` trials at once, train them together, then tell them in order.

    Each is asked with its own seeded sampler. TPE samples start-up trials at random from that
    seed alone, so their parameters are those a sequential study draws. Later trials are asked
    with the constant liar: the first of a batch sees what a sequential study would, the others
    also see the batch's earlier trials as running (TPE's usual way to ask in parallel), so
    their parameters differ from a sequential study's. Reports are replayed trial after trial,
    each trial told before the next replays, so the median pruner decides on exactly the
    finished trials it would have seen sequentially. The cost: a trial the pruner stops is
    trained to its last epoch in the batch anyway."""
    asked: list[optuna.Trial] = []
    try:
        prepared = []
        for index in range(first, first + count):
            liar = index >= SAMPLER_STARTUP_TRIALS
            study.sampler = seeded_sampler(seed_parts, index, constant_liar=liar)
            asked.append(study.ask())
            prepared.append(batch.prepare(asked[-1], index))
        replays = batch.train(prepared)
    except BaseException:
        for trial in asked:
            study.tell(trial, state=TrialState.FAIL)
        raise
    for position, (trial, replay) in enumerate(zip(asked, replays, strict=True)):
        try:
            tell(study, trial, replay)
        except BaseException:
            for later in asked[position + 1 :]:
                study.tell(later, state=TrialState.FAIL)
            raise
        on_trial()


def run_study(
    study: optuna.Study,
    objective: Objective,
    trials: int,
    seed_parts: tuple,
    on_trial: Callable[[], None],
    batch: TrialBatch | None = None,
) -> None:
    """Run trials until ``trials`` of them have finished, each with its own derived seed.

    With ``batch``, the start-up trials not yet finished (indices below
    SAMPLER_STARTUP_TRIALS) are asked at once and trained together, and then the rest, up to
    TRIAL_BATCH at a time (``run_trial_batch``); without, one by one."""
    fail_interrupted(study)
    for _ in range(len(finished(study))):
        on_trial()
    while (index := len(finished(study))) < trials:
        interrupt.check()
        startup = min(trials, SAMPLER_STARTUP_TRIALS) - index
        count = startup if startup > 0 else min(trials - index, TRIAL_BATCH)
        if batch is not None and count > 1:
            run_trial_batch(study, batch, index, count, seed_parts, on_trial)
            continue
        study.sampler = seeded_sampler(seed_parts, index)
        study.optimize(lambda trial, i=index: objective(trial, i), n_trials=1)
        on_trial()


def place(trial: optuna.trial.FrozenTrial) -> tuple[int, int]:
    """A trial's place in its study: its slot where many workers recorded one (a retried
    trial runs at its original's slot, after trials asked later), else its number."""
    return (trial.user_attrs.get(workers.SLOT, trial.number), trial.number)


def counted_trials(study: optuna.Study, trials: int) -> list[optuna.trial.FrozenTrial]:
    """The first ``trials`` finished trials: a study extended by an earlier run with more
    trials still answers for exactly the trials this run asked for."""
    return sorted(finished(study), key=place)[:trials]


def best_trial(trials: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial | None:
    """The completed trial with the highest value, the earliest on ties (as Optuna's own)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    best = max(t.value for t in complete)
    return min((t for t in complete if t.value == best), key=place)


def trial_counts(trials: list[optuna.trial.FrozenTrial]) -> dict[str, int]:
    return {
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "pruned": sum(
            t.state == TrialState.PRUNED and "diverged_at_epoch" not in t.user_attrs for t in trials
        ),
        "diverged": sum("diverged_at_epoch" in t.user_attrs for t in trials),
    }
