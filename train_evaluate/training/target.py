"""What the sweep trains and scores, whatever it covers: a ``Target`` is one compression of
some of a model's layers (each with its compressor) from which adapted models are built.

Two implementations: ``fc_method.Method``, the classifier alone on its cached pre-logits
features (trained by the batched engine), and ``network.NetworkMethod``, any set of a
network's Linear and Conv2d layers on the cached images. Everything downstream of them (the
study, the finals, the rows, the plan, the checkpoint read back) asks only what is here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from compression import StorageCost
from lora.plan import LayerPlan


class Target(Protocol):
    name: str  # the rows' ``quant``: a method, a budget or a plan
    config: Any  # the compressor config (``describe()`` names it in the rows)
    records: dict[int, list]  # per rank, the reconstruction's stages (none without one)

    @property
    def cost(self) -> StorageCost:
        """The compressor's storage over every layer it covers (no adapters)."""
        ...

    def adapted(self, rank: int, alpha: float, sweep: Any, seed: int) -> nn.Module:
        """A fresh compressed model with adapters of ``rank``, ``alpha`` and ``seed``."""
        ...

    def compressed_model(self, sweep: Any = None) -> nn.Module:
        """The compressed layers without adapters: the ``quantized`` row (``sweep``: what a
        target may use to share work with its ranks' models)."""
        ...

    def layer_plan(self, rank: int, adapter_dtype: str) -> LayerPlan:
        """The plan of its models at ``rank``: each layer's method and rank."""
        ...

    def descriptions(self) -> dict[str, str]:
        """Each method it uses, fully described (what a plan file records)."""
        ...

    def adapters_of(self, model: nn.Module) -> dict[str, nn.Module]:
        """The adapted layers of one of its models, by the module each replaces (what a packed
        file stores)."""
        ...

    def load(self, path: Path, device: torch.device | str) -> nn.Module:
        """The adapted model a checkpoint of this target holds, read back and checked."""
        ...
