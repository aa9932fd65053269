"""The driver's options as a run records them and ``--config`` reads them back: run.json's
``options`` holds every option of the command (timm's train.py keeps its args.yaml the same way).
Imports nothing heavy, like the parser.
"""

from __future__ import annotations

import json
from pathlib import Path

from train_evaluate.config.cli import build_parser
from train_evaluate.config.run_options import RunOptions
from train_evaluate.runtime.errors import UsageError


def parse_args(argv: list[str] | None = None) -> RunOptions:
    """The driver's options: RunOptions' defaults, then ``--config FILE``'s, then the command
    line's (as timm's train.py reads its ``--config``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        given = read_options(args.config)
        unknown = sorted(set(given) - set(RunOptions.names()))
        if unknown:
            raise UsageError(
                f"--config {args.config}: unknown option {unknown[0]!r}"
                f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; the options "
                "are the driver's own, spelled with underscores (e.g. calib_images)"
            )
        parser.set_defaults(**given)  # argparse converts text defaults by each option's type
        args = parser.parse_args(argv)
    return RunOptions(**{name: getattr(args, name) for name in RunOptions.names()})


def read_options(path: Path) -> dict:
    """The options in ``path``: a run.json's ``options``, or a JSON object of them."""
    try:
        found = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"--config {path}: cannot read it as JSON ({error})") from None
    if isinstance(found, dict) and "format" in found:  # a run.json
        found = found.get("options")
        if found is None:
            raise UsageError(
                f"--config {path}: this run.json records no options (written before they were "
                "recorded); give the options on the command line"
            )
    if not isinstance(found, dict):
        raise UsageError(f"--config {path}: expected a JSON object of option names to values")
    return found


def dump_options(options: RunOptions) -> dict:
    """``options`` as run.json records them: every option, in JSON's types (paths as text)."""

    def plain(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    dumped = {name: plain(getattr(options, name)) for name in RunOptions.names()}
    return json.loads(json.dumps(dumped))
