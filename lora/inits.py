"""Adapter initialisations, registered by name. Adding one is adding one decorated function.

An init sets ``lora_A`` and ``lora_B`` of a fresh ``LoraLinear`` or ``LoraConv2d`` from an
``InitContext`` (the uncompressed weight W, the compressed W_c and how it was made). Inits see
only matrices: for a conv, W is the matrix view out x (in*kh*kw) and ``set_factors`` reshapes the
factors into the conv's A and B. Each keeps one invariant that the tests check:

- ``paper_init``: B = 0, so the layer's output equals the compressed layer's output exactly.
  A is drawn as PEFT's default ``init_lora_weights=True`` draws it: Kaiming-uniform with
  a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)). (The LoRA paper, Hu et al. 2021, says only "random
  Gaussian" for A; the original study used N(0, 1/r).)
- ``svd_init``: W_c + scaling * B @ A is the best rank-r approximation of W around W_c, i.e.
  scaling * B @ A is the rank-r truncated SVD of the residual R = W - W_c, for every alpha: the
  singular values are divided by the scaling before being split evenly between B and A.
- ``loftq_init``: the idea of LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware
  Quantization"), for any compressor C: alternate W_c = C(W - L) and L = rank-r SVD of W - W_c,
  starting from svd_init, and keep the iterate with the smallest ||W - W_c - L||_F. The base is
  refitted (same compressor, same storage). When C is an exact L2 projection (sparse absmax,
  N:M, int1) each step can only lower the error.
- ``act_svd_init``: minimises the error on the layer's inputs, ||X (R - L)^T||_F, instead of
  ||R - L||_F (activation-aware low-rank compensation, as in EoRA, Liu et al. 2024, and QERA,
  Zhang et al. 2024): whiten R by C^(1/2), where C = X^T X / N is the second moment of the
  layer's inputs (for a conv, its unfolded input patches), truncate its SVD, un-whiten. C's
  eigenvalues are raised by ``RIDGE`` x their mean before the square roots, so the solution
  minimises ||X M^T||^2 + ridge * N * ||M||^2 (M = R - L); it never has a larger input error
  than svd_init.
- ``act_loftq_init``: LoftQ's alternation with the activation-aware low-rank step, starting from
  act_svd_init, keeping the iterate with the smallest input error.

Asymmetric calibration (``InitContext.cross_moment``): when the inputs X~ a layer sees differ
from the clean inputs X it had in the uncompressed network (the layers before it are
compressed), the act-aware inits fit the full-precision outputs instead of the layer's own
weight on X~, min ||X~ (W_c + L)^T - X W^T||_F. Its unconstrained solution is the least-squares
target W_t = W (X^T X~)(X~^T X~)^-1 (``output_target``), and the objective equals
||X~ (W_t - W_c - L)^T||^2 plus a constant, so the same whitened truncation fits R = W_t - W_c.
This is the asymmetric calibration of GPTAQ (Li et al. 2025, arXiv:2504.02692), here for the
low-rank step as well as for GPTQ's rounding (``compresses_target``: GPTQ rounds W_t instead
of W, with H = X~^T X~ / N).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from compression import CompressedWeight, compress, second_moment, uses_inputs
from lora.conv import LoraConv2d
from lora.layer import LoraLinear

Adapter = LoraLinear | LoraConv2d
InitFn = Callable[[Adapter, "InitContext", Any, "torch.Generator | None"], None]
RIDGE = 1e-4  # act-aware inits: eigenvalue floor, relative to the mean eigenvalue


@dataclass(frozen=True)
class FitConfig:
    """How the activation-aware fits are regularised (``--fit-ridge``, ``--asymmetric-strength``).

    ridge: the eigenvalue floor of the inputs' moment, relative to its mean eigenvalue (the
    whitening of the act-aware inits and the asymmetric target's ridge towards W); a layer fitted
    on fewer rows than its input width (the FC: one row per calibration image) needs more of it.
    asymmetric_strength: with asymmetric calibration, the weight s of the clean-output objective
    against the layer's own (s = 1: the clean outputs alone; 0: the symmetric target W)."""

    ridge: float = RIDGE
    asymmetric_strength: float = 1.0


DEFAULT_FIT = FitConfig()

LORA_INITS: dict[str, InitFn] = {}
# Inits that read the layer's inputs (``InitContext.moment`` or ``features``): a calibration
# pass must run before them, and only before them.
ACTIVATION_AWARE_INITS: set[str] = set()


def register_init(name: str, activation_aware: bool = False) -> Callable[[InitFn], InitFn]:
    def decorate(fn: InitFn) -> InitFn:
        LORA_INITS[name] = fn
        if activation_aware:
            ACTIVATION_AWARE_INITS.add(name)
        return fn

    return decorate


def get_init(name: str) -> InitFn:
    if name not in LORA_INITS:
        raise ValueError(f"unknown LoRA init {name!r}; valid inits: {', '.join(LORA_INITS)}")
    return LORA_INITS[name]


@dataclass(eq=False)
class InitContext:
    """What an init may look at. One context serves every rank and trial of one compressor,
    so that expensive pieces (the residual's SVD) are computed once.

    weight: the uncompressed W (out x in; a conv's matrix view); compressed: C(W), its W_c and
    stored parts; compression: the config C (for inits that refit the base); features: inputs of
    the layer (N x in), for activation-aware inits; moment: their second moment X^T X / N
    (in x in, float64), which activation-aware inits use instead of ``features`` when given
    (a calibration pass accumulates it without holding X); cache: results an init may reuse
    across trials; cross_moment: X^T X~ / N (in x in, float64) of the clean inputs X (from the
    uncompressed network) and the inputs X~ that ``moment`` is of, on the same rows, for
    asymmetric calibration (None: symmetric, the fit imitates W on X~); fit: the ridge and the
    asymmetric strength of the act-aware fits.
    """

    weight: torch.Tensor
    compressed: CompressedWeight
    compression: Any = None
    features: torch.Tensor | None = None
    moment: torch.Tensor | None = field(default=None, repr=False)
    cache: dict = field(default_factory=dict, repr=False)
    cross_moment: torch.Tensor | None = field(default=None, repr=False)
    fit: FitConfig = DEFAULT_FIT

    @property
    def base_weight(self) -> torch.Tensor:
        return self.compressed.weight

    @cached_property
    def residual_svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """U, S, Vh of R = W - W_c, computed in float64 so that a full-rank reconstruction is
        exact to the weight's own precision."""
        residual = self.weight.double() - self.base_weight.double()
        return torch.linalg.svd(residual, full_matrices=False)

    @cached_property
    def input_moment(self) -> torch.Tensor | None:
        """C = X^T X / N (in x in, float64): ``moment``, or computed from ``features``; None
        when neither is known."""
        if self.moment is not None:
            return self.moment.double()
        if self.features is not None:
            return second_moment(self.features)
        return None

    @property
    def compress_moment(self) -> torch.Tensor | None:
        """What a calibrated compressor sees when an init refits the base: the inputs' moment
        (the same the stored base was compressed with), or None for the others."""
        return self.input_moment if uses_inputs(self.compression) else None

    @cached_property
    def target(self) -> torch.Tensor:
        """What W_c + L should equal (float64): W, or with ``cross_moment`` the least-squares
        target ``output_target`` of the full-precision outputs on the perturbed inputs."""
        if self.cross_moment is None:
            return self.weight.double()
        if self.input_moment is None:
            raise ValueError("a cross-moment needs the moment of the perturbed inputs as well")
        return output_target(
            self.weight,
            self.input_moment,
            self.cross_moment,
            self.fit.ridge,
            self.fit.asymmetric_strength,
        )

    @property
    def compress_target(self) -> torch.Tensor:
        """The matrix the stored base is compressed from: W, or W_t for GPTQ under asymmetric
        calibration (``compresses_target``), in the weight's dtype."""
        if self.cross_moment is None or not compresses_target(self.compression):
            return self.weight
        return self.target.to(self.weight.dtype)

    @cached_property
    def whitening(self) -> tuple[torch.Tensor, torch.Tensor]:
        """C^(1/2) and C^(-1/2) (in x in, float64) for C = X^T X / N, eigenvalues ridged.

        A grouped conv has one C per group (groups x c x c): a low-rank fit whitened row by row
        with each group's C would not stay of rank r, so its fit is whitened by their mean (the
        error it minimises weighs every group's rows alike by it)."""
        moment = self.input_moment
        if moment is None:
            raise ValueError(
                "activation-aware inits need the layer's training inputs (features) or their "
                "second moment (moment)"
            )
        if moment.ndim == 3:
            moment = moment.mean(dim=0)
        eigenvalues, vectors = symmetric_eigh(moment)
        eigenvalues = eigenvalues.clamp_min(0) + self.fit.ridge * eigenvalues.clamp_min(0).mean()
        root = eigenvalues.sqrt()
        return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T


def symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a symmetric ``matrix`` (or a batch of them). Where LAPACK fails
    to converge, as it can on a moment with hundreds of equal eigenvalues (inputs that are zero
    on every calibration image), the decomposition of matrix + c I instead: the same
    eigenvectors, the eigenvalues shifted by c, which is taken back off (c: 1e-6 of the mean
    diagonal)."""
    try:
        return torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        mean = matrix.diagonal(dim1=-2, dim2=-1).mean(dim=-1, keepdim=True)
        shift = 1e-6 * torch.where(mean > 0, mean, torch.ones_like(mean))
        identity = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
        eigenvalues, vectors = torch.linalg.eigh(matrix + shift.unsqueeze(-1) * identity)
        return eigenvalues - shift, vectors


def output_target(
    weight: torch.Tensor,
    moment: torch.Tensor,
    cross_moment: torch.Tensor,
    ridge: float = RIDGE,
    strength: float = 1.0,
) -> torch.Tensor:
    """W_t = W (s G + (1 - s) C~ + lam I)(C~ + lam I)^-1 (out x in, float64), with C~ = X~^T X~ / N
    the perturbed inputs' moment, G = X^T X~ / N the cross-moment of clean and perturbed inputs
    and s = ``strength``.

    It minimises s ||X~ M^T - X W^T||^2 / N + (1 - s) ||X~ (M - W)^T||^2 / N + lam ||M - W||^2
    over M: the least-squares fit of the full-precision outputs on the perturbed inputs (s = 1),
    blended with the layer's own outputs on them (s = 0 gives W), ridged towards W. lam =
    ``ridge`` x the mean eigenvalue of C~ (clamped at 0), the ridge of ``InitContext.whitening``,
    so that the whitened fit of W_t - W_c minimises exactly this objective; and with X~ = X
    (G = C~), W_t = W for every s. Equivalently W_t = W + s (W_t(1) - W). Moments of
    groups x c x c (a grouped conv's) fit each group's rows on its own.
    """
    grouped = moment.ndim == 3
    moment, cross = moment.double(), cross_moment.double()
    if not grouped:  # one group
        moment, cross = moment.unsqueeze(0), cross.unsqueeze(0)
    eigenvalues, vectors = symmetric_eigh(moment)
    eigenvalues = eigenvalues.clamp_min(0)
    lam = ridge * eigenvalues.mean(dim=-1, keepdim=True)  # groups x 1
    # a group whose inputs are all zero (a dead channel of a depthwise conv) has C~ = G = 0: any
    # positive lam then gives W_t = W, where lam = 0 would divide by zero
    lam = torch.where(lam > 0, lam, torch.ones_like(lam))
    inverse = (vectors / (eigenvalues + lam).unsqueeze(-2)) @ vectors.transpose(-2, -1)
    identity = torch.eye(cross.shape[-1], dtype=cross.dtype, device=cross.device)
    shifted = strength * cross + (1 - strength) * moment + lam.unsqueeze(-1) * identity
    rows = weight.double().reshape(moment.shape[0], -1, weight.shape[1])
    return ((rows @ shifted) @ inverse).reshape(weight.shape)


def compresses_target(compression: Any) -> bool:
    """Whether asymmetric calibration changes what ``compression`` rounds: GPTQ's error
    feedback minimises the output error, so it rounds towards W_t (as GPTAQ does); the other
    compressors round W itself."""
    return getattr(compression, "quantizer", None) in ("gptq", "gptq-adaround")


@dataclass
class LowRankFit:
    """scaling * B @ A = left @ diag(singular) @ right, and the error it leaves (in the norm the
    init minimises)."""

    left: torch.Tensor
    singular: torch.Tensor
    right: torch.Tensor
    error: float


def fit_low_rank(residual: torch.Tensor, rank: int, whitening=None) -> LowRankFit:
    """Best rank-r L for R (float64): in Frobenius norm, or in ||(R - L) C^(1/2)||_F when the
    whitening pair (C^(1/2), C^(-1/2)) is given."""
    target = residual if whitening is None else residual @ whitening[0]
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    right = vh[:rank] if whitening is None else vh[:rank] @ whitening[1]
    error = torch.sqrt((s[rank:] ** 2).sum()).item()
    return LowRankFit(u[:, :rank], s[:rank], right, error)


@dataclass
class Alternation:
    """What ``alternate`` found: the best iterate (its compressed base and low-rank fit) and
    the error after each iterate."""

    base: CompressedWeight
    fit: LowRankFit
    errors: list[float]


def alternate(
    weight: torch.Tensor,
    compression: Any,
    rank: int,
    iterations: int,
    whitening=None,
    moment: torch.Tensor | None = None,
    base: CompressedWeight | None = None,
) -> Alternation:
    """LoftQ's alternation: W_c = C(W - L), L = best rank-r fit of W - W_c, ``iterations``
    times from W_c = C(W). Returns the iterate with the smallest error (the first is svd_init,
    or act_svd_init with ``whitening``). ``moment``: the inputs a calibrated C sees. ``base``:
    the first W_c, when it is not C(W) (asymmetric calibration: W is then the target W_t and
    the first base the stored one)."""
    target = weight.double()
    if base is None:
        base = compress(weight, compression, moment)
    best, errors = None, []
    for _ in range(iterations):
        fit = fit_low_rank(target - base.weight.double(), rank, whitening)
        errors.append(fit.error)
        if best is None or fit.error < best.fit.error:
            best = Alternation(base, fit, errors)
        low_rank = (fit.left * fit.singular) @ fit.right
        base = compress((target - low_rank).to(weight.dtype), compression, moment)
    return best


def set_factors(
    layer: Adapter, left: torch.Tensor, singular: torch.Tensor, right: torch.Tensor
) -> None:
    """Set B, A so that scaling * B @ A = left @ diag(singular) @ right.

    left: out x r, singular: r, right: r x in (for a conv, in*kh*kw). The singular values are
    divided by the scaling and their square roots go to both factors, so B and A have the same
    scale. A conv's (out, r, 1, 1) B and (r, in, kh, kw) A are these matrices reshaped.
    """
    root = torch.sqrt(singular / layer.scaling)
    with torch.no_grad():
        layer.lora_B.copy_((left * root).reshape(layer.lora_B.shape))
        layer.lora_A.copy_((root.unsqueeze(1) * right).reshape(layer.lora_A.shape))


@register_init("paper_init")
def paper_init(layer: Adapter, ctx: InitContext, config: Any, generator) -> None:
    # for a conv A, kaiming's fan_in is in*kh*kw: the same bound as A's matrix view
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(layer.lora_B)


@register_init("svd_init")
def svd_init(layer: Adapter, ctx: InitContext, config: Any, generator) -> None:
    u, s, vh = ctx.residual_svd
    r = layer.r
    set_factors(layer, u[:, :r], s[:r], vh[:r])


@register_init("act_svd_init", activation_aware=True)
def act_svd_init(layer: Adapter, ctx: InitContext, config: Any, generator) -> None:
    # ctx.target is W itself unless the calibration is asymmetric
    residual = ctx.target - ctx.base_weight.double()
    fit = fit_low_rank(residual, layer.r, ctx.whitening)
    set_factors(layer, fit.left, fit.singular, fit.right)


def _set_alternation(layer: Adapter, result: Alternation) -> None:
    # the refitted base replaces the stored parts as well as W_c: a packed file holds it
    layer.base_layer.set_compressed(result.base)
    set_factors(layer, result.fit.left, result.fit.singular, result.fit.right)


@register_init("loftq_init")
def loftq_init(layer: Adapter, ctx: InitContext, config: Any, generator) -> None:
    # alpha-independent, so one alternation serves every trial of a rank
    key = ("loftq", layer.r, config.loftq_iters)
    if key not in ctx.cache:
        ctx.cache[key] = alternate(
            ctx.weight, ctx.compression, layer.r, config.loftq_iters, moment=ctx.compress_moment
        )
    _set_alternation(layer, ctx.cache[key])


@register_init("act_loftq_init", activation_aware=True)
def act_loftq_init(layer: Adapter, ctx: InitContext, config: Any, generator) -> None:
    key = ("act_loftq", layer.r, config.loftq_iters)
    if key not in ctx.cache and ctx.cross_moment is None:
        ctx.cache[key] = alternate(
            ctx.weight,
            ctx.compression,
            layer.r,
            config.loftq_iters,
            ctx.whitening,
            ctx.compress_moment,
        )
    elif key not in ctx.cache:
        # asymmetric: W_c = C(W_t - L), L = the whitened fit of W_t - W_c, from the stored base
        # (act_svd_init's iterate), so every iterate's error is the output error up to a constant
        ctx.cache[key] = alternate(
            ctx.target.to(ctx.weight.dtype),
            ctx.compression,
            layer.r,
            config.loftq_iters,
            ctx.whitening,
            ctx.compress_moment,
            base=ctx.compressed,
        )
    _set_alternation(layer, ctx.cache[key])
