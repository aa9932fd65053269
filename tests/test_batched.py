"""Batched trials: each run of a batch is the run ``train_adapter`` gives it alone (same seed,
same steps), up to float summation order; and the sweep's start-up batch keeps the study a
sequential sweep records."""

import inspect
import math

import optuna
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compression import SparseConfig, make_config
from lora import LoraConfig, make_init_context, make_lora_linear
from train_evaluate.search import sweep
from train_evaluate.search.storage import open_storage
from train_evaluate.training import batched, fc_method
from train_evaluate.training.batched import Run, train_adapters
from train_evaluate.training.synthetic import synthetic_features
from train_evaluate.training.training import FeatureSplit, TrainConfig, evaluate, train_adapter

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


@pytest.mark.parametrize("products", ["narrow-layout", "plain-layout", "onednn"])
@pytest.mark.parametrize("objective", ["ce", "kd", "ce+kd"])
def test_each_batched_run_is_the_run_trained_alone(objective, products, monkeypatch):
    # rank 3: below NARROW_RANK a CPU lays the gradient products out another way, and from
    # ONEDNN_STEP_WORK it computes them with oneDNN (here every step and evaluation); all checked
    if products == "onednn" and not batched.onednn_available():
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(batched, "NARROW_RANK", 16 if products == "narrow-layout" else 0)
    monkeypatch.setattr(batched, "ONEDNN_STEP_WORK", 0 if products == "onednn" else 10**12)
    through_onednn = []  # per forward and gradient call, of steps and evaluations

    def recording(function):
        def recorded(*args, **kwargs):
            bound = inspect.signature(function).bind(*args, **kwargs)
            bound.apply_defaults()
            through_onednn.append(bound.arguments["onednn"])
            return function(*args, **kwargs)

        return recorded

    for name in ("logits_and_hidden", "adapter_grads"):
        monkeypatch.setattr(batched, name, recording(getattr(batched, name)))
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
    # every step and evaluation took the path under test
    assert set(through_onednn) == {products == "onednn"}


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
    method = fc_method.Method.create("sparse", make_config("sparse"), head, splits.train.features)
    config = sweep.SweepConfig(
        init="paper_init", trials=7, epochs=4, space=sweep.SearchSpace(lr=(1e-3, 3e-1))
    )
    studies = {}
    for together in (False, True):
        monkeypatch.setattr(sweep, "BATCHED", together)
        monkeypatch.setattr(sweep, "ENGINE", together)  # sequential: today's loop
        storage = open_storage(tmp_path / f"{together}.sqlite3")
        outcome = sweep.run_rank(method, 4, splits, config, storage, "s")
        studies[together] = (outcome, optuna.load_study(study_name="s", storage=storage).trials)
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


def crafted_logits():
    """Rows whose CE loss is finite or not in every way a logit can make it so."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 7, 6, generator=generator) * 3
    labels = torch.randint(0, 6, (2, 7), generator=generator)
    inf = math.inf
    logits[1, 0, 2] = math.nan  # NaN anywhere: NaN loss
    logits[1, 1, (labels[1, 1] + 1) % 6] = inf  # +inf elsewhere: infinite loss
    logits[1, 2, labels[1, 2]] = -inf  # -inf at the label: infinite loss
    logits[1, 3, (labels[1, 3] + 1) % 6] = -inf  # -inf elsewhere: finite loss
    logits[1, 4] = -inf  # every logit -inf: NaN loss
    logits[1, 5, labels[1, 5]] = 1e30  # huge but finite: finite loss
    return logits, labels


def test_the_ce_check_is_finite_exactly_when_the_loss_is():
    """(Short of float overflow of the loss itself: see ``logit_grad``.)"""
    logits, labels = crafted_logits()
    ce = batched.Objective(1.0, 0.0, 2.0)
    for run in range(2):
        for row in range(7):
            part = logits[run : run + 1, row : row + 1].clone()
            target = labels[run : run + 1, row : row + 1]
            check, _ = batched.logit_grad(part.clone(), target, None, ce)
            loss = F.cross_entropy(part[0], target[0])
            assert bool(torch.isfinite(check)) == bool(torch.isfinite(loss)), (run, row)
    assert all(torch.isfinite(F.cross_entropy(logits[0, r : r + 1], labels[0, r : r + 1]))
               for r in range(7))  # fmt: skip


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (0.7, 0.3)])
def test_the_logit_gradient_is_autograds_of_the_summed_loss(weights):
    """n times the gradient of the mean loss that train_adapter minimises (TrainConfig.loss)."""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 9, 11, generator=generator)
    labels = torch.randint(0, 11, (3, 9), generator=generator)
    teacher = torch.randn(3, 9, 11, generator=generator)
    objective = batched.Objective(*weights, temperature=2.5)
    tau = objective.temperature
    teacher_log_probs = torch.log_softmax(teacher / tau, dim=2)
    _, grad = batched.logit_grad(logits.clone(), labels, teacher_log_probs, objective)
    for run in range(3):
        z = logits[run].clone().requires_grad_(True)
        config = TrainConfig(
            objective="ce" if weights[1] == 0 else "kd" if weights[0] == 0 else "ce+kd",
            kd_temperature=tau,
            kd_weight=weights[1],
        )
        batch = FeatureSplit(z.detach(), labels[run], teacher_logits=teacher[run])
        (config.loss(z, batch) * z.shape[0]).backward()
        torch.testing.assert_close(grad[run], z.grad, **TOLERANCE)


def test_evaluation_in_chunks_is_evaluate(monkeypatch):
    """Runs stacked and rows in chunks that do not divide the split: each run's loss and top-1
    are what training.evaluate gives its layer."""
    monkeypatch.setattr(batched, "CPU_EVAL_ROWS", 14)  # 7 rows per run per chunk
    head, _, val = problem(seed=5)
    layers = [layer_for(head, alpha, seed, init="svd_init") for seed, alpha in enumerate((8, 24))]
    a = torch.stack([layer.lora_A.detach() for layer in layers])
    b = torch.stack([layer.lora_B.detach() for layer in layers])
    scale = torch.tensor([layer.scaling for layer in layers]).view(-1, 1, 1)
    losses, accuracies = batched.evaluate_stacked(a, b, scale, val.with_base(layers[0]))
    assert len(val) % 7 != 0
    for layer, loss, accuracy in zip(layers, losses, accuracies, strict=True):
        expected = evaluate(layer, val)
        assert loss == pytest.approx(expected["loss"], rel=1e-6)
        assert accuracy == pytest.approx(expected["acc"], abs=1e-9)


def test_a_run_without_curves_is_train_adapters_without_curves():
    """Beside a run that measures its train curve (the final model's), a trial's is not
    measured, as ``train_adapter(curves=False)`` leaves it."""
    head, train, val = problem(seed=6)
    config = TrainConfig(epochs=2, lr=1e-2, batch_size=50, seed=1)
    alone = [
        train_adapter(layer_for(head, 8, 1), train, val, config, curves=curves)
        for curves in (False, True)
    ]
    runs = [Run(layer_for(head, 8, 1), config, curves=curves) for curves in (False, True)]
    outcomes = train_adapters(runs, train, val)
    assert all(math.isnan(v) for v in outcomes[0].result.history["train_acc"])
    assert not any(math.isnan(v) for v in outcomes[1].result.history["train_acc"])
    for single, outcome in zip(alone, outcomes, strict=True):
        assert_same_run(single, outcome.result)


def test_the_engine_records_the_study_the_loop_records(tmp_path, monkeypatch):
    """One trial at a time (the CPU's default): every trial's parameters, values, states and
    pruning decisions, and the final model, as today's autograd loop records them."""
    head, splits = synthetic_features(600, 200, in_features=32, classes=20)
    method = fc_method.Method.create("sparse", make_config("sparse"), head, splits.train.features)
    config = sweep.SweepConfig(
        init="svd_init", trials=8, epochs=4, space=sweep.SearchSpace(lr=(1e-3, 3e-1))
    )
    monkeypatch.setattr(sweep, "BATCHED", False)
    studies = {}
    for engine in (False, True):
        monkeypatch.setattr(sweep, "ENGINE", engine)
        storage = open_storage(tmp_path / f"{engine}.sqlite3")
        outcome = sweep.run_rank(method, 4, splits, config, storage, "s")
        studies[engine] = (outcome, optuna.load_study(study_name="s", storage=storage).trials)
    (loop, loop_trials), (engine, engine_trials) = studies[False], studies[True]
    assert any(t.state == optuna.trial.TrialState.PRUNED for t in loop_trials)
    assert len(loop_trials) == len(engine_trials) == 8
    for a, b in zip(loop_trials, engine_trials, strict=True):
        assert (a.state, a.params, a.user_attrs) == (b.state, b.params, b.user_attrs)
        assert a.intermediate_values.keys() == b.intermediate_values.keys()
        for step, value in a.intermediate_values.items():
            assert math.isclose(b.intermediate_values[step], value, abs_tol=1e-9)
    assert engine.record["best_trial"] == loop.record["best_trial"]
    (final,), (loop_final,) = engine.record["finals"], loop.record["finals"]
    assert final["best_epoch"] == loop_final["best_epoch"]
    assert final["test_acc"] == pytest.approx(loop_final["test_acc"], abs=1e-9)
    for key, values in loop_final["history"].items():
        torch.testing.assert_close(
            torch.tensor(final["history"][key]), torch.tensor(values), **TOLERANCE
        )


def test_a_cpu_trains_each_run_alone_on_the_engine(monkeypatch):
    """The defaults: the engine for every LoraLinear run, trials one at a time on a CPU (the
    study a sequential sweep records); DoRA on train_adapter."""
    head, splits = synthetic_features(60, 20, in_features=8, classes=5)
    context = make_init_context(head, SparseConfig(block=(1, 4)))
    dora = make_lora_linear(head, LoraConfig(r=2, use_dora=True), context)
    assert not sweep.use_batched(splits)

    def loop(*args, **kwargs):
        raise AssertionError("train_adapter")

    monkeypatch.setattr(sweep, "train_adapter", loop)
    config = TrainConfig(epochs=1, batch_size=16)
    result = sweep.train_one(layer_for(head, 8, 0, rank=2), splits, config)
    assert len(result.history["val_acc"]) == 2  # trained: epoch 0 and epoch 1
    with pytest.raises(AssertionError, match="train_adapter"):
        sweep.train_one(dora, splits, config)


@pytest.mark.parametrize("together", [False, True])
def test_only_the_final_model_measures_its_train_curve(tmp_path, monkeypatch, together):
    """Trials, alone or batched, never draw a train curve, so none is scored for them."""
    head, splits = synthetic_features(200, 60, in_features=16, classes=8)
    method = fc_method.Method.create("sparse", make_config("sparse"), head, splits.train.features)
    config = sweep.SweepConfig(init="svd_init", trials=6, epochs=2)
    calls = []

    def recording(runs, train, val):
        calls.append([run.curves for run in runs])
        return train_adapters(runs, train, val)

    monkeypatch.setattr(sweep, "BATCHED", together)
    monkeypatch.setattr(sweep, "train_adapters", recording)
    sweep.run_rank(method, 2, splits, config, open_storage(tmp_path / "s.db"), "s")
    assert calls[-1] == [True]  # the final model
    assert sum(len(c) for c in calls[:-1]) == 6 and not any(any(c) for c in calls[:-1])


@pytest.mark.parametrize(("size", "rank", "expected"), [(32, 3, 1), (400, 3, 2), (32, 128, 2)])
def test_a_small_cpu_step_runs_on_one_thread_and_the_count_comes_back(
    size, rank, expected, monkeypatch
):
    head, train, val = problem(seed=4, features=130, classes=140)
    seen = []
    step = batched._Group._step

    def counting(self, index):
        seen.append(torch.get_num_threads())
        step(self, index)

    monkeypatch.setattr(batched._Group, "_step", counting)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run = Run(layer_for(head, 8, 0, rank=rank), TrainConfig(epochs=2, batch_size=size))
        train_adapters([run], train, val)
        assert set(seen) == {expected}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_only_a_cpu_step_from_the_threshold_goes_to_onednn():
    if not batched.onednn_available():
        pytest.skip("this torch has no oneDNN")
    cpu = torch.zeros(1)
    width = 512 + 1000
    rows = batched.ONEDNN_STEP_WORK // (32 * width)
    assert batched.use_onednn(cpu, rows, 32, width)
    assert not batched.use_onednn(cpu, rows - 1, 32, width)
    assert not batched.use_onednn(cpu, rows, 32, 64 + 10)  # a small problem's products
    assert not batched.use_onednn(cpu.double(), rows, 32, width)  # oneDNN's linear is fp32
    other = torch.zeros(1, device="meta")  # another device (CUDA) keeps its own products
    assert not batched.use_onednn(other, 10 * rows, 128, width)
