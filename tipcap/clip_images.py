"""CLIP's image input: the shape check before preprocessing, and images decoded in batches by threads.

:class:`ImagePreprocess` wraps a CLIP's image transform (:attr:`tipcap.clip.ClipEncoder.preprocess`) and
refuses an image whose resize would balloon. :func:`image_batches` decodes and preprocesses images
(paths or PIL images) on threads, in order, while earlier batches are encoded: what
``embed images`` and captioning (:mod:`tipcap.pipeline`) read images through.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tipcap.data import ImageError, load_image
from tipcap.data.images import ImageBytes

MAX_ASPECT_RATIO = 20
"""The most times longer one side of an image may be than the other. CLIP sees only the centre square of
an image (a twentieth of one at this bound), and preprocessing scales the shortest side to CLIP's input
first, so a thinner image would grow to many times its pixels (see :class:`ImagePreprocess`)."""
MAX_RESIZED_PIXELS = 2**23
"""The most pixels an image may have once scaled for CLIP, before the crop: about 25 MB in RGB. Images
within :data:`MAX_ASPECT_RATIO` stay below it for CLIPs of up to 640-pixel inputs (a 224-pixel CLIP
scales them to at most 224 × 4,480); this bounds the resize for CLIPs of larger inputs."""


class ImagePreprocess:
    """A CLIP's image transform (open_clip's), behind a check of the image's shape.

    open_clip scales an image's shortest side to CLIP's input size, then crops the centre, so a thin image
    grows before it is cropped: an 83-byte PNG of 3,000 × 1 pixels to 672,000 × 224 (450 MB) for a
    224-pixel CLIP, one of 89,000,000 × 1 past what the resize can count. :meth:`check` refuses such an
    image before any resize; calling the object checks, then transforms.

    Args:
        transform: open_clip's evaluation transform, PIL image to ``[3, H, W]``.
        input_size: CLIP's input, ``(height, width)`` in pixels.
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], input_size: tuple[int, int]):
        self.transform = transform
        self.input_size = input_size

    def check(self, image: Image.Image, name: str) -> None:
        """Refuse an image more than :data:`MAX_ASPECT_RATIO` times as long as wide (or wide as high), or
        one whose resize would exceed :data:`MAX_RESIZED_PIXELS`.

        Raises:
            ImageError: naming ``name`` and saying what to do.
        """
        width, height = image.size
        short, long = sorted(image.size)
        if short == 0:
            raise ImageError(f"{name}: {width}×{height} pixels, an empty image")
        if long > MAX_ASPECT_RATIO * short:
            longer, shorter = ("wide", "high") if width > height else ("high", "wide")
            raise ImageError(
                f"{name}: {width}×{height} pixels, more than {MAX_ASPECT_RATIO} times as {longer} as it is "
                f"{shorter}; CLIP sees only the centre square of an image, so crop it to that part first"
            )
        # The shortest side is scaled to the input's longest side, as torchvision's Resize rounds (open_clip's
        # 'shortest' resize, the largest of its modes).
        side = max(self.input_size)
        resized = (width * side // short, height * side // short)
        if resized[0] * resized[1] > MAX_RESIZED_PIXELS:
            raise ImageError(
                f"{name}: {width}×{height} pixels, which this CLIP's preprocessing would scale to "
                f"{resized[0]:,}×{resized[1]:,} before cropping, over {MAX_RESIZED_PIXELS:,} pixels; crop "
                "it closer to a square first"
            )

    def __call__(self, image: Image.Image, name: str = "image") -> torch.Tensor:
        """``image`` as CLIP's input ``[3, H, W]``, once :meth:`check` has passed it."""
        self.check(image, name)
        return self.transform(image)


class ImageFiles:
    """Images (paths, :class:`~tipcap.data.images.ImageBytes` or PIL images) decoded and preprocessed for a
    CLIP, one per index; an image that cannot be read, or whose shape CLIP's preprocessing refuses, gives
    its reason instead of pixels (a PIL image is named ``image <index>`` there). Through
    :func:`image_batches`' threads, decoding runs beside the encoding and captioning of earlier batches.

    ``jpeg_draft``: decode JPEG files at a reduced DCT scale that keeps their shortest side at least CLIP's
    input (:func:`tipcap.data.load_image`'s ``draft``): faster, with pixels close to, not equal to, the
    reference preprocessing's. Off, every image is decoded in full, as open_clip's preprocessing expects.
    """

    def __init__(self, images: Sequence[Any], preprocess: ImagePreprocess, jpeg_draft: bool = False):
        self.images = images
        self.preprocess = preprocess
        self.draft = max(preprocess.input_size) if jpeg_draft else None

    def __len__(self) -> int:
        return len(self.images)

    def decode_into(self, index: int, pixels: torch.Tensor) -> str | None:
        """Decode and preprocess image ``index`` into ``pixels`` ``[3, H, W]`` (a batch's row, so the
        batch needs no copy of its images); the reason it cannot be read, or ``None``."""
        image = self.images[index]
        try:
            if isinstance(image, Image.Image):
                pixels.copy_(self.preprocess(image.convert("RGB"), f"image {index}"))
            elif isinstance(image, ImageBytes):
                pixels.copy_(self.preprocess(load_image(image, self.draft), image.name))
            else:
                pixels.copy_(self.preprocess(load_image(Path(image), self.draft), str(image)))
        except ImageError as e:
            return str(e)
        return None


DecodedImages = tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]
"""A batch of images: the readable ones' positions, their pixels ``[b, 3, H, W]`` (``None`` when none is
readable), and (position, reason) for the others."""


def collated(positions: range, pixels: torch.Tensor, reasons: list[str | None]) -> DecodedImages:
    """The batch of images at ``positions``, decoded into ``pixels`` ``[n, 3, H, W]`` with their
    :meth:`ImageFiles.decode_into` results ``reasons``, as one :data:`DecodedImages`."""
    good = [row for row, reason in enumerate(reasons) if reason is None]
    bad = [(positions[row], reason) for row, reason in enumerate(reasons) if reason is not None]
    if bad:
        pixels = pixels[good] if good else None
    return [positions[row] for row in good], pixels, bad


def image_batches(
    images: Sequence[Any],
    preprocess: ImagePreprocess,
    batch_size: int,
    workers: int | None = None,
    jpeg_draft: bool = False,
) -> Iterator[DecodedImages]:
    """Batches (:data:`DecodedImages`) of ``batch_size`` consecutive images, in order, decoded by
    ``workers`` threads (default: one per core, at most 8; 0 decodes in the calling thread) while the
    caller works on earlier batches. ``jpeg_draft``: see :class:`ImageFiles`.

    Pillow and torch release the interpreter's lock while they decode, resize and convert, so threads
    decode in parallel, without starting processes or copying pixels between them (on 2 cores, 128 COCO-
    sized JPEGs in 0.39 s with two threads, against 0.51–0.57 s with two ``DataLoader`` processes). Images
    are taken in order by whichever thread is free, so every thread works on the first batch, and the last
    batch's decoding is not left to one. At most two batches ahead are decoded, so memory does not grow
    with the number of images. An image that crashes its decoder takes the process with it, as with 0."""
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    files = ImageFiles(images, preprocess, jpeg_draft)
    count = len(files)
    batches = [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    shape = (3, *preprocess.input_size)
    if workers == 0:
        for batch in batches:
            pixels = torch.empty(len(batch), *shape)
            reasons = [files.decode_into(i, row) for i, row in zip(batch, pixels, strict=True)]
            yield collated(batch, pixels, reasons)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="tipcap-decode")
    try:
        ahead: deque[tuple[range, torch.Tensor, list[Future]]] = deque()

        def next_batch() -> DecodedImages:
            batch, pixels, futures = ahead.popleft()
            return collated(batch, pixels, [future.result() for future in futures])

        for batch in batches:
            # Each thread writes its image into the batch's row: no stacking on this thread.
            pixels = torch.empty(len(batch), *shape)
            futures = [pool.submit(files.decode_into, i, row) for i, row in zip(batch, pixels, strict=True)]
            ahead.append((batch, pixels, futures))
            if len(ahead) > 2:
                yield next_batch()
        while ahead:
            yield next_batch()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
