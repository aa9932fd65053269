"""``--bits-budget B``: each selected layer gets its own compressor and adapter rank from
``--methods`` x ``--ranks``, so that the stored bits of the selected layers come to at most B
per weight and the summed sensitivity is smallest (``compression.budget`` solves it).

A layer's sensitivity to one choice (``--budget-sensitivity``) is measured with that layer
alone compressed and initialised, W~ being its compressed weight plus its initialised adapter
(the run's ``--init``):

- ``output``: its relative output error on the clean calibration inputs,

      ||(W - W~) X^T||^2 / ||W X^T||^2 = tr(D S D^T) / tr(W S W^T),  D = W - W~,

  with S the second moment X^T X / N of the layer's inputs in the uncompressed network (one
  pass over the calibration images, every layer at once). Every layer counts the same, however
  much or little its error moves the logits.
- ``kl``: KL(original || model) of the network's logits over the calibration images, that
  layer alone replaced by W~ (one pass per option). The original's own KL is 0, so this is the
  increase the choice causes, in the units the network's output is judged in (HAWQ-v2 and
  BRECQ weigh layers by their effect on the loss for the same reason).
- ``kl-reconstructed``: the same KL, W~ taken after the layer's block has been reconstructed
  as ``--reconstruct`` reconstructs it (block stage, the run's steps, learned rounding and
  held-out rows) with that layer the only one compressed. An option that reconstruction wins
  back is then priced by what the final model keeps of its error, not by its error before.

Summing any of them over the layers, as the knapsack does, assumes the layers' effects add up.
Each option is priced by the run's own accounting, so the budget holds in the bits
``evaluation.csv`` reports.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from compression import compress
from compression.budget import Allocation, Option, solve
from compression.modules import replace_submodule
from compression.registry import uses_inputs as config_uses_inputs
from lora import LoraConfig, make_adapter
from lora.attach import make_init_context
from lora.calibration import input_moments
from lora.capture import first_outputs
from lora.plan import LayerPlan, LayerSpec, mix
from lora.reconstruction import (
    ReconstructionConfig,
    capture_module_io,
    reconstruct,
    reconstruction_units,
)

log = logging.getLogger("train_model")


@dataclass(frozen=True)
class PerLayerCompression:
    """The compressor config of a method with a choice per layer (a bit budget's, or a
    ``--layer-plan``'s): each layer's method, config and requested rank, in forward order.
    ``describe()`` names what made it (``label``), the mix and a digest of every layer's
    choice, so that a study or record of one allocation is never taken for another's."""

    label: str
    layers: tuple[tuple[str, str, Any, int], ...]  # (layer, method, config, rank)

    @classmethod
    def of(cls, plan: LayerPlan, compressions: dict[str, Any]) -> PerLayerCompression:
        label = plan.origin or f"layer plan {plan.name}"
        return cls(
            label, tuple((n, s.method, compressions[s.method], s.rank) for n, s in plan.layers)
        )

    @property
    def uses_inputs(self) -> bool:
        return any(config_uses_inputs(config) for _, _, config, _ in self.layers)

    def describe(self) -> str:
        choice = ";".join(f"{n}={c.describe()}/{r}" for n, _, c, r in self.layers)
        digest = hashlib.sha256(choice.encode()).hexdigest()[:12]
        choices = mix(f"{config.describe()} r={rank}" for _, _, config, rank in self.layers)
        return f"{self.label}: {choices} [{digest}]"


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

    def layer_plan(self, name: str, adapter_dtype: str) -> LayerPlan:
        """The budget's choice as a plan (what ``--layer-plan`` reads back)."""
        how = "exact" if self.allocation.exact else "greedy"
        return LayerPlan(
            name,
            tuple((c.layer, LayerSpec(c.method, c.rank)) for c in self.chosen),
            adapter_dtype,
            f"bit budget {self.bits_per_weight:g} bits/weight ({how})",
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


# --budget-sensitivity; the first is the default
SENSITIVITIES = ("output", "kl", "kl-reconstructed")
CHUNK = 32  # calibration images per pass


def network_kl(model: Any, inputs: torch.Tensor, teacher: torch.Tensor, chunk: int = 32) -> float:
    """KL(teacher || model) of the softmax over classes, summed over classes and averaged over
    the rows of ``inputs`` (what ``model`` takes), in float64."""
    total = 0.0
    with torch.no_grad():
        for rows, wanted in zip(inputs.split(chunk), teacher.split(chunk), strict=True):
            log_p = F.log_softmax(model(rows).double(), dim=-1)
            log_q = F.log_softmax(wanted.double(), dim=-1)
            total += float((log_q.exp() * (log_q - log_p)).sum())
    return total / max(len(inputs), 1)


class FromUnit:
    """The network run from one unit (a block holding selected layers) on, for passes that
    change nothing before it: each unit before it answers zeros of its output's shape (a
    ``SkippedModule``, the original kept inside), and the unit takes its clean input, cached
    once, chunk by chunk. Trusted only where it reproduces the original logits bit for bit
    (``reproduces``), so that a layer's KL costs the network from its block on."""

    def __init__(
        self,
        model: Any,
        unit: str,
        before: Sequence[tuple[str, tuple[int, ...]]],
        calibration: torch.Tensor,
        chunk: int,
    ) -> None:
        self.model, self.before, self.chunk = model, tuple(before), chunk
        self.unit = model.model.get_submodule(unit)
        self.clean, _ = capture_module_io(model, self.unit, calibration, chunk, with_output=False)
        self.start = 0

    def _hand(self, _module: torch.nn.Module, args: tuple) -> tuple:
        rows = len(args[0])
        # a copy: the unit may write in place on its input, which would damage the cache
        clean = self.clean[self.start : self.start + rows].clone()
        self.start += rows
        return (clean, *args[1:])

    def __enter__(self) -> FromUnit:
        from lora.cut import SkippedModule

        bare = self.model.model
        self.replaced = []
        for name, shape in self.before:
            stand_in = SkippedModule(bare.get_submodule(name), shape)
            self.replaced.append((name, replace_submodule(bare, name, stand_in)))
        self.handle = self.unit.register_forward_pre_hook(self._hand)
        return self

    def __exit__(self, *_exc) -> None:
        self.handle.remove()
        for name, original in reversed(self.replaced):
            replace_submodule(self.model.model, name, original)

    def kl(self, calibration: torch.Tensor, teacher: torch.Tensor) -> float:
        self.start = 0
        return network_kl(self.model, calibration, teacher, self.chunk)

    def reproduces(self, calibration: torch.Tensor, teacher: torch.Tensor) -> bool:
        self.start = 0
        try:
            with torch.no_grad():
                answers = [self.model(rows) for rows in calibration.split(self.chunk)]
        except RuntimeError:  # a stand-in written to in place: this unit cannot start a pass
            return False
        return torch.equal(torch.cat(answers), teacher)


def output_shapes(model: Any, names: Sequence[str], rows: torch.Tensor) -> dict[str, tuple]:
    """Each of ``names``' output shape per image (the first call, tensors only) on ``rows``."""
    modules = {name: model.model.get_submodule(name) for name in names}
    return {name: tuple(out.shape[1:]) for name, out in first_outputs(model, modules, rows).items()}


def option_bits(template: Any, info: Any, cost: Any, rank: int) -> int:
    """The bits one layer (``info``) stores compressed at ``cost`` with an adapter of ``rank``
    (clamped to the layer), as the run's accounting (``template``) prices it."""
    pricing = replace(template, layers=(info,), costs=(cost,), ranks=None)
    (_, _, priced), *_ = pricing.per_layer(rank)
    return priced.stored_bits


def shape_prices(
    template: Any, compressions: dict[str, Any], ranks: Sequence[int]
) -> list[list[int]]:
    """The bits of every option of ``template``'s layers (each method at each rank), priced as
    the run prices them. A compressor's cost depends on the matrix's shape alone, so a seeded
    random matrix of that shape prices it: no weights and no image are needed."""
    generator = torch.Generator().manual_seed(0)
    prices = []
    for info in template.layers:
        matrix = torch.randn(info.matrix, generator=generator)
        costs = [compress(matrix, config).cost for config in compressions.values()]
        prices.append([option_bits(template, info, cost, rank) for cost in costs for rank in ranks])
    return prices


def cheapest_bits(template: Any, compressions: dict[str, Any], ranks: Sequence[int]) -> int:
    """The fewest bits ``template``'s layers can store over ``compressions`` x ``ranks``, every
    layer at its cheapest option (a budget below this is refused before any work)."""
    return sum(min(layer) for layer in shape_prices(template, compressions, ranks))


def unreachable(bits_budget: float, template: Any, cheapest_bits: int) -> str:
    """The one line that refuses a budget below the cheapest option of every layer, priced
    as the budget is: over the whole model (``template``: the run's accounting)."""
    rest = template.model_bits(0)
    return (
        f"--bits-budget {bits_budget:g}: the cheapest choice of every layer (over --methods and "
        f"--ranks) makes {template.model_bits(cheapest_bits):.3f} bits per weight of the whole "
        f"model, {rest:.3f} of them stored outside the selected layers; raise the budget, or "
        "add a cheaper method or a smaller rank"
    )


def layer_options(
    setup: Any,
    compressions: dict[str, Any],
    ranks: Sequence[int],
    sweep: Any,
    skip: Collection[str] = (),
) -> Iterator[tuple[Any, torch.nn.Module, torch.Tensor, list[tuple[str, int, int, Any]]]]:
    """For each selected layer in forward order (those named in ``skip`` left out): its
    ``LayerInfo``, module and input moment (on the clean calibration images), and its options
    ``(method, rank, stored bits, adapter)``: each method at each rank, a rank the layer clamps
    to one already listed left out; the adapter holds the layer's compressed weight and its
    initialised adapter (``merged`` gives W~). ``setup``: the run's ``NetworkSetup``."""
    model = setup.model
    modules = {info.name: model.model.get_submodule(info.name) for info in setup.layers}
    device = next(model.parameters()).device

    def batches():
        for chunk in setup.calibration.split(32):
            yield model.preprocess(chunk.to(device))

    with torch.no_grad():
        moments = input_moments(model.model, modules, batches, 64)
    generator = torch.Generator(device=device)
    for info in (info for info in setup.layers if info.name not in skip):
        module, moment = modules[info.name], moments[info.name]
        options = []
        for method, config in compressions.items():
            context = make_init_context(module, config, moment=moment)
            cost = context.compressed.cost
            clamped = set()
            for rank in ranks:
                if info.rank(rank) in clamped:
                    continue
                clamped.add(info.rank(rank))
                lora = LoraConfig(
                    r=info.rank(rank), lora_alpha=8.0, init=sweep.init,
                    use_dora=sweep.use_dora and info.rank(rank) > 0, loftq_iters=sweep.loftq_iters,
                )  # fmt: skip
                generator.manual_seed(0)
                with torch.no_grad():
                    adapter = make_adapter(module, lora, context, generator)
                options.append(
                    (method, rank, option_bits(setup.template, info, cost, rank), adapter)
                )
        yield info, module, moment, options


def merged(adapter: Any) -> torch.Tensor:
    """W~: the adapter's compressed weight plus its low-rank term, a matrix out x in."""
    with torch.no_grad():
        return adapter.merged_weight().flatten(1)


def reconstructed(
    network: torch.nn.Module,
    reference: torch.nn.Module,
    layer: str,
    unit: str,
    adapter: Any,
    unit_inputs: torch.Tensor,
    config: ReconstructionConfig,
) -> None:
    """``adapter`` (of ``layer``) trained in place as ``--reconstruct`` trains block ``unit``,
    with it the only compressed layer: the block alone, on its clean inputs ``unit_inputs``
    (what the network gives it when nothing before it is compressed), against its copy in
    ``reference`` (the uncompressed network); ``network`` is left as it was."""
    config = replace(config, mode="block")
    clean = reference.get_submodule(unit)
    if unit == layer:  # a layer no boundary holds is its own block
        reconstruct(adapter, clean, [("", ("",))], unit_inputs, config)
        return
    block, inner = network.get_submodule(unit), layer.removeprefix(f"{unit}.")
    original = replace_submodule(block, inner, adapter)
    try:
        reconstruct(block, clean, [("", (inner,))], unit_inputs, config)
    finally:
        replace_submodule(block, inner, original)


def _start_at(
    model: Any, units: Sequence, index: int, shapes: dict, calibration: torch.Tensor, teacher
) -> FromUnit | None:
    """The passes of unit ``index``'s layers: from the unit (``FromUnit``) where that
    reproduces the original logits, else None (from the images)."""
    before = [(unit, shapes.get(unit)) for unit, _ in units[:index]]
    if not before or any(shape is None for _, shape in before):
        return None
    candidate = FromUnit(model, units[index][0], before, calibration, CHUNK)
    with candidate:
        return candidate if candidate.reproduces(calibration, teacher) else None


def _block_inputs(model: Any, block: torch.nn.Module, start: FromUnit | None, calibration):
    """A block's clean inputs over the calibration images: those the pass that starts at the
    block already holds, else captured on a pass from the images."""
    if start is not None:
        return start.clean
    return capture_module_io(model, block, calibration, CHUNK, with_output=False)[0]


def measure_options(
    setup: Any,
    compressions: dict[str, Any],
    ranks: Sequence[int],
    sweep: Any,
    progress=None,
    sensitivity: str = SENSITIVITIES[0],
    measured_before: dict[str, list[LayerChoice]] | None = None,
    on_layer: Callable[[dict[str, list[LayerChoice]]], None] | None = None,
) -> list[list[LayerChoice]]:
    """Every layer's options (``layer_options``), priced and measured by ``sensitivity`` (one
    of ``SENSITIVITIES``; ``kl-reconstructed`` needs ``setup.reconstruction`` enabled); the
    network is left as it was. The layers in ``measured_before`` are taken from it, not
    measured; ``on_layer`` is given every layer's options so far after each layer measured."""
    from compression import weight_matrix
    from lora.cut import boundaries

    if sensitivity not in SENSITIVITIES:
        raise ValueError(f"sensitivity: one of {', '.join(SENSITIVITIES)}; got {sensitivity}")
    rebuilt = sensitivity == "kl-reconstructed"
    if rebuilt and not setup.reconstruction.enabled:
        raise ValueError("kl-reconstructed measures each option after --reconstruct; none given")
    found = dict(measured_before or {})
    for _ in found if progress is not None else ():
        progress()
    if all(info.name in found for info in setup.layers):  # nothing to measure: no pass at all
        return [found[info.name] for info in setup.layers]
    model = setup.model
    device = next(model.parameters()).device
    calibration = setup.calibration.to(device)
    by_kl = sensitivity != "output"
    if by_kl:  # the original network's logits, which every option is judged by
        with torch.no_grad():
            teacher = torch.cat([model(rows) for rows in calibration.split(CHUNK)])
    if rebuilt:  # the clean network each option's block is reconstructed against
        reference = copy.deepcopy(model.model)

    def measured(module: torch.nn.Module, weight: torch.Tensor, moment: torch.Tensor) -> float:
        if not by_kl:
            return relative_output_error(weight_matrix(module), weight, moment)
        kept = module.weight.detach().clone()
        try:  # the layer alone replaced, for one pass over the calibration images
            with torch.no_grad():
                module.weight.copy_(weight.reshape(kept.shape).to(kept.dtype))
            if start is None:
                return network_kl(model, calibration, teacher, CHUNK)
            with start:
                return start.kl(calibration, teacher)
        finally:
            with torch.no_grad():
                module.weight.copy_(kept)

    # kl: each layer's passes start at its unit where that reproduces the original logits
    units = reconstruction_units([info.name for info in setup.layers], boundaries(model.model))
    unit_of = {name: index for index, (_, names) in enumerate(units) for name in names}
    shapes = output_shapes(model, [u for u, _ in units], calibration[:1]) if by_kl else {}
    start, current = None, None
    for info, module, moment, options in layer_options(setup, compressions, ranks, sweep, found):
        index = unit_of[info.name]
        if by_kl and index != current:
            start, current = _start_at(model, units, index, shapes, calibration, teacher), index
            if rebuilt:  # the block's clean inputs, which each option's reconstruction starts from
                block = model.model.get_submodule(units[index][0])
                unit_inputs = _block_inputs(model, block, start, calibration)
        choices = []
        for method, rank, bits, adapter in options:
            if rebuilt:
                unit = units[index][0]
                reconstructed(
                    model.model, reference, info.name, unit, adapter, unit_inputs,
                    setup.reconstruction,
                )  # fmt: skip
            sensitivity_of = measured(module, merged(adapter), moment)
            choices.append(LayerChoice(info.name, method, rank, bits, sensitivity_of))
        found[info.name] = choices
        if on_layer is not None:
            on_layer(found)
        if progress is not None:
            progress()
    return [found[info.name] for info in setup.layers]


def allocate(
    setup: Any,
    compressions: dict[str, Any],
    ranks: Sequence[int],
    bits_per_weight: float,
    sweep: Any,
    progress=None,
    sensitivity: str = SENSITIVITIES[0],
    options: list[list[LayerChoice]] | None = None,
) -> Budget:
    """The budget solved over the run's methods and ranks (``options``: those already measured
    by ``measure_options``, else measured here); ``compression.budget.BudgetError`` when even
    the cheapest choice of every layer is over it, ``SensitivityError`` when a sensitivity is
    NaN or infinite."""
    if options is None:
        options = measure_options(setup, compressions, ranks, sweep, progress, sensitivity)
    budget_bits = setup.template.budget_bits(bits_per_weight)
    allocation = solve(
        [
            [Option(f"{c.layer} {c.method} r={c.rank}", c.bits, c.sensitivity) for c in layer]
            for layer in options
        ],
        budget_bits,
    )
    return Budget(bits_per_weight, budget_bits, tuple(map(tuple, options)), allocation)
