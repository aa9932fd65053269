"""Learned rounding of N-bit integer weights (``--quantizer adaround``, int2 to int8).

Round to nearest picks each code on its own; AdaRound (Nagel et al. 2020, arXiv:2004.10568)
learns, per weight, whether to round down or up so that the layer's (here: the block's) output
stays close to the uncompressed one. Each weight W_ij / s_i = f_ij + r_ij (f the floor, r in
[0, 1)) gets a logit V_ij; during training the code is the soft f_ij + h(V_ij), with
h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1) the rectified sigmoid (zeta = 1.1,
gamma = -0.1), clamped to the N-bit range. V starts where h(V) = r, i.e. at the weight itself.
A regulariser sum(1 - |2h - 1|^beta), with beta annealed from 20 to 2 after a warm-up without
it, pushes every h to 0 or 1; the final code is f + [V >= 0] (h >= 1/2). The grid (the row
scales, max or mse) is the one the scale option fixed: storage and bits are those of
round-to-nearest, only the codes change.

One departure from the paper: the forward pass uses the codes the logits choose at that step,
f + [V >= 0], and the gradient flows through the soft codes f + h(V) (a straight-through
estimator). AdaRound trains on the soft codes for some 10,000 steps per block until the
regulariser has driven them to 0 or 1; in the few hundred steps a CPU affords they are still
far from it, and the adapters trained beside them do not fit the codes that are then stored
(on the small test resnet at int2 and int4, the soft form ended worse than round to nearest on
most blocks, the straight-through form better on every block it changed). It starts at round
to nearest (V >= 0 exactly where r >= 1/2), or, with ``gptq-adaround``, from the codes GPTQ
stored (``start_from``), so that it keeps them when it takes no step.

``SoftRounding`` is a ``torch.nn.utils.parametrize`` parametrization of a compressed layer's
weight; ``lora.reconstruction`` trains it with the block's adapters.
"""

from __future__ import annotations

import torch
from torch import nn

ZETA, GAMMA = 1.1, -0.1
BETA_START, BETA_END = 20.0, 2.0
WARMUP = 0.2  # the first fifth of the steps: reconstruction only, no regulariser


# the quantizers that learn their rounding; gptq-adaround starts from GPTQ's codes
LEARNED = ("adaround", "gptq-adaround")


def learns_rounding(config: object) -> bool:
    """Whether a compressor config asks for learned rounding."""
    return getattr(config, "quantizer", None) in LEARNED


def rectified_sigmoid(logits: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(logits) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def initial_logits(rest: torch.Tensor) -> torch.Tensor:
    """V with h(V) = ``rest`` (in [0, 1]), the inverse of the rectified sigmoid where it is
    invertible (rest at 0 or 1 lands just inside)."""
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def beta_at(step: int, steps: int) -> float | None:
    """The regulariser's exponent at ``step`` of ``steps``: None during the warm-up, then from
    BETA_START down to BETA_END linearly."""
    start = int(WARMUP * steps)
    if step < start:
        return None
    progress = (step - start) / max(1, steps - start - 1)
    return BETA_START + (BETA_END - BETA_START) * min(1.0, progress)


def start_from(steps: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, r) such that f + [r >= 1/2] is ``codes`` and f + r is as near ``steps`` (W / s) as
    that allows: f = codes where the weight lies at or above its code, else codes - 1; r is
    the weight's distance above f, kept on the side of 1/2 that gives back the code. GPTQ's
    codes can lie several steps from the weight, whose error they feed forward: learned
    rounding then starts from them, not from round to nearest."""
    above = steps >= codes
    floor = torch.where(above, codes, codes - 1)
    rest = torch.where(above, (steps - floor).clamp(0, 0.49), (steps - floor).clamp(0.51, 1))
    return floor, rest


class SoftRounding(nn.Module):
    """The weight s_i * clamp(f_ij + h(V_ij), lo_i, hi_i), shaped like the layer's weight, from
    the uncompressed ``weight`` and the row ``scale`` (rows x 1) of its N-bit grid, whose codes
    lie in [``lo``, ``hi``] (numbers, or rows x 1 on an affine grid). ``codes``: the stored
    codes to start from (``start_from``); without them, round to nearest. ``relaxed``: the
    forward pass gives the soft weight (AdaRound's relaxation) instead of the hard codes."""

    def __init__(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor,
        lo,
        hi,
        codes: torch.Tensor | None = None,
        relaxed: bool = False,
    ) -> None:
        super().__init__()
        self.relaxed = relaxed
        scale = scale.detach().float()  # fp16 scales: the grid's values, computed in fp32
        matrix = weight.detach().reshape(weight.shape[0], -1).to(scale.dtype)
        steps = matrix / torch.where(scale > 0, scale, 1)  # an all-zero row: codes 0 either way
        if codes is None:
            floor = torch.floor(steps)
            rest = steps - floor
        else:
            floor, rest = start_from(steps, codes.detach().to(scale.dtype))
        self.shape = tuple(weight.shape)
        self.register_buffer("floor", floor)
        self.register_buffer("scale", scale.clone())
        self.register_buffer("lo", torch.as_tensor(lo, dtype=scale.dtype).expand_as(scale).clone())
        self.register_buffer("hi", torch.as_tensor(hi, dtype=scale.dtype).expand_as(scale).clone())
        self.logits = nn.Parameter(initial_logits(rest))

    def forward(self, _stored: torch.Tensor) -> torch.Tensor:
        """The weight with the codes the logits choose now (``hard_codes``); the gradient
        flows through the soft codes (straight through). Relaxed: the soft weight itself."""
        if self.relaxed:
            return self.soft_weight()
        soft = self.floor + rectified_sigmoid(self.logits)
        hard = self.floor + (self.logits >= 0).to(soft.dtype)
        codes = torch.clamp(hard + (soft - soft.detach()), self.lo, self.hi)
        return (codes * self.scale).reshape(self.shape)

    def soft_weight(self) -> torch.Tensor:
        """The weight with the soft codes f + h(V) themselves (AdaRound's relaxation)."""
        codes = torch.clamp(self.floor + rectified_sigmoid(self.logits), self.lo, self.hi)
        return (codes * self.scale).reshape(self.shape)

    def regulariser(self, beta: float) -> torch.Tensor:
        """mean(1 - |2h - 1|^beta): 0 when every h is 0 or 1; here it keeps a code from
        flipping on a weak gradient."""
        return (1 - (2 * rectified_sigmoid(self.logits) - 1).abs().pow(beta)).mean()

    def hard_codes(self) -> torch.Tensor:
        """The learned codes (rows x cols): the floor, plus one where h >= 1/2 (V >= 0)."""
        up = (self.logits.detach() >= 0).to(self.floor.dtype)
        return torch.clamp(self.floor + up, self.lo, self.hi) + 0.0  # -0.0 -> +0.0
