"""GPTQ side by side: Brevitas's and ours, on EfficientNet-Lite0 with the same images, model and
widths, top-1 and seconds, in one run.

    python train_evaluate/inputs/convert_efficientnet_lite0.py          # once: the real weights
    pip install --no-deps --target .brevitas brevitas==0.13.4 dependencies==2.0.1 unfoldNd==0.2.3
    PYTHONPATH=.brevitas python -m benchmarks.versus_brevitas [--bits 4 3] [--grids affine]

Brevitas (AMD's quantization library, https://github.com/Xilinx/brevitas) is installed for this
benchmark only, into its own folder: the tool never imports it. Both sides get a copy of the same
model, the BatchNorms already folded into their convs (as the tool compresses it), and the same
calibration images: the split 40/10/50 of the ImageNet sample (seed 0, as the driver splits it),
the first ``--calib-images`` of the train part as the driver draws them; top-1 on the 100 test
images. Widths: every pointwise conv and the FC at ``--bits``, the depthwise convs and the stem
at 8; one weight scale per output channel chosen by mean squared error on both sides
(``--int-scale mse``; Brevitas's ``...WeightPerChannelFloatMSE``), on the symmetric grid
(2^N - 1 levels: ``intN``; ``Int8WeightPerChannelFloatMSE``) or with a zero point per channel
(``intN-affine``; ``ShiftedUint8WeightPerChannelFloatMSE``); activations stay float. Ours runs
``lora.calibration.compress_sequentially`` with ``--quantizer gptq`` (what the driver's
compressed-only row runs), Brevitas its ``gptq_mode`` as its ImageNet example drives it (one
pass over the calibration images per layer, no activation quantization, no act order). timm's
Conv2dSame (the stem and the stride-2 depthwise convs pad by the input's size) becomes a fixed
zero pad and a plain conv for Brevitas, which only replaces plain Conv2d modules: at 224 x 224
the same function. Seconds: the wall and the process CPU seconds of the quantization alone.
Besides top-1, each row's mean KL divergence from the original model's outputs on the test
images and how often its top class is the original's: label-free, and far less noisy than
top-1 on 100 images.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import machine, missing_inputs
from compression import make_config
from data import SplitFractions, scan_imagenet_folder, split_indices
from lora.calibration import compress_sequentially
from lora.folding import conv_batchnorm_pairs, fold_batchnorm_
from train_evaluate.inputs.backbone import create_backbone, eval_transform
from train_evaluate.inputs.images import (
    ImageModel,
    decode_images,
    normalisation,
    uint8_transform,
)
from train_evaluate.training.network import calibration_rows

REPO = Path(__file__).resolve().parents[1]
MODEL = "tf_efficientnet_lite0"
STEM = "conv_stem"
INSTALL = (
    "pip install --no-deps --target .brevitas brevitas==0.13.4 dependencies==2.0.1 "
    "unfoldNd==0.2.3, then run with PYTHONPATH=.brevitas"
)


def load(args: argparse.Namespace) -> tuple[ImageModel, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The folded model on uint8 images, the calibration images, the test images and labels."""
    model = create_backbone(MODEL, args.weights, torch.device("cpu"))
    transform = eval_transform(model)
    images = decode_images(scan_imagenet_folder(args.data_dir), uint8_transform(transform), 32, 0)
    mean, std = normalisation(transform)
    wrapped = ImageModel(model, mean, std).eval()
    split = split_indices(len(images.ids), SplitFractions(0.4, 0.1, 0.5), seed=0)
    train, test = split["train"], split["test"]
    calibration = images.features[train][calibration_rows(len(train), args.calib_images, 0)]
    fold_batchnorm_(model, conv_batchnorm_pairs(model, wrapped.preprocess(calibration[:1])))
    return wrapped, calibration, images.features[test], images.labels[test]


def widths(model: nn.Module, bits: int) -> dict[str, int]:
    """Each conv and linear layer's width: 8 for the stem and the grouped convs, ``bits`` else."""
    return {
        name: 8 if name == STEM or getattr(module, "groups", 1) > 1 else bits
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.Linear)
    }


def logits_of(model: ImageModel, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(chunk) for chunk in images.split(50)])


def scores(logits: torch.Tensor, labels: torch.Tensor, original: torch.Tensor) -> tuple:
    """Top-1 (%), and against the original model's outputs on the same images: the mean
    KL(original || quantized) in nats and the share of images whose top class is the original's
    (%). The last two read no label and vary far less from image to image than top-1, so they
    separate two quantizers that 100 test images' top-1 cannot."""
    reference, own = original.log_softmax(1), logits.log_softmax(1)
    kl = (reference.exp() * (reference - own)).sum(1).mean().item()
    agree = (logits.argmax(1) == original.argmax(1)).double().mean().item()
    return 100.0 * (logits.argmax(1) == labels).double().mean().item(), kl, 100.0 * agree


def timed(quantize: Callable[[], None]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    quantize()
    return time.perf_counter() - wall, time.process_time() - cpu


def our_gptq(model: ImageModel, calibration: torch.Tensor, bits: int, grid: str) -> tuple:
    suffix = "-affine" if grid == "affine" else ""
    targets = {
        name: make_config(f"int{width}{suffix}", quantizer="gptq", int_scale="mse")
        for name, width in widths(model.model, bits).items()
    }
    batches = [model.preprocess(chunk) for chunk in calibration.split(16)]
    return timed(lambda: compress_sequentially(model.model, targets, batches))


def plain_convs(model: nn.Module) -> None:
    """Each timm Conv2dSame as a fixed zero pad and a plain Conv2d (the same function at the
    input size its pads are measured at), so that Brevitas finds and replaces it."""
    from timm.layers import Conv2dSame

    sizes = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda module, args: sizes.__setitem__(module, args[0].shape[-2:])
        )
        for module in model.modules()
        if isinstance(module, Conv2dSame)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for hook in hooks:
        hook.remove()
    for name, module in list(model.named_modules()):
        if module not in sizes:
            continue
        pads = []
        for size, k, s, d in zip(
            sizes[module], module.kernel_size, module.stride, module.dilation, strict=True
        ):
            total = max((-(size // -s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size,
                         module.stride, 0, module.dilation, module.groups,
                         module.bias is not None)  # fmt: skip
        conv.load_state_dict(module.state_dict())
        pad = nn.ZeroPad2d((*pads[1], *pads[0]))  # (left, right, top, bottom)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Sequential(pad, conv))


def brevitas_gptq(model: ImageModel, calibration: torch.Tensor, bits: int, grid: str) -> tuple:
    import brevitas.nn as qnn
    from brevitas import quant
    from brevitas.graph.gptq import gptq_mode
    from brevitas.graph.quantize import layerwise_quantize

    wanted = widths(model.model, bits)
    batches = [model.preprocess(chunk) for chunk in calibration.split(16)]
    with torch.no_grad():
        before = model.model(batches[0])
        plain_convs(model.model)
        moved = (model.model(batches[0]) - before).abs().max().item()
    if moved > 1e-4 * before.abs().max().item():
        raise SystemExit(f"the plain convs changed the logits by {moved:.3g}")
    weight_quant = {
        "affine": quant.ShiftedUint8WeightPerChannelFloatMSE,
        "symmetric": quant.Int8WeightPerChannelFloatMSE,
    }[grid]

    def width(module: nn.Module, name: str) -> int:
        return wanted.get(name, wanted.get(name.removesuffix(".1"), bits))

    options = {
        "weight_quant": weight_quant,
        # Brevitas evaluates a lambda per layer (a named function would be passed as it is)
        "weight_bit_width": lambda module, name: width(module, name),
        "input_quant": None,
        "output_quant": None,
        "return_quant_tensor": False,
    }
    layer_map = {nn.Conv2d: (qnn.QuantConv2d, options), nn.Linear: (qnn.QuantLinear, options)}

    def quantize() -> None:
        quantized = layerwise_quantize(model.model, compute_layer_map=layer_map)
        with torch.no_grad():  # Brevitas sets its weight quantizers up on a first forward pass
            quantized(batches[0])
        with torch.no_grad(), gptq_mode(quantized, use_quant_activations=False) as gptq:
            for _ in range(gptq.num_layers):
                for batch in batches:
                    gptq.model(batch)
                gptq.update()
        model.model = quantized

    seconds = timed(quantize)
    found = sum(isinstance(m, qnn.QuantConv2d | qnn.QuantLinear) for m in model.model.modules())
    if found != len(wanted):
        raise SystemExit(f"Brevitas quantized {found} layers of {len(wanted)}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/imagenet-sample")
    parser.add_argument("--weights", type=Path, default=REPO / f"weights/{MODEL}.safetensors")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--grids", nargs="+", choices=["affine", "symmetric"], default=["affine"])
    parser.add_argument("--calib-images", type=int, default=64)
    args = parser.parse_args(argv)
    if missing := missing_inputs({"the image folder": args.data_dir, "the weights": args.weights}):
        return missing
    if importlib.util.find_spec("brevitas") is None:
        print(f"error: this benchmark needs Brevitas: {INSTALL}", file=sys.stderr)
        return 2
    model, calibration, images, labels = load(args)
    original = logits_of(model, images)
    print(
        f"{MODEL}, BatchNorms folded, {len(calibration)} calibration images, "
        f"{len(images)} test images; original top-1 {scores(original, labels, original)[0]:.1f}; "
        f"{machine()}",
        flush=True,
    )
    lines = [
        "| widths | grid | GPTQ of | top-1 | KL to the original | top-1 agrees with the "
        "original | wall s | CPU s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for bits in args.bits:
        for grid in args.grids:
            for name, quantize in (("ours", our_gptq), ("Brevitas", brevitas_gptq)):
                copied = copy.deepcopy(model)
                wall, cpu = quantize(copied, calibration, bits, grid)
                accuracy, kl, agree = scores(logits_of(copied, images), labels, original)
                lines.append(
                    f"| int{bits}, depthwise and stem int8 | {grid} | {name} | {accuracy:.1f} | "
                    f"{kl:.3f} | {agree:.0f} | {wall:.0f} | {cpu:.0f} |"
                )
                print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
