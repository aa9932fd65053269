"""Where images come from: an ImageNet folder (one subfolder per synset) or the digits demo.

A source is a sorted list of ids, one label per id, a ``load(i)`` that returns a PIL image, and a
fingerprint that changes whenever the images change (it keys the feature cache).
"""

from __future__ import annotations

import hashlib
import os
import re
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
SYNSET = re.compile(r"n\d{8}")


class DataError(ValueError):
    """The data cannot be used as given; the message says what to do."""


@cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k synset ids in class-index order, as timm ships them."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo("imagenet-1k").label_names())


@dataclass(frozen=True)
class ImageFolderSource:
    """Images under ``root/<synset>/``; label = the synset's index in ImageNet-1k.

    Labels never depend on which folders are present, so a folder that holds only some of the
    1000 classes (a sample, Imagenette) is labelled exactly as the full validation set is.
    """

    root: Path
    ids: tuple[str, ...]
    labels: tuple[int, ...]
    fingerprint: str

    @property
    def description(self) -> str:
        classes = len(set(self.labels))
        return f"ImageNet folder {self.root} ({len(self.ids)} images, {classes} classes)"

    def load(self, index: int) -> Image.Image:
        with Image.open(self.path(index)) as image:
            return image.convert("RGB")

    def path(self, index: int) -> Path:
        """The image's file: ``--decode gpu`` reads its bytes and decodes them on the device."""
        return self.root / self.ids[index]


def _stat(path: Path) -> os.stat_result:
    """The file's own stat; the link's when it points nowhere."""
    try:
        return path.stat()
    except OSError:
        return path.lstat()


def scan_imagenet_folder(root: Path) -> ImageFolderSource:
    """Every image-named entry under ``root/<synset>/``, in sorted order, with its label."""
    root = Path(root)
    if not root.is_dir():
        state = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"data folder {root} {state}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    known = {name: index for index, name in enumerate(imagenet_synsets())}
    strangers = [p.name for p in folders if p.name not in known]
    if not folders or strangers:
        example = f" (found e.g. {', '.join(strangers[:3])})" if strangers else ""
        raise DataError(
            f"{root} must hold one folder per ImageNet-1k synset, named like n01440764"
            f"{example}; point --data-dir at such a folder"
        )
    ids, labels, digest = [], [], hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.iterdir()):
            # Every entry named like an image is one, even a dangling link or a folder: loading
            # it fails, so it is skipped and listed with its reason instead of vanishing.
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            image_id = f"{folder.name}/{path.name}"
            stat = _stat(path)
            ids.append(image_id)
            labels.append(known[folder.name])
            digest.update(f"{image_id}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    if not ids:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return ImageFolderSource(root, tuple(ids), tuple(labels), digest.hexdigest())


@dataclass(frozen=True, eq=False)
class DigitsSource:
    """scikit-learn's 1,797 handwritten digits (8 x 8, grey levels 0..16), 10 classes.

    They ship inside the scikit-learn package, so the demo runs with no download.
    """

    images: np.ndarray  # N x 8 x 8, uint8, 0..255
    ids: tuple[str, ...]
    labels: tuple[int, ...]
    fingerprint: str
    description: str = "digits demo (scikit-learn's 1,797 8x8 handwritten digits, 10 classes)"

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index], mode="L")


DIGITS_SHAPE = (1797, 65)  # 64 pixels (0..16) and the label, one row per image


def digits_file() -> Path:
    """Where scikit-learn keeps the digits table, found without importing scikit-learn (whose
    import takes longer than reading the table, and every demo process would pay it)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package, does not run it
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the offline demo needs scikit-learn: pip install -r requirements.txt")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"


def read_digits_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The digits table's 8x8 images (0..16) and labels, checked, so that a damaged file is
    refused rather than fingerprinted."""
    try:
        table = np.loadtxt(path, delimiter=",")
    except (OSError, ValueError, EOFError, zlib.error) as error:  # a cut or damaged gzip too
        raise DataError(
            f"cannot read the demo's digits {path} ({error}); reinstall scikit-learn"
        ) from error
    if table.shape != DIGITS_SHAPE or not np.array_equal(table, np.round(table)):
        raise DataError(f"the demo's digits {path} are damaged; reinstall scikit-learn")
    pixels, labels = table[:, :64], table[:, 64]
    if pixels.min() < 0 or pixels.max() > 16 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"the demo's digits {path} are damaged; reinstall scikit-learn")
    return pixels.reshape(-1, 8, 8), labels.astype(np.int64)


def load_digits_source() -> DigitsSource:
    pixels, targets = read_digits_file(digits_file())
    images = np.round(pixels * (255 / 16)).astype(np.uint8)
    labels = tuple(int(y) for y in targets)
    digest = hashlib.sha256(images.tobytes() + np.asarray(labels, dtype=np.int64).tobytes())
    ids = tuple(f"digits/{i:04d}" for i in range(len(labels)))
    return DigitsSource(images, ids, labels, digest.hexdigest())
