"""Batched trials: each run of a batch is the run ``train_adapter`` gives it alone (same seed,
same steps), up to float summation order; and the sweep's start-up batch keeps the study a
sequential sweep records."""

import math

import optuna
import pytest
import torch
from torch import nn

from compression import SparseConfig, make_config
from lora import LoraConfig, make_init_context, make_lora_linear
from train_evaluate import sweep
from train_evaluate.batched import Run, train_adapters
from train_evaluate.synthetic import synthetic_features
from train_evaluate.training import FeatureSplit, TrainConfig, train_adapter

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def problem(seed=0, n=800, features=24, classes=10):
    """A dense layer that labels its own features; train / val halves with teacher logits."""
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(features, classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(classes, features, generator=generator))
        head.bias.zero_()
    x = torch.randn(n, features, generator=generator)
    teacher = head(x).detach()
    labels = teacher.argmax(dim=1)
    half = n // 2
    train = FeatureSplit(x[:half], labels[:half], teacher_logits=teacher[:half])
    val = FeatureSplit(x[half:], labels[half:], teacher_logits=teacher[half:])
    return head, train, val


def layer_for(head, alpha, seed, init="paper_init", rank=3):
    context = make_init_context(head, SparseConfig(block=(2, 4)))
    config = LoraConfig(r=rank, lora_alpha=alpha, init=init)
    return make_lora_linear(head, config, context, torch.Generator().manual_seed(seed))


def assert_same_run(alone, batched):
    assert batched.best_epoch == alone.best_epoch
    assert batched.diverged_at == alone.diverged_at
    assert batched.best_val_acc == pytest.approx(alone.best_val_acc, rel=1e-5, abs=1e-5)
    assert batched.history.keys() == alone.history.keys()
    for key, values in alone.history.items():
        expected, actual = torch.tensor(values), torch.tensor(batched.history[key])
        torch.testing.assert_close(actual, expected, equal_nan=True, **TOLERANCE)
    assert batched.best_state.keys() == alone.best_state.keys()
    for key, value in alone.best_state.items():
        torch.testing.assert_close(batched.best_state[key], value, **TOLERANCE)


# (optimizer, lr, batch size, alpha): Adam and SGD in one group, two batch sizes (one leaving a
# short last batch), three alphas, and one SGD run that diverges in its first epoch.
TRIALS = [
    ("Adam", 1e-2, 64, 8),
    ("SGD", 0.3, 64, 16),
    ("Adam", 3e-3, 96, 24),
    ("SGD", 1e30, 64, 8),
    ("SGD", 0.1, 96, 8),
]


@pytest.mark.parametrize("objective", ["ce", "kd", "ce+kd"])
def test_each_batched_run_is_the_run_trained_alone(objective):
    head, train, val = problem()
    if objective == "kd":  # kd never reads train labels: hide them, as split_tensors does
        train = FeatureSplit(train.features, None, teacher_logits=train.teacher_logits)
    configs = [
        TrainConfig(epochs=3, optimizer=opt, lr=lr, batch_size=size, seed=seed,
                    objective=objective, kd_temperature=2.0, kd_weight=0.3)
        for seed, (opt, lr, size, _) in enumerate(TRIALS)
    ]  # fmt: skip
    alphas = [alpha for *_, alpha in TRIALS]
    alone = [
        train_adapter(layer_for(head, alpha, seed), train, val, config)
        for seed, (alpha, config) in enumerate(zip(alphas, configs, strict=True))
    ]
    layers = [layer_for(head, alpha, seed) for seed, alpha in enumerate(alphas)]
    base = layers[0]
    outcomes = train_adapters(
        [Run(layer, config) for layer, config in zip(layers, configs, strict=True)],
        train.with_base(base),
        val.with_base(base),
    )
    assert alone[3].diverged_at == 1  # the check covers a diverging run too
    assert len({r.best_epoch for r in alone}) > 1  # and runs that differ
    for single, outcome, layer in zip(alone, outcomes, layers, strict=True):
        assert outcome.error is None
        assert_same_run(single, outcome.result)
        # the layer is left at its best epoch, as train_adapter leaves it
        torch.testing.assert_close(layer.lora_A.detach(), single.best_state["lora_A"], **TOLERANCE)


def test_a_run_whose_callback_raises_stops_alone():
    head, train, val = problem(seed=1)
    configs = [TrainConfig(epochs=3, lr=1e-2, batch_size=50, seed=s) for s in range(3)]
    seen = []

    def stop_at_one(epoch, accuracy):
        seen.append(epoch)
        if epoch == 1:
            raise optuna.TrialPruned("stop")

    runs = [Run(layer_for(head, 8, s), c) for s, c in enumerate(configs)]
    runs[1].on_epoch = stop_at_one
    outcomes = train_adapters(runs, train, val)
    assert seen == [0, 1]
    assert isinstance(outcomes[1].error, optuna.TrialPruned) and outcomes[1].result is None
    for seed in (0, 2):
        alone = train_adapter(layer_for(head, 8, seed), train, val, configs[seed])
        assert_same_run(alone, outcomes[seed].result)


def test_dora_is_refused():
    head, train, val = problem(seed=2)
    context = make_init_context(head, SparseConfig(block=(2, 4)))
    layer = make_lora_linear(head, LoraConfig(r=2, use_dora=True), context)
    with pytest.raises(ValueError, match="DoRA"):
        train_adapters([Run(layer, TrainConfig(epochs=1))], train, val)


def test_the_trial_batches_record_the_study_a_sequential_sweep_records(tmp_path, monkeypatch):
    """The 5 start-up trials and the first trial after them: same parameters, values, states
    and pruning decisions, trial by trial. The 7th trial is asked together with the 6th, before
    the 6th finishes (the constant liar sees it running), and told after it."""
    head, splits = synthetic_features(600, 200, in_features=32, classes=20)
    method = sweep.Method.create("sparse", make_config("sparse"), head, splits.train.features)
    config = sweep.SweepConfig(
        init="paper_init", trials=7, epochs=4, space=sweep.SearchSpace(lr=(1e-3, 3e-1))
    )
    studies = {}
    for batched in (False, True):
        monkeypatch.setattr(sweep, "BATCHED", batched)
        monkeypatch.setattr(sweep, "ENGINE", batched)  # sequential: today's loop
        storage = sweep.open_storage(tmp_path / f"{batched}.sqlite3")
        outcome = sweep.run_rank(method, 4, splits, config, storage, "s")
        studies[batched] = (outcome, optuna.load_study(study_name="s", storage=storage).trials)
    (plain, plain_trials), (fast, fast_trials) = studies[False], studies[True]
    assert len(plain_trials) == len(fast_trials) == 7
    assert any(t.state == optuna.trial.TrialState.PRUNED for t in plain_trials[:5])
    sixth, seventh = fast_trials[5], fast_trials[6]
    assert seventh.datetime_start < sixth.datetime_complete <= seventh.datetime_complete
    assert seventh.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    for a, b in zip(plain_trials[:6], fast_trials[:6], strict=True):
        assert (a.number, a.state, a.params, a.user_attrs) == (b.number, b.state, b.params,
                                                               b.user_attrs)  # fmt: skip
        assert a.intermediate_values.keys() == b.intermediate_values.keys()
        for step, value in a.intermediate_values.items():
            assert math.isclose(b.intermediate_values[step], value, abs_tol=1e-9)
    if fast.record["best_trial"]["number"] != 6 and plain.record["best_trial"]["number"] != 6:
        assert fast.record["best_trial"] == plain.record["best_trial"]
        assert fast.record["test_acc"] == pytest.approx(plain.record["test_acc"], abs=1e-9)
