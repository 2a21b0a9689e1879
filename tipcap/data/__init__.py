"""Corpora and images: readers for every accepted input format."""

from tipcap.data.captions import (
    PERIOD_POLICIES,
    Caption,
    CaptionCorpus,
    normalize_caption,
    read_captions,
)
from tipcap.data.images import ImageError, ImageRef, list_images, load_image, subsample
from tipcap.data.karpathy import SPLITS, ImageId, KarpathyImage, read_karpathy

__all__ = [
    "PERIOD_POLICIES",
    "SPLITS",
    "Caption",
    "CaptionCorpus",
    "ImageError",
    "ImageId",
    "ImageRef",
    "KarpathyImage",
    "list_images",
    "load_image",
    "normalize_caption",
    "read_captions",
    "read_karpathy",
    "subsample",
]
