"""CLIP encoders over open_clip: loading by name, tag, local weights or config JSON; batched encoding.

``ClipSpec`` names a CLIP without loading it (its :meth:`~ClipSpec.identity` is what embedding stores
and gap files record); ``ClipEncoder`` is the loaded model with batched, L2-normalised encoders.

Text encoding skips the work that cannot change CLIP's output (:mod:`tipcap.text_tower`): the padding
after each caption's end-of-text token, and second copies of the prefixes captions of a batch share.

open_clip is imported only where a model is loaded: it takes seconds to import, and checking whether a
cached store or gap file matches a ``ClipSpec`` must stay cheap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import torch
from PIL import Image

from tipcap import text_tower
from tipcap.clip_images import ImagePreprocess
from tipcap.errors import TipcapError, WeightsUnavailable
from tipcap.io import atomic_path, load_json
from tipcap.network import hub_unavailable, probe
from tipcap.provenance import sha256_file

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
ENCODER_VERSION = 2
"""How :class:`ClipEncoder` computes embeddings: bump whenever a change alters its output's float rounding
(2: the trimmed, prefix-sharing text tower). Stores record it in their key, so a store encoded by other
code is rebuilt rather than mixed with embeddings the current code computes (a prompt vocabulary's)."""


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP to use.

    Attributes:
        model: an open_clip model name (``ViT-B-32``) or the path of an open_clip model-config JSON
            (``{"embed_dim", "vision_cfg", "text_cfg"}``).
        pretrained: an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``), a local weights file
            (``.safetensors``, ``.pt``, ``.bin``), or ``none`` for random weights.
        init_seed: seed of the random initialisation when ``pretrained`` is ``none``, so that two loads
            give the same model (and a store built with it can be reused).
    """

    model: str
    pretrained: str = "none"
    init_seed: int = 0

    @property
    def config_path(self) -> Path | None:
        """The model-config JSON, when ``model`` names one."""
        path = Path(self.model)
        return path if path.suffix == ".json" else None

    @property
    def weights_path(self) -> Path | None:
        """The local weights file, when ``pretrained`` names one."""
        path = Path(self.pretrained)
        return path if self.pretrained != "none" and path.is_file() else None

    def identity(self) -> dict[str, Any]:
        """What determines the model's outputs: name or config hash, tag or weights hash.

        Computed without loading the model (hashing files), so a cached store can be checked cheaply.
        """
        identity: dict[str, Any] = {}
        config = self.config_path
        if config is not None:
            if not config.is_file():
                raise TipcapError(f"--clip {config}: no such model-config file.")
            identity["model"] = config.stem
            identity["model_config_sha256"] = sha256_file(config)
        else:
            identity["model"] = self.model
        weights = self.weights_path
        if self.pretrained == "none":
            identity["pretrained"] = "none"
            identity["init_seed"] = self.init_seed
        elif weights is not None:
            identity["pretrained"] = weights.name
            identity["weights_sha256"] = sha256_file(weights)
        else:
            identity["pretrained"] = self.pretrained
        return identity

    def to_dict(self) -> dict[str, Any]:
        """How to load this CLIP again: absolute paths for files, as given otherwise."""
        config, weights = self.config_path, self.weights_path
        return {
            "model": str(config.resolve()) if config is not None else self.model,
            "pretrained": str(weights.resolve()) if weights is not None else self.pretrained,
            "init_seed": self.init_seed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path | None = None) -> ClipSpec:
        """A spec from :meth:`to_dict` or :meth:`save_into` output; relative file paths are under ``base``."""

        def resolve(value: str, is_file: bool) -> str:
            path = Path(value)
            if base is None or not is_file or path.is_absolute():
                return value
            return str(base / path)

        model, pretrained = str(data["model"]), str(data.get("pretrained", "none"))
        return cls(
            resolve(model, model.endswith(".json")),
            resolve(pretrained, pretrained != "none" and Path(pretrained).suffix != ""),
            int(data.get("init_seed", 0)),
        )

    def save_into(self, folder: Path) -> dict[str, Any]:
        """Copy the model-config and local weights files into ``folder`` and say how to load them from
        there: :meth:`to_dict` with those files' paths relative to ``folder``'s parent.

        A folder that carries its CLIP this way can be moved, and the files it was made from deleted.
        Files are hard-linked where the file system allows it, else copied; their names are kept, so
        the CLIP's :meth:`identity` does not change.
        """
        data = self.to_dict()
        for key, source in (("model", self.config_path), ("pretrained", self.weights_path)):
            if source is None:
                continue
            if not source.is_file():
                raise TipcapError(f"CLIP file {source} is missing; it cannot be stored with the model.")
            target = folder / source.name
            if not (target.exists() and target.samefile(source)):
                folder.mkdir(parents=True, exist_ok=True)
                _link_or_copy(source, target)
            data[key] = f"{folder.name}/{source.name}"
        return data

    def describe(self) -> str:
        """A short human-readable name, e.g. ``ViT-B-32 (openai)``."""
        return f"{self.model} ({self.pretrained})"


def _link_or_copy(source: Path, target: Path) -> None:
    """Place ``source``'s bytes at ``target`` (a hard link, else a copy), renamed into place."""
    with atomic_path(target) as tmp:
        tmp.unlink()  # a hard link needs a free name; the name stays this call's own
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


class TextEmbeddings(NamedTuple):
    """Encoded captions: ``embeddings`` ``[N, d]`` float32, unit length; how many were truncated."""

    embeddings: torch.Tensor
    truncated: int


def _cached_tag_weights(tag_cfg: dict[str, Any]) -> str | None:
    """The local copy of a tag's weights in the Hugging Face or open_clip URL cache, if any."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        candidates = [filename]
        if filename == HF_WEIGHTS_NAME:
            candidates.insert(0, HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        for candidate in candidates:
            found = try_to_load_from_cache(repo, candidate)
            if isinstance(found, str):
                return found
    url = tag_cfg.get("url", "")
    if url:
        local = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if local.is_file():
            return str(local)
    return None


def local_weights(spec: ClipSpec) -> str | None:
    """The weights file of ``spec`` on this machine without downloading: its own file, or its tag's cached
    copy; ``None`` for random weights (``none``), an unknown tag, or weights that only a download gives."""
    if spec.weights_path is not None:
        return str(spec.weights_path)
    if spec.pretrained == "none":
        return None
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(spec.model, spec.pretrained)
    return _cached_tag_weights(tag_cfg) if tag_cfg else None


def _fetch_tag_weights(spec: ClipSpec, tag_cfg: dict[str, Any]) -> str:
    """Path of a tag's weights: from the cache, or downloaded when the source host answers.

    Raises:
        WeightsUnavailable: within a few seconds when the weights are not cached and cannot be downloaded.
    """
    cached = _cached_tag_weights(tag_cfg)
    if cached is not None:
        return cached
    from huggingface_hub import constants

    if tag_cfg.get("hf_hub"):
        reason = hub_unavailable()
    elif constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set"
    else:
        url = tag_cfg.get("url", "")
        problem = probe(url)
        reason = None if problem is None else f"{urlsplit(url).netloc or url!r} {problem}"
    if reason is not None:
        raise WeightsUnavailable(
            f"CLIP weights for {spec.model} (pretrained tag '{spec.pretrained}') are not cached on this "
            f"machine and {reason}; download the weights file elsewhere and pass it with "
            f"--pretrained /path/to/weights.safetensors (or point HF_HOME at a cache that holds them).",
            reason,
        )
    import open_clip

    return open_clip.download_pretrained(tag_cfg)


@contextlib.contextmanager
def _quiet_open_clip():
    """Silence open_clip's root-logger warnings during loading; tipcap reports what matters itself."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when available and the CPU otherwise.

    Raises:
        TipcapError: a name torch does not know, or a CUDA device this machine does not have.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise TipcapError(f"--device {device!r}: not a device name; use cpu, cuda or cuda:N.") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise TipcapError(f"--device {device}: this machine has no usable CUDA device; use --device cpu.")
        if resolved.index is not None and resolved.index >= count:
            raise TipcapError(
                f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}."
            )
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise TipcapError(f"--device {device}: MPS is not available on this machine; use --device cpu.")
    elif resolved.type not in ("cpu", "mps"):
        raise TipcapError(f"--device {device}: tipcap runs on cpu, cuda or mps.")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """The encoder precision ``auto`` stands for on ``device``: fp16 on CUDA, fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise TipcapError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


class ClipEncoder:
    """A loaded CLIP with batched, L2-normalised text and image encoders.

    Use :meth:`load`. Encoding runs under ``torch.inference_mode()`` on ``device`` (CUDA when present),
    in fp16 on CUDA and fp32 on CPU unless another precision is asked for. ``preprocess`` turns a PIL
    image into CLIP's input, refusing images whose resize would balloon (:class:`ImagePreprocess`).
    """

    def __init__(
        self,
        spec: ClipSpec,
        model: torch.nn.Module,
        tokenizer: Callable[..., torch.Tensor],
        preprocess: Callable[[Image.Image], torch.Tensor],
        device: torch.device,
    ):
        self.spec = spec
        self.model = model.eval()
        self.tokenizer = tokenizer
        size = model.visual.preprocess_cfg["size"]
        self.preprocess = ImagePreprocess(preprocess, (size, size) if isinstance(size, int) else tuple(size))
        self.device = device
        self._tower = text_tower.causal_text_tower(model)
        self._prepared_tower: text_tower.CausalTextTower | None = None

    @classmethod
    def load(
        cls, spec: ClipSpec, device: str | None = None, precision: str = "auto", for_training: bool = False
    ) -> ClipEncoder:
        """Build the model and load its weights.

        Args:
            spec: which CLIP (see :class:`ClipSpec`).
            device: ``cuda``, ``cpu``, ...; default CUDA when available.
            precision: ``fp32``, ``fp16``, ``bf16`` or ``auto`` (fp16 on CUDA, fp32 on CPU).
            for_training: the caller trains the CLIP, so random weights (``pretrained: none``) are its
                starting point and are not warned about.

        Raises:
            TipcapError: unknown model or tag, unreadable config, weights that do not fit the model,
                or weights that are neither local nor downloadable (within a few seconds, offline).
        """
        import open_clip

        torch_device = resolve_device(device)
        precision = resolve_precision(precision, torch_device)

        name = spec.model
        config = spec.config_path
        if config is not None:
            if not config.is_file():
                raise TipcapError(f"--clip {config}: no such model-config file.")
            document = load_json(config)
            missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in document]
            if missing:
                raise TipcapError(
                    f"--clip {config}: not an open_clip model config, missing {', '.join(missing)}."
                )
            embed_dim = document["embed_dim"]
            if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
                raise TipcapError(
                    f"--clip {config}: embed_dim must be a positive integer, not {embed_dim!r}."
                )
            open_clip.add_model_config(config)
            name = config.stem
        elif name not in open_clip.list_models():
            raise TipcapError(
                f"--clip {name!r}: not an open_clip model name nor a model-config .json file "
                "(open_clip.list_models() lists the names, e.g. ViT-B-32)."
            )

        kwargs: dict[str, Any] = {}
        if spec.pretrained == "none":
            weights = None
            if not for_training:
                logger.warning(
                    "CLIP %s has random weights (--pretrained none, seed %d).", name, spec.init_seed
                )
        elif spec.weights_path is not None:
            weights = str(spec.weights_path)
        else:
            tag_cfg = open_clip.get_pretrained_cfg(name, spec.pretrained)
            if not tag_cfg:
                tags = open_clip.list_pretrained_tags_by_model(name)
                raise TipcapError(
                    f"--pretrained {spec.pretrained!r}: neither a file nor a pretrained tag of {name} "
                    f"(tags: {', '.join(tags) or 'none'}; or pass a weights file, or 'none')."
                )
            weights = _fetch_tag_weights(spec, tag_cfg)
            # Passing the cached file (not the tag) keeps open_clip off the network; the tag's
            # activation and preprocessing settings must then be given explicitly.
            kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
            kwargs["force_preprocess_cfg"] = {
                k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg
            }

        with torch.random.fork_rng(devices=[]), _quiet_open_clip():
            torch.manual_seed(spec.init_seed)
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=weights, precision=precision, device=torch_device, **kwargs
                )
            # open_clip reports a checkpoint of another architecture with assertions or key errors, a
            # file that is no checkpoint at all with torch.load's unpickling error, a config of the wrong
            # types with type errors.
            except (
                RuntimeError,
                KeyError,
                ValueError,
                TypeError,
                OSError,
                AssertionError,
                pickle.UnpicklingError,
                EOFError,
            ) as e:
                first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                if weights is None:
                    raise TipcapError(
                        f"--clip {spec.model}: open_clip cannot build {name}: {first_line}"
                    ) from None
                raise TipcapError(
                    f"--pretrained {spec.pretrained}: could not load weights into {name}: {first_line}"
                ) from None
        tokenizer = open_clip.get_tokenizer(name)
        return cls(spec, model, tokenizer, preprocess, torch_device)

    @property
    def dim(self) -> int:
        """Width ``d`` of the joint embedding space."""
        return int(self.model.visual.output_dim)

    @property
    def context_length(self) -> int:
        """The text tower's context length (77 for OpenAI CLIP)."""
        return int(self.tokenizer.context_length)

    @property
    def text_batch_size(self) -> int:
        """Default captions per batch: 128 on CPU (measured fastest there: 7% ahead of 64, 4-14% ahead
        of 256, which pads attention more), 1024 on a GPU."""
        return 128 if self.device.type == "cpu" else 1024

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, int]:
        """Tokenise to ``[N, context_length]`` int64 and count the captions cut at the context length."""
        tokens = self.tokenizer(list(texts))
        full = (tokens[:, -1] != 0).nonzero().flatten().tolist()
        encode = getattr(self.tokenizer, "encode", None)
        if encode is None:
            return tokens, len(full)
        # A row that fills the context was truncated unless it fits exactly (start + text + end).
        truncated = sum(len(encode(texts[i])) + 2 > self.context_length for i in full)
        return tokens, truncated

    def token_lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        """Number of positions up to and including the pooled end-of-text token, per row ``[N]``."""
        return text_tower.token_lengths(self._tower if self._tower is not None else self.model, tokens)

    @torch.inference_mode()
    def encode_tokens(
        self, tokens: torch.Tensor, trim: bool = True, share_prefixes: bool = True
    ) -> torch.Tensor:
        """Encode a batch of token rows ``[B, context_length]`` to unit vectors ``[B, d]`` (float32).

        With ``trim`` (and a tower that allows it, see :mod:`tipcap.text_tower`) the transformer runs
        only up to each row's end-of-text token, and with ``share_prefixes`` over each distinct prefix
        of the batch once; the result equals open_clip's ``encode_text`` up to float rounding.
        """
        tokens = tokens.to(self.device)
        if trim and self._tower is not None:
            # Prepared on first use: an encoder used for images only never pays for it.
            if self._prepared_tower is None:
                self._prepared_tower = text_tower.CausalTextTower(self._tower)
            features = self._prepared_tower.encode(tokens, share_prefixes=share_prefixes)
        else:
            features = self.model.encode_text(tokens)
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def encode_texts(
        self,
        texts: Sequence[str],
        batch_size: int | None = None,
        trim: bool = True,
        share_prefixes: bool = True,
        on_batch: Callable[[int], object] | None = None,
    ) -> TextEmbeddings:
        """Encode captions to unit vectors ``[N, d]`` (float32, CPU), in the order given.

        Captions are sorted by token length, then by their tokens, so that each batch holds captions of
        similar length that share long prefixes (see :meth:`encode_tokens` for ``trim`` and
        ``share_prefixes``). ``on_batch`` is called with each batch's size. ``batch_size`` defaults to
        :attr:`text_batch_size`.
        """
        batch_size = batch_size or self.text_batch_size
        if not texts:
            return TextEmbeddings(torch.empty(0, self.dim), 0)
        tokens, truncated = self.tokenize(texts)
        out = torch.empty(len(texts), self.dim)
        for rows in text_tower.token_batches(tokens, self.token_lengths(tokens), batch_size):
            out[rows] = self.encode_tokens(tokens[rows], trim=trim, share_prefixes=share_prefixes).cpu()
            if on_batch is not None:
                on_batch(len(rows))
        return TextEmbeddings(out, truncated)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode preprocessed images ``[B, 3, H, W]`` to unit vectors ``[B, d]`` (float32, CPU)."""
        dtype = next(self.model.visual.parameters()).dtype
        features = self.model.encode_image(pixels.to(self.device, dtype=dtype))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()
