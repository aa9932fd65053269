"""One training epoch of a whole-network run cut at a block boundary against the same epoch run
from the cached images, in one run, on the same adapters, images and device.

    python -m benchmarks.bench_cache_cut [--model tf_efficientnet_lite0] [--images 64]

The selection is the model's last two stages' pointwise convs, its head conv and its classifier
(``--layers``), the case where most of the network precedes the compressed layers. Weights are
random: the compute, which is all this measures, is the pretrained model's. An epoch is the
driver's ``train_adapter`` for one epoch (an evaluation before the first step and after it, then
the steps), int4 with rank-8 svd_init adapters.
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch
from timm.data import resolve_data_config

from benchmarks.common import REPEATS, interleaved, machine, ratio_line
from compression import make_config
from lora.cut import cut_model, find_cut, state_of
from train_evaluate.inputs import images as image_cache
from train_evaluate.inputs import selection as layer_selection
from train_evaluate.inputs.backbone import eval_transform
from train_evaluate.search.sweep import SweepConfig
from train_evaluate.training import network
from train_evaluate.training.training import FeatureSplit, TrainConfig, train_adapter

DEFAULT_LAYERS = ["blocks.5.*.conv_p*", "blocks.6.*.conv_p*", "conv_head", "classifier"]


def adapted(model: image_cache.ImageModel, names: list[str], inputs: torch.Tensor):
    layers = layer_selection.describe_layers(model.model, names, model.preprocess(inputs[:1]))
    method = network.NetworkMethod.create("int4", make_config("int4"), model, layers, inputs[:8])
    return method.adapted(8, 16.0, SweepConfig(init="svd_init"), seed=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=DEFAULT_LAYERS)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    bare = timm.create_model(args.model, pretrained=False).eval()
    input_size = tuple(resolve_data_config({}, model=bare)["input_size"])
    names = layer_selection.select_layers(bare, args.layers)
    cut = find_cut(bare, names, input_size)
    if cut is None:
        print(f"no block boundary precedes {args.layers} in {args.model}: nothing to compare")
        return 1
    mean, std = image_cache.normalisation(eval_transform(bare))
    full = image_cache.ImageModel(bare, mean, std).eval().requires_grad_(False)
    suffix = image_cache.StateModel(cut_model(bare, cut, input_size), mean, std, cut.state_shape)
    suffix.eval().requires_grad_(False)
    images = torch.randint(0, 256, (args.images, *input_size), dtype=torch.uint8)
    with torch.no_grad():
        states = state_of(full.model, cut.module, full.preprocess(images))
    labels = torch.randint(0, 1000, (args.images,))
    config = TrainConfig(epochs=1, batch_size=args.batch_size)
    half = args.images // 2
    variants = {}
    for name, model, inputs in (("images", full, images), ("cut", suffix, states)):
        start = adapted(model, names, inputs)
        train = FeatureSplit(inputs[:half], labels[:half])
        val = FeatureSplit(inputs[half:], labels[half:])

        def epoch(start=start, train=train, val=val) -> None:
            train_adapter(copy.deepcopy(start), train, val, config, curves=False)

        variants[name] = epoch

    print(f"{machine()}; {args.model}, --layers {' '.join(args.layers)}")
    print(
        f"{len(names)} layers; cut at {cut.describe()}, {len(cut.skipped)} modules skipped; "
        f"{args.images} images ({half} train, {args.images - half} val), batch {args.batch_size}"
    )
    timings = interleaved(variants, args.repeats)
    for timing in timings.values():
        print(timing.line())
    print(ratio_line(timings["images"], timings["cut"], "epoch speedup of the cut"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
