"""``LoraConv2d``: a frozen (compressed) Conv2d plus a trainable low-rank adapter.

Shapes follow PEFT's conv LoRA: ``lora_A`` (r, in, kh, kw) is a conv in -> r with the layer's
kernel, stride, padding and dilation; ``lora_B`` (out, r, 1, 1) is a 1x1 conv r -> out; and

    y = conv(x, W_c) + b + scaling * conv1x1(conv(x, A), B),     scaling = lora_alpha / r.

Seen as matrices (``weight.reshape(out, -1)``), A is r x (in*kh*kw) and B is out x r, and the
adapter adds scaling * B @ A to the matrix view of W_c: conv(x, A) at one output position is
A's matrix times the input patch there, flattened in the order of ``weight.reshape(out, -1)``.
So every init written for matrices works here through a reshape. A grouped (depthwise) conv's
matrix view is out x (in/groups*kh*kw): A and B are its factors as well, but conv(x, A) would
mix the groups, so such a layer computes with its merged weight (one conv of W_c + s * B @ A).

With ``use_dora`` a magnitude m (one per output channel) rescales the channels of the merged
direction V: W' = m * V / ||V|| with the norm over (in, kh, kw), the row norm of the matrix view.
"""

from __future__ import annotations

import torch
from torch import nn

from compression import CompressedWeight
from compression.modules import CompressedConv2d, pad_from_input
from lora.layer import AdapterState, adapter_scaling, check_rank, compressed_of


def conv_like(
    conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``conv``'s convolution of ``x`` with another ``weight`` (and ``bias``): its stride,
    dilation and groups, and its padding in its own mode (zeros, reflect, replicate, circular;
    a number, a pair, or "same" / "valid"; or from the input's size, as timm's ``Conv2dSame``),
    as ``conv(x)`` pads."""
    x = pad_from_input(conv, x)
    padding = conv.padding
    if conv.padding_mode != "zeros":
        if isinstance(padding, str):  # "same": pad dilation * (k - 1), the extra one after
            totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
            if padding == "valid":
                totals = [0, 0]
            pads = [(total // 2, total - total // 2) for total in totals]
        else:
            pads = [(p, p) for p in padding]
        # F.pad takes the last dimension first: (left, right, top, bottom)
        x = nn.functional.pad(x, [*pads[1], *pads[0]], mode=conv.padding_mode)
        padding = 0
    return nn.functional.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups)


class LoraConv2d(AdapterState, nn.Module):
    def __init__(
        self,
        base_layer: CompressedConv2d | nn.Conv2d,
        r: int,
        lora_alpha: float,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        out_channels, in_channels, kh, kw = base_layer.weight.shape  # in: in/groups
        check_rank(r, out_channels, in_channels * kh * kw, use_dora)
        self.base_layer = base_layer.requires_grad_(False)
        self.r = r
        self.lora_alpha = float(lora_alpha)
        self.scaling = adapter_scaling(self.lora_alpha, r)
        weight = base_layer.weight
        self.lora_A = nn.Parameter(weight.new_zeros(r, in_channels, kh, kw))
        self.lora_B = nn.Parameter(weight.new_zeros(out_channels, r, 1, 1))
        self.lora_magnitude = nn.Parameter(weight.new_ones(out_channels)) if use_dora else None

    @property
    def base_compressed(self) -> CompressedWeight | None:
        """The base's stored parts (of its matrix view), or None for a plain Conv2d base."""
        return compressed_of(self.base_layer)

    @property
    def in_features(self) -> int:
        """Columns of the matrix view: in * kh * kw."""
        return self.base_layer.weight[0].numel()

    @property
    def out_features(self) -> int:
        return self.base_layer.out_channels

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A as a conv weight (out, in, kh, kw)."""
        product = self.lora_B.flatten(1) @ self.lora_A.flatten(1)
        return self.scaling * product.view_as(self.base_layer.weight)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        # the base's geometry, so that A sees the same padding (mode included), stride and
        # dilation as W_c and the two outputs line up position by position
        return conv_like(self.base_layer, x, weight, bias)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        """``base_out``: this batch's ``base_layer(x)`` when the caller has it precomputed (not
        used with DoRA, which rescales whole channels of the merged weight, nor by a grouped
        conv)."""
        if self.r == 0:  # no adapter: the compressed layer alone
            return self.base_layer(x) if base_out is None else base_out
        if self.use_dora or self.base_layer.groups != 1:
            return self._conv(x, self.merged_weight(), self.base_layer.bias)
        if base_out is None:
            base_out = self.base_layer(x)
        # scale the r-channel hidden map, not the out-channel one
        hidden = self._conv(x, self.lora_A, None) * self.scaling
        return base_out + nn.functional.conv2d(hidden, self.lora_B)
