"""Rebuild a classifier from its backbone and a packed checkpoint, and evaluate it.

    python train_evaluate/evaluate.py \\
        --checkpoint results/svd_init/checkpoints/quant=sparse_r=8.safetensors

The checkpoint holds the compressed FC and its adapter (see checkpoint.py) and names the model,
its weights and the data it was trained on. By default the images are the test split of the run
the checkpoint belongs to (``<run>/split/test.txt``); the features come from the feature cache
when they are there. ``--merge FILE`` also writes the dense merged FC, W_c + (alpha/r) B @ A,
for deployment without this tool (it gives up the compression).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import hashlib
import logging

import torch

from data import DataError, load_digits_source, scan_imagenet_folder
from train_evaluate.backbone import BackboneError
from train_evaluate.checkpoint import CheckpointError, read_packed, write_merged
from train_evaluate.features import backbone_features
from train_evaluate.train_model import (
    DEFAULT_RESULTS,
    OneLineParser,
    UsageError,
    configure_logging,
    resolve_device,
)
from train_evaluate.training import FeatureSplit, evaluate

log = logging.getLogger("evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a packed .safetensors")
    parser.add_argument("--data-dir", type=Path, help="ImageNet folder (default: the run's)")
    parser.add_argument("--weights", type=Path, help="backbone weights (default: the run's)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--ids", type=Path, help="file of image ids to evaluate, one per line")
    which.add_argument("--all", action="store_true", help="evaluate every image of the data")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_RESULTS / "cache")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--merge", type=Path, help="also write the dense merged FC here")
    return parser


def image_source(info: dict, data_dir: Path | None):
    if info.get("demo"):
        return load_digits_source()
    folder = data_dir or (Path(info["data_dir"]) if info.get("data_dir") else None)
    if folder is None:
        raise UsageError("the checkpoint names no data folder; pass --data-dir")
    return scan_imagenet_folder(folder)


def backbone_weights(info: dict, weights: Path | None) -> Path | None:
    if weights is not None:
        return weights
    if info.get("weights", "hub") == "hub":
        return None
    stored = Path(info["weights"])
    if not stored.is_file():
        raise UsageError(f"the checkpoint's backbone weights {stored} are gone; pass --weights")
    return stored


def selected_ids(
    args: argparse.Namespace, info: dict, all_ids: tuple[str, ...]
) -> tuple[list[str], str]:
    """The image ids to evaluate, and what they are."""
    if args.all:
        return list(all_ids), "all images"
    if args.ids:
        if not args.ids.is_file():
            raise UsageError(f"id list {args.ids} does not exist")
        return args.ids.read_text().split(), f"the ids in {args.ids}"
    path = args.checkpoint.resolve().parent.parent / "split" / "test.txt"
    if not path.is_file():
        raise UsageError(f"no id list at {path}; pass --ids FILE or --all")
    text = path.read_text()
    if hashlib.sha256(text.encode()).hexdigest() != info.get("test_ids_sha256"):
        raise UsageError(
            f"{path} is not the test split this checkpoint was scored on (the folder was run "
            "again with another split); pass --ids FILE or --all"
        )
    return text.split(), f"the run's test split ({path})"


def run(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    packed = read_packed(args.checkpoint, device)
    info = packed.info
    log.info(
        "checkpoint: %s r=%d (%s), adapter %s, %d bytes",
        info["method"],
        info["rank"],
        info["init"],
        info["adapter_dtype"],
        args.checkpoint.stat().st_size,
    )
    source = image_source(info, args.data_dir)
    found = backbone_features(
        info["model"], backbone_weights(info, args.weights), source, device, args.cache_dir
    )
    ids, described = selected_ids(args, info, found.cached.ids)
    position = {image_id: row for row, image_id in enumerate(found.cached.ids)}
    missing = [i for i in ids if i not in position]
    if missing:
        raise UsageError(f"{len(missing)} ids are not among the images, e.g. {missing[0]}")
    rows = torch.tensor([position[i] for i in ids])
    split = FeatureSplit(
        found.cached.features[rows].to(device), found.cached.labels[rows].to(device)
    ).with_base(packed.layer)
    accuracy = evaluate(packed.layer, split)["acc"]
    log.info("top-1 %.4f%% on %d images (%s)", accuracy, len(ids), described)
    recorded = info.get("metrics", {}).get("this_model_test_acc")
    if recorded is not None and args.ids is None and not args.all:
        verdict = (
            "reproduced exactly"
            if accuracy == recorded
            else f"differs by {accuracy - recorded:+.4f}"
        )
        log.info("recorded test top-1 of the trained model: %.4f%%: %s", recorded, verdict)
    if args.merge:
        size = write_merged(args.merge, packed.layer)
        log.info(
            "wrote %s: one dense fp32 FC (W_c + (alpha/r) B @ A), %d bytes, %.2fx the packed "
            "checkpoint: it gives up the compression",
            args.merge,
            size,
            size / args.checkpoint.stat().st_size,
        )


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    try:
        run(build_parser().parse_args(argv))
    except (UsageError, CheckpointError, DataError, BackboneError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help
        return int(done.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
