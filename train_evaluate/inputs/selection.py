"""Which layers a run compresses: ``--layers`` patterns resolved to module names, and each
selected layer described (``LayerInfo``: kind, shape, positions, bias) in forward order.

``head`` is the classifier, ``all`` every Linear and every Conv2d (depthwise and timm's
``Conv2dSame`` included), anything else an fnmatch pattern over ``named_modules()`` names;
a pattern that selects nothing, or something no compressor handles, is refused in one line.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from compression import compressible
from lora.attach import classifier_name
from lora.capture import first_outputs, forward_order

HEAD, ALL = "head", "all"


class SelectionError(ValueError):
    """A ``--layers`` selection that cannot be run; the message says what to change."""


def classifier_module_name(model: nn.Module) -> str:
    try:
        return classifier_name(model)
    except ValueError as error:
        raise SelectionError(str(error)) from error


def select_layers(
    model: nn.Module, patterns: Sequence[str], skip_grouped: bool = False
) -> list[str]:
    """The module names ``patterns`` select, in the model's order.

    ``head``: the classifier; ``all``: every Linear and Conv2d that can be compressed (stem and
    depthwise convs included); anything else: an fnmatch pattern over ``named_modules()``
    names, which must select at least one Linear or Conv2d and no module that cannot be
    compressed. ``skip_grouped``: grouped (depthwise) convs are left out of every pattern.
    """
    modules = dict(model.named_modules())
    layers = {n: m for n, m in modules.items() if n and isinstance(m, nn.Linear | nn.Conv2d)}
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern == HEAD:
            chosen.add(classifier_module_name(model))
            continue
        if pattern == ALL:
            chosen.update(n for n, m in layers.items() if compressible(m) is None)
            continue
        matched = [n for n in modules if n and fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            examples = ", ".join(list(layers)[:3])
            raise SelectionError(
                f"--layers {pattern!r} matches no module of the model; names look like "
                f"{examples} (or use 'head' or 'all')"
            )
        selected = [n for n in matched if n in layers]
        if not selected:
            kinds = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in matched[:3])
            raise SelectionError(
                f"--layers {pattern!r} matches {kinds}, not a Linear or Conv2d layer; "
                "select Linear or Conv2d layers"
            )
        for name in selected:
            reason = compressible(layers[name])
            if reason is not None:
                raise SelectionError(
                    f"--layers {pattern!r} selects {name}: {reason}; narrow the pattern"
                )
        chosen.update(selected)
    if skip_grouped:
        chosen = {n for n in chosen if getattr(layers[n], "groups", 1) == 1}
        if not chosen:
            raise SelectionError(
                f"--layers {' '.join(patterns)} selects grouped convs alone, which "
                "--skip-depthwise leaves out: drop it or select other layers"
            )
    return [n for n in layers if n in chosen]


def left_out(model: nn.Module, names: Sequence[str]) -> dict[str, list[str]]:
    """The Linear and Conv2d layers a selection does not compress, grouped by why (grouped
    convs left out, layers with a forward of their own), for the run's announcement."""
    chosen = set(names)
    reasons: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if name in chosen or not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        reason = compressible(module)
        if reason is None and getattr(module, "groups", 1) > 1:
            reason = "grouped (depthwise) convs, left out by --skip-depthwise"
        if reason is not None:
            reasons.setdefault(reason.split(";")[0], []).append(name)
    return reasons


def is_head_only(model: nn.Module, names: Sequence[str]) -> bool:
    """Whether the selection is the classifier alone: today's FC path."""
    return list(names) == [classifier_module_name(model)]


@dataclass(frozen=True)
class LayerInfo:
    """One selected layer: its name, kind, weight shape, matrix shape (out x in*kh*kw), the
    spatial positions (tokens, pixels) of its output per image, which multiply its compute, and
    whether it has a bias (a conv before a BatchNorm has none: nothing stored, nothing counted)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    positions: int
    bias: bool = True

    @property
    def matrix(self) -> tuple[int, int]:
        return self.shape[0], math.prod(self.shape[1:])

    def rank(self, requested: int) -> int:
        """The requested rank, clamped to what the layer can hold: min(out, in*kh*kw)."""
        return min(requested, min(self.matrix))

    @classmethod
    def of(cls, name: str, module: nn.Module, positions: int = 1) -> LayerInfo:
        """The layer ``module`` (a Linear or Conv2d, on any device, ``meta`` included)."""
        kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
        return cls(name, kind, tuple(module.weight.shape), positions, module.bias is not None)


def describe_layers(
    model: nn.Module, names: Sequence[str], example: torch.Tensor
) -> list[LayerInfo]:
    """The selected layers in forward order, with their output positions on ``example``."""
    order = forward_order(model, example, list(names))
    modules = {name: model.get_submodule(name) for name in order}
    outputs = first_outputs(model, modules, example[:1])
    # one image's output holds positions x out values, whatever its layout (NCHW convs,
    # tokens, NHWC or window-partitioned Linears)
    positions = {
        name: max(1, outputs[name].numel() // modules[name].weight.shape[0]) for name in outputs
    }
    return [LayerInfo.of(name, model.get_submodule(name), positions.get(name, 1)) for name in order]
