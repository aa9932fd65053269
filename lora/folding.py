"""BatchNorm folded into the convolution before it, as deployment does.

In eval mode a BatchNorm after a conv is an affine map per channel, y = g * (x - mean) /
sqrt(var + eps) + beta, so it can be taken into the conv: each output channel's weights scaled
by s = g / sqrt(var + eps), its bias becoming s * (b - mean) + beta (b = 0 for a conv without
one). The folded network computes what the original did, up to float rounding, and stores one
bias per channel where the BatchNorm stored four numbers. A conv compressed after folding is
compressed with its BatchNorm in it, which is what the deployed model multiplies by.

The conv a BatchNorm follows is found by running the model once: a BatchNorm folds into the conv
whose output tensor is its input tensor, and only if no other module reads that output (a conv
whose output also goes elsewhere cannot take the BatchNorm's scale). Only modules are watched:
a conv output also read by a bare function call (``x + y`` in a forward) would go unseen, as
none in timm's convolutional models is. timm's ``BatchNormAct2d`` is a
BatchNorm followed by its dropout and activation: folding leaves those two in its place.
"""

from __future__ import annotations

import torch
from torch import nn

from compression.modules import replace_submodule


def conv_batchnorm_pairs(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """{conv name: the BatchNorm2d name that reads its output and nothing else does}, from
    one forward pass of ``model`` (eval mode) on ``example``."""
    names = {module: name for name, module in model.named_modules()}
    produced: dict[int, str] = {}  # id of a conv's output tensor -> the conv
    readers: dict[str, list[str]] = {}  # a conv -> the modules that read its output
    kept = []  # the outputs themselves: an id is not reused while its tensor lives

    def after_conv(module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        kept.append(output)
        produced[id(output)] = names[module]
        readers.setdefault(names[module], [])

    def before_any(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) in produced:
            readers[produced[id(args[0])]].append(names[module])

    handles = []
    try:
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                handles.append(module.register_forward_hook(after_conv))
            if not list(module.children()) or isinstance(module, FOLDABLE):
                # the modules that read a tensor: leaves, and BatchNormAct2d (a BatchNorm with
                # its activation inside)
                handles.append(module.register_forward_pre_hook(before_any))
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    return {
        conv: found[0]
        for conv, found in readers.items()
        if len(found) == 1 and type(modules[found[0]]) in FOLDABLE
    }


def _foldable() -> tuple[type, ...]:
    kinds: list[type] = [nn.BatchNorm2d]
    try:
        from timm.layers import BatchNormAct2d

        kinds.append(BatchNormAct2d)
    except ImportError:  # timm is a dependency; the plain BatchNorm folds without it
        pass
    return tuple(kinds)


FOLDABLE = _foldable()


def what_is_left(norm: nn.BatchNorm2d) -> nn.Module:
    """The module that takes a folded BatchNorm's place: its dropout and activation
    (``BatchNormAct2d``), or nothing."""
    parts = [getattr(norm, name, None) for name in ("drop", "act")]
    parts = [p for p in parts if p is not None and not isinstance(p, nn.Identity)]
    return nn.Sequential(*parts) if parts else nn.Identity()


def fold_batchnorm_(model: nn.Module, pairs: dict[str, str]) -> None:
    """Fold each BatchNorm of ``pairs`` (conv name -> BatchNorm name) into its conv, in place:
    the conv's weight scaled per output channel and its bias set (an fp32 one added where it had
    none), the BatchNorm replaced by ``what_is_left``."""
    for conv_name, norm_name in pairs.items():
        conv = model.get_submodule(conv_name)
        norm = model.get_submodule(norm_name)
        with torch.no_grad():
            weight = conv.weight.double()
            scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
            bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
            shift = scale * (bias - norm.running_mean.double()) + norm.bias.double()
            conv.weight.copy_((weight * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
            if conv.bias is None:
                conv.bias = nn.Parameter(shift.to(conv.weight.dtype), conv.weight.requires_grad)
            else:
                conv.bias.copy_(shift.to(conv.bias.dtype))
        replace_submodule(model, norm_name, what_is_left(norm))
