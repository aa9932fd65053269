"""Per-epoch cost of the original approach (the backbone runs on every image in every epoch of
every trial) against cache-first training, on the same images, model and device, in one run;
and both projected to the full protocol.

    python -m benchmarks.bench_cache_speedup [--images 128] [--rank 32] [--batch-size 128]

An epoch is one training pass over 80% of the images and one evaluation of the other 20%, with
a rank-``--rank`` adapter on resnet18's (random) sparse-compressed FC at 224 px:
- original: decode + transform + backbone forward for every image, then the FC and adapter;
- cache-first: the same epoch on the features cached by one backbone pass (the driver's
  ``train_adapter``, which also evaluates before the first step).
The full protocol is 2 methods x 7 ranks x 10 trials x 10 epochs = 1,400 epochs on 40,000
train + val images; its cache-first cost is one caching pass plus 1,400 epochs measured on
40,000 ImageNet-shaped cached features (32,000 train, 8,000 val).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from benchmarks.common import REPEATS, image_folder, interleaved, machine, synthetic_features
from compression import make_config
from data import scan_imagenet_folder
from data.loader import ImageDataset, image_batches
from lora import LoraConfig, make_init_context, make_lora_linear
from train_evaluate.inputs.backbone import classifier, eval_transform, pre_logits
from train_evaluate.inputs.features import default_workers, extract_features
from train_evaluate.training.training import FeatureSplit, TrainConfig, train_adapter

PROTOCOL_EPOCHS = 2 * 7 * 10 * 10
PROTOCOL_IMAGES = 40_000


def adapter_for(head, rank: int):
    context = make_init_context(head, make_config("sparse"))
    return make_lora_linear(head, LoraConfig(r=rank, init="svd_init"), context)


def original_epoch(model, images, labels, layer, batch_size, device, workers) -> None:
    """One epoch as the original code ran it: every image through the backbone."""
    optimizer = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-3)
    train_count = int(0.8 * len(images))
    for batch, indices, _ in image_batches(images, batch_size, workers, device.type == "cuda"):
        with torch.no_grad():
            features = pre_logits(model, batch.to(device))
        targets = labels[indices].to(device)
        train_rows = torch.tensor(indices) < train_count
        if train_rows.any():
            loss = F.cross_entropy(layer(features[train_rows]), targets[train_rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if (~train_rows).any():
            with torch.no_grad():
                layer(features[~train_rows]).argmax(dim=1)


def cached_epochs(head, train, val, rank: int, batch_size: int, count: int):
    """``count`` cache-first epochs (``train_adapter`` with one epoch each): one repetition."""
    layer = adapter_for(head, rank)
    config = TrainConfig(epochs=1, batch_size=batch_size)
    return lambda: [train_adapter(layer, train, val, config) for _ in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=REPEATS, help="interleaved repetitions")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workers = default_workers(device)
    model = timm.create_model("resnet18", pretrained=False).eval().requires_grad_(False).to(device)
    transform = eval_transform(model)
    head = classifier(model)
    # a repetition of the cache-first variant is this many epochs (one takes milliseconds)
    cached_block = 20
    with tempfile.TemporaryDirectory() as scratch:
        folder, what = image_folder(args.images, Path(scratch))
        source = scan_imagenet_folder(folder)
        images = ImageDataset(source, transform)
        labels = torch.tensor(source.labels)
        print(f"resnet18 (random weights), {what}, rank {args.rank}, batch {args.batch_size}; "
              f"{machine()}")  # fmt: skip
        started = time.perf_counter()
        cached = extract_features(model, source, transform, device, 64, workers)
        caching_pass = time.perf_counter() - started
        rows = int(0.8 * args.images)
        features = cached.features.to(device)
        train = FeatureSplit(features[:rows], cached.labels[:rows].to(device))
        val = FeatureSplit(features[rows:], cached.labels[rows:].to(device))
        layer = adapter_for(head, args.rank)
        train, val = train.with_base(layer), val.with_base(layer)
        timings = interleaved(
            {
                "original epoch": lambda: original_epoch(
                    model, images, labels, adapter_for(head, args.rank), 64, device, workers
                ),
                f"cache-first, {cached_block} epochs": cached_epochs(
                    head, train, val, args.rank, args.batch_size, cached_block
                ),
            },
            args.repeats,
        )
    original_timing, cached_timing = timings.values()
    print(original_timing.line())
    print(cached_timing.line(1e3 / cached_block, "ms per epoch"))
    speedups = sorted(
        a / (b / cached_block)
        for a, b in zip(original_timing.seconds, cached_timing.seconds, strict=True)
    )
    original = original_timing.median
    epoch = cached_timing.median / cached_block
    print(
        f"one epoch on these {args.images} images: original {original:.3f} s, "
        f"cache-first {epoch * 1e3:.3f} ms (after one caching pass of {caching_pass:.2f} s)"
    )

    head, splits = synthetic_features(32_000, 8_000)
    head = head.to(device)
    layer = adapter_for(head, args.rank)
    big_train, big_val = (s.to(device).with_base(layer) for s in (splits.train, splits.val))
    (big,) = interleaved(
        {"cache-first epoch, 40,000 features": cached_epochs(
            head, big_train, big_val, args.rank, args.batch_size, 1
        )},
        args.repeats,
    ).values()  # fmt: skip
    print(big.line())
    big_epoch = big.median
    per_image_original = original / args.images
    hours_original = PROTOCOL_EPOCHS * PROTOCOL_IMAGES * per_image_original / 3600
    hours_cached = (
        PROTOCOL_IMAGES * caching_pass / args.images + PROTOCOL_EPOCHS * big_epoch
    ) / 3600
    print(
        f"full protocol ({PROTOCOL_EPOCHS} epochs, {PROTOCOL_IMAGES:,} images): original "
        f"{hours_original:,.1f} h; cache-first {hours_cached:.2f} h (one caching pass, timed "
        f"once, {PROTOCOL_IMAGES * caching_pass / args.images / 3600:.2f} h + training "
        f"{PROTOCOL_EPOCHS * big_epoch / 3600:.2f} h); {hours_original / hours_cached:,.0f}x"
    )
    print(
        f"per-epoch speedup of cache-first training on the same {args.images} images: median "
        f"{statistics.median(speedups):,.0f}x [min {speedups[0]:,.0f}x, max {speedups[-1]:,.0f}x]"
        f" over {len(speedups)} interleaved pairs, {torch.get_num_threads()} threads"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
