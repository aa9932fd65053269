"""Label-free reconstruction of a compressed network's adapters, block by block, then end to end.

The closed-form inits (``lora.calibration``) fit each layer alone. Reconstruction trains the
adapters against the uncompressed network on the calibration images, without reading a label:

- ``block``: in forward order, each unit (a block the model's structure delimits, see
  ``reconstruction_units``) is trained so that its compressed, adapted form reproduces the
  uncompressed unit's output, minimising the mean squared error. The unit's input comes from
  the compressed prefix as already reconstructed, its target from the uncompressed network on
  the clean input, so a unit also corrects the error that reaches it from upstream (BRECQ, Li et
  al. 2021, arXiv:2102.05426, which learns the rounding there instead of adapters).
- ``network``: ``block``, then every adapter together, end to end, on the uncompressed
  network's softened logits (KL divergence, as ``--objective kd``).

With ``--quantizer adaround`` (or ``gptq-adaround``, from GPTQ's codes) a block's N-bit layers
also learn each weight's rounding, with the block's adapters (``compression.adaround``); the
learned codes then replace the stored ones.

Each stage trains on most calibration rows and measures its error on the rest, held out
(``ReconstructionConfig.held_out``), before and after training (after: with the learned codes
themselves, not their soft form), and keeps the better of the two states: a stage never leaves
a unit worse than it found it on rows it did not fit. Nothing else moves: BatchNorm statistics
and every other tensor stay as they are (every module in eval mode).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from compression import CompressedWeight
from compression.adaround import SoftRounding, beta_at, learns_rounding
from compression.integer import FED_BACK, code_bounds, from_codes, row_zero, signed_codes
from lora.capture import NotCalled, first_call
from lora.cut import CarriedStates
from lora.layer import compressed_of

MODES = ("none", "block", "network")
# how a block's loss weighs its output error against the rounding regulariser: ``relative``,
# the mean squared error over the target's mean power plus the weight times the regulariser's
# mean over the layers' weights (the balance is the same in every block); ``brecq``, as BRECQ
# (Li et al. 2021, arXiv:2102.05426) and AdaRound sum them: the squared error summed over the
# output channels (the last axis of a token layout), averaged over the images and positions,
# plus the weight times the regulariser
# summed over every weight (the balance follows the block's width against its weight count)
WEIGHTINGS = ("relative", "brecq")
# what learned rounding trains on: ``straight-through``, the hard codes, the gradient passed
# through the soft ones; ``soft``, AdaRound's relaxation (Nagel et al. 2020, arXiv:2004.10568):
# the soft weight itself, which the regulariser drives to the grid before the codes are hardened
RELAXATIONS = ("straight-through", "soft")


@dataclass(frozen=True)
class ReconstructionConfig:
    """mode: ``none``, ``block`` or ``network`` (block, then end to end); block_steps: Adam steps
    per unit; network_steps: Adam steps of the end-to-end stage; lr: Adam's learning rate;
    batch_size: calibration images per step; temperature: the KL's softening of both logits;
    seed: the order in which the steps draw their batches; rounding_lr, rounding_weight: Adam's
    learning rate for learned rounding's logits and the weight of its regulariser against the
    relative squared error (``--quantizer adaround``); held_out: the share of the calibration
    rows that no step trains on and that alone decide whether a stage keeps its trained state;
    drop: QDrop's probability (Wei et al. 2022, arXiv:2203.05740) that a unit's input value
    is taken from the clean network instead of the compressed prefix, drawn anew each step;
    weighting: one of ``WEIGHTINGS``; relaxation: one of ``RELAXATIONS``."""

    mode: str = "none"
    block_steps: int = 100
    network_steps: int = 50
    lr: float = 1e-3
    batch_size: int = 32
    temperature: float = 1.0
    seed: int = 0
    rounding_lr: float = 1e-2
    rounding_weight: float = 0.01
    held_out: float = 0.125
    drop: float = 0.0
    weighting: str = WEIGHTINGS[0]
    relaxation: str = RELAXATIONS[0]

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown reconstruction {self.mode!r}; valid: {', '.join(MODES)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(
                f"unknown weighting {self.weighting!r}; valid: {', '.join(WEIGHTINGS)}"
            )
        if self.relaxation not in RELAXATIONS:
            raise ValueError(
                f"unknown relaxation {self.relaxation!r}; valid: {', '.join(RELAXATIONS)}"
            )
        if not 0 <= self.rounding_weight < float("inf"):
            raise ValueError("the rounding regulariser's weight must be at least 0 and finite")
        if self.block_steps < 1 or self.network_steps < 1 or self.batch_size < 1:
            raise ValueError("reconstruction steps and batch size must be at least 1")
        if not (0 <= self.held_out < 1 and 0 <= self.drop <= 1):
            raise ValueError("the held-out share must lie in [0, 1) and the drop in [0, 1]")
        rates = (self.lr, self.temperature, self.rounding_lr)
        if not all(0 < value < float("inf") for value in rates):
            raise ValueError(
                "the reconstruction's learning rates and temperature must be positive and finite"
            )

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


NO_RECONSTRUCTION = ReconstructionConfig()


@dataclass(frozen=True)
class UnitRecord:
    """One stage of a reconstruction: the unit's module name (``network`` for the end-to-end
    stage), its adapted layers, its error over the held-out calibration rows before and after
    training (a unit: squared error over the target's squared norm; the network: the KL), the
    steps taken, which state it kept (``trained``, or ``start`` when training made it worse),
    and how many stored codes learned rounding changed (kept ones only)."""

    unit: str
    layers: tuple[str, ...]
    error_start: float
    error_end: float
    steps: int
    kept: str
    codes_changed: int = 0


class ReconstructionError(ValueError):
    """A unit that cannot be reconstructed on its own; the message names it."""


def reconstruction_units(
    names: Sequence[str], boundaries: Iterable[str]
) -> list[tuple[str, tuple[str, ...]]]:
    """The selected layers ``names`` (in forward order) grouped into units: each layer goes to
    the deepest module of ``boundaries`` that holds it (itself when none does), and a unit that
    lies inside another joins it (a ResNet block's shortcut conv, a child of its own Sequential,
    belongs to the block). Units come in the order of their first layer."""
    bounds = set(boundaries)
    owners: dict[str, str] = {}
    for name in names:
        parts = name.split(".")
        owner = name
        for end in range(len(parts), 0, -1):
            prefix = ".".join(parts[:end])
            if prefix in bounds:
                owner = prefix
                break
        owners[name] = owner
    outer = set(owners.values())
    units: dict[str, list[str]] = {}
    for name in names:
        owner = owners[name]
        enclosing = [u for u in outer if owner.startswith(f"{u}.")]
        if enclosing:
            owner = min(enclosing, key=len)
        units.setdefault(owner, []).append(name)
    return [(unit, tuple(layers)) for unit, layers in units.items()]


def capture_module_io(
    model: nn.Module, module: nn.Module, inputs: torch.Tensor, chunk: int, with_output: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``module``'s input (and output) on every row of ``inputs`` when ``model`` runs on them,
    ``chunk`` rows at a time; each pass stops as soon as it has them."""
    taken, given = [], []
    for rows in inputs.split(chunk):
        try:
            x, y = first_call(model, module, rows, with_output)
        except NotCalled as error:
            raise ReconstructionError(str(error)) from None
        if with_output and not isinstance(y, torch.Tensor):
            raise ReconstructionError(f"it answers a {type(y).__name__}, not a tensor")
        taken.append(x)
        given.append(y)
    return torch.cat(taken), torch.cat(given) if with_output else None


def _check_alone(module: nn.Module, clean_in: torch.Tensor, target: torch.Tensor, chunk: int):
    """A unit is trained as ``module(x)``: it must answer what it answered inside the network,
    or it reads something besides its first input."""
    with torch.no_grad():
        again = module(clean_in[:chunk])
    scale = target[:chunk].abs().max().clamp_min(1e-12)
    if again.shape != target[:chunk].shape or not torch.allclose(
        again, target[:chunk], rtol=1e-4, atol=1e-5 * float(scale)
    ):
        raise ReconstructionError("called on its own input it does not answer what it answers "
                                  "inside the network")  # fmt: skip


def _trainable(adapters: Sequence[nn.Module]) -> list[nn.Parameter]:
    # a rank-0 layer's empty factors: nothing to train (a unit of them alone takes no step)
    return [
        p for adapter in adapters for p in adapter.parameters() if p.requires_grad and p.numel()
    ]


def _snapshot(parameters: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in parameters]


def _restore(parameters: Sequence[nn.Parameter], state: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for parameter, value in zip(parameters, state, strict=True):
            parameter.copy_(value)


def split_rows(rows: int, config: ReconstructionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(trained, held out): a seeded split of ``rows`` calibration rows, ``config.held_out`` of
    them (at least one) held out; with fewer than two rows, or no share, every row is both."""
    held = min(rows - 1, max(1, round(rows * config.held_out))) if config.held_out else 0
    if held < 1:
        every = torch.arange(rows)
        return every, every
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(config.seed + 1))
    return order[held:].sort().values, order[:held].sort().values


def _fit(
    groups: list[dict],
    loss_of: Callable[[torch.Tensor, int], torch.Tensor],
    rows: torch.Tensor,
    steps: int,
    config: ReconstructionConfig,
    generator: torch.Generator,
) -> None:
    """``steps`` Adam steps (parameter ``groups``, each with its lr) on ``loss_of(batch rows,
    step)``, the batches drawn without replacement from a fresh permutation of ``rows`` (the
    indices trained on) each time one runs out."""
    groups = [group for group in groups if group["params"]]
    if not groups:
        return
    optimizer = torch.optim.Adam(groups)
    order = torch.empty(0, dtype=torch.long)
    for step in range(steps):
        if len(order) < min(config.batch_size, len(rows)):
            order = rows[torch.randperm(len(rows), generator=generator)]
        batch, order = order[: config.batch_size], order[config.batch_size :]
        optimizer.zero_grad(set_to_none=True)
        loss_of(batch, step).backward()
        optimizer.step()


def _soft_roundings(
    adapted: nn.Module, reference: nn.Module, layers: Sequence[str], relaxed: bool = False
) -> dict[str, SoftRounding]:
    """A ``SoftRounding`` put on the base weight of every layer of ``layers`` whose compressor
    learns its rounding, started from the uncompressed weight on the stored grid (at the stored
    codes where GPTQ chose them)."""
    found = {}
    for name in layers:
        base = getattr(adapted.get_submodule(name), "base_layer", None)
        compressed = compressed_of(base) if base is not None else None
        if compressed is None or not learns_rounding(compressed.config):
            continue
        lo, hi = code_bounds(compressed.config, row_zero(compressed))
        weight = reference.get_submodule(name).weight
        # gptq-adaround: from the codes GPTQ stored; adaround: from round to nearest
        codes = signed_codes(compressed) if compressed.config.quantizer in FED_BACK else None
        rounding = SoftRounding(weight, compressed.parts["scale"], lo, hi, codes, relaxed)
        rounding = rounding.to(weight.device)
        parametrize.register_parametrization(base, "weight", rounding)
        found[name] = rounding
    return found


def _harden(adapted: nn.Module, roundings: dict[str, SoftRounding]) -> dict[str, tuple]:
    """Each soft rounding replaced by its learned codes, stored; returns, per layer, the stored
    base it had before and the number of codes that changed."""
    before = {}
    for name, rounding in roundings.items():
        base = adapted.get_submodule(name).base_layer
        codes = rounding.hard_codes()
        parametrize.remove_parametrizations(base, "weight", leave_parametrized=False)
        old = _detached(base.compressed)
        old_codes = signed_codes(old).to(codes.dtype)
        scale = old.parts["scale"].to(codes.dtype)
        base.set_compressed(from_codes(codes, scale, old.config, row_zero(old)))
        before[name] = (old, int((old_codes != codes).sum()))
    return before


def _relative_error(module: nn.Module, x: torch.Tensor, target: torch.Tensor, chunk: int) -> float:
    error = norm = 0.0
    with torch.no_grad():
        for rows, wanted in zip(x.split(chunk), target.split(chunk), strict=True):
            error += float((module(rows) - wanted).double().square().sum())
            norm += float(wanted.double().square().sum())
    return error / max(norm, 1e-300)


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on logits softened by ``temperature``, times T^2 (Hinton et al.),
    summed over classes and averaged over rows."""
    log_p = F.log_softmax(student / temperature, dim=-1)
    log_q = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
    return kl * temperature**2


def _network_error(
    model: nn.Module, inputs: torch.Tensor, teacher: torch.Tensor, chunk: int, temperature: float
) -> float:
    total = 0.0
    with torch.no_grad():
        for rows, wanted in zip(inputs.split(chunk), teacher.split(chunk), strict=True):
            total += float(_kl(model(rows).float(), wanted, temperature)) * len(rows)
    return total / len(inputs)


def _keep_better(parameters, start, error_start: float, error_end: float) -> tuple[float, str]:
    if error_end <= error_start:
        return error_end, "trained"
    _restore(parameters, start)
    return error_start, "start"


def refit_steps(config: ReconstructionConfig) -> int:
    """Adam steps of a block's adapters after its rounding is learned and stored."""
    return max(1, config.block_steps // 2)


def learned_bases(adapted: nn.Module, layers: Sequence[str]) -> dict[str, CompressedWeight]:
    """The stored base of each of ``layers`` whose rounding was learned (to carry them over to
    a copy of the network)."""
    found = {}
    for name in layers:
        compressed = compressed_of(getattr(adapted.get_submodule(name), "base_layer", None))
        if compressed is not None and learns_rounding(compressed.config):
            found[name] = _detached(compressed)
    return found


def _detached(compressed: CompressedWeight) -> CompressedWeight:
    """``compressed`` with a copy of its weight: a layer's ``compressed`` is a view of the
    weight that ``set_compressed`` overwrites in place."""
    return dataclasses.replace(compressed, weight=compressed.weight.detach().clone())


class _Chain:
    """Each unit's input (from the compressed, already reconstructed prefix) and its clean input
    and output (from the uncompressed network), carried from unit to unit (``CarriedStates``):
    a unit costs the part of the network between the last verified block boundary and its own
    end, not the whole prefix again. A unit with no boundary before it (the first, or one past a
    skip connection) reads both networks from the inputs."""

    def __init__(
        self, adapted: nn.Module, reference: nn.Module, inputs: torch.Tensor, chunk: int
    ) -> None:
        networks = {"reference": reference, "adapted": adapted}  # boundaries found on reference
        self.carried = CarriedStates(networks, list(inputs.split(chunk)))
        self.chunk = chunk

    def unit_io(self, unit: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The unit's input in the adapted network, its clean input and its clean output, over
        every calibration row."""
        found = {}
        for kind, (network, batches) in self.carried.before(unit).items():
            found[kind] = capture_module_io(
                network, network.get_submodule(unit), torch.cat(batches), self.chunk,
                with_output=kind == "reference",
            )  # fmt: skip
        return found["adapted"][0], *found["reference"]


def reconstruct(
    adapted: nn.Module,
    reference: nn.Module,
    units: Sequence[tuple[str, Sequence[str]]],
    inputs: torch.Tensor,
    config: ReconstructionConfig,
    progress: Callable[[str], None] | None = None,
) -> list[UnitRecord]:
    """Train ``adapted``'s adapters in place against ``reference`` (the uncompressed network:
    same structure, frozen) on the calibration ``inputs`` (what both networks take), as
    ``config.mode`` says; returns one record per stage. ``units``: (module name, the adapted
    layers' names inside it), in forward order (``reconstruction_units``)."""
    if not config.enabled:
        return []
    adapted.eval()
    reference.eval()
    chunk = config.batch_size
    generator = torch.Generator().manual_seed(config.seed)
    records = []
    chain = _Chain(adapted, reference, inputs, chunk)
    trained, held = split_rows(len(inputs), config)
    for unit, layers in units:
        module, clean = adapted.get_submodule(unit), reference.get_submodule(unit)
        try:
            x, clean_in, target = chain.unit_io(unit)
            _check_alone(clean, clean_in, target, chunk)
        except ReconstructionError as error:
            raise ReconstructionError(f"block {unit} cannot be reconstructed: {error}") from None
        if not config.drop:
            clean_in = None  # not needed past the check: free it now
        parameters = _trainable([adapted.get_submodule(name) for name in layers])
        start = _snapshot(parameters)
        before = _relative_error(module, x[held], target[held], chunk)
        roundings = _soft_roundings(adapted, reference, layers, config.relaxation == "soft")
        power = float(target[trained].double().square().mean().clamp_min(1e-30))

        def loss_of(
            rows, step, module=module, x=x, target=target, roundings=roundings, power=power,
            clean_in=clean_in,
        ):  # fmt: skip
            given = x[rows]
            if clean_in is not None:  # QDrop: each value from the clean network with p = drop
                mask = torch.rand(given.shape, generator=generator) < config.drop
                given = torch.where(mask.to(given.device), clean_in[rows], given)
            output = module(given)
            beta = beta_at(step, config.block_steps)
            if config.weighting == "brecq":
                # over the channels (dim 1 of N x C x H x W and N x C; the last of a token
                # layout, N x T x C), then the mean over images and positions
                channels = -1 if output.ndim == 3 else 1
                loss = (output - target[rows]).square().sum(channels).mean()
                if roundings and beta is not None:
                    penalty = sum(
                        r.regulariser(beta) * r.logits.numel() for r in roundings.values()
                    )
                    loss = loss + config.rounding_weight * penalty
                return loss
            loss = F.mse_loss(output, target[rows]) / power
            if roundings and beta is not None:
                penalty = sum(r.regulariser(beta) for r in roundings.values()) / len(roundings)
                loss = loss + config.rounding_weight * penalty
            return loss

        groups = [
            {"params": parameters, "lr": config.lr},
            {"params": [r.logits for r in roundings.values()], "lr": config.rounding_lr},
        ]
        _fit(groups, loss_of, trained, config.block_steps, config, generator)
        replaced = _harden(adapted, roundings)
        if replaced:
            # the adapters were trained beside soft codes, which a few hundred steps do not
            # drive all the way to 0 or 1: they are refitted to the codes now stored
            refit = [{"params": parameters, "lr": config.lr}]
            plain = functools.partial(loss_of, roundings={})
            _fit(refit, plain, trained, refit_steps(config), config, generator)
        after, kept = _keep_better(
            parameters, start, before, _relative_error(module, x[held], target[held], chunk)
        )
        changed = 0
        for name, (old, count) in replaced.items():
            if kept == "start":
                adapted.get_submodule(name).base_layer.set_compressed(old)
            else:
                changed += count
        steps = config.block_steps + (refit_steps(config) if replaced else 0)
        records.append(UnitRecord(unit, tuple(layers), before, after, steps, kept, changed))
        if progress is not None:
            progress(unit)
        del x, target, clean_in
    if config.mode == "network":
        layers = tuple(name for _, names in units for name in names)
        parameters = _trainable([adapted.get_submodule(name) for name in layers])
        with torch.no_grad():
            teacher = torch.cat([reference(rows).float() for rows in inputs.split(chunk)])
        start = _snapshot(parameters)
        before = _network_error(adapted, inputs[held], teacher[held], chunk, config.temperature)

        def network_loss(rows, _step):
            return _kl(adapted(inputs[rows]).float(), teacher[rows], config.temperature)

        groups = [{"params": parameters, "lr": config.lr}]
        _fit(groups, network_loss, trained, config.network_steps, config, generator)
        after = _network_error(adapted, inputs[held], teacher[held], chunk, config.temperature)
        after, kept = _keep_better(parameters, start, before, after)
        records.append(UnitRecord("network", layers, before, after, config.network_steps, kept))
        if progress is not None:
            progress("network")
    return records
