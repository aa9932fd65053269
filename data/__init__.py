"""Images and labels in, a fixed seeded split out.

``scan_imagenet_folder`` reads a folder of synset subfolders (labels from the ImageNet-1k
synset order); ``load_digits_source`` is the offline demo's data; ``split_indices`` draws the one
train / val / test split of a run.
"""

from data.sources import (
    DataError,
    DigitsSource,
    ImageFolderSource,
    imagenet_synsets,
    load_digits_source,
    scan_imagenet_folder,
)
from data.split import SPLITS, SplitFractions, split_indices, split_lists, split_warnings

__all__ = [
    "SPLITS",
    "DataError",
    "DigitsSource",
    "ImageFolderSource",
    "SplitFractions",
    "imagenet_synsets",
    "load_digits_source",
    "scan_imagenet_folder",
    "split_indices",
    "split_lists",
    "split_warnings",
]
