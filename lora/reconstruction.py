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

Each stage measures its error over every calibration image before and after training and keeps
the better of the two states, so a stage never leaves a unit worse than it found it. Only the
adapters' tensors move: the compressed bases, BatchNorm statistics and everything else stay as
they are (every module in eval mode).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("none", "block", "network")


@dataclass(frozen=True)
class ReconstructionConfig:
    """mode: ``none``, ``block`` or ``network`` (block, then end to end); block_steps: Adam steps
    per unit; network_steps: Adam steps of the end-to-end stage; lr: Adam's learning rate;
    batch_size: calibration images per step; temperature: the KL's softening of both logits;
    seed: the order in which the steps draw their batches."""

    mode: str = "none"
    block_steps: int = 100
    network_steps: int = 50
    lr: float = 1e-3
    batch_size: int = 32
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown reconstruction {self.mode!r}; valid: {', '.join(MODES)}")
        if self.block_steps < 1 or self.network_steps < 1 or self.batch_size < 1:
            raise ValueError("reconstruction steps and batch size must be at least 1")
        if not (self.lr > 0 and self.temperature > 0):
            raise ValueError("the reconstruction's learning rate and temperature must be positive")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


NO_RECONSTRUCTION = ReconstructionConfig()


@dataclass(frozen=True)
class UnitRecord:
    """One stage of a reconstruction: the unit's module name (``network`` for the end-to-end
    stage), its adapted layers, its error over every calibration image before and after
    training (a unit: squared error over the target's squared norm; the network: the KL), the
    steps taken, and which state it kept (``trained``, or ``start`` when training made it
    worse)."""

    unit: str
    layers: tuple[str, ...]
    error_start: float
    error_end: float
    steps: int
    kept: str


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


class _Reached(Exception):
    """Raised from a hook once the pass has what it needs."""


def _capture(
    model: nn.Module, module: nn.Module, inputs: torch.Tensor, chunk: int, with_output: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``module``'s input (and output) on every row of ``inputs`` when ``model`` runs on them,
    ``chunk`` rows at a time; each pass stops as soon as it has them."""
    taken: list[torch.Tensor] = []
    given: list[torch.Tensor] = []

    def before(_module: nn.Module, args: tuple) -> None:
        taken.append(args[0].detach())
        if not with_output:
            raise _Reached

    def after(_module: nn.Module, _args: tuple, output: object) -> None:
        if not isinstance(output, torch.Tensor):
            raise ReconstructionError(f"it answers a {type(output).__name__}, not a tensor")
        given.append(output.detach())
        raise _Reached

    handles = [module.register_forward_pre_hook(before)]
    if with_output:
        handles.append(module.register_forward_hook(after))
    try:
        with torch.no_grad():
            for rows in inputs.split(chunk):
                count = len(taken)
                with contextlib.suppress(_Reached):
                    model(rows)
                if len(taken) != count + 1:
                    raise ReconstructionError("the forward pass never calls it")
    finally:
        for handle in handles:
            handle.remove()
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
    return [p for adapter in adapters for p in adapter.parameters() if p.requires_grad]


def _snapshot(parameters: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in parameters]


def _restore(parameters: Sequence[nn.Parameter], state: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for parameter, value in zip(parameters, state, strict=True):
            parameter.copy_(value)


def _fit(
    parameters: Sequence[nn.Parameter],
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    rows: int,
    steps: int,
    config: ReconstructionConfig,
    generator: torch.Generator,
) -> None:
    """``steps`` Adam steps on ``loss_of(batch rows)``, the batches drawn without replacement
    from a fresh permutation of the ``rows`` each time one runs out."""
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < min(config.batch_size, rows):
            order = torch.randperm(rows, generator=generator)
        batch, order = order[: config.batch_size], order[config.batch_size :]
        optimizer.zero_grad(set_to_none=True)
        loss_of(batch).backward()
        optimizer.step()


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
    for unit, layers in units:
        module, clean = adapted.get_submodule(unit), reference.get_submodule(unit)
        try:
            clean_in, target = _capture(reference, clean, inputs, chunk, with_output=True)
            _check_alone(clean, clean_in, target, chunk)
        except ReconstructionError as error:
            raise ReconstructionError(f"block {unit} cannot be reconstructed: {error}") from None
        del clean_in
        x, _ = _capture(adapted, module, inputs, chunk, with_output=False)
        parameters = _trainable([adapted.get_submodule(name) for name in layers])
        start = _snapshot(parameters)
        before = _relative_error(module, x, target, chunk)

        def loss_of(rows, module=module, x=x, target=target):
            return F.mse_loss(module(x[rows]), target[rows])

        _fit(parameters, loss_of, len(x), config.block_steps, config, generator)
        after, kept = _keep_better(
            parameters, start, before, _relative_error(module, x, target, chunk)
        )
        records.append(UnitRecord(unit, tuple(layers), before, after, config.block_steps, kept))
        if progress is not None:
            progress(unit)
        del x, target
    if config.mode == "network":
        layers = tuple(name for _, names in units for name in names)
        parameters = _trainable([adapted.get_submodule(name) for name in layers])
        with torch.no_grad():
            teacher = torch.cat([reference(rows).float() for rows in inputs.split(chunk)])
        start = _snapshot(parameters)
        before = _network_error(adapted, inputs, teacher, chunk, config.temperature)

        def network_loss(rows):
            return _kl(adapted(inputs[rows]).float(), teacher[rows], config.temperature)

        _fit(parameters, network_loss, len(inputs), config.network_steps, config, generator)
        after = _network_error(adapted, inputs, teacher, chunk, config.temperature)
        after, kept = _keep_better(parameters, start, before, after)
        records.append(UnitRecord("network", layers, before, after, config.network_steps, kept))
        if progress is not None:
            progress("network")
    return records
