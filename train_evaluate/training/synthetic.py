"""A seeded synthetic classification problem in cached-feature form.

What the sweep trains on, without a backbone or images: a random classifier (the "pretrained"
FC) and train / val / test splits of features with labels. Used by the benchmarks (the cost of a
step does not depend on the values, only on the shapes) and by the tests of the protocol (a
problem small enough to sweep in seconds, on which compression costs accuracy and an adapter
wins it back).

Everything is drawn from one ``torch.Generator`` seeded with ``seed``, and torch's global
generator is left alone: the same arguments give the same tensors in any process.
"""

from __future__ import annotations

import torch
from torch import nn

from train_evaluate.training.training import FeatureSplit, Splits


def synthetic_features(
    train: int,
    val: int,
    in_features: int = 512,
    classes: int = 1000,
    seed: int = 0,
    test: int | None = None,
) -> tuple[nn.Linear, Splits]:
    """A random classifier (``classes`` x ``in_features``) and the splits the sweep uses.

    Features are ReLU'd Gaussians (non-negative, as pooled CNN features are), N x in_features.
    The labels are the classifier's own predictions: the uncompressed layer scores 100%, a
    compressed one less, and an adapter can win the difference back, so Optuna's pruner sees
    trials that differ as on real data. ``test`` rows default to a quarter of ``val`` (at least
    one), which is what the benchmarks were measured with.
    """
    generator = torch.Generator().manual_seed(seed)
    # skip_init: no draw from the global generator for values that are overwritten at once
    head = nn.utils.skip_init(nn.Linear, in_features, classes).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(classes, in_features, generator=generator) / in_features**0.5)
        head.bias.copy_(0.1 * torch.randn(classes, generator=generator))

    def split(rows: int) -> FeatureSplit:
        features = torch.randn(rows, in_features, generator=generator).relu()
        return FeatureSplit(features, head(features).argmax(dim=1))

    test_rows = max(val // 4, 1) if test is None else test
    return head, Splits(split(train), split(val), split(test_rows))
