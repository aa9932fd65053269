"""``LoraLinear``: a frozen (compressed) Linear layer plus a trainable low-rank adapter.

The base is a ``CompressedLinear`` (W_c and its stored parts) or, for backwards
compatibility, a plain ``nn.Linear``.

Shapes follow PEFT: the base weight W_c is out x in, ``lora_A`` is r x in, ``lora_B`` is out x r,
``scaling`` = lora_alpha / r, and

    y = x @ W_c.T + b + scaling * (x @ A.T) @ B.T

With ``use_dora`` (DoRA, Liu et al. 2024) a trainable magnitude m (one per output row) rescales
the rows of the merged direction V = W_c + scaling * B @ A:  W' = m * V / ||V||_row.

Rank 0 is a layer with no adapter: its factors are empty, it computes the compressed layer alone
and a packed file stores no adapter for it (a per-layer plan or a bit budget may leave a layer
without one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compression import CompressedWeight
from compression.modules import CompressedConv2d, CompressedLinear


def compressed_of(base: nn.Module) -> CompressedWeight | None:
    """A base layer's stored parts: None for a plain layer, which has none."""
    return base.compressed if isinstance(base, CompressedLinear | CompressedConv2d) else None


def check_rank(rank: int, out_features: int, in_features: int, use_dora: bool = False) -> None:
    """A rank the layer can take: 0 (no adapter: the compressed layer alone) to min(out, in)."""
    limit = min(out_features, in_features)
    if not 0 <= rank <= limit:
        raise ValueError(
            f"LoRA rank must be between 0 (no adapter) and {limit} for a {out_features} x "
            f"{in_features} layer (0 <= r <= min(out, in)); got {rank}"
        )
    if rank == 0 and use_dora:
        raise ValueError("a layer of rank 0 has no adapter, so no DoRA magnitude either")


def adapter_scaling(lora_alpha: float, rank: int) -> float:
    """lora_alpha / r. A rank-0 layer's factors are empty, so its scaling multiplies nothing:
    it is alpha, as at rank 1, so that no caller divides by zero."""
    return lora_alpha / max(rank, 1)


class AdapterState:
    """What every adapter layer shares: the merged weight (plain LoRA's or DoRA's, from the
    layer's ``delta_weight``), the trained tensors as a detached copy, loading them back, and
    its repr (``lora_A``, ``lora_B``, DoRA's ``lora_magnitude``, ``r``, alpha)."""

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude is not None

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """A detached copy of the trained tensors (A, B and DoRA's magnitude)."""
        state = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        if self.use_dora:
            state["lora_magnitude"] = self.lora_magnitude
        return {k: v.detach().clone() for k, v in state.items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, value in state.items():
                getattr(self, name).copy_(value)

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha:g}, use_dora={self.use_dora}"

    def direction(self) -> torch.Tensor:
        """W_c + scaling * B @ A (the base's shape): the merged weight of plain LoRA, DoRA's
        direction."""
        return self.base_layer.weight + self.delta_weight()

    def merged_weight(self) -> torch.Tensor:
        """The single dense weight this layer computes with (its bias is ``base_layer.bias``)."""
        direction = self.direction()
        if not self.use_dora:
            return direction
        # An output row (channel) of W_c + s B A can be all zero (a sparse base whose kept
        # entries are all in other rows, and B = 0): its norm is 0 and so is its magnitude; the
        # floor keeps 0 / 0 at 0.
        norm = direction.flatten(1).norm(dim=1).clamp_min(torch.finfo(direction.dtype).tiny)
        scale = self.lora_magnitude / norm
        return scale.view(-1, *[1] * (direction.ndim - 1)) * direction


class LoraLinear(AdapterState, nn.Module):
    def __init__(
        self,
        base_layer: CompressedLinear | nn.Linear,
        r: int,
        lora_alpha: float,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        out_features, in_features = base_layer.weight.shape
        check_rank(r, out_features, in_features, use_dora)
        self.base_layer = base_layer.requires_grad_(False)
        self.r = r
        self.lora_alpha = float(lora_alpha)
        self.scaling = adapter_scaling(self.lora_alpha, r)
        weight = base_layer.weight
        self.lora_A = nn.Parameter(weight.new_zeros(r, in_features))
        self.lora_B = nn.Parameter(weight.new_zeros(out_features, r))
        self.lora_magnitude = nn.Parameter(weight.new_ones(out_features)) if use_dora else None

    @property
    def base_compressed(self) -> CompressedWeight | None:
        """How the base is stored (a compressor's parts; what a packed checkpoint writes), or
        None for a plain Linear base. The base layer owns it; LoftQ refits it there."""
        return compressed_of(self.base_layer)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A (out x in)."""
        return self.scaling * self.lora_B @ self.lora_A

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        """``base_out``: this batch's ``base_layer(x)`` when the caller has it precomputed.

        The base is frozen, so a training loop over fixed inputs can compute it once; the
        adapter then costs r * (in + out) multiply-adds per row. DoRA rescales whole rows of
        the merged weight, so it always recomputes.
        """
        if self.r == 0:  # no adapter: the compressed layer alone
            return self.base_layer(x) if base_out is None else base_out
        if self.use_dora or (base_out is None and x.ndim > 2):
            # DoRA; and token inputs (a Linear inside a network): many rows per weight, where
            # one product with the merged W_c + s B A costs fewer kernels than three
            return F.linear(x, self.merged_weight(), self.base_layer.bias)
        if base_out is None:
            base_out = self.base_layer(x)
        # scale the small N x r product, not the N x out one, and let the GEMM add the base
        hidden = (x @ self.lora_A.T) * self.scaling
        if hidden.ndim == 2:
            return torch.addmm(base_out, hidden, self.lora_B.T)
        return base_out + hidden @ self.lora_B.T
