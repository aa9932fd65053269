"""Efficiency of the caching pass: images/s of decode + transform + forward, against the bare
forward pass on the same batches already decoded.

    python -m benchmarks.bench_feature_extraction [--images 256] [--model resnet18]
        [--workers 0 2] [--decode cpu gpu] [--repeats 5]

The caching pass is the driver's own (``extract_features``): ``--decode cpu`` decodes with PIL
(``--workers`` processes, or threads with 0), ``--decode gpu`` with nvJPEG and resizes on the
CUDA device. Efficiency = caching-pass images/s / bare-forward images/s: 1.0 would mean decoding
costs nothing. Each figure is the median of interleaved repetitions (bare, pass, bare, pass...).
Random weights (the time does not depend on them).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import timm
import torch

from benchmarks.common import REPEATS, image_folder, interleaved, machine
from data import scan_imagenet_folder
from train_evaluate.inputs.backbone import eval_transform, pre_logits
from train_evaluate.inputs.features import default_workers, extract_features


def caching_pass(model, source, transform, device, batch_size, workers, decode) -> None:
    ahead = decode.DECODE_AHEAD
    decode.DECODE_AHEAD = 0 if decode == "gpu-serial" else ahead
    try:
        extract_features(
            model, source, transform, device, batch_size, workers, decode.removesuffix("-serial")
        )
    finally:
        decode.DECODE_AHEAD = ahead


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--workers", type=int, nargs="+", help="CPU-decode settings (default: the driver's)"
    )
    parser.add_argument(
        "--decode",
        nargs="+",
        default=["cpu"],
        choices=["cpu", "gpu", "gpu-serial"],
        help="gpu-serial: --decode gpu without the read-ahead thread (DECODE_AHEAD = 0)",
    )
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if any(d.startswith("gpu") for d in args.decode) and device.type != "cuda":
        parser.error("--decode gpu needs a CUDA device")
    default = default_workers(device)
    settings = args.workers or [default]
    model = timm.create_model(args.model, pretrained=False).eval().requires_grad_(False).to(device)
    transform = eval_transform(model)
    with tempfile.TemporaryDirectory() as scratch:
        folder, what = image_folder(args.images, Path(scratch))
        source = scan_imagenet_folder(folder)
        print(f"{args.model}, {what}, batch {args.batch_size}; {machine()}")
        batches = torch.stack([transform(source.load(i)) for i in range(len(source.ids))])
        batches = batches.split(args.batch_size)

        @torch.inference_mode()
        def bare() -> None:
            for batch in batches:
                pre_logits(model, batch.to(device)).cpu()

        variants = {"bare forward on decoded tensors": bare}
        for decode in args.decode:
            for workers in settings if decode == "cpu" else [0]:
                cpu = f"cpu decode, {workers} processes" if workers else "cpu decode in threads"
                how = {
                    "gpu": "gpu decode (nvJPEG), read ahead",
                    "gpu-serial": "gpu decode (nvJPEG), serial",
                }.get(decode, cpu)
                variants[f"caching pass, {how}"] = lambda d=decode, w=workers: caching_pass(
                    model, source, transform, device, args.batch_size, w, d
                )
        timings = interleaved(variants, args.repeats)
    rates = {name: args.images / t.median for name, t in timings.items()}
    for name, timing in timings.items():
        per_image = timing.line(scale=1e3 / args.images, unit="ms/image")
        print(f"{per_image}; {rates[name]:.1f} images/s at the median")
    bare_rate = rates["bare forward on decoded tensors"]
    for name, rate in rates.items():
        if name.startswith("caching pass"):
            print(f"efficiency of the {name[14:]} (caching pass / bare forward, medians): "
                  f"{rate / bare_rate:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
