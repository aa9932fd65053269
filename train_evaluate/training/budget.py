"""``--bits-budget B``: each selected layer gets its own compressor and adapter rank from
``--methods`` x ``--ranks``, so that the stored bits of the selected layers come to at most B
per weight and the summed sensitivity is smallest (``compression.budget`` solves it).

A layer's sensitivity to one choice is its relative output error on the clean calibration
inputs, the layer alone compressed and initialised:

    ||(W - W~) X^T||^2 / ||W X^T||^2 = tr(D S D^T) / tr(W S W^T),  D = W - W~,

with W~ the compressed weight plus its initialised adapter (the run's ``--init``) and S the
second moment X^T X / N of the layer's inputs in the uncompressed network (one pass over the
calibration images, every layer at once). Each option is priced by the run's own accounting,
so the budget holds in the bits ``evaluation.csv`` reports.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from compression.budget import Allocation, Option, solve
from compression.registry import uses_inputs as config_uses_inputs
from lora import LoraConfig, make_adapter
from lora.attach import make_init_context
from lora.calibration import input_moments

log = logging.getLogger("train_model")


@dataclass(frozen=True)
class PerLayerCompression:
    """The compressor config of a budgeted method: each layer's method, config and requested
    rank, in forward order. ``describe()`` names the mix and a digest of every layer's choice,
    so that a study or record of one allocation is never taken for another's."""

    budget: float
    layers: tuple[tuple[str, str, Any, int], ...]  # (layer, method, config, rank)
    exact: bool

    @property
    def uses_inputs(self) -> bool:
        return any(config_uses_inputs(config) for _, _, config, _ in self.layers)

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for _, _, config, rank in self.layers:
            key = f"{config.describe()} r={rank}"
            counts[key] = counts.get(key, 0) + 1
        choice = ";".join(f"{n}={c.describe()}/{r}" for n, _, c, r in self.layers)
        digest = hashlib.sha256(choice.encode()).hexdigest()[:12]
        mix = ", ".join(f"{count} x {key}" for key, count in counts.items())
        how = "exact" if self.exact else "greedy"
        return f"bit budget {self.budget:g} bits/weight ({how}): {mix} [{digest}]"


@dataclass(frozen=True)
class LayerChoice:
    """One layer's option: its method and requested rank (the adapter is ``rank`` clamped to
    the layer), the bits it stores and its sensitivity."""

    layer: str
    method: str
    rank: int
    bits: int
    sensitivity: float


@dataclass(frozen=True)
class Budget:
    """The solved budget: every layer's options and the one it takes."""

    bits_per_weight: float
    budget_bits: int
    options: tuple[tuple[LayerChoice, ...], ...]  # per layer, in forward order
    allocation: Allocation

    @property
    def chosen(self) -> tuple[LayerChoice, ...]:
        return tuple(opts[k] for opts, k in zip(self.options, self.allocation.choice, strict=True))

    def compression(self, compressions: dict[str, Any]) -> PerLayerCompression:
        return PerLayerCompression(
            self.bits_per_weight,
            tuple((c.layer, c.method, compressions[c.method], c.rank) for c in self.chosen),
            self.allocation.exact,
        )


def relative_output_error(
    weight: torch.Tensor, approximation: torch.Tensor, moment: torch.Tensor
) -> float:
    """tr(D S D^T) / tr(W S W^T) in float64, D = weight - approximation (matrices out x in)."""
    w = weight.detach().double()
    d = w - approximation.detach().double()
    scale = float(((w @ moment) * w).sum())
    error = float(((d @ moment) * d).sum())
    return error / scale if scale > 0 else error


def measure_options(
    setup: Any, compressions: dict[str, Any], ranks: Sequence[int], sweep: Any, progress=None
) -> list[list[LayerChoice]]:
    """Every layer's options (each method at each rank, a rank the layer clamps to one already
    listed left out), priced and measured; ``setup``: the run's ``NetworkSetup``."""
    from compression import weight_matrix

    model = setup.model
    modules = {info.name: model.model.get_submodule(info.name) for info in setup.layers}
    device = next(model.parameters()).device

    def batches():
        for chunk in setup.calibration.split(32):
            yield model.preprocess(chunk.to(device))

    with torch.no_grad():
        moments = input_moments(model.model, modules, batches, 64)
    generator = torch.Generator(device=device)
    options = []
    for info in setup.layers:
        module, moment = modules[info.name], moments[info.name]
        weight = weight_matrix(module).detach()
        layer = []
        for method, config in compressions.items():
            context = make_init_context(module, config, moment=moment)
            cost = context.compressed.cost
            pricing = replace(setup.template, layers=(info,), costs=(cost,), ranks=None)
            clamped = set()
            for rank in ranks:
                if info.rank(rank) in clamped:
                    continue
                clamped.add(info.rank(rank))
                lora = LoraConfig(
                    r=info.rank(rank), lora_alpha=8.0, init=sweep.init,
                    use_dora=sweep.use_dora, loftq_iters=sweep.loftq_iters,
                )  # fmt: skip
                generator.manual_seed(0)
                with torch.no_grad():
                    adapter = make_adapter(module, lora, context, generator)
                    merged = adapter.merged_weight().flatten(1)
                (_, _, priced), *_ = pricing.per_layer(rank)
                layer.append(
                    LayerChoice(
                        info.name,
                        method,
                        rank,
                        priced.stored_bits,
                        relative_output_error(weight, merged, moment),
                    )
                )
        options.append(layer)
        if progress is not None:
            progress()
    return options


def allocate(
    setup: Any,
    compressions: dict[str, Any],
    ranks: Sequence[int],
    bits_per_weight: float,
    sweep: Any,
    progress=None,
) -> Budget:
    """The budget solved over the run's methods and ranks; ``compression.budget.BudgetError``
    when even the cheapest choice of every layer is over it."""
    options = measure_options(setup, compressions, ranks, sweep, progress)
    budget_bits = math.floor(bits_per_weight * setup.template.weights())
    allocation = solve(
        [
            [Option(f"{c.method} r={c.rank}", c.bits, c.sensitivity) for c in layer]
            for layer in options
        ],
        budget_bits,
    )
    return Budget(bits_per_weight, budget_bits, tuple(map(tuple, options)), allocation)
