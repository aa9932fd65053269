"""Verified block boundaries: where a whole-network run cuts its cache (the deepest boundary
before every selected layer), and where reconstruction carries its states from unit to unit.

Every training step of a whole-network run goes through the part of the network that precedes
the first selected layer. That part is never compressed, so its output is the same for every
trial, rank and method: it is computed once per image and cached (the *state*), and each step
runs the network from there on.

A boundary is the output of a top-level child of the model or of a child of any
``nn.Sequential`` (timm's stages and blocks). Whether its output carries everything the rest of
the forward pass needs is checked, not assumed: on a probe batch, the network with its prefix
skipped must give exactly the full network's logits. Skipped modules answer zeros of their
output's shape and the boundary module answers the state, so a skip connection around the
boundary, a module called twice or an in-place write on a skipped output changes the logits or
fails, and the boundary is passed over for a shallower one. When none qualifies, the cache
holds the input images (``train_evaluate.inputs.images.uint8_transform``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from compression.modules import replace_submodule
from lora.capture import NotCalled, first_call

STATE_BYTES = 4  # the state is cached in float32: the suffix then sees what the full pass sees


@dataclass(frozen=True)
class Cut:
    """A verified cut: ``module``'s output is cached; ``skipped`` are the outermost modules whose
    work the cache replaces, each with its output's shape per image (what its stand-in answers);
    ``state_shape`` is the cached state's shape per image."""

    module: str
    skipped: tuple[tuple[str, tuple[int, ...]], ...]
    state_shape: tuple[int, ...]

    def state_bytes(self, images: int) -> int:
        return images * math.prod(self.state_shape) * STATE_BYTES

    def describe(self) -> str:
        return f"the output of {self.module} ({'x'.join(map(str, self.state_shape))} float32)"


class SkippedModule(nn.Module):
    """A module before the cut: its work is in the cached state, so it answers zeros of its output's
    shape. The original stays inside, so the model's weights and size are unchanged."""

    def __init__(self, original: nn.Module, shape: Sequence[int]) -> None:
        super().__init__()
        self.original = original
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # a stride-0 view: no memory, and any write to it fails (so a cut that relies on one
        # fails its check instead of passing silently)
        return x.new_zeros(()).expand(x.shape[0], *self.shape)


class CachedBoundary(SkippedModule):
    """The boundary module: answers the cached state that the model was called with."""

    state: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.state is None:
            raise RuntimeError("the cut model was called without its cached state")
        # a copy: the suffix may write in place on its input, and eval passes views of the cache
        return self.state.clone()


class _RouteState:
    """The cut model's forward pre-hook: ``model(state)`` hands the state to the boundary and
    runs the model's own forward on a stand-in input of the original shape (a stride-0 view)."""

    def __init__(self, boundary: str, input_shape: Sequence[int]) -> None:
        self.boundary = boundary
        self.input_shape = tuple(input_shape)

    def __call__(self, model: nn.Module, args: tuple) -> tuple:
        (state,) = args
        model.get_submodule(self.boundary).state = state
        return (state.new_zeros(()).expand(state.shape[0], *self.input_shape),)


class _ClearState:
    """The cut model's forward hook: drops the boundary's reference to the batch's state."""

    def __init__(self, boundary: str) -> None:
        self.boundary = boundary

    def __call__(self, model: nn.Module, _args: tuple, _output: object) -> None:
        model.get_submodule(self.boundary).state = None


def cut_model(
    model: nn.Module, cut: Cut, input_shape: Sequence[int], share: bool = False
) -> nn.Module:
    """A copy of ``model`` that takes the cached state of ``cut`` (N x state_shape) instead of
    its input (N x ``input_shape``) and runs only the modules after the boundary. With
    ``share`` only the containers above the skipped modules are copied: every other module and
    every tensor is ``model``'s own (for a pass run at once, without a deep copy per pass)."""
    model = _copy_above(model, [name for name, _ in cut.skipped]) if share else copy.deepcopy(model)
    for name, shape in cut.skipped:
        original = model.get_submodule(name)
        kind = CachedBoundary if name == cut.module else SkippedModule
        replace_submodule(model, name, kind(original, shape))
    model.register_forward_pre_hook(_RouteState(cut.module, input_shape))
    model.register_forward_hook(_ClearState(cut.module))
    return model


def _copy_above(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A copy of ``model`` in which the root and each container above ``names`` are new objects
    (their own children, parameter and hook tables), so that replacing ``names`` or hooking the
    root leaves ``model`` untouched; all else is shared."""

    def own(module: nn.Module) -> nn.Module:
        clone = copy.copy(module)  # a new __dict__ whose tables are still the module's
        for key, value in vars(module).items():
            if isinstance(value, dict):
                clone.__dict__[key] = copy.copy(value)
        return clone

    root = own(model)
    owned = {id(root)}
    for name in names:
        parent = root
        for part in name.split(".")[:-1]:
            child = parent._modules[part]
            if id(child) not in owned:
                child = own(child)
                parent._modules[part] = child
                owned.add(id(child))
            parent = child
    return root


def state_of(model: nn.Module, boundary: str, x: torch.Tensor) -> torch.Tensor:
    """``boundary``'s output when ``model`` runs on ``x``; nothing after it is run."""
    try:
        _, output = first_call(model, model.get_submodule(boundary), x, with_output=True)
    except NotCalled:
        raise RuntimeError(f"the forward pass never called {boundary}") from None
    return output.float()


def boundaries(model: nn.Module) -> set[str]:
    """The module names a cut may follow: top-level children and children of nn.Sequential."""
    names = {name for name, _ in model.named_children()}
    for parent, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            names.update(
                f"{parent}.{child}" if parent else child for child, _ in module.named_children()
            )
    return names


@dataclass
class _Trace:
    """One forward pass, module by module: when each was entered and left, how often it ran and
    what it answered the first time."""

    entered: dict[str, int]
    left: dict[str, int]
    calls: dict[str, int]
    outputs: dict[str, object]


def _trace(model: nn.Module, x: torch.Tensor) -> tuple[_Trace, torch.Tensor]:
    trace = _Trace({}, {}, {}, {})
    clock = iter(range(1 << 62))
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def before(_m, _a, name=name) -> None:
            trace.entered.setdefault(name, next(clock))
            trace.calls[name] = trace.calls.get(name, 0) + 1

        def after(_m, _a, output, name=name) -> None:
            trace.left.setdefault(name, next(clock))
            trace.outputs.setdefault(name, output)

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return trace, logits


def _outermost(names: Sequence[str]) -> list[str]:
    chosen = set(names)
    return [n for n in names if not any(n.startswith(f"{other}.") for other in chosen)]


def find_cut(
    model: nn.Module,
    selected: Sequence[str],
    input_shape: Sequence[int],
    fits: Callable[[Cut], bool] = lambda cut: True,
    probe: int = 2,
) -> Cut | None:
    """The deepest verified boundary that precedes every module in ``selected`` and ``fits``, or
    None (cache the input). ``model`` is run on ``probe`` random inputs on its device, in eval
    mode; a random-weight copy has the same structure as the pretrained one, so plans use that."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((probe, *input_shape), generator=generator).to(device)
    trace, logits = _trace(model, x)
    called = [trace.entered[n] for n in selected if n in trace.entered]
    if not called:
        return None
    first = min(called)

    def usable(name: str) -> bool:
        output = trace.outputs.get(name)
        return (
            trace.calls.get(name) == 1
            and trace.left[name] < first
            and isinstance(output, torch.Tensor)
            and output.ndim >= 2
            and output.shape[0] == probe
        )

    candidates = sorted((n for n in boundaries(model) if usable(n)), key=lambda n: -trace.left[n])
    for name in candidates:
        done = [n for n in trace.left if trace.left[n] <= trace.left[name]]
        skipped = _outermost(done)
        outputs = [trace.outputs[n] for n in skipped]
        if not all(isinstance(o, torch.Tensor) and o.ndim >= 1 for o in outputs):
            continue
        cut = Cut(
            module=name,
            skipped=tuple((n, tuple(o.shape[1:])) for n, o in zip(skipped, outputs, strict=True)),
            state_shape=tuple(trace.outputs[name].shape[1:]),
        )
        if not fits(cut):
            continue
        if _reproduces(model, cut, input_shape, trace.outputs[name], logits):
            return cut
    return None


def _reproduces(
    model: nn.Module,
    cut: Cut,
    input_shape: Sequence[int],
    state: torch.Tensor,
    logits: torch.Tensor,
) -> bool:
    """Whether the model cut at ``cut`` answers exactly ``logits`` from ``state``."""
    suffix = cut_model(model, cut, input_shape, share=True)
    try:
        with torch.no_grad():
            answer = suffix(state.float())
    except Exception:  # a stand-in the suffix cannot use (written to, the wrong kind): no cut
        return False
    return (
        isinstance(answer, torch.Tensor)
        and answer.shape == logits.shape
        and torch.equal(answer, logits)
    )


class CarriedStates:
    """Networks of one structure (a compressed network and its clean original) run on the same
    batches up to one layer after another, in forward order, each pass starting from their
    states at the deepest verified boundary before that layer instead of from the inputs.

    The states kept are those of the last boundary reached; moving to a later one runs only the
    part between the two. This holds while nothing before the kept boundary changes, as when
    layers are compressed or trained in forward order. The boundary is found on the first
    network given. With ``carry=False`` every pass starts from the inputs (the reference the
    carried passes are checked against)."""

    def __init__(
        self, networks: dict[str, nn.Module], batches: list[torch.Tensor], carry: bool = True
    ) -> None:
        self.networks, self.batches, self.carry = networks, batches, carry
        self.input_shape = tuple(batches[0].shape[1:])
        self.cut: Cut | None = None
        self.states: dict[str, list[torch.Tensor]] = {}

    def before(self, name: str) -> dict[str, tuple[nn.Module, list[torch.Tensor]]]:
        """For each network: what to run (the network, or its part after the boundary) and on
        which batches (the inputs, or the states there), so that the pass reaches ``name``."""
        cut = None
        if self.carry:
            probe = next(iter(self.networks.values()))
            cut = find_cut(probe, [name], self.input_shape)
            if cut is not None and self.cut is not None and not at_or_after(self.cut, cut):
                cut = None  # a boundary behind the one kept: read from the inputs
        self._advance(cut)
        if cut is None:
            return {kind: (network, self.batches) for kind, network in self.networks.items()}
        return {
            kind: (cut_model(network, cut, self.input_shape, share=True), self.states[kind])
            for kind, network in self.networks.items()
        }

    def _advance(self, cut: Cut | None) -> None:
        """The networks' states at ``cut``, from the states kept so far where they lead there
        (an earlier boundary), else from the inputs."""
        if cut is None:
            self.cut, self.states = None, {}
            return
        if self.cut is not None and self.cut.module == cut.module:
            return  # at the same boundary nothing ran since
        states = {}
        for kind, network in self.networks.items():
            start, given = network, self.batches
            if self.cut is not None:
                start = cut_model(network, self.cut, self.input_shape, share=True)
                given = self.states[kind]
            states[kind] = [state_of(start, cut.module, batch) for batch in given]
        self.cut, self.states = cut, states


def at_or_after(old: Cut, new: Cut) -> bool:
    """Whether ``new``'s boundary is ``old``'s or a later one: ``old``'s module is among (or
    inside) the modules ``new`` skips."""
    return any(old.module == name or old.module.startswith(f"{name}.") for name, _ in new.skipped)
