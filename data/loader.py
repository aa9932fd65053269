"""Decoded images in batches, in order: a Dataset over a source and the loop that feeds it.

Shared by the feature cache (``train_evaluate.inputs.features``) and the whole network's image
cache (``train_evaluate.training.network``).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

# What a broken or non-image file raises while PIL decodes it.
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageDataset(Dataset):
    """(transformed image, index, None) per image of ``source``; (None, index, reason) for one
    that cannot be decoded, so one bad file is reported, not fatal."""

    def __init__(self, source: Any, transform: Callable) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source.ids)

    def __getitem__(self, index: int):
        try:
            image = self.source.load(index)
            note_if_huge(self.source.ids[index], image)
            return self.transform(image), index, None
        except UNREADABLE as error:
            return None, index, f"{type(error).__name__}: {error}"


def note_if_huge(image_id: str, image: Image.Image) -> None:
    """One line for an image over PIL's decompression-bomb threshold, in place of PIL's raw
    warning (silenced in ``extract_features``). It is decoded all the same: a large photo is
    legitimate, and PIL itself refuses (an unreadable image) beyond twice the threshold."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        log.warning(
            "image %s is very large (%d x %d pixels, over PIL's limit of %d); decoding it anyway",
            image_id,
            image.width,
            image.height,
            limit,
        )


def collate(batch):
    good = [(image, index) for image, index, _ in batch if image is not None]
    bad = [(index, reason) for image, index, reason in batch if image is None]
    images = torch.stack([image for image, _ in good]) if good else None
    return images, [index for _, index in good], bad


def ignore_interrupt(_: int) -> None:
    # Ctrl-C reaches every process of the terminal's group; the main process alone reports it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def image_batches(images: ImageDataset, batch_size: int, workers: int, pin_memory: bool):
    """(images, indices, unreadable) per batch, in order.

    workers > 0: a DataLoader with that many decoding processes. workers == 0: each batch is
    decoded by a pool of threads, one per torch thread (PIL releases the GIL while it decodes
    and resizes), then handed to the backbone: decoding and the forward pass take turns on all
    cores instead of competing for them.
    """
    if workers > 0:
        yield from DataLoader(
            images,
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collate,
            worker_init_fn=ignore_interrupt,
            pin_memory=pin_memory,
        )
        return
    with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:
        for start in range(0, len(images), batch_size):
            indices = range(start, min(start + batch_size, len(images)))
            yield collate(list(pool.map(images.__getitem__, indices)))
