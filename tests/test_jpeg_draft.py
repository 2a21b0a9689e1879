"""Decoding images for CLIP: on threads, the batches of the calling thread; JPEGs at a reduced
DCT scale (jpeg_draft): off by default, where pixels are open_clip's own preprocessing's byte for byte; on,
CLIP's input of the right shape, close to the reference."""

import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tipcap.clip import ClipEncoder, ClipSpec
from tipcap.clip_images import image_batches
from tipcap.data.images import load_image


def photo_like(folder: Path, count: int) -> list[Path]:
    """640×480 JPEGs: colour blocks of 80 pixels over a gradient, with noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:480, 0:640]
    paths = []
    for i in range(count):
        blocks = rng.uniform(0, 255, (6, 8, 3)).repeat(80, axis=0).repeat(80, axis=1)
        pixels = (
            0.7 * blocks + 0.3 * (xs[..., None] + ys[..., None]) * 255 / 1120 + rng.normal(0, 8, blocks.shape)
        )
        path = folder / f"{i}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def pixels(paths: list[Path], encoder: ClipEncoder, **options) -> torch.Tensor:
    """``[N, 3, H, W]``: the images through tipcap's image stream, decoded in this process."""
    batches = list(image_batches(paths, encoder.preprocess, batch_size=2, workers=0, **options))
    return torch.cat([batch[1] for batch in batches])


def test_jpeg_draft_is_off_by_default_and_close_to_the_reference_when_on(tmp_path, tiny_clip):
    encoder = ClipEncoder.load(ClipSpec(str(tiny_clip)), device="cpu")
    paths = photo_like(tmp_path / "images", 3)
    # open_clip's evaluation transform on the fully decoded image: the reference.
    reference = torch.stack([encoder.preprocess.transform(Image.open(p).convert("RGB")) for p in paths])
    assert torch.equal(pixels(paths, encoder), reference)

    side = max(encoder.preprocess.input_size)  # the tiny CLIP's 32 pixels: JPEGs decode at 1/8 scale
    assert load_image(paths[0], draft=side).size == (80, 60)
    assert load_image(paths[0]).size == (640, 480)
    drafted = pixels(paths, encoder, jpeg_draft=True)
    assert drafted.shape == reference.shape == (3, 3, side, side)
    assert not torch.equal(drafted, reference)
    cosines = torch.nn.functional.cosine_similarity(drafted.flatten(1), reference.flatten(1))
    assert cosines.min() > 0.99
    # The same crop of the same picture: each pixel within a fraction of the reference's spread.
    assert (drafted - reference).abs().mean() < 0.1 * reference.std()


def test_jpeg_draft_leaves_other_formats_alone(tmp_path, tiny_clip):
    encoder = ClipEncoder.load(ClipSpec(str(tiny_clip)), device="cpu")
    jpeg = photo_like(tmp_path / "images", 1)[0]
    png = tmp_path / "image.png"
    Image.open(jpeg).save(png)
    assert torch.equal(pixels([png], encoder, jpeg_draft=True), pixels([png], encoder))


def test_decoding_threads_give_the_batches_of_the_calling_thread_and_stop_with_the_caller(
    tmp_path, tiny_clip
):
    encoder = ClipEncoder.load(ClipSpec(str(tiny_clip)), device="cpu")
    paths = photo_like(tmp_path / "images", 11)
    (tmp_path / "images" / "3.jpg").write_bytes(b"not a jpeg")
    paths.append(tmp_path / "images" / "missing.jpg")
    whole = list(image_batches(paths, encoder.preprocess, batch_size=5, workers=0))
    threaded = list(image_batches(paths, encoder.preprocess, batch_size=5, workers=3))
    assert [(p, f) for p, _, f in threaded] == [(p, f) for p, _, f in whole]
    assert [p for p, _, _ in whole] == [[0, 1, 2, 4], [5, 6, 7, 8, 9], [10]]
    assert [[i for i, _ in f] for _, _, f in whole] == [[3], [], [11]]
    for (_, a, _), (_, b, _) in zip(threaded, whole, strict=True):
        assert torch.equal(a, b)
    # The batches hold open_clip's transform of each readable image, in order.
    readable = [paths[i] for batch, _, _ in whole for i in batch]
    reference = torch.stack([encoder.preprocess.transform(Image.open(p).convert("RGB")) for p in readable])
    assert torch.equal(torch.cat([b for _, b, _ in threaded]), reference)
    # A batch of unreadable images only has no pixels.
    lone = list(image_batches(paths[3:4], encoder.preprocess, batch_size=1, workers=2))
    assert lone[0][:2] == ([], None) and lone[0][2][0][0] == 0
    # A caller that stops after the first batch stops the decoding threads with it.
    batches = image_batches(paths, encoder.preprocess, batch_size=2, workers=2)
    next(batches)
    batches.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("tipcap-decode")]
