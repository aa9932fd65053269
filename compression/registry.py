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
from dataclasses import dataclass
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
    """A compressor's result: the dense W_c (out x in) and what it costs to store."""

    weight: torch.Tensor
    cost: StorageCost


CompressFn = Callable[[torch.Tensor, Any], CompressedWeight]

_COMPRESS_FNS: dict[type, CompressFn] = {}
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


def compress(weight: torch.Tensor, config: Any) -> CompressedWeight:
    """Compress a weight matrix (out x in) with the compressor that ``config`` belongs to."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight (out x in), got shape {tuple(weight.shape)}")
    fn = _COMPRESS_FNS.get(type(config))
    if fn is None:
        raise ValueError(f"no compressor is registered for {type(config).__name__}")
    with torch.no_grad():
        return fn(weight.detach(), config)


def dtype_bits(dtype: torch.dtype) -> int:
    """Bits of one element of a floating dtype (fp32 -> 32, fp16/bf16 -> 16)."""
    return torch.finfo(dtype).bits
