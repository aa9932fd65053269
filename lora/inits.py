"""Adapter initialisations, registered by name. Adding one is adding one decorated function.

An init sets ``lora_A`` and ``lora_B`` of a fresh ``LoraLinear`` from an ``InitContext`` (the
uncompressed weight W, the compressed W_c and how it was made). Each keeps one invariant that the
tests check:

- ``paper_init``: B = 0, so the layer's output equals the compressed layer's output exactly.
  A is drawn as PEFT's default ``init_lora_weights=True`` draws it: Kaiming-uniform with
  a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)). (The LoRA paper, Hu et al. 2021, says only "random
  Gaussian" for A; the original study used N(0, 1/r).)
- ``svd_init``: W_c + scaling * B @ A is the best rank-r approximation of W around W_c, i.e.
  scaling * B @ A is the rank-r truncated SVD of the residual R = W - W_c, for every alpha: the
  singular values are divided by the scaling before being split evenly between B and A.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from lora.layer import LoraLinear

InitFn = Callable[[LoraLinear, "InitContext", "torch.Generator | None"], None]

LORA_INITS: dict[str, InitFn] = {}


def register_init(name: str) -> Callable[[InitFn], InitFn]:
    def decorate(fn: InitFn) -> InitFn:
        LORA_INITS[name] = fn
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

    weight: the uncompressed W (out x in); base_weight: W_c; compression: the config that made
    W_c (for inits that refit the base); features: training inputs of the layer (N x in), for
    activation-aware inits.
    """

    weight: torch.Tensor
    base_weight: torch.Tensor
    compression: Any = None
    features: torch.Tensor | None = None

    @cached_property
    def residual_svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """U, S, Vh of R = W - W_c, computed in float64 so that a full-rank reconstruction is
        exact to the weight's own precision."""
        residual = self.weight.double() - self.base_weight.double()
        return torch.linalg.svd(residual, full_matrices=False)


def set_factors(layer: LoraLinear, left: torch.Tensor, singular: torch.Tensor, right: torch.Tensor):
    """Set B, A so that scaling * B @ A = left @ diag(singular) @ right.

    left: out x r, singular: r, right: r x in. The singular values are divided by the scaling
    and their square roots go to both factors, so B and A have the same scale.
    """
    root = torch.sqrt(singular / layer.scaling)
    with torch.no_grad():
        layer.lora_B.copy_(left * root)
        layer.lora_A.copy_(root.unsqueeze(1) * right)


@register_init("paper_init")
def paper_init(layer: LoraLinear, ctx: InitContext, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(layer.lora_B)


@register_init("svd_init")
def svd_init(layer: LoraLinear, ctx: InitContext, generator: torch.Generator | None) -> None:
    u, s, vh = ctx.residual_svd
    r = layer.r
    set_factors(layer, u[:, :r], s[:r], vh[:r])
