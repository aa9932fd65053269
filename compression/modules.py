"""Compressed layers as modules, and ``compress_``, which swaps them into a whole model.

``CompressedLinear`` / ``CompressedConv2d`` are a frozen ``nn.Linear`` / ``nn.Conv2d`` whose
``weight`` holds W_c and which also keep the compressor's stored parts (what a packed file
holds): ``expand()`` rebuilds W_c from those parts alone. They compute exactly what the plain
layer with weight W_c computes, and their state dict has the plain layer's keys, so a
compressed model still loads a timm state dict.

A conv's weight is seen by compressors as the matrix out x (in/groups * kh * kw), i.e.
``weight.reshape(out, -1)``: every compressor works for convs with no second implementation.

>>> compressed = compress_(model, make_config("int4"))   # {name: new module}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compression.registry import CompressedWeight, StorageCost, compress, expand


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted ``name`` inside ``model`` (its parent's attribute, as PEFT's
    ``_get_submodules`` finds it); returns the module that was there."""
    parent, _, child = name.rpartition(".")
    holder = model.get_submodule(parent)
    old = getattr(holder, child)
    setattr(holder, child, new)
    return old


def weight_matrix(module: nn.Linear | nn.Conv2d) -> torch.Tensor:
    """The weight as the matrix a compressor sees: out x in (Linear), out x in/g*kh*kw (conv)."""
    return module.weight.reshape(module.weight.shape[0], -1)


class _StoresParts:
    """What both compressed layers share: the stored parts beside the dense W_c.

    The parts are kept as plain attributes rather than buffers so that the module's state dict
    stays the plain layer's (weight, bias); ``_apply`` moves them with the module's device.
    """

    weight: nn.Parameter

    def _store(self, compressed: CompressedWeight) -> None:
        self._parts = dict(compressed.parts)
        self._codes = dict(compressed.codes)
        self._cost = compressed.cost
        self._config = compressed.config

    def _matrix_shape(self) -> tuple[int, int]:
        return (self.weight.shape[0], self.weight[0].numel())

    @property
    def compressed(self) -> CompressedWeight:
        """The stored base as a packed file holds it; its ``weight`` is a view of ``weight``."""
        matrix = self.weight.detach().reshape(self._matrix_shape())
        return CompressedWeight(
            matrix, self._cost, dict(self._parts), dict(self._codes), self._config
        )

    @property
    def cost(self) -> StorageCost:
        return self._cost

    def expand(self) -> torch.Tensor:
        """W_c rebuilt from the stored parts alone, shaped like ``weight``."""
        matrix = expand(self._parts, self._config, self._matrix_shape())
        return matrix.reshape(self.weight.shape)

    def set_compressed(self, compressed: CompressedWeight) -> None:
        """Replace the stored base (e.g. LoftQ refits it); ``weight`` is updated in place so that
        optimisers and views holding it see the new W_c."""
        if tuple(compressed.weight.shape) != self._matrix_shape():
            raise ValueError(
                f"a {tuple(compressed.weight.shape)} compressed weight cannot replace the "
                f"{self._matrix_shape()} base of {type(self).__name__}"
            )
        with torch.no_grad():
            self.weight.copy_(compressed.weight.reshape(self.weight.shape))
        self._store(compressed)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        # parts keep their stored dtype (what expand() needs to be bit-exact); only the device
        # follows, so that expand() returns W_c where the weight lives
        device = self.weight.device
        self._parts = {name: part.to(device) for name, part in self._parts.items()}
        return result


def _frozen(tensor: torch.Tensor, like: torch.Tensor | None = None) -> nn.Parameter:
    value = tensor.detach().clone()
    if like is not None:
        value = value.to(device=like.device, dtype=like.dtype)
    return nn.Parameter(value, requires_grad=False)


class CompressedLinear(_StoresParts, nn.Linear):
    """A frozen Linear computing with W_c; ``compressed`` holds its stored parts."""

    def __init__(self, compressed: CompressedWeight, bias: torch.Tensor | None) -> None:
        out_features, in_features = compressed.weight.shape
        # built on the meta device: the random init nn.Linear draws is overwritten at once
        super().__init__(in_features, out_features, bias=bias is not None, device="meta")
        self.weight = _frozen(compressed.weight)
        if bias is not None:
            self.bias = _frozen(bias, like=self.weight)
        self._store(compressed)

    @classmethod
    def from_dense(cls, linear: nn.Linear, config: Any) -> CompressedLinear:
        """Compress ``linear``'s weight with ``config``; the bias is copied. ``linear`` is not
        modified."""
        _refuse_own_forward(linear)
        return cls(compress(linear.weight.detach(), config), linear.bias)

    @classmethod
    def from_compressed(
        cls, compressed: CompressedWeight, bias: torch.Tensor | None
    ) -> CompressedLinear:
        return cls(compressed, bias)


def _timm_conv2d_same() -> type | None:
    try:
        from timm.layers import Conv2dSame
    except ImportError:  # timm is a dependency; without it no such layer exists to compress
        return None
    return Conv2dSame


_CONV2D_SAME = _timm_conv2d_same()


def pads_from_input(conv: nn.Module) -> bool:
    """Whether ``conv`` pads each input from its size, as TensorFlow's SAME padding does for a
    strided conv (timm's ``Conv2dSame``: the stem and strided depthwise convs of its tf_
    models), rather than by a fixed amount."""
    if isinstance(conv, CompressedConv2d):
        return conv.pads_from_input
    return _CONV2D_SAME is not None and isinstance(conv, _CONV2D_SAME)


def pad_from_input(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded as ``conv`` pads it when ``pads_from_input(conv)`` (timm's own padding
    function, so that both compute the same pads), else ``x`` itself."""
    if not pads_from_input(conv):
        return x
    from timm.layers import pad_same

    return pad_same(x, conv.kernel_size, conv.stride, conv.dilation)


def conv_options(conv: nn.Conv2d) -> dict[str, Any]:
    """The geometry ``CompressedConv2d.from_compressed`` needs to rebuild ``conv``'s layer."""
    return {
        "in_channels": conv.in_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "padding_mode": conv.padding_mode,
        "pads_from_input": pads_from_input(conv),
    }


class CompressedConv2d(_StoresParts, nn.Conv2d):
    """A frozen Conv2d computing with W_c; ``compressed`` holds the parts of the matrix view
    out x (in/groups * kh * kw), and ``weight`` is that W_c reshaped to 4-D. A depthwise conv
    (groups = channels) is the matrix out x kh*kw. ``pads_from_input``: it pads each input as
    timm's ``Conv2dSame`` does (its ``padding`` is then 0), so that it can replace one."""

    def __init__(
        self,
        compressed: CompressedWeight,
        bias: torch.Tensor | None,
        *,
        in_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        pads_from_input: bool = False,
    ) -> None:
        out_channels, columns = compressed.weight.shape
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias is not None,
            padding_mode=padding_mode,
            device="meta",
        )
        shape = self.weight.shape
        if shape[1:].numel() != columns:
            raise ValueError(
                f"a {out_channels} x {columns} compressed weight is not the matrix view of a "
                f"conv weight {tuple(shape)} (out x in/groups * kh * kw)"
            )
        self.weight = _frozen(compressed.weight.reshape(shape))
        if bias is not None:
            self.bias = _frozen(bias, like=self.weight)
        self.pads_from_input = pads_from_input
        self._store(compressed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(pad_from_input(self, x))

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, config: Any) -> CompressedConv2d:
        """Compress ``conv``'s weight (as its matrix view) with ``config``; the bias and geometry
        are copied. ``conv`` is not modified."""
        _refuse_own_forward(conv)
        return cls(compress(weight_matrix(conv).detach(), config), conv.bias, **conv_options(conv))

    @classmethod
    def from_compressed(
        cls, compressed: CompressedWeight, bias: torch.Tensor | None, **geometry: Any
    ) -> CompressedConv2d:
        """``compressed`` is the matrix view; ``geometry``: the constructor's keywords
        (``conv_options(conv)`` gives them for an existing conv)."""
        return cls(compressed, bias, **geometry)


def _own_forward(module: nn.Module) -> str | None:
    """Why a Linear / Conv2d subclass cannot be replaced: it computes with its own forward,
    which a compressed layer would drop (timm's ``Conv2dSame`` is known: a compressed conv pads
    as it does)."""
    if pads_from_input(module):
        return None
    for base in (nn.Linear, nn.Conv2d):
        if isinstance(module, base) and type(module).forward is not base.forward:
            return (
                f"{type(module).__name__} overrides {base.__name__}.forward; a compressed "
                f"{base.__name__} would not compute what it does"
            )
    return None


def _refuse_own_forward(module: nn.Module) -> None:
    reason = _own_forward(module)
    if reason is not None:
        raise ValueError(reason)


def compressible(module: nn.Module) -> str | None:
    """None if ``compress_`` can replace ``module``, else a one-line reason why not."""
    if isinstance(module, _StoresParts):
        return f"{type(module).__name__} is already compressed"
    if not isinstance(module, nn.Linear | nn.Conv2d):
        return f"{type(module).__name__} is not a Linear or Conv2d"
    return _own_forward(module)


def _compressed(module: nn.Module, config: Any) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        return CompressedConv2d.from_dense(module, config)
    return CompressedLinear.from_dense(module, config)


def compress_(
    model: nn.Module,
    config: Any,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> dict[str, nn.Module]:
    """Replace, in place, every selected Linear / Conv2d of ``model`` by its compressed layer.

    ``filter_fn(module, name)`` is asked about every submodule (``name`` fully qualified, as
    ``named_modules`` gives it); by default every compressible Linear / Conv2d is selected.
    ``config``: a compressor config, or a callable ``name -> config`` (one per layer).
    A selected module that cannot be compressed (``compressible`` says why) raises ValueError
    before anything is replaced. Returns {name: new module}; a module reachable under several
    names is compressed once and replaced under each.
    """
    config_for = config if callable(config) else (lambda _name: config)
    selected: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if filter_fn is None:
            chosen = compressible(module) is None
        else:
            chosen = bool(filter_fn(module, name))
        if not chosen:
            continue
        reason = "the root module cannot be replaced in place" if name == "" else None
        reason = reason or compressible(module)
        if reason is not None:
            raise ValueError(f"cannot compress {name or 'the model'}: {reason}")
        selected.append((name, module))
    # every layer is checked and compressed before the first swap, so that a refusal or a
    # compressor's error leaves the model as it was
    replacements: dict[int, nn.Module] = {}
    for name, module in selected:
        if id(module) not in replacements:
            replacements[id(module)] = _compressed(module, config_for(name))
    result: dict[str, nn.Module] = {}
    for name, module in selected:
        replace_submodule(model, name, replacements[id(module)])
        result[name] = replacements[id(module)]
    return result
