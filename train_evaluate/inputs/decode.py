"""``--decode gpu``: JPEGs decoded on the GPU (torchvision's ``decode_jpeg``) and timm's eval
transform applied there, with the file reads and decodes of the next batches made ahead in a
thread, so the backbone's pass waits on neither."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from data.loader import UNREADABLE

DECODES = ("cpu", "gpu")


class DeviceTransform:
    """timm's eval transform (Resize, CenterCrop, ToTensor, Normalize) applied on the device to
    decoded uint8 images, for ``--decode gpu``.

    The steps are read from the transform itself, so the sizes, interpolation and statistics are
    the model's. Resizing runs torchvision's tensor kernel (antialiased), not PIL's: the pixels
    differ slightly, which is why ``gpu`` is an option and not the default."""

    def __init__(self, transform: Callable) -> None:
        from torchvision import transforms as T

        self.steps = []
        for step in getattr(transform, "transforms", [transform]):
            name = type(step).__name__
            if isinstance(step, T.Resize | T.CenterCrop | T.Normalize) or name in (
                "ToTensor",
                "MaybeToTensor",
            ):
                self.steps.append(step)
            else:
                raise ValueError(
                    f"--decode gpu cannot apply the transform step {name} on the device"
                )

    @staticmethod
    def _apply(steps: Sequence[Any], images: torch.Tensor) -> torch.Tensor:
        from torchvision import transforms as T
        from torchvision.transforms import functional as TF

        for step in steps:
            if isinstance(step, T.Resize):
                images = TF.resize(images, step.size, step.interpolation, step.max_size, True)
            elif isinstance(step, T.CenterCrop):
                images = TF.center_crop(images, step.size)
            elif isinstance(step, T.Normalize):
                images = TF.normalize(images, step.mean, step.std)
            else:  # ToTensor: uint8 0..255 -> float 0..1
                images = images.float().div_(255)
        return images

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """One C x H x W uint8 image (on the device) -> the model's float input."""
        return self._apply(self.steps, image)

    def batch(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Several decoded images -> N x C x H x W model inputs, equal to stacking ``__call__``
        of each. Images of one size are resized and cropped in one call, and the values of the
        whole batch scaled and normalised in one: a handful of kernels instead of a handful per
        image (every kernel computes each image on its own, so the pixels are the same)."""
        from torchvision import transforms as T

        geometric = [isinstance(step, T.Resize | T.CenterCrop) for step in self.steps]
        split = geometric.index(False) if False in geometric else len(geometric)
        if any(geometric[split:]):  # a resize after the values are scaled: image by image
            return torch.stack([self(image) for image in images])
        by_size: dict[tuple[int, ...], list[int]] = {}
        for position, image in enumerate(images):
            by_size.setdefault(tuple(image.shape), []).append(position)
        shaped: list[torch.Tensor | None] = [None] * len(images)
        for positions in by_size.values():
            group = self._apply(self.steps[:split], torch.stack([images[p] for p in positions]))
            for position, image in zip(positions, group, strict=True):
                shaped[position] = image
        return self._apply(self.steps[split:], torch.stack(shaped))


# Batches ``--decode gpu`` prepares ahead of the one the model is running on, in a thread of
# their own (file reads, nvJPEG, transforms on a CUDA stream of their own); 0: one after another.
DECODE_AHEAD = 2


def device_batches(source: Any, transform: DeviceTransform, batch_size: int, device):
    """(images on the device, indices, unreadable) per batch, ``DECODE_AHEAD`` batches read and
    decoded ahead by a background thread (see ``_decoded_batches``)."""
    batches = _decoded_batches(source, transform, batch_size, device)
    if DECODE_AHEAD <= 0 or device.type != "cuda":
        yield from batches
        return
    stream = torch.cuda.Stream(device)

    def produce():
        with torch.cuda.stream(stream):
            for batch, good, bad in batches:
                # wait here, in the producer, until the batch is on the device: the consumer's
                # stream may then use it at once
                stream.synchronize()
                yield batch, good, bad

    for batch, good, bad in ahead(produce(), DECODE_AHEAD):
        if batch is not None:
            # made on the producer's stream, used on the consumer's: the allocator must not
            # reuse its memory before the consumer's work on it is done
            batch.record_stream(torch.cuda.current_stream(device))
        yield batch, good, bad


def ahead(items, depth: int):
    """``items``, produced by a daemon thread up to ``depth`` ahead of the consumer; an
    exception in the producer is raised in the consumer."""
    import queue
    import threading

    pending: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def run() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                pending.put(item)
        except BaseException as error:  # handed to the consumer
            pending.put(error)
        pending.put(done)

    thread = threading.Thread(target=run, daemon=True, name="decode-ahead")
    thread.start()
    try:
        while (item := pending.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                pending.get(timeout=0.1)


def _decoded_batches(source: Any, transform: DeviceTransform, batch_size: int, device):
    """(images on the device, indices, unreadable) per batch: file bytes are read on the CPU,
    JPEGs decoded in one batched nvJPEG call on the device (torchvision.io.decode_jpeg with
    device="cuda"); other formats, or a JPEG nvJPEG refuses, are decoded by PIL and moved."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.functional import pil_to_tensor

    for start in range(0, len(source.ids), batch_size):
        indices = list(range(start, min(start + batch_size, len(source.ids))))
        decoded: dict[int, torch.Tensor] = {}
        bad = []
        jpegs = []
        for index in indices:
            path = source.path(index)
            try:
                data = path.read_bytes()
            except OSError as error:
                bad.append((index, f"{type(error).__name__}: {error}"))
                continue
            if data[:3] == b"\xff\xd8\xff":  # the JPEG start-of-image marker
                jpegs.append((index, torch.frombuffer(bytearray(data), dtype=torch.uint8)))
            else:
                jpegs.append((index, None))
        pending = [(i, d) for i, d in jpegs if d is not None]
        if pending:
            try:
                images = decode_jpeg([d for _, d in pending], mode=ImageReadMode.RGB, device=device)
                decoded.update({i: image for (i, _), image in zip(pending, images, strict=True)})
            except RuntimeError:  # one bad file fails the batch: decode these one by one
                for i, d in pending:
                    # one nvJPEG refuses is left to PIL below
                    with contextlib.suppress(RuntimeError):
                        decoded[i] = decode_jpeg(d, mode=ImageReadMode.RGB, device=device)
        for index in indices:
            if index in decoded or any(index == i for i, _ in bad):
                continue
            try:  # not a JPEG, or one nvJPEG could not decode: PIL, as the CPU path
                decoded[index] = pil_to_tensor(source.load(index)).to(device)
            except UNREADABLE as error:
                bad.append((index, f"{type(error).__name__}: {error}"))
        good = [i for i in indices if i in decoded]
        batch = transform.batch([decoded[i] for i in good]) if good else None
        yield batch, good, sorted(bad)
