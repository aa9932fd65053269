"""Running part of a network and reading what passes through it, without autograd.

Calibration needs a layer's input, reconstruction a block's input and output, the cache a
boundary's output, the plans every selected module's output shape. Each pass stops as soon as it
has what it asked for (a hook raises ``Reached``), so the modules after it never run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn


class Reached(Exception):
    """Raised from a hook once a pass has seen what it needs: the rest of the forward is
    skipped."""


class NotCalled(ValueError):
    """The forward pass never called the module asked about."""


@contextlib.contextmanager
def _hooked(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _stopped(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad(), contextlib.suppress(Reached):
        model(x)


def run_until(model: nn.Module, x: torch.Tensor, module: nn.Module) -> None:
    """Run ``model(x)`` until ``module`` is entered; hooks already on ``module`` run first (an
    accumulator reading its input), nothing after it runs."""

    def stop(_module: nn.Module, _args: tuple) -> None:
        raise Reached

    with _hooked([module.register_forward_pre_hook(stop)]):
        _stopped(model, x)


def first_call(
    model: nn.Module, module: nn.Module, x: torch.Tensor, with_output: bool = False
) -> tuple[torch.Tensor, object]:
    """``module``'s first input (and, ``with_output``, what it answered: a tensor or whatever
    the module returns; else None) when ``model`` runs on ``x``. NotCalled if it never runs."""
    seen: dict[str, object] = {}

    def before(_module: nn.Module, args: tuple) -> None:
        seen.setdefault("input", args[0].detach())
        if not with_output:
            raise Reached

    def after(_module: nn.Module, _args: tuple, output: object) -> None:
        seen["output"] = output.detach() if isinstance(output, torch.Tensor) else output
        raise Reached

    handles = [module.register_forward_pre_hook(before)]
    if with_output:
        handles.append(module.register_forward_hook(after))
    with _hooked(handles):
        _stopped(model, x)
    if "input" not in seen or (with_output and "output" not in seen):
        raise NotCalled("the forward pass never calls it")
    return seen["input"], seen.get("output")  # type: ignore[return-value]


def first_outputs(
    model: nn.Module, modules: Mapping[str, nn.Module], x: torch.Tensor
) -> dict[str, torch.Tensor]:
    """What each of ``modules`` answered at its first call in one whole pass of ``model(x)``
    (tensors only: a module that answers something else is left out, as is one never called)."""
    found: dict[str, torch.Tensor] = {}

    def keeper(name: str):
        def keep(_module: nn.Module, _args: tuple, output: object) -> None:
            if isinstance(output, torch.Tensor):
                found.setdefault(name, output.detach())

        return keep

    handles = [module.register_forward_hook(keeper(name)) for name, module in modules.items()]
    with _hooked(handles), torch.no_grad():
        model(x)
    return found


def forward_order(model: nn.Module, example_input: torch.Tensor, names: Iterable[str]) -> list[str]:
    """``names`` in the order the forward pass first calls their modules (modules the pass never
    calls are left out), from one pass of ``model(example_input)`` that stops as soon as every
    named module has been called."""
    wanted = list(dict.fromkeys(names))
    order: list[str] = []

    def entered(name: str):
        def hook(_module: nn.Module, _args: tuple) -> None:
            if name not in order:
                order.append(name)
            if len(order) == len(wanted):
                raise Reached

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(entered(n)) for n in wanted]
    with _hooked(handles):
        _stopped(model, example_input)
    return order
