"""Adapter trainings of one rank, alone or several at once as one batched model: the engine.

Each run is what ``training.train_adapter`` does with its own layer and ``TrainConfig``: the same
batches (its own seeded permutation and batch size), the same updates, the same evaluations and
best-epoch choice. Runs are grouped by what the steps must share (rank, batch size, epochs,
objective); within a group the T adapters are stacked, A as (T, r, in) and B as (T, out, r), and
every step is a handful of batched matmuls (``torch.bmm`` / ``torch.baddbmm``) over all T runs.
Learning rate, alpha and optimizer (Adam or SGD) are per run: the gradients are written out by
hand (no autograd) and so is the optimizer's update, in the form ``torch.optim.Adam`` and
``torch.optim.SGD`` document with their defaults (betas 0.9 / 0.999, eps 1e-8, no momentum, no
weight decay), so a run's numbers equal its lone run's up to float summation order.

The sweep trains every run here, one at a time or (``sweep.BATCHED``) several at once: a step
makes fewer passes over the (rows x classes) logits than autograd's (no log-probabilities, the
1 / n applied to the small factors) and no graph. What is not batched: DoRA (its forward
renormalises the merged weight's rows; ``batchable`` says no, and callers fall back to
``train_adapter``).

On a CPU each run's update is torch's own fused Adam kernel (one call per run), the larger
products go through oneDNN (``ONEDNN_STEP_WORK``), and evaluation goes in cache-sized chunks.
On CUDA the data stays on the device and a step does no host synchronisation: the divergence
checks are summed on the device and read once per epoch. With ``CUDA_GRAPHS`` the fixed-shape
step (every batch but an epoch's last, shorter one) is captured once per group as a CUDA graph
and replayed, which removes the per-kernel launch cost; if capture fails the group runs eagerly
(logged).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lora import LoraLinear
from train_evaluate.runtime import interrupt
from train_evaluate.training.training import (
    EVAL_CHUNK,
    EpochCallback,
    FeatureSplit,
    TrainConfig,
    TrainResult,
    curve_sample,
    linear_logits,
)

log = logging.getLogger(__name__)

# torch.optim.Adam's defaults, which training.py's optimizer uses.
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
# Capture the fixed-shape training step as a CUDA graph (CUDA only; the CPU path never does).
# benchmarks/gpu_check.sh measures both settings; see README "GPU".
CUDA_GRAPHS = True
# Rows of one evaluation pass on a CPU: few enough that their logits stay in cache across the
# passes over them (softmax, pick, argmax). A GPU takes EVAL_CHUNK rows at once.
CPU_EVAL_ROWS = 512
# Below this rank a CPU's BLAS (MKL, 2 cores) runs a product whose right-hand operand is only r
# columns wide, (n x out) @ (out x r), 3x to 5x slower than the same product laid out with r
# as the rows of a transposed operand (single timings of the products alone, r = 2 to 8, n =
# 32 to 512, out = 1,000); from rank 16 up the two layouts cost the same. So on a CPU, below
# it, ``adapter_grads`` lays its two gradient products out the second way.
NARROW_RANK = 16
# A CPU step small enough that torch's intra-op threads cost more than they share runs on one
# thread: batch rows x max(rank, 16) up to this. Single timings of whole runs on 2 cores (1,000
# classes, 512 features), one thread against two: 1.1x to 1.3x faster at batch 32 up to rank
# 64 and at batch 64 up to rank 16, as fast at batch 128 up to rank 16, 0.6x to 0.7x at batch
# 64 from rank 64 and at batch 32 at rank 128. Evaluation keeps every thread.
ONE_THREAD_STEP_WORK = 2048
# From this much work, batch rows x rank x (in + out features), a CPU's products go to oneDNN's
# matmul instead of torch's BLAS. On this project's machine (AMD EPYC, AVX-512) the MKL torch ships
# ran a step's products at about 100 GFLOP/s a core, about what AVX2 code reaches, and oneDNN, which
# picks its code from the CPU's features, at about 200 (benchmarks/bench_cpu_products.py). A oneDNN
# call costs about 10 us more, so small products stay with torch. Whole one-epoch runs (32,000 rows,
# 1,000 classes, 512 features; ranks 2 to 128, batches 32 to 512; single timings, medians of 3):
# from rows x rank 4,096 up 1.10x to 1.77x faster on one thread and 1.0x to 1.56x on two, about even
# at 2,048, and 0.64x to 0.85x at batch 32 and 64 below it. Counting the features and classes keeps
# a small problem's tiny products (the demo's 10 classes) with torch.
ONEDNN_STEP_WORK = 4096 * (512 + 1000)


@functools.cache
def onednn_available() -> bool:
    """Whether this torch has oneDNN and its fp32 linear op (every x86 build torch ships does)."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):
        return False


def use_onednn(weight: torch.Tensor, rows: int, rank: int, width: int) -> bool:
    """Whether a CPU's fp32 products of ``rows`` x ``rank`` and ``width`` = in + out features
    go to oneDNN (``ONEDNN_STEP_WORK``); ``weight``: an adapter factor, for device and dtype
    (oneDNN's linear takes no float64)."""
    work = rows * rank * width
    fp32_cpu = weight.device.type == "cpu" and weight.dtype == torch.float32
    return fp32_cpu and work >= ONEDNN_STEP_WORK and onednn_available()


def product_t(input: torch.Tensor, weight: torch.Tensor, onednn: bool = False) -> torch.Tensor:
    """input (T, n, k) @ weight (T, m, k)^T, stacked: (T, n, m); through oneDNN one run at a
    time when ``onednn`` (its linear op takes strided views, transposed ones included)."""
    if not onednn:
        return torch.bmm(input, weight.transpose(1, 2))
    linear = torch.ops.mkldnn._linear_pointwise
    outs = [linear(input[t], weight[t], None, "none", [], "") for t in range(input.shape[0])]
    return outs[0].unsqueeze(0) if len(outs) == 1 else torch.stack(outs)


@dataclass
class Run:
    """One training run: its layer (trained in place, left at its best epoch as
    ``train_adapter`` leaves it), its config and an optional per-epoch callback (raising stops
    this run only; the exception is kept in its outcome). ``curves=False``: the train curve
    is not measured (NaN), as in ``train_adapter``."""

    layer: LoraLinear
    config: TrainConfig
    on_epoch: EpochCallback | None = None
    curves: bool = True


@dataclass
class RunOutcome:
    """result: as ``train_adapter`` returns it; None when ``on_epoch`` raised ``error``."""

    result: TrainResult | None
    error: Exception | None = None


def batchable(layer: LoraLinear) -> bool:
    """Whether ``train_adapters`` can train this layer: one LoraLinear without DoRA (DoRA, and
    a whole adapted network, train alone)."""
    return isinstance(layer, LoraLinear) and not layer.use_dora


def group_key(run: Run) -> tuple:
    """Runs with equal keys step in lockstep: same rank, batch size, epochs and objective (and
    whether the train curve is measured)."""
    c = run.config
    objective = (c.objective, c.kd_temperature, c.kd_weight)
    return (run.layer.r, c.batch_size, c.epochs, *objective, run.curves)


def train_adapters(runs: Sequence[Run], train: FeatureSplit, val: FeatureSplit) -> list[RunOutcome]:
    """Train every run, in groups of ``group_key``; outcomes in the order of ``runs``.

    All layers must share one base (the same W_c and bias: the trials of one rank)."""
    for run in runs:
        if not batchable(run.layer):
            raise ValueError("DoRA layers cannot be batched; train them with train_adapter")
    if not runs:
        return []
    base = runs[0].layer.base_layer
    for run in runs[1:]:
        other = run.layer.base_layer
        same_bias = (base.bias is None) == (other.bias is None) and (
            base.bias is None or torch.equal(base.bias, other.bias)
        )
        if not (torch.equal(base.weight, other.weight) and same_bias):
            raise ValueError("batched runs must share one base layer (one rank of one method)")
    if train.base_logits is None:
        train = FeatureSplit(
            train.features, train.labels, linear_logits(base, train.features), train.teacher_logits
        )
    if val.base_logits is None:
        val = FeatureSplit(val.features, val.labels, linear_logits(base, val.features))
    groups: dict[tuple, list[int]] = {}
    for index, run in enumerate(runs):
        groups.setdefault(group_key(run), []).append(index)
    outcomes: list[RunOutcome | None] = [None] * len(runs)
    # the train-curve rows, gathered once, and only if a run measures its curve
    sample = curve_sample(train) if any(run.curves for run in runs) else None
    for members in groups.values():
        group = _Group([runs[i] for i in members], train, sample, val)
        for index, outcome in zip(members, group.train(), strict=True):
            outcomes[index] = outcome
    return outcomes  # type: ignore[return-value]


# ---- pure tensor functions: one step's gradients and the optimizers' updates ----


@dataclass(frozen=True)
class Objective:
    """The loss as weights of its parts: ce_weight * CE + kd_weight * KD(temperature)."""

    ce_weight: float
    kd_weight: float
    temperature: float

    @classmethod
    def of(cls, config: TrainConfig) -> Objective:
        if config.objective == "ce":
            return cls(1.0, 0.0, config.kd_temperature)
        if config.objective == "kd":
            return cls(0.0, 1.0, config.kd_temperature)
        return cls(1.0 - config.kd_weight, config.kd_weight, config.kd_temperature)


def logits_and_hidden(
    x: torch.Tensor,
    base: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    onednn: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (T, n, out) = base + scale * (x @ A^T) @ B^T, and the scaled hidden (T, n, r).

    x: (T, n, in) or (n, in) shared by all runs; base: (T, n, out) or (n, out); scale: (T, 1, 1).
    ``onednn``: the products go through oneDNN (``use_onednn``).
    """
    runs = a.shape[0]
    if base.ndim == 2:
        base = base.unsqueeze(0).expand(runs, -1, -1)
    if onednn:
        if x.ndim == 2:
            x = x.unsqueeze(0).expand(runs, -1, -1)
        hidden = product_t(x, a, onednn=True).mul_(scale)
        # the base added after: oneDNN's fused add was slower than this pass
        return product_t(hidden, b, onednn=True).add_(base), hidden
    hidden = torch.matmul(x, a.transpose(1, 2)).mul_(scale)
    return torch.baddbmm(base, hidden, b.transpose(1, 2)), hidden


def logit_grad(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    teacher_log_probs: torch.Tensor | None,
    objective: Objective,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of each run's loss *summed* over its rows with respect to ``logits``
    (T, n, out): n times the mean's, so that no pass over the large logits is spent on the
    1 / n, which ``adapter_grads`` applies to its small factors instead. And a per-run number
    (T,) that is finite exactly when the run's loss on this batch is: all that the epoch's
    divergence check reads of the training loss (as in ``train_adapter``).

    CE: d/dz = softmax(z) - onehot(y). Its loss lse(z) - z_y is finite exactly when p_y and
    z_y are (a NaN or +inf logit makes the whole row of the softmax NaN, z_y = -inf makes the
    loss infinite, a -inf elsewhere changes neither), so the check is sum(p_y + 0 * z_y) and no
    log-probabilities are formed: one pass fewer over the logits. Not covered: finite logits so
    far apart (about 3e38) that lse(z) - z_y itself overflows, or per-batch losses large enough
    (about 1e36) that ``train_adapter``'s epoch sum overflows; such a run has diverged anyway,
    and its val loss, checked after the epoch, is then not finite either. KD (Hinton et al. 2015, as
    ``training.distillation_loss``: KL(p || q) with q = softmax(z / tau), times tau^2):
    d/dz = tau * (q - p); its check is the KL itself."""
    rows = logits.shape[1]
    check = logits.new_zeros(logits.shape[0])
    grad = None
    if objective.kd_weight > 0:
        tau = objective.temperature
        log_q = torch.log_softmax(logits / tau, dim=2)
        p = teacher_log_probs.exp()
        check += (p * (teacher_log_probs - log_q)).sum(dim=(1, 2)) / rows * tau**2
        grad = log_q.exp_().sub_(p).mul_(objective.kd_weight * tau)
    if objective.ce_weight > 0:
        target = labels.unsqueeze(2)
        probs = torch.softmax(logits, dim=2)
        check += (probs.gather(2, target) + logits.gather(2, target) * 0).sum(dim=(1, 2))
        probs.scatter_add_(2, target, probs.new_full(target.shape, -1.0))
        if objective.ce_weight != 1:
            probs.mul_(objective.ce_weight)
        grad = probs if grad is None else grad.add_(probs)
    return check, grad


def adapter_grads(
    x: torch.Tensor,
    hidden: torch.Tensor,
    logit_grad: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    onednn: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dA (T, r, in) and dB (T, out, r) of the per-run mean loss, from the gradient of its sum
    with respect to the logits (``logit_grad``), for z = base + h @ B^T with
    h = scale * x @ A^T (the chain rule through the two products). ``onednn``: the products go
    through oneDNN (``use_onednn``)."""
    rows = logit_grad.shape[1]
    hidden = hidden / rows
    if x.ndim == 2:
        x = x.unsqueeze(0).expand(b.shape[0], -1, -1)
    if onednn:
        # dB^T = h^T g, then made contiguous in B's layout for the fused Adam kernel (see
        # below): oneDNN reads g^T slowly as the left operand, quickly as the right one
        grad_b = product_t(hidden.transpose(1, 2), logit_grad.transpose(1, 2), onednn=True)
        grad_b = grad_b.transpose(1, 2).contiguous()
        grad_hidden = product_t(logit_grad, b.transpose(1, 2), onednn=True).mul_(scale / rows)
        grad_a = product_t(grad_hidden.transpose(1, 2), x.transpose(1, 2), onednn=True)
        return grad_a, grad_b
    if b.device.type == "cpu" and b.shape[2] < NARROW_RANK:
        # r as the rows of the output (dB^T) and of a transposed operand (B^T); the two narrow
        # copies cost less than they save, and torch's fused Adam kernel reads a gradient
        # laid out as its parameter (a transposed view gives wrong updates, silently)
        grad_b = torch.bmm(hidden.transpose(1, 2), logit_grad).transpose(1, 2).contiguous()
        grad_hidden = torch.bmm(logit_grad, b.transpose(1, 2).contiguous().transpose(1, 2))
    else:
        grad_b = torch.bmm(logit_grad.transpose(1, 2), hidden)
        grad_hidden = torch.bmm(logit_grad, b)
    grad_hidden.mul_(scale / rows)
    grad_a = torch.bmm(grad_hidden.transpose(1, 2), x)
    return grad_a, grad_b


def optimizer_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    lr: torch.Tensor,
    adam: torch.Tensor | None,
) -> None:
    """One update of stacked parameters (T, ...), in place.

    Adam (Kingma and Ba 2015, in torch.optim.Adam's form): m <- lerp(m, g, 1 - b1), v <- b2 v +
    (1 - b2) g^2, p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps); SGD:
    p <- p - lr g. ``step`` is t (a tensor, so a captured CUDA graph sees it change); ``lr``
    (T, 1, 1); ``adam``: (T, 1, 1) bools, True: Adam, False: SGD, None: all Adam."""
    exp_avg.lerp_(grad, 1 - BETA1)
    exp_avg_sq.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
    step_size = lr / (1 - BETA1**step)
    denom = (exp_avg_sq.sqrt() / (1 - BETA2**step).sqrt()).add_(EPS)
    update = step_size * exp_avg / denom
    if adam is not None:
        update = torch.where(adam, update, lr * grad)
    param.sub_(update)


def fused_adam_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    lr: float,
) -> None:
    """One Adam update of ``params`` in place, by the fused kernel ``torch.optim.Adam(fused=True)``
    runs. Its entry point, ``torch._fused_adam_``, is private: use it only where
    ``fused_adam_available()`` says it is there and gives the public optimizer's result."""
    torch._fused_adam_(
        params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=lr, beta1=BETA1,
        beta2=BETA2, weight_decay=0.0, eps=EPS, maximize=False,
    )  # fmt: skip


@functools.cache
def fused_adam_available() -> bool:
    """Whether ``fused_adam_`` runs here and updates as ``torch.optim.Adam(fused=True)`` does,
    checked once on a small tensor (two steps); if not, the engine updates with
    ``optimizer_step_`` (the same formula, unfused)."""
    try:
        start = torch.linspace(-1.0, 1.0, 6)
        grads = [torch.linspace(0.5, -0.5, 6), torch.linspace(-0.3, 0.2, 6)]
        public = start.clone().requires_grad_()
        optimizer = torch.optim.Adam([public], lr=0.01, betas=(BETA1, BETA2), eps=EPS, fused=True)
        mine, m, v, step = start.clone(), torch.zeros(6), torch.zeros(6), torch.zeros(())
        for grad in grads:
            public.grad = grad.clone()
            optimizer.step()
            step += 1
            fused_adam_([mine], [grad.clone()], [m], [v], [step], 0.01)
        return torch.equal(mine, public.detach())
    except (AttributeError, RuntimeError, TypeError):
        return False


@torch.inference_mode()
def evaluate_stacked(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, split: FeatureSplit
) -> tuple[list[float], list[float]]:
    """Each run's mean cross-entropy and top-1 accuracy (%) on ``split`` (which carries its
    base logits), as ``training.evaluate`` computes them; NaN without labels."""
    runs = a.shape[0]
    count = len(split)
    if split.labels is None:
        return [math.nan] * runs, [math.nan] * runs
    loss = torch.zeros(runs, dtype=torch.float64, device=a.device)
    correct = torch.zeros(runs, dtype=torch.int64, device=a.device)
    # on 2 cores, 8,000 rows, 1,000 classes: 1,024 rows a pass were 1.6x faster than 8,192
    # (rank 16), and 512 rows 1.4x faster than 1,024 at rank 2, the same from rank 16 up
    rows = CPU_EVAL_ROWS if a.device.type == "cpu" else EVAL_CHUNK
    chunk = max(1, rows // runs)
    onednn = use_onednn(a, min(chunk, count), a.shape[1], a.shape[2] + b.shape[1])
    for start in range(0, count, chunk):
        part = split.rows(slice(start, start + chunk))
        logits, _ = logits_and_hidden(part.features, part.base_logits, a, b, scale, onednn)
        labels = part.labels.unsqueeze(0).expand(runs, -1)
        # cross_entropy on (rows, classes): one fused log-softmax pass instead of logsumexp's
        # several
        per_row = F.cross_entropy(
            logits.view(-1, logits.shape[2]), labels.reshape(-1), reduction="none"
        )
        loss += per_row.view(runs, -1).sum(dim=1).double()
        correct += (logits.argmax(dim=2) == labels).sum(dim=1)
    loss_values = (loss / count).tolist()
    accuracy = (100.0 * correct.double() / count).tolist()
    return loss_values, accuracy


# ---- one group of runs in lockstep ----


@dataclass
class _Track:
    """The bookkeeping of one run of a group (its ``train_adapter`` locals)."""

    run: Run
    generator: torch.Generator
    history: dict[str, list[float]] = field(
        default_factory=lambda: {"train_loss": [], "train_acc": [], "val_loss": [], "val_acc": []}
    )
    best_epoch: int = 0
    best_acc: float = math.nan
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    diverged_at: int | None = None
    error: Exception | None = None


class _Group:
    def __init__(
        self,
        runs: list[Run],
        train: FeatureSplit,
        sample: FeatureSplit | None,
        val: FeatureSplit,
    ) -> None:
        self.train_split, self.sample, self.val = train, sample, val
        self.config = runs[0].config
        self.curves = runs[0].curves  # one value per group (group_key)
        self.objective = Objective.of(self.config)
        self.device = train.features.device
        self.tracks = [_Track(run, torch.Generator().manual_seed(run.config.seed)) for run in runs]
        layers = [run.layer for run in runs]
        self.a = torch.stack([layer.lora_A.detach() for layer in layers]).clone()
        self.b = torch.stack([layer.lora_B.detach() for layer in layers]).clone()
        column = lambda values, dtype=torch.float32: torch.tensor(  # noqa: E731
            values, dtype=dtype, device=self.device
        ).view(-1, 1, 1)
        self.scale = column([layer.scaling for layer in layers])
        self.lr = column([run.config.lr for run in runs])
        kinds = {run.config.optimizer for run in runs}
        self.adam = column([run.config.optimizer == "Adam" for run in runs], torch.bool)
        self.adam_mask = self.adam if len(kinds) > 1 else None
        self.all_sgd = kinds == {"SGD"}
        self.moments = [torch.zeros_like(t) for t in (self.a, self.a, self.b, self.b)]
        self.step = torch.zeros((), device=self.device)
        self.checks = torch.zeros(len(runs), device=self.device)  # finite: no loss diverged
        self.teacher_log_probs = None
        if self.objective.kd_weight > 0:
            tau = self.objective.temperature
            self.teacher_log_probs = torch.log_softmax(train.teacher_logits / tau, dim=1)
        self.graph = None  # (CUDAGraph, static index buffer) once captured
        rows = self.config.batch_size * len(runs)
        self.one_thread = (
            self.device.type == "cpu" and rows * max(runs[0].layer.r, 16) <= ONE_THREAD_STEP_WORK
        )
        width = self.a.shape[2] + self.b.shape[1]
        self.onednn = use_onednn(self.a, self.config.batch_size, runs[0].layer.r, width)

    # -- the step --

    def _step(self, index: torch.Tensor) -> None:
        """One optimizer step of every run on its rows ``index`` (T, n); no host sync."""
        train = self.train_split
        rows = index.reshape(-1)  # index_select on flat rows: cheaper than (T, n) indexing
        x = train.features.index_select(0, rows).view(*index.shape, -1)
        base = train.base_logits.index_select(0, rows).view(*index.shape, -1)
        logits, hidden = logits_and_hidden(x, base, self.a, self.b, self.scale, self.onednn)
        labels = None if train.labels is None else train.labels[index]
        teacher = None if self.teacher_log_probs is None else self.teacher_log_probs[index]
        check, grad = logit_grad(logits, labels, teacher, self.objective)
        grad_a, grad_b = adapter_grads(x, hidden, grad, self.b, self.scale, self.onednn)
        self.step += 1
        if self.device.type == "cpu":
            self._update_each(grad_a, grad_b)
        elif self.all_sgd:
            self.a.sub_(self.lr * grad_a)
            self.b.sub_(self.lr * grad_b)
        else:
            m_a, v_a, m_b, v_b = self.moments
            optimizer_step_(self.a, grad_a, m_a, v_a, self.step, self.lr, self.adam_mask)
            optimizer_step_(self.b, grad_b, m_b, v_b, self.step, self.lr, self.adam_mask)
        self.checks += check

    def _update_each(self, grad_a: torch.Tensor, grad_b: torch.Tensor) -> None:
        """The CPU's update: per run, the fused kernel ``torch.optim.Adam(fused=True)`` runs
        (what ``train_adapter`` uses, so the update is the same arithmetic), or plain SGD. On a
        CPU a few such calls cost less than the dozen whole-tensor passes of
        ``optimizer_step_``; a GPU captures that form in its graph instead."""
        m_a, v_a, m_b, v_b = self.moments
        steps = [self.step, self.step]
        for row, track in enumerate(self.tracks):
            config = track.run.config
            if config.optimizer == "SGD":
                self.a[row].sub_(grad_a[row], alpha=config.lr)
                self.b[row].sub_(grad_b[row], alpha=config.lr)
                continue
            params = [self.a[row], self.b[row]]
            grads = [grad_a[row], grad_b[row]]
            if fused_adam_available():
                fused_adam_(params, grads, [m_a[row], m_b[row]], [v_a[row], v_b[row]], steps,
                            config.lr)  # fmt: skip
                continue
            for param, grad, m, v in zip(params, grads, (m_a, m_b), (v_a, v_b), strict=True):
                optimizer_step_(param, grad, m[row], v[row], self.step, self.lr[row], None)

    def _state(self) -> list[torch.Tensor]:
        return [self.a, self.b, *self.moments, self.step, self.checks]

    def _capture(self, shape: tuple[int, int]) -> None:
        """Record the full-batch step as a CUDA graph (warm-up on a side stream, as the CUDA
        graphs notes of PyTorch ask; the warm-up's updates are undone)."""
        saved = [t.clone() for t in self._state()]
        static = torch.zeros(shape, dtype=torch.int64, device=self.device)
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self._step(static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step(static)
            self.graph = (graph, static)
        except RuntimeError as error:
            log.warning("CUDA graph capture failed (%s); training this group eagerly", error)
            self.graph = False
        for tensor, value in zip(self._state(), saved, strict=True):
            tensor.copy_(value)

    def _run_step(self, index: torch.Tensor, full: bool) -> None:
        if full and self.device.type == "cuda" and CUDA_GRAPHS and self.graph is not False:
            if self.graph is None:
                self._capture(tuple(index.shape))
            if self.graph:
                graph, static = self.graph
                static.copy_(index)
                graph.replay()
                return
        self._step(index)

    # -- epochs --

    def _keep(self, alive: list[bool]) -> None:
        """Drop the runs that stopped (pruned, diverged): later steps skip them."""
        if all(alive):
            return
        keep = torch.tensor(alive, device=self.device)
        self.tracks = [t for t, a in zip(self.tracks, alive, strict=True) if a]
        for name in ("a", "b", "scale", "lr", "adam", "checks"):
            setattr(self, name, getattr(self, name)[keep])
        if self.adam_mask is not None:
            self.adam_mask = self.adam
        self.moments = [m[keep] for m in self.moments]
        self.graph = None  # shapes changed: capture again

    def _measure(self, tracks: list[_Track], rows: torch.Tensor) -> list[float]:
        a, b, scale = self.a[rows], self.b[rows], self.scale[rows]
        sample = self.sample if self.curves else None
        for name, split in (("train", sample), ("val", self.val)):
            if split is None:
                losses = accuracies = [math.nan] * len(tracks)
            else:
                losses, accuracies = evaluate_stacked(a, b, scale, split)
            for track, loss, accuracy in zip(tracks, losses, accuracies, strict=True):
                track.history[f"{name}_loss"].append(loss)
                track.history[f"{name}_acc"].append(accuracy)
        return [track.history["val_acc"][-1] for track in tracks]

    def _state_of(self, row: int) -> dict[str, torch.Tensor]:
        return {"lora_A": self.a[row].clone(), "lora_B": self.b[row].clone()}

    def _notify(self, epoch: int, accuracies: list[float]) -> list[bool]:
        """Call each run's on_epoch; a run whose callback raised stops."""
        alive = []
        for track, accuracy in zip(self.tracks, accuracies, strict=True):
            callback = track.run.on_epoch
            try:
                if callback is not None and track.diverged_at is None:
                    callback(epoch, accuracy)
            except Exception as error:  # e.g. optuna.TrialPruned: this run ends here
                track.error = error
            alive.append(track.error is None and track.diverged_at is None)
        return alive

    def train(self) -> list[RunOutcome]:
        every = list(self.tracks)
        all_rows = torch.arange(len(self.tracks), device=self.device)
        for track, accuracy, row in zip(self.tracks, self._measure(self.tracks, all_rows),
                                        range(len(self.tracks)), strict=True):  # fmt: skip
            track.best_acc, track.best_state = accuracy, self._state_of(row)
        self._keep(self._notify(0, [t.best_acc for t in self.tracks]))
        size, rows = self.config.batch_size, len(self.train_split)
        for epoch in range(1, self.config.epochs + 1):
            if not self.tracks:
                break
            order = torch.stack(
                [torch.randperm(rows, generator=t.generator) for t in self.tracks]
            ).to(self.device)
            self.checks.zero_()
            threads = torch.get_num_threads()
            if self.one_thread:
                torch.set_num_threads(1)
            try:
                for start in range(0, rows, size):
                    interrupt.check()
                    index = order[:, start : start + size]
                    self._run_step(index, full=index.shape[1] == size)
            finally:
                if self.one_thread:
                    torch.set_num_threads(threads)
            finite = torch.isfinite(self.checks).tolist()  # the one sync of an epoch
            measured = [i for i, ok in enumerate(finite) if ok]
            tracks = [self.tracks[i] for i in measured]
            accuracies = dict(
                zip(
                    measured,
                    self._measure(tracks, torch.tensor(measured, device=self.device))
                    if measured
                    else [],
                    strict=True,
                )
            )
            for row, track in enumerate(self.tracks):
                accuracy = accuracies.get(row, math.nan)
                if math.isnan(accuracy) or not math.isfinite(track.history["val_loss"][-1]):
                    if not math.isnan(accuracy):
                        for values in track.history.values():
                            values.pop()
                    track.diverged_at = epoch
                elif accuracy > track.best_acc:
                    track.best_epoch, track.best_acc = epoch, accuracy
                    track.best_state = self._state_of(row)
            self._keep(self._notify(epoch, [accuracies.get(i, math.nan)
                                            for i in range(len(self.tracks))]))  # fmt: skip
        outcomes = []
        for track in every:
            layer = track.run.layer
            if track.error is not None:
                outcomes.append(RunOutcome(None, track.error))
                continue
            layer.load_adapter_state(track.best_state)
            layer.eval()
            result = TrainResult(
                track.history, track.best_epoch, track.best_acc, track.best_state,
                track.diverged_at,
            )  # fmt: skip
            outcomes.append(RunOutcome(result))
        return outcomes
