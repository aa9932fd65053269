"""The one training loop, shared by Optuna trials and final models.

It trains only the adapter of a ``LoraLinear`` on cached features. The base (W_c, b) and the
features are frozen, so the base logits x @ W_c.T + b of every row are computed once
(``FeatureSplit.with_base``) and each step costs only the adapter: r * (in + out) multiply-adds
per row instead of in * out.

Every run evaluates the adapter before its first step (epoch 0) and after every epoch, on val
and on a fixed sample of train (for the curves); the best epoch is the one with the highest
val accuracy, earliest on ties, and epoch 0 competes: training that only hurts ends where it
started. The layer is left holding the best epoch's adapter.

Objectives: ``ce`` (cross-entropy on the labels), ``kd`` (distillation from the uncompressed
layer's logits, Hinton et al. 2015, "Distilling the Knowledge in a Neural Network": it needs no
labels, so the train split can be unlabelled) and ``ce+kd`` (a weighted sum).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from lora import LoraLinear
from train_evaluate.runtime import interrupt

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "Adam": torch.optim.Adam,
    "SGD": torch.optim.SGD,
}
EVAL_CHUNK = 8192  # rows per evaluation step: bounds memory at 8192 x classes logits
TRAIN_CURVE_ROWS = 8192  # train rows scored after each epoch for the train curves


def derive_seed(*parts: object) -> int:
    """A seed in [0, 2**31) from a base seed and names (method, rank, trial...), stable across
    runs and Python processes (unlike ``hash``)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()
    return int(digest[:8], 16) % 2**31


@dataclass(frozen=True)
class FeatureSplit:
    """Rows of cached features for one split.

    features: N x in; labels: N; base_logits: the frozen base layer's output for these rows
    (N x out), set by ``with_base``; teacher_logits: the uncompressed layer's output.
    """

    features: torch.Tensor
    labels: torch.Tensor | None
    base_logits: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.features.shape[0]

    def rows(self, index: torch.Tensor | slice) -> FeatureSplit:
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return FeatureSplit(
            self.features[index],
            pick(self.labels),
            pick(self.base_logits),
            pick(self.teacher_logits),
        )

    def to(self, device: torch.device) -> FeatureSplit:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return FeatureSplit(
            move(self.features),
            move(self.labels),
            move(self.base_logits),
            move(self.teacher_logits),
        )

    def with_base(self, layer: LoraLinear) -> FeatureSplit:
        """This split with ``layer.base_layer``'s logits precomputed (not for DoRA, whose
        forward does not separate base and adapter)."""
        # a whole adapted network (not one layer) has no separate base output to reuse
        if layer.use_dora or not isinstance(layer, LoraLinear):
            return replace(self, base_logits=None)
        return replace(self, base_logits=linear_logits(layer.base_layer, self.features))


@dataclass(frozen=True)
class Splits:
    train: FeatureSplit
    val: FeatureSplit
    test: FeatureSplit

    def with_base(self, layer: LoraLinear) -> Splits:
        return Splits(*(s.with_base(layer) for s in (self.train, self.val, self.test)))


def split_tensors(
    features: torch.Tensor,
    labels: torch.Tensor,
    split: dict[str, torch.Tensor],
    objective: str,
    head: nn.Module,
    device: torch.device,
) -> dict[str, FeatureSplit]:
    """The cached features cut into train / val / test on ``device``.

    With a distillation objective each row carries the uncompressed layer's logits (computed
    once); with ``kd`` alone the train split carries no labels at all, so no code path can read
    them.
    """
    features, labels = features.to(device), labels.to(device)
    teacher = linear_logits(head, features) if objective != "ce" else None

    def part(name: str) -> FeatureSplit:
        index = split[name].to(device)
        hide_labels = name == "train" and objective == "kd"
        return FeatureSplit(
            features[index],
            None if hide_labels else labels[index],
            teacher_logits=None if teacher is None else teacher[index],
        )

    return {name: part(name) for name in ("train", "val", "test")}


def eval_chunk(module: nn.Module) -> int:
    """Rows per evaluation step: a whole network on images says how many it takes at once."""
    return getattr(module, "eval_chunk", EVAL_CHUNK)


@torch.inference_mode()
def linear_logits(linear: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return torch.cat([linear(chunk) for chunk in features.split(eval_chunk(linear))])


def forward(head: nn.Module, split: FeatureSplit) -> torch.Tensor:
    if split.base_logits is None:
        return head(split.features)
    return head(split.features, base_out=split.base_logits)


TOP_K = 5  # top-5 accuracy, ImageNet's second headline number


@torch.inference_mode()
def evaluate(head: nn.Module, split: FeatureSplit) -> dict[str, float]:
    """Metrics of ``head`` on a split.

    loss: mean cross-entropy; acc / top5: top-1 / top-5 accuracy (%); n: rows scored; correct /
    correct_top5: how many of them were right (the counts a binomial interval needs); agree:
    top-1 agreement (%) with the teacher. Label metrics are NaN (counts 0) when the split has no
    labels, agree is NaN when it has no teacher. With fewer than 5 classes, top5 is top-C."""
    device = split.features.device
    loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    correct_top5 = torch.zeros((), device=device, dtype=torch.int64)
    agree = torch.zeros((), device=device, dtype=torch.int64)
    chunk = eval_chunk(head)
    for start in range(0, len(split), chunk):
        part = split.rows(slice(start, start + chunk))
        logits = forward(head, part)
        predicted = logits.argmax(dim=1)
        if part.labels is not None:
            loss += F.cross_entropy(logits, part.labels, reduction="sum").double()
            correct += (predicted == part.labels).sum()
            top = logits.topk(min(TOP_K, logits.shape[1]), dim=1).indices  # rows x 5
            correct_top5 += (top == part.labels.unsqueeze(1)).any(dim=1).sum()
        if part.teacher_logits is not None:
            agree += (predicted == part.teacher_logits.argmax(dim=1)).sum()
    count = len(split)
    labelled = split.labels is not None
    return {
        "loss": loss.item() / count if labelled else math.nan,
        "acc": 100.0 * correct.item() / count if labelled else math.nan,
        "top5": 100.0 * correct_top5.item() / count if labelled else math.nan,
        "n": count,
        "correct": correct.item(),
        "correct_top5": correct_top5.item(),
        "agree": 100.0 * agree.item() / count if split.teacher_logits is not None else math.nan,
    }


OBJECTIVES = ("ce", "kd", "ce+kd")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    """KL(teacher || student) on temperature-softened distributions, times T^2 so that its
    gradients keep their size as T changes (Hinton et al. 2015)."""
    return (
        F.kl_div(
            F.log_softmax(student / temperature, dim=1),
            F.log_softmax(teacher / temperature, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (the Optuna search space is over these)."""

    epochs: int = 10
    optimizer: str = "Adam"
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    objective: str = "ce"
    kd_temperature: float = 2.0
    kd_weight: float = 0.5  # ce+kd: (1 - kd_weight) * ce + kd_weight * kd

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}"
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"unknown objective {self.objective!r}; valid: {', '.join(OBJECTIVES)}"
            )
        if not (math.isfinite(self.kd_temperature) and self.kd_temperature > 0) or not (
            0 <= self.kd_weight <= 1
        ):
            raise ValueError("kd temperature must be positive and kd weight within [0, 1]")

    def loss(self, logits: torch.Tensor, batch: FeatureSplit) -> torch.Tensor:
        """The training objective on one batch. ``kd`` never reads the labels."""
        if self.objective == "ce":
            return F.cross_entropy(logits, batch.labels)
        kd = distillation_loss(logits, batch.teacher_logits, self.kd_temperature)
        if self.objective == "kd":
            return kd
        return (1 - self.kd_weight) * F.cross_entropy(logits, batch.labels) + self.kd_weight * kd


@dataclass
class TrainResult:
    """history[k][e] is metric k after epoch e (e = 0: the init, before any step)."""

    history: dict[str, list[float]]
    best_epoch: int
    best_val_acc: float
    best_state: dict[str, torch.Tensor] = field(repr=False)
    diverged_at: int | None = None


EpochCallback = Callable[[int, float], None]


def curve_sample(train: FeatureSplit) -> FeatureSplit:
    """The train rows the train curves are measured on: all of them up to TRAIN_CURVE_ROWS,
    else a fixed random sample (the same rows for every run).

    At ImageNet scale a full pass would cost more than the epoch's training steps, and the
    curves only need to show the trend. Not the first rows: split ids are sorted, so those
    would be the first classes only."""
    if len(train) <= TRAIN_CURVE_ROWS:
        return train
    sample = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    return train.rows(sample[:TRAIN_CURVE_ROWS].sort().values.to(train.features.device))


def train_adapter(
    layer: LoraLinear,
    train: FeatureSplit,
    val: FeatureSplit,
    config: TrainConfig,
    on_epoch: EpochCallback | None = None,
    curves: bool = True,
) -> TrainResult:
    """Train ``layer``'s adapter; see the module doc for epoch 0 and best-epoch selection.

    ``curves=False``: the train curve is not measured (its history entries are NaN). Nothing
    else changes: Optuna's trials use it, since only the final models' curves are drawn, and
    scoring the train sample every epoch costs as much as a third of a whole network's epoch.

    ``on_epoch(epoch, val_acc)`` is called after every evaluation, epoch 0 included (Optuna
    reports and prunes there; raising stops the run). A run whose loss turns NaN or infinite
    stops at the end of that epoch and records it in ``diverged_at``.
    """
    params = [p for p in layer.parameters() if p.requires_grad]
    optimizer = OPTIMIZERS[config.optimizer](params, lr=config.lr, fused=True)
    generator = torch.Generator().manual_seed(config.seed)
    history: dict[str, list[float]] = {
        "train_loss": [],
        "train_acc": [],
        "val_loss": [],
        "val_acc": [],
    }

    train_sample = curve_sample(train) if curves else None

    def measure() -> float:
        for name, split in (("train", train_sample), ("val", val)):
            metrics = (
                {"loss": math.nan, "acc": math.nan} if split is None else evaluate(layer, split)
            )
            history[f"{name}_loss"].append(metrics["loss"])
            history[f"{name}_acc"].append(metrics["acc"])
        return history["val_acc"][-1]

    best_epoch, best_acc, best_state = 0, measure(), layer.adapter_state()
    if on_epoch is not None:
        on_epoch(0, best_acc)
    diverged_at = None
    for epoch in range(1, config.epochs + 1):
        layer.train()
        order = torch.randperm(len(train), generator=generator).to(train.features.device)
        total = torch.zeros((), device=train.features.device)
        for index in order.split(config.batch_size):
            interrupt.check()
            batch = train.rows(index)
            loss = config.loss(forward(layer, batch), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        # One check per epoch, not per step: a per-step check would synchronise a GPU each step.
        # History keeps only the epochs that ended with finite losses.
        val_acc = measure() if torch.isfinite(total) else math.nan
        if math.isnan(val_acc) or not math.isfinite(history["val_loss"][-1]):
            if not math.isnan(val_acc):
                for values in history.values():
                    values.pop()
            diverged_at = epoch
            break
        if val_acc > best_acc:
            best_epoch, best_acc, best_state = epoch, val_acc, layer.adapter_state()
        if on_epoch is not None:
            on_epoch(epoch, val_acc)
    layer.load_adapter_state(best_state)
    layer.eval()
    return TrainResult(history, best_epoch, best_acc, best_state, diverged_at)
