"""Rebuild a classifier from its backbone and a packed checkpoint, and evaluate it.

    python train_evaluate/evaluate.py \\
        --checkpoint results/digits_vit/digits/svd_init/checkpoints/quant=sparse_r=8.safetensors

The checkpoint holds the compressed FC and its adapter (see checkpoint.py) and names the model,
its weights and the data it was trained on. By default the images are the test split of the run
the checkpoint belongs to (``<run>/split/test.txt``); the features come from the feature cache
when they are there. ``--merge FILE`` also writes the dense merged FC, W_c + (alpha/r) B @ A,
for deployment without this tool (it gives up the compression).

The checkpoint may name its weights and data only by id and name (``sha256:<hex>``, a file or
folder name), not by a path on this machine: then ``--weights`` and ``--data-dir`` say where
they are, and weights given for a ``sha256:`` id must be those very bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import timm
import torch

from data import DataError, load_digits_source, scan_imagenet_folder
from lora.attach import classifier_name
from train_evaluate.config.cli import (
    OneLineParser,
    UsageError,
    configure_logging,
    resolve_device,
)
from train_evaluate.config.run_options import DEFAULT_RESULTS
from train_evaluate.inputs.backbone import BackboneError, weights_id
from train_evaluate.inputs.demo import DEMO_MODEL  # importing it registers digits_vit with timm
from train_evaluate.inputs.features import backbone_features
from train_evaluate.outputs.checkpoint import NETWORK_FORMAT, CheckpointError, packed_format
from train_evaluate.outputs.deploy import write_merged
from train_evaluate.outputs.network_checkpoint import (
    PackedNetwork,
    read_layer_file,
    read_packed_network,
    the_one_layer,
)
from train_evaluate.runtime.files import check_writable
from train_evaluate.training.training import FeatureSplit, evaluate

log = logging.getLogger("evaluate")

SPLIT_NAMES = ("train", "val", "test")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a packed .safetensors")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="ImageNet folder (default: the run's, when the checkpoint names an existing one)",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        help="backbone weights (default: the run's, when the checkpoint names an existing file)",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--ids", type=Path, help="file of image ids to evaluate, one per line")
    which.add_argument("--all", action="store_true", help="evaluate every image of the data")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_RESULTS / "cache")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--merge", type=Path, help="also write the dense merged FC here")
    return parser


def parse_ids(text: str) -> list[str]:
    """One image id per line. Ids are file names, which may hold spaces: only the line break
    (``\\n`` or ``\\r\\n``) is stripped, and empty lines are skipped."""
    lines = (line.removesuffix("\r") for line in text.split("\n"))
    return [line for line in lines if line]


def read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise UsageError(f"id list {path} does not exist or is not a file")
    try:
        # bytes, not read_text: its universal newlines would also split a name at a lone \r
        return parse_ids(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read id list {path} ({error}); pass a UTF-8 text file") from error


def recorded_string(info: dict, key: str) -> str | None:
    value = info.get(key)
    return value if isinstance(value, str) and value else None


def image_source(info: dict, data_dir: Path | None):
    """The images: the digits for a demo checkpoint, else the ImageNet folder that --data-dir
    names or, failing that, the checkpoint's own when it is an existing absolute path."""
    if info.get("demo") is True:
        if data_dir is not None:
            raise UsageError(
                "--data-dir does not apply to a demo checkpoint: its images are scikit-learn's "
                "digits, built in; drop --data-dir"
            )
        return load_digits_source()
    if data_dir is not None:
        return scan_imagenet_folder(data_dir)
    recorded = recorded_string(info, "data_dir") or recorded_string(info, "data")
    # only an absolute path means a place: a bare name would be looked up in the current folder
    if recorded is not None and Path(recorded).is_absolute() and Path(recorded).is_dir():
        return scan_imagenet_folder(Path(recorded))
    named = f"names data {recorded!r}, not a folder here" if recorded else "names no data folder"
    raise UsageError(
        f"the checkpoint {named}; pass --data-dir FOLDER (the ImageNet folder it was trained on)"
    )


def expected_weights_id(info: dict) -> str | None:
    """The ``sha256:<hex>`` the checkpoint records for its backbone weights, if any."""
    for key in ("weights_id", "weights"):
        value = recorded_string(info, key)
        if value is not None and value.startswith("sha256:"):
            return value
    return None


def backbone_weights(info: dict, weights: Path | None, cache_dir: Path) -> Path | None:
    """The weights file to load (None: timm's hub weights), checked against the checkpoint's
    ``sha256:`` id when it records one."""
    model = info["model"]
    recorded = recorded_string(info, "weights") or "hub"
    expected = expected_weights_id(info)
    if weights is not None:
        if not weights.is_file():
            raise UsageError(f"--weights {weights} does not exist or is not a file")
        chosen = weights
    elif recorded == "hub" or recorded.startswith("hub:"):
        return None
    else:
        chosen = _recorded_weights(info, recorded, expected, cache_dir)
    if expected is not None and weights_id(model, chosen) != expected:
        raise UsageError(
            f"{chosen} are not the backbone weights this checkpoint was trained with (it "
            f"records {expected[:19]}...); pass those with --weights"
        )
    return chosen


def _recorded_weights(info: dict, recorded: str, expected: str | None, cache_dir: Path) -> Path:
    """The weights file the checkpoint names, where this machine has it."""
    candidates = []
    if Path(recorded).is_absolute():  # old checkpoints: where the run found them
        candidates.append(Path(recorded))
    elif info.get("demo") is True:
        # the demo trains its classifier itself and keeps it in the feature cache
        if not recorded.startswith("sha256:"):
            candidates.append(cache_dir / Path(recorded).name)
        elif cache_dir.is_dir():
            candidates.extend(sorted(cache_dir.glob(f"{DEMO_MODEL}-*.safetensors")))
    for path in candidates:
        if path.is_file() and (expected is None or weights_id(info["model"], path) == expected):
            return path
    where = " (nor in --cache-dir)" if info.get("demo") is True else ""
    raise UsageError(
        f"the checkpoint's backbone weights {recorded} are not a file here{where}; "
        "pass --weights FILE"
    )


def run_folder(checkpoint: Path) -> Path:
    """The run a driver checkpoint belongs to: ``<run>/checkpoints/<name>.safetensors``."""
    return checkpoint.resolve().parent.parent


def requested_ids(args: argparse.Namespace, info: dict) -> tuple[list[str] | None, str]:
    """The image ids to evaluate (None: all of them), and what they are."""
    if args.all:
        return None, "all images"
    if args.ids:
        return read_ids(args.ids), f"the ids in {args.ids}"
    path = run_folder(args.checkpoint) / "split" / "test.txt"
    if not path.is_file():
        raise UsageError(f"no id list at {path}; pass --ids FILE or --all")
    data = path.read_bytes()
    # the hash of the bytes the driver wrote (UTF-8): a match means they decode as it wrote them
    if hashlib.sha256(data).hexdigest() != info.get("test_ids_sha256"):
        raise UsageError(
            f"{path} is not the test split this checkpoint was scored on (the folder was run "
            "again with another split); pass --ids FILE or --all"
        )
    return parse_ids(data.decode("utf-8")), f"the run's test split ({path})"


def same_file(first: Path, second: Path) -> bool:
    """Whether two paths name one file: the same resolved path (links followed), or, when both
    exist, the same inode (hard links, bind mounts)."""
    if first.resolve() == second.resolve():
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist (yet)
        return False


def check_merge_target(target: Path, inputs: list[tuple[str, Path]], data_dir: Path | None) -> None:
    """Refuse, before any work, a --merge path that would overwrite what this run reads."""
    for what, path in inputs:
        if same_file(target, path):
            raise UsageError(
                f"--merge {target} is {what} ({path}): writing it would destroy an input; "
                "name another file"
            )
    if data_dir is not None and target.resolve().is_relative_to(data_dir.resolve()):
        raise UsageError(
            f"--merge {target} is inside the data folder {data_dir}; name a file outside it"
        )
    if target.exists() and not target.is_file():
        raise UsageError(f"--merge {target} exists and is not a file; name a file")
    problem = check_writable(target.parent)
    if problem is not None:
        raise UsageError(f"cannot write --merge {target}: {problem}")


def merge_metadata(info: dict, weights: Path | None, model: torch.nn.Module) -> dict[str, str]:
    """What the merged FC is for, as safetensors metadata strings."""
    out_features, in_features = info["shape"]
    return {
        "model": info["model"],
        "weights": weights_id(info["model"], weights),
        "classifier": classifier_name(model),
        "method": info["method"],
        "compression": json.dumps(info["compression"]),
        "rank": str(info["rank"]),
        "lora_alpha": str(info["lora_alpha"]),
        "use_dora": str(info["use_dora"]).lower(),
        "init": recorded_string(info, "init") or "unrecorded",
        "shape": f"{out_features}x{in_features}",
        "adapter_dtype": info["adapter_dtype"],
    }


def run_paths(checkpoint: Path) -> tuple[Path | None, Path | None]:
    """The data folder and weights file that the checkpoint's run recorded in its run.json
    (the checkpoint itself names them only by id, so that its size does not depend on where
    the run lived); None for what is not recorded or not there any more."""
    from train_evaluate.runtime.files import read_json

    recorded = read_json(run_folder(checkpoint) / "run.json") or {}
    found = []
    for key, exists in (("data_dir", Path.is_dir), ("weights_file", Path.is_file)):
        value = recorded.get(key)
        path = Path(value) if isinstance(value, str) and value else None
        found.append(path if path is not None and exists(path) else None)
    return found[0], found[1]


def image_rows(cached, wanted: list[str] | None, described: str) -> tuple[list[str], torch.Tensor]:
    """The requested ids and their rows in the cached tensors."""
    ids = list(cached.ids) if wanted is None else wanted
    position = {image_id: row for row, image_id in enumerate(cached.ids)}
    missing = [i for i in ids if i not in position]
    if missing:
        raise UsageError(f"{len(missing)} ids are not among the images, e.g. {missing[0]!r}")
    if not ids:
        raise UsageError(f"no image ids to evaluate in {described}")
    return ids, torch.tensor([position[i] for i in ids])


def report_accuracy(accuracy: float, count: int, described: str, info: dict, args) -> None:
    log.info("top-1 %.4f%% on %d images (%s)", accuracy, count, described)
    metrics = info.get("metrics")
    recorded = metrics.get("this_model_test_acc") if isinstance(metrics, dict) else None
    if isinstance(recorded, int | float) and args.ids is None and not args.all:
        verdict = (
            "reproduced exactly"
            if accuracy == recorded
            else f"differs by {accuracy - recorded:+.4f}"
        )
        log.info("recorded test top-1 of the stored model: %.4f%%: %s", recorded, verdict)


def settle_inputs(args: argparse.Namespace, info: dict):
    """(image source, weights file, wanted ids, their description): every input of the
    evaluation, checked before the backbone runs (it writes a cache) or --merge writes."""
    run_data, run_weights = run_paths(args.checkpoint)
    demo = info.get("demo") is True
    source = image_source(info, args.data_dir or (None if demo else run_data))
    weights = backbone_weights(info, args.weights or run_weights, args.cache_dir)
    wanted, described = requested_ids(args, info)
    return source, weights, wanted, described


def log_plan(info: dict) -> None:
    """The layer plan the file holds (checked against its layers when it was read): what made
    it and its mix of choices; ``--layer-plan`` rebuilds the model from the run's plans/ copy."""
    plan = info.get("layer_plan")
    if plan is None:
        log.info("layer plan: not recorded (a file written before plans were)")
        return
    from lora.plan import mix

    log.info(
        "layer plan %s%s: %s",
        plan.get("name"),
        f" ({plan['origin']})" if plan.get("origin") else "",
        mix(f"{entry['method']} r={entry['rank']}" for entry in plan["layers"].values()),
    )


def run_network(args: argparse.Namespace, device: torch.device, packed: PackedNetwork) -> None:
    """A whole-network checkpoint (``packed``, read from it): the backbone from its weights,
    every compressed layer and adapter from the file, evaluated on the decoded images (from
    the image cache)."""
    from train_evaluate.inputs import images as image_cache
    from train_evaluate.inputs.backbone import create_backbone, eval_transform
    from train_evaluate.inputs.features import check_labels
    from train_evaluate.outputs.network_checkpoint import install_network
    from train_evaluate.training import network

    info = packed.info
    if recorded_string(info, "model") is None:
        raise UsageError(f"{args.checkpoint} names no timm model; evaluate.py needs it")
    if args.merge is not None:
        raise UsageError(
            "--merge writes one dense classifier; a whole-network checkpoint holds "
            f"{len(packed.layers)} layers and cannot be merged into one file yet; drop --merge"
        )
    log.info(
        "checkpoint: whole network, %d compressed layers (%s), %d bytes",
        len(packed.layers),
        recorded_string(info, "init") or "init unrecorded",
        args.checkpoint.stat().st_size,
    )
    log_plan(info)
    source, weights, wanted, described = settle_inputs(args, info)
    model = create_backbone(info["model"], weights, device)
    check_labels(source, model.get_classifier().out_features, info["model"])
    # the file's layers checked against the model's (kind, shape, conv geometry) before the
    # image pass: a mismatch is one line, and no cache is written for a run that cannot be
    installed = install_network(model, packed)
    transform = eval_transform(model)
    cached, _, _ = image_cache.cached_images(
        source,
        image_cache.uint8_transform(transform),
        args.cache_dir,
        model.get_classifier().out_features,
    )
    ids, rows = image_rows(cached, wanted, described)
    mean, std = image_cache.normalisation(transform)
    adapted = network.AdaptedNetwork(
        image_cache.ImageModel(installed, mean, std).to(device),
        list(packed.layers),
    )
    split = FeatureSplit(cached.features[rows].to(device), cached.labels[rows].to(device))
    report_accuracy(evaluate(adapted, split)["acc"], len(ids), described, info, args)


def holds_the_classifier_alone(packed: PackedNetwork) -> bool:
    """Whether a network file holds one layer, its model's classifier (the FC study's files,
    scored on the cached features); any other is scored on the images, the whole model run."""
    model = recorded_string(packed.info, "model")
    if len(packed.layers) != 1 or model is None:
        return False
    try:
        with torch.device("meta"):
            bare = timm.create_model(model, pretrained=False)
        return next(iter(packed.layers)) == classifier_name(bare)
    except Exception:  # a model that cannot be built here: run_network says why in one line
        return False


def run(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    if not args.checkpoint.is_file():
        raise UsageError(f"checkpoint {args.checkpoint} does not exist or is not a file")
    if packed_format(args.checkpoint) != NETWORK_FORMAT:
        packed = read_layer_file(args.checkpoint, device)  # the first layout: one classifier
    else:
        network = read_packed_network(args.checkpoint, device)
        if not holds_the_classifier_alone(network):
            run_network(args, device, network)
            return
        packed = the_one_layer(network, args.checkpoint)
    info = packed.info
    if recorded_string(info, "model") is None:
        raise UsageError(
            f"{args.checkpoint} names no timm model (written outside the driver?); evaluate.py "
            "needs the model the adapter was trained on"
        )
    log.info(
        "checkpoint: %s r=%d (%s), adapter %s, %d bytes",
        info["method"],
        info["rank"],
        recorded_string(info, "init") or "init unrecorded",
        info["adapter_dtype"],
        args.checkpoint.stat().st_size,
    )
    log_plan(info)
    source, weights, wanted, described = settle_inputs(args, info)
    if args.merge is not None:
        split = run_folder(args.checkpoint) / "split"
        inputs = [("the checkpoint", args.checkpoint)]
        inputs += [("the --ids file", args.ids)] if args.ids else []
        inputs += [("the backbone weights", weights)] if weights is not None else []
        inputs += [(f"the run's {name} split", split / f"{name}.txt") for name in SPLIT_NAMES]
        check_merge_target(args.merge, inputs, getattr(source, "root", None))
    found = backbone_features(info["model"], weights, source, device, args.cache_dir)
    ids, rows = image_rows(found.cached, wanted, described)
    split = FeatureSplit(
        found.cached.features[rows].to(device), found.cached.labels[rows].to(device)
    ).with_base(packed.layer)
    report_accuracy(evaluate(packed.layer, split)["acc"], len(ids), described, info, args)
    if args.merge:
        metadata = merge_metadata(info, weights, found.model)
        size = write_merged(args.merge, packed.layer, metadata)
        log.info(
            "wrote %s: one dense fp32 FC (W_c + (alpha/r) B @ A) for %s's %s, %d bytes, %.2fx "
            "the packed checkpoint: it gives up the compression",
            args.merge,
            metadata["model"],
            metadata["classifier"],
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
