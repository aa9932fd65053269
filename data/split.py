"""One seeded train / val / test split, fixed for a whole run and written next to its results."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitFractions:
    """Fractions of the images in train, val and test; they must sum to 1.

    The default 0.64 / 0.16 / 0.20 is the original study's 80/20 split applied twice.
    """

    train: float = 0.64
    val: float = 0.16
    test: float = 0.20

    def __post_init__(self) -> None:
        values = (self.train, self.val, self.test)
        if min(values) <= 0 or not math.isclose(sum(values), 1.0, abs_tol=1e-6):
            raise ValueError(
                f"split fractions must be positive and sum to 1; got train={self.train:g}, "
                f"val={self.val:g}, test={self.test:g} (sum {sum(values):g})"
            )

    def sizes(self, count: int) -> dict[str, int]:
        train = int(count * self.train)
        val = int(count * self.val)
        sizes = {"train": train, "val": val, "test": count - train - val}
        empty = [name for name, size in sizes.items() if size < 1]
        if empty:
            raise ValueError(
                f"the split of {count} images leaves {', '.join(empty)} empty; "
                "use more images or larger fractions"
            )
        return sizes


def split_indices(count: int, fractions: SplitFractions, seed: int) -> dict[str, torch.Tensor]:
    """Disjoint index tensors that together cover range(count); the same for the same seed."""
    sizes = fractions.sizes(count)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    parts = torch.split(order, [sizes[name] for name in SPLITS])
    return {name: part.sort().values for name, part in zip(SPLITS, parts, strict=True)}


def split_lists(ids: list[str] | tuple[str, ...], split: dict[str, torch.Tensor]) -> dict[str, str]:
    """The text of ``train.txt`` / ``val.txt`` / ``test.txt``: one image id per line."""
    return {name: "".join(f"{ids[i]}\n" for i in split[name].tolist()) for name in SPLITS}


# Below this many val images, one image moves val accuracy by half a point or more.
MIN_VAL_IMAGES = 200


def split_warnings(labels: torch.Tensor, split: dict[str, torch.Tensor]) -> list[str]:
    """What makes a split unfit for training an adapter, one line each (empty when sound)."""
    warnings = []
    seen = set(labels[split["train"]].tolist())
    for name in ("val", "test"):
        classes = set(labels[split[name]].tolist())
        unseen = len(classes - seen)
        if unseen:
            warnings.append(
                f"{unseen} of the {len(classes)} classes in {name} have no train image: the "
                "adapter cannot learn them, so training can only trade their accuracy for others'"
            )
    count = len(split["val"])
    if count < MIN_VAL_IMAGES:
        warnings.append(
            f"val has only {count} images (one image = {100 / count:.2f} points): the epoch and "
            "trial chosen on it are noisy; use more images for a result that carries over to test"
        )
    return warnings
