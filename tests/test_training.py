"""The shared training loop: epoch 0 competes, runs are deterministic, divergence is caught."""

import pytest
import torch
from torch import nn

from compression import SparseConfig
from lora import LoraConfig, make_init_context, make_lora_linear
from train_evaluate.training.training import FeatureSplit, TrainConfig, evaluate, train_adapter


def problem(seed=0, n=1200, features=32, classes=12):
    """Features whose labels a dense 12 x 32 layer predicts perfectly; train/val halves."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, features, generator=generator)
    x = torch.randn(n, features, generator=generator)
    head = nn.Linear(features, classes)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.zero_()
    labels = (x @ weight.T).argmax(dim=1)
    half = n // 2
    return head, FeatureSplit(x[:half], labels[:half]), FeatureSplit(x[half:], labels[half:])


def adapter(head, init="paper_init", rank=4, alpha=8, seed=0):
    context = make_init_context(head, SparseConfig(block=(2, 4)))
    config = LoraConfig(r=rank, lora_alpha=alpha, init=init)
    return make_lora_linear(head, config, context, torch.Generator().manual_seed(seed))


def test_training_recovers_accuracy_lost_to_compression():
    head, train, val = problem()
    layer = adapter(head)
    result = train_adapter(layer, train, val, TrainConfig(epochs=8, lr=1e-2, batch_size=64))
    assert evaluate(head, val)["acc"] == 100.0
    assert result.history["val_acc"][0] < 80  # compressed: one weight in eight kept
    assert result.best_val_acc > result.history["val_acc"][0] + 10
    assert len(result.history["val_acc"]) == 9  # epochs 0..8
    assert evaluate(layer, val)["acc"] == result.best_val_acc  # left at its best epoch


@pytest.mark.parametrize("init", ["paper_init", "svd_init"])
def test_when_training_only_hurts_epoch_zero_is_selected_with_the_init_accuracy(init):
    head, train, val = problem(seed=1)
    layer = adapter(head, init=init, rank=8)
    init_state = layer.adapter_state()
    init_acc = evaluate(layer, val)["acc"]
    # SGD with lr 1e30 throws the adapter to overflow in its first steps
    result = train_adapter(layer, train, val, TrainConfig(epochs=3, optimizer="SGD", lr=1e30))
    assert result.best_epoch == 0
    assert result.best_val_acc == init_acc  # exactly: the same evaluation of the same adapter
    assert all(torch.equal(layer.adapter_state()[k], v) for k, v in init_state.items())


def test_a_diverging_run_is_stopped_and_marked():
    head, train, val = problem(seed=2)
    layer = adapter(head)
    result = train_adapter(layer, train, val, TrainConfig(epochs=5, optimizer="SGD", lr=1e30))
    assert result.diverged_at == 1
    assert len(result.history["val_acc"]) == 1  # only epoch 0 ended with finite losses
    assert torch.isfinite(layer.lora_A).all() and torch.isfinite(layer.lora_B).all()


def test_the_same_seed_gives_the_same_run_and_another_seed_does_not():
    head, train, val = problem(seed=3)

    def run(seed):
        layer = adapter(head, seed=seed)
        config = TrainConfig(epochs=3, lr=5e-3, batch_size=32, seed=seed)
        return train_adapter(layer, train, val, config)

    first, second, other = run(0), run(0), run(1)
    assert first.history == second.history
    assert all(torch.equal(first.best_state[k], second.best_state[k]) for k in first.best_state)
    assert first.history != other.history


def test_precomputed_base_logits_train_the_same_adapter():
    head, train, val = problem(seed=4)
    config = TrainConfig(epochs=3, lr=5e-3, batch_size=50)
    plain = train_adapter(adapter(head), train, val, config)
    layer = adapter(head)
    cached = train_adapter(layer, train.with_base(layer), val.with_base(layer), config)
    for key in plain.history:
        expected, actual = torch.tensor(plain.history[key]), torch.tensor(cached.history[key])
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_on_epoch_sees_every_evaluation_from_epoch_zero():
    head, train, val = problem(seed=5)
    seen = []
    config = TrainConfig(epochs=3)
    result = train_adapter(adapter(head), train, val, config, lambda e, acc: seen.append((e, acc)))
    assert seen == list(enumerate(result.history["val_acc"]))


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="valid: Adam, SGD"):
        TrainConfig(optimizer="Lion")


def with_teacher(head, split, hide_labels=False):
    teacher = head(split.features).detach()
    return FeatureSplit(split.features, None if hide_labels else split.labels, None, teacher)


def test_kd_trains_without_labels_and_raises_agreement_with_the_teacher():
    head, train, val = problem(seed=6)
    unlabelled = with_teacher(head, train, hide_labels=True)  # any read of a label would fail
    val = with_teacher(head, val)
    layer = adapter(head)
    before = evaluate(layer, val)["agree"]
    config = TrainConfig(epochs=6, lr=1e-2, batch_size=64, objective="kd", kd_temperature=2.0)
    result = train_adapter(layer, unlabelled, val, config)
    assert evaluate(layer, val)["agree"] > before + 10
    assert result.best_val_acc > result.history["val_acc"][0]
    assert all(v != v for v in result.history["train_acc"])  # NaN: no train labels to score


def test_ce_plus_kd_mixes_both_losses():
    head, train, _ = problem(seed=7)
    train = with_teacher(head, train)
    logits = torch.randn(len(train), 12)
    for weight in (0.0, 1.0):
        config = TrainConfig(objective="ce+kd", kd_weight=weight)
        alone = TrainConfig(objective="ce" if weight == 0 else "kd")
        torch.testing.assert_close(config.loss(logits, train), alone.loss(logits, train))
