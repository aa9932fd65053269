"""Efficiency of the caching pass: images/s of decode + transform + forward, against the bare
forward pass on the same batches already decoded.

    python benchmarks/bench_feature_extraction.py [--images 256] [--model resnet18]

The caching pass is the driver's own (``extract_features``: a DataLoader decoding with
``--workers`` processes while the main process runs the backbone). Efficiency = caching-pass
images/s / bare-forward images/s: 1.0 would mean decoding costs nothing. Random weights (the
time does not depend on them).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import timm
import torch

from benchmarks.common import image_folder, machine
from data import scan_imagenet_folder
from train_evaluate.backbone import eval_transform, pre_logits
from train_evaluate.features import default_workers, extract_features


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--workers", type=int, nargs="+", help="settings to compare (default: the driver's, 0, 2)"
    )
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = default_workers(device)
    settings = args.workers or list(dict.fromkeys([default, 0, 2]))
    model = timm.create_model(args.model, pretrained=False).eval().requires_grad_(False).to(device)
    transform = eval_transform(model)
    with tempfile.TemporaryDirectory() as scratch:
        folder, what = image_folder(args.images, Path(scratch))
        source = scan_imagenet_folder(folder)
        print(f"{args.model}, {what}, batch {args.batch_size}; {machine()}")
        batches = torch.stack([transform(source.load(i)) for i in range(len(source.ids))])
        batches = batches.split(args.batch_size)
        with torch.inference_mode():
            pre_logits(model, batches[0].to(device))  # warm-up
            started = time.perf_counter()
            for batch in batches:
                pre_logits(model, batch.to(device)).cpu()
            bare = args.images / (time.perf_counter() - started)
        print(f"bare forward on decoded tensors: {bare:8.1f} images/s")
        efficiency = {}
        for workers in settings:
            started = time.perf_counter()
            extract_features(model, source, transform, device, args.batch_size, workers)
            rate = args.images / (time.perf_counter() - started)
            efficiency[workers] = rate / bare
            how = "decoding in threads" if workers == 0 else f"{workers} decoding processes"
            print(f"caching pass, {how}: {rate:8.1f} images/s (efficiency {rate / bare:.2f})")
    headline = efficiency.get(default, max(efficiency.values()))
    print(f"feature-extraction efficiency (caching pass / bare forward, the driver's default "
          f"of {default} workers): {headline:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
