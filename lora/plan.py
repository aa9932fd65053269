"""A per-layer plan as data: each module's compression method and adapter rank.

PEFT states per-layer ranks as data (``LoraConfig.rank_pattern``) and torchao a per-module mix
of quantisers (``FqnToConfig`` given to ``quantize_``); a ``LayerPlan`` does both for one run
of this tool. The driver writes the plan of every model it trains (``plans/<row>.json`` in the
run folder, and inside the packed checkpoint), and ``--layer-plan FILE`` reads one back.

A file (JSON, or YAML for hand-written ones) maps module-name patterns to a choice::

    {"layers": {"blocks.*.conv_pw": {"method": "int2", "rank": 8},
                "conv_head": {"method": "int8", "rank": 4}}}

A pattern is an exact module name or an fnmatch pattern over ``named_modules()`` names. A
module takes the entry that names it exactly, else the first pattern (in the file's order)
that matches it, as torchao resolves ``FqnToConfig``. Every pattern must match at least one
Linear or Conv2d module that a compressor handles; a pattern passes over those none handles (a
depthwise conv), an exact name of one is refused. Optional keys: ``name`` (the rows'
``quant``), ``origin`` (what made the plan, e.g. a bit budget), ``adapter_dtype`` (how the
adapters are stored) and, per entry, ``adapter_dtype`` (this layer's, where it differs) and
``compression`` (the method's full description, checked against the run's compression
options so that a plan is never rebuilt with other ones).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from compression import compressible, list_methods
from lora.rounding import ADAPTER_FORMATS

PLAN_FORMAT = "lora-compression-layer-plan/1"
PLAN_KEYS = ("format", "name", "origin", "adapter_dtype", "layers")
ENTRY_KEYS = ("method", "rank", "adapter_dtype", "compression")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class LayerPlanError(ValueError):
    """A plan that cannot be run on this model; the message (one line) says what to change."""


@dataclass(frozen=True)
class LayerSpec:
    """One layer's choice: a compression method (a ``--methods`` name), the adapter rank
    asked for (clamped to the layer, as ``--ranks`` are; 0: no adapter) and, where it is not
    the plan's, how its adapter is stored."""

    method: str
    rank: int
    adapter_dtype: str | None = None  # None: the plan's


@dataclass(frozen=True)
class LayerPlan:
    """Every planned module's choice, in the model's order. ``name`` names the rows it
    produces; ``origin`` says what made it (empty for a hand-written one)."""

    name: str
    layers: tuple[tuple[str, LayerSpec], ...]
    adapter_dtype: str = "fp32"
    origin: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.layers)

    def specs(self) -> dict[str, LayerSpec]:
        return dict(self.layers)

    def adapter_dtypes(self) -> dict[str, str]:
        """How each layer's adapter is stored: its own dtype, else the plan's."""
        return {name: spec.adapter_dtype or self.adapter_dtype for name, spec in self.layers}

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(spec.method for _, spec in self.layers))

    @property
    def rank(self) -> int:
        """The rank its rows name: the largest any layer asks for (0: no layer has an
        adapter)."""
        return max(spec.rank for _, spec in self.layers)

    @property
    def uniform(self) -> LayerSpec | None:
        """The one choice every layer takes, if they all take the same."""
        choices = {spec for _, spec in self.layers}
        return next(iter(choices)) if len(choices) == 1 else None

    @property
    def cell(self) -> LayerSpec | None:
        """The one (method, rank) this plan is, if it is one: every layer takes the same
        choice and the plan is named after its method, as the plans of a ``--methods`` x
        ``--ranks`` model are, its adapters stored as the plan's. Such a plan runs as that
        model."""
        spec = self.uniform
        same = spec is not None and spec.method == self.name and spec.adapter_dtype is None
        return spec if same else None

    def digest(self) -> str:
        """A short digest of every layer's choice."""
        text = ";".join(
            f"{n}={s.method}/{s.rank}" + (f"/{s.adapter_dtype}" if s.adapter_dtype else "")
            for n, s in self.layers
        )
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def to_json(self, descriptions: Mapping[str, str]) -> dict[str, Any]:
        """The plan as its file holds it; ``descriptions``: each method's full description."""
        return {
            "format": PLAN_FORMAT,
            "name": self.name,
            "origin": self.origin,
            "adapter_dtype": self.adapter_dtype,
            "layers": {
                name: {
                    "method": spec.method,
                    "rank": spec.rank,
                    **({"adapter_dtype": spec.adapter_dtype} if spec.adapter_dtype else {}),
                    "compression": descriptions[spec.method],
                }
                for name, spec in self.layers
            },
        }


def mix(choices: Iterable[str]) -> str:
    """``4 x int4 r=2, 6 x int2 r=2``: each choice with how many layers take it, in the order
    they first come."""
    counts = Counter(choices)
    return ", ".join(f"{count} x {choice}" for choice, count in counts.items())


def read_plan_file(path: Path) -> dict[str, Any]:
    """The raw plan in ``path`` (JSON; YAML when the name ends in .yaml or .yml)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise LayerPlanError(f"--layer-plan {path}: cannot read it ({error})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            found = yaml.safe_load(text)
        except yaml.YAMLError as error:
            detail = " ".join(str(error).split())
            raise LayerPlanError(f"--layer-plan {path}: not valid YAML ({detail})") from None
    else:
        try:
            found = json.loads(text)
        except ValueError as error:
            raise LayerPlanError(f"--layer-plan {path}: not valid JSON ({error})") from None
    if not isinstance(found, dict):
        raise LayerPlanError(
            f"--layer-plan {path}: expected a mapping with 'layers' "
            "(pattern -> {method, rank}); see docs/layer-plans.md"
        )
    return found


def _spec(pattern: str, entry: Any, where: str, adapter_dtype: str) -> tuple[LayerSpec, str | None]:
    if not isinstance(entry, dict):
        raise LayerPlanError(f"{where}: {pattern!r} must map to {{method, rank}}, not {entry!r}")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise LayerPlanError(
            f"{where}: {pattern!r} has unknown key {unknown[0]!r}; keys: {', '.join(ENTRY_KEYS)}"
        )
    method, rank = entry.get("method"), entry.get("rank")
    if method not in list_methods():
        raise LayerPlanError(
            f"{where}: {pattern!r} has unknown method {method!r}; valid: "
            f"{', '.join(list_methods())}"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise LayerPlanError(
            f"{where}: {pattern!r} has rank {rank!r}; a rank is a whole number, 0 (no adapter) "
            "or more"
        )
    described = entry.get("compression")
    if described is not None and not isinstance(described, str):
        raise LayerPlanError(f"{where}: {pattern!r} has a compression that is not text")
    own = entry.get("adapter_dtype", adapter_dtype)
    if own not in ADAPTER_FORMATS:
        raise LayerPlanError(
            f"{where}: {pattern!r} has adapter_dtype {own!r}; valid: {', '.join(ADAPTER_FORMATS)}"
        )
    # the plan's own dtype is written once, at the top: a layer names only one that differs
    return LayerSpec(method, rank, None if own == adapter_dtype else own), described


def resolve_plan(
    raw: Mapping[str, Any],
    model: nn.Module,
    where: str = "--layer-plan",
    adapter_dtype: str = "fp32",
) -> tuple[LayerPlan, dict[str, str]]:
    """The plan ``raw`` describes, resolved against ``model``'s modules (every Linear and
    Conv2d a pattern matches, in the model's order), and the method descriptions it records
    (method -> text; for the run to check). ``adapter_dtype``: the plan's when it names none.
    One-line LayerPlanError on anything wrong."""
    unknown = sorted(set(raw) - set(PLAN_KEYS))
    if unknown:
        raise LayerPlanError(f"{where}: unknown key {unknown[0]!r}; keys: {', '.join(PLAN_KEYS)}")
    if raw.get("format", PLAN_FORMAT) != PLAN_FORMAT:
        raise LayerPlanError(f"{where}: format {raw['format']!r} is not {PLAN_FORMAT}")
    entries = raw.get("layers")
    if not isinstance(entries, dict) or not entries:
        raise LayerPlanError(f"{where}: 'layers' must map module-name patterns to {{method, rank}}")
    name = raw.get("name", "plan")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise LayerPlanError(
            f"{where}: name {name!r} must be letters, digits, '.', '_' or '-' (it names files)"
        )
    origin = raw.get("origin", "")
    adapter_dtype = raw.get("adapter_dtype", adapter_dtype)
    if not isinstance(origin, str):
        raise LayerPlanError(f"{where}: 'origin' must be text")
    if adapter_dtype not in ADAPTER_FORMATS:
        raise LayerPlanError(
            f"{where}: adapter_dtype {adapter_dtype!r}; valid: {', '.join(ADAPTER_FORMATS)}"
        )
    layers = {n: m for n, m in model.named_modules() if n and isinstance(m, nn.Linear | nn.Conv2d)}
    specs: dict[str, LayerSpec] = {}
    described: dict[str, str] = {}
    exact = [p for p in entries if p in layers]
    for pattern in exact + [p for p in entries if p not in layers]:
        spec, text = _spec(pattern, entries[pattern], where, adapter_dtype)
        matched = [n for n in layers if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            examples = ", ".join(list(layers)[:3])
            raise LayerPlanError(
                f"{where}: {pattern!r} names no Linear or Conv2d module of the model; names "
                f"look like {examples}"
            )
        # a pattern passes over the layers no compressor handles (as --layers all does); a
        # layer named exactly must be one it handles
        refused = {m: reason for m in matched if (reason := compressible(layers[m])) is not None}
        if (pattern in layers and refused) or len(refused) == len(matched):
            module, reason = next(iter(refused.items()))
            raise LayerPlanError(f"{where}: {pattern!r} selects {module}: {reason}")
        for module in matched:
            if module not in refused:
                specs.setdefault(module, spec)
        if text is not None and described.setdefault(spec.method, text) != text:
            raise LayerPlanError(
                f"{where}: method {spec.method} is described two ways ({described[spec.method]!r}"
                f" and {text!r}); one run makes one config per method"
            )
    ordered = tuple((n, specs[n]) for n in layers if n in specs)
    plan = LayerPlan(name, ordered, adapter_dtype, origin)
    if name in list_methods() and plan.cell is None:
        # its rows would be named as that method's, and be something else
        raise LayerPlanError(
            f"{where}: name {name!r} is a method's; only a plan giving every layer {name} at one "
            "rank may take it: name the plan otherwise"
        )
    return plan, described
