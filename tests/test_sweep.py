"""The Optuna sweep: seeded trials that resume exactly, and studies that can be extended."""

import optuna
import torch

from compression import make_config
from train_evaluate.search.storage import open_storage
from train_evaluate.search.study import counted_trials
from train_evaluate.search.sweep import (
    SearchSpace,
    SweepConfig,
    run_rank,
)
from train_evaluate.training.fc_method import Method
from train_evaluate.training.synthetic import synthetic_features


def small_problem():
    head, splits = synthetic_features(600, 200, in_features=32, classes=20)
    return Method.create("sparse", make_config("sparse"), head, splits.train.features), splits


def test_a_run_with_fewer_trials_uses_only_its_own_trials(tmp_path):
    method, splits = small_problem()
    storage = open_storage(tmp_path / "optuna.sqlite3")
    space = SearchSpace(lr=(1e-3, 1e-1))

    def config(trials):
        return SweepConfig(init="paper_init", trials=trials, epochs=3, space=space)

    many = run_rank(method, 4, splits, config(6), storage, "s")
    few = run_rank(method, 4, splits, config(1), storage, "s")
    fresh = run_rank(method, 4, splits, config(1), open_storage(tmp_path / "other.sqlite3"), "s")
    study = optuna.load_study(study_name="s", storage=storage)
    assert len(study.trials) == 6  # the second run ran nothing new
    assert sum(few.record["trials"].values()) == 1 and len(counted_trials(study, 1)) == 1
    # the 1-trial record is the one a fresh 1-trial study gives: same trial, same final model
    assert few.record["best_trial"] == fresh.record["best_trial"]
    assert few.record["best_trial"]["number"] == 0
    assert few.record["test_acc"] == fresh.record["test_acc"]
    assert torch.equal(few.layer.lora_A, fresh.layer.lora_A)
    # and the check can fail: over all six trials another one is best
    assert many.record["best_trial"]["number"] != 0
    assert many.record["trials"]["complete"] + many.record["trials"]["pruned"] == 6


class CountingStorage(optuna.storages.InMemoryStorage):
    """Optuna's in-memory storage, counting the reads of a study's trials."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def get_all_trials(self, *args, **kwargs):
        self.reads += 1
        return super().get_all_trials(*args, **kwargs)


def test_the_warmed_up_pruner_decides_as_optunas_and_reads_nothing_before_its_warm_up():
    from train_evaluate.search.study import PRUNER, WarmedUpMedianPruner

    storage = CountingStorage()
    study = optuna.create_study(storage=storage, direction="maximize")
    ours, optunas = WarmedUpMedianPruner(), optuna.pruners.MedianPruner(**PRUNER)
    generator = torch.Generator().manual_seed(0)
    decided = {True: 0, False: 0}
    for _ in range(12):
        trial = study.ask()
        for step in range(6):
            trial.report(float(torch.rand(1, generator=generator)) * 100, step)
            frozen = storage.get_trial(trial._trial_id)
            before = storage.reads
            answer = ours.prune(study, frozen)
            if step < PRUNER["n_warmup_steps"]:
                assert storage.reads == before  # answered without reading the study
            assert answer == optunas.prune(study, frozen)
            decided[answer] += 1
        study.tell(trial, float(torch.rand(1, generator=generator)) * 100)
    assert decided[True] and decided[False]  # both answers were compared
