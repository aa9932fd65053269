"""What every compressor returns, and the registries that find compressors by name.

A compressor is a config dataclass plus a pure function ``fn(weight, config) -> CompressedWeight``.
The function never modifies ``weight``; it returns the dense compressed weight W_c (same shape
and dtype, ready for ``F.linear``) and the exact number of bits needed to store it.

Two registries:
- ``_COMPRESS_FNS``: config class -> function (``compress`` dispatches on the config's type);
- ``_METHODS``: the names a user types (``sparse``, ``int1``, ``int4``...) -> config class and
  the fixed fields that name implies (``int4`` is ``IntNConfig(bits=4)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class StorageCost:
    """Exact storage of one compressed weight matrix, in bits, and its compute.

    value_bits: the stored weight values (kept entries at their dtype, or N-bit codes).
    index_bits: where the kept values sit (e.g. the position inside each sparse block).
    scale_bits: scales that turn codes back into weights (per tensor or per row).
    macs: multiply-adds (or plain adds, for sign codes) per input row of the compressed layer.
    """

    value_bits: int
    index_bits: int
    scale_bits: int
    macs: int

    @property
    def total_bits(self) -> int:
        return self.value_bits + self.index_bits + self.scale_bits


@dataclass(frozen=True)
class CompressedWeight:
    """A compressor's result: the dense W_c (out x in), what it costs, and what is stored.

    parts: the tensors a file needs to rebuild W_c bit for bit (``expand``): kept values,
    scales, integer codes. codes: bits per element of the parts that hold small non-negative
    integers (positions, signs, N-bit codes); a file packs them at exactly that width. The
    other parts are stored at their dtype. Together they hold ``cost.total_bits`` bits.
    config: the compressor's config (``compress`` sets it).
    """

    weight: torch.Tensor
    cost: StorageCost
    parts: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    codes: dict[str, int] = field(default_factory=dict)
    config: Any = None

    def stored_bits(self) -> int:
        """Bits of ``parts`` at their stored widths (equals ``cost.total_bits``)."""
        return sum(
            t.numel() * (self.codes[n] if n in self.codes else t.element_size() * 8)
            for n, t in self.parts.items()
        )


CompressFn = Callable[[torch.Tensor, Any], CompressedWeight]
ExpandFn = Callable[[dict[str, torch.Tensor], Any, tuple[int, int]], torch.Tensor]

_COMPRESS_FNS: dict[type, CompressFn] = {}
_EXPAND_FNS: dict[type, ExpandFn] = {}
_METHODS: dict[str, tuple[type, dict[str, Any]]] = {}


def register_compressor(config_cls: type, *method_names: str, **fixed: Any):
    """Decorator: ``fn`` compresses weights for ``config_cls``; ``method_names`` select it.

    ``fixed`` holds config fields that a method name implies (``bits=4`` for ``int4``); when
    several names share a config class, register the function once and add the other names
    with ``register_method``.
    """

    def decorate(fn: CompressFn) -> CompressFn:
        _COMPRESS_FNS[config_cls] = fn
        for name in method_names:
            register_method(name, config_cls, **fixed)
        return fn

    return decorate


def register_expander(config_cls: type):
    """Decorator: ``fn(parts, config, shape)`` rebuilds W_c from a compressor's parts."""

    def decorate(fn: ExpandFn) -> ExpandFn:
        _EXPAND_FNS[config_cls] = fn
        return fn

    return decorate


def register_method(name: str, config_cls: type, **fixed: Any) -> None:
    _METHODS[name] = (config_cls, fixed)


def list_methods() -> list[str]:
    return list(_METHODS)


def make_config(method: str, **options: Any) -> Any:
    """The config for a method name; ``options`` that the method does not use are ignored.

    ``make_config("sparse", block=(1, 16), int1_scale="row")`` -> ``SparseConfig(block=(1, 16))``.
    Options set to ``None`` are left at the config's default.
    """
    if method not in _METHODS:
        raise ValueError(
            f"unknown compression method {method!r}; valid methods: {', '.join(list_methods())}"
        )
    config_cls, fixed = _METHODS[method]
    names = {f.name for f in dataclasses.fields(config_cls)}
    kwargs = {k: v for k, v in options.items() if k in names and v is not None}
    kwargs.update(fixed)
    return config_cls(**kwargs)


def uses_inputs(config: Any) -> bool:
    """Whether ``config``'s compressor gives another result once it knows the layer's inputs
    (a calibrated compressor: GPTQ, the input-weighted mse scale)."""
    return bool(getattr(config, "uses_inputs", False))


def compress(
    weight: torch.Tensor, config: Any, moment: torch.Tensor | None = None
) -> CompressedWeight:
    """Compress a weight matrix (out x in) with the compressor that ``config`` belongs to.

    ``moment``: the second moment X^T X / N (in x in) of the layer's inputs, for calibrated
    compressors (``uses_inputs``); the others ignore it."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight (out x in), got shape {tuple(weight.shape)}")
    fn = _COMPRESS_FNS.get(type(config))
    if fn is None:
        raise ValueError(f"no compressor is registered for {type(config).__name__}")
    with torch.no_grad():
        if moment is not None and uses_inputs(config):
            result = fn(weight.detach(), config, moment=moment)
        else:
            result = fn(weight.detach(), config)
        return dataclasses.replace(result, config=config)


def expand(parts: dict[str, torch.Tensor], config: Any, shape: tuple[int, int]) -> torch.Tensor:
    """W_c from the parts ``compress`` returned: identical, bit for bit, to its ``weight``."""
    fn = _EXPAND_FNS.get(type(config))
    if fn is None:
        raise ValueError(f"no expander is registered for {type(config).__name__}")
    return fn(parts, config, shape)


def method_of(config: Any) -> str:
    """The method name a config answers to: of the names whose fixed fields it has, the one
    that fixes the most (``IntNConfig(bits=4)`` -> ``int4``; with ``int_grid="affine"`` ->
    ``int4-affine``)."""
    matches = [
        (len(fixed), name)
        for name, (config_cls, fixed) in _METHODS.items()
        if isinstance(config, config_cls) and all(getattr(config, k) == v for k, v in fixed.items())
    ]
    if not matches:
        raise ValueError(f"no method name is registered for {config!r}")
    return max(matches, key=lambda match: match[0])[1]


def dtype_bits(dtype: torch.dtype) -> int:
    """Bits of one element of a floating dtype (fp32 -> 32, fp16/bf16 -> 16)."""
    return torch.finfo(dtype).bits
