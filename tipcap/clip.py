"""CLIP encoders over open_clip: loading by name, tag, local weights or config JSON; batched encoding.

``ClipSpec`` names a CLIP without loading it (its :meth:`~ClipSpec.identity` is what embedding stores
and gap files record); ``ClipEncoder`` is the loaded model with batched, L2-normalised encoders.

Text encoding runs the text tower only as far as the longest caption of each batch: with a causal mask
and pooling at the end-of-text token, positions after that token cannot influence the pooled feature,
so trimming the padding changes nothing but the cost (COCO captions use ~15 of CLIP's 77 positions).

open_clip is imported only where a model is loaded: it takes seconds to import, and checking whether a
cached store or gap file matches a ``ClipSpec`` must stay cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import torch
from PIL import Image

from tipcap.data.files import load_json
from tipcap.errors import TipcapError

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_PROBE_TIMEOUT_S = 4.0


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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

    def describe(self) -> str:
        """A short human-readable name, e.g. ``ViT-B-32 (openai)``."""
        return f"{self.model} ({self.pretrained})"


class TextEmbeddings(NamedTuple):
    """Encoded captions: ``embeddings`` ``[N, d]`` float32, unit length; how many were truncated."""

    embeddings: torch.Tensor
    truncated: int


def _host_reachable(host: str, port: int = 443, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds (DNS included)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    # A thread bounds the DNS lookup too, which socket timeouts do not cover.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


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


def _fetch_tag_weights(spec: ClipSpec, tag_cfg: dict[str, Any]) -> str:
    """Path of a tag's weights: from the cache, or downloaded when the source host answers.

    Raises:
        TipcapError: within a few seconds when the weights are not cached and cannot be downloaded.
    """
    cached = _cached_tag_weights(tag_cfg)
    if cached is not None:
        return cached
    from huggingface_hub import constants

    if tag_cfg.get("hf_hub"):
        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    else:
        host = urlparse(tag_cfg.get("url", "")).hostname or ""
    offline = constants.HF_HUB_OFFLINE or not _host_reachable(host)
    if offline:
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{host} cannot be reached"
        raise TipcapError(
            f"CLIP weights for {spec.model} (pretrained tag '{spec.pretrained}') are not cached on this "
            f"machine and {reason}; download the weights file elsewhere and pass it with "
            f"--pretrained /path/to/weights.safetensors (or point HF_HOME at a cache that holds them)."
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


def _resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _text_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module holding the text transformer, when its padding can be trimmed; else ``None``.

    ``open_clip.CLIP`` keeps the text modules on the model itself, ``CustomTextCLIP`` in ``.text``.
    Trimming is exact only for a causal mask with end-of-text (``argmax``/``eos``) pooling and no
    appended class token; other towers (Hugging Face text models, CoCa) and blocks with other attention
    modules run at full length.
    """
    tower = getattr(model, "text", model)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    if not all(hasattr(tower, name) for name in needed):
        return None
    if getattr(tower, "attn_mask", None) is None or getattr(tower, "cls_emb", None) is not None:
        return None
    if _pool_type(tower) not in ("argmax", "eos"):
        return None
    transformer = tower.transformer
    if not getattr(transformer, "batch_first", True):
        return None
    # The trimmed path computes attention from packed in-projections (see _attention).
    for block in transformer.resblocks:
        attn = getattr(block, "attn", None)
        if not isinstance(attn, torch.nn.MultiheadAttention) or hasattr(block, "ln_1_kv"):
            return None
        if attn.in_proj_weight is None or attn.in_proj_bias is None or not attn.batch_first:
            return None
    return tower


def _pool_type(tower: torch.nn.Module) -> str | None:
    return getattr(tower, "text_pool_type", getattr(tower, "pool_type", None))


def _eos_id(tower: torch.nn.Module) -> int | None:
    return getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))


def _attention(
    block: torch.nn.Module, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``block``'s multi-head attention of ``query [B, Q, W]`` over ``keys [B, L, W]`` (both after ``ln_1``)
    with an additive ``mask`` broadcastable to ``[B, heads, Q, L]``; returns ``[B, Q, W]``.

    The arithmetic of ``nn.MultiheadAttention``, written out: for rows of a dozen tokens torch's fused CPU
    attention kernel costs twice as much as these two products and a softmax (measured in bf16).
    """
    attn = block.attn
    width, heads = query.shape[-1], attn.num_heads
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    linear = torch.nn.functional.linear
    if query is keys:
        q, k, v = linear(query, weight, bias).chunk(3, dim=-1)
    else:
        q = linear(query, weight[:width], bias[:width])
        k, v = linear(keys, weight[width:], bias[width:]).chunk(2, dim=-1)

    def split(t: torch.Tensor) -> torch.Tensor:  # [B, L, W] -> [B, heads, L, W / heads]
        return t.unflatten(-1, (heads, width // heads)).transpose(1, 2)

    # Scaling the queries before the product (as torch does) keeps fp16 scores in range.
    q, k, v = split(q * (width // heads) ** -0.5), split(k), split(v)
    scores = torch.matmul(q, k.transpose(-1, -2)).add_(mask)
    out = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).flatten(2)
    return attn.out_proj(out)


def _block(block: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A residual attention block on ``x [B, L, W]`` with an additive causal ``mask [L, L]``."""
    hidden = block.ln_1(x)
    x = x + block.ls_1(_attention(block, hidden, hidden, mask))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _block_at(block: torch.nn.Module, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A residual attention block's output at one position per row: ``x [B, L, W]`` → ``[B, W]``.

    Pooling keeps only the end-of-text position of the last block, which needs every earlier position
    as a key but only its own query, attention output and MLP: the rest of that block is skipped.
    """
    rows = torch.arange(len(x), device=x.device)
    query = x[rows, positions].unsqueeze(1)  # [B, 1, W]
    after = torch.arange(x.shape[1], device=x.device)[None, :] > positions[:, None]  # [B, L]
    mask = torch.zeros(after.shape, dtype=x.dtype, device=x.device).masked_fill(after, float("-inf"))
    attended = _attention(block, block.ln_1(query), block.ln_1(x), mask[:, None, None, :])
    query = query + block.ls_1(attended)
    query = query + block.ls_2(block.mlp(block.ln_2(query)))
    return query[:, 0]


class ClipEncoder:
    """A loaded CLIP with batched, L2-normalised text and image encoders.

    Use :meth:`load`. Encoding runs under ``torch.inference_mode()`` on ``device`` (CUDA when present),
    in fp16 on CUDA and fp32 on CPU unless another precision is asked for.
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
        self.preprocess = preprocess
        self.device = device
        self._tower = _text_tower(model)

    @classmethod
    def load(cls, spec: ClipSpec, device: str | None = None, precision: str = "auto") -> ClipEncoder:
        """Build the model and load its weights.

        Args:
            spec: which CLIP (see :class:`ClipSpec`).
            device: ``cuda``, ``cpu``, ...; default CUDA when available.
            precision: ``fp32``, ``fp16``, ``bf16`` or ``auto`` (fp16 on CUDA, fp32 on CPU).

        Raises:
            TipcapError: unknown model or tag, unreadable config, weights that do not fit the model,
                or weights that are neither local nor downloadable (within a few seconds, offline).
        """
        import open_clip

        if precision not in PRECISIONS:
            raise TipcapError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
        torch_device = _resolve_device(device)
        if precision == "auto":
            precision = "fp16" if torch_device.type == "cuda" else "fp32"

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
            logger.warning("CLIP %s has random weights (--pretrained none, seed %d).", name, spec.init_seed)
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
            # open_clip reports a checkpoint of another architecture with assertions or key errors.
            except (RuntimeError, KeyError, ValueError, OSError, AssertionError) as e:
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
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
        """Default captions per batch: 64 on CPU (measured fastest there: shorter batches keep the
        matrices in cache and pad less), 1024 on a GPU."""
        return 64 if self.device.type == "cpu" else 1024

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
        tower = self._tower if self._tower is not None else self.model
        if _pool_type(tower) == "eos":
            position = (tokens == _eos_id(tower)).int().argmax(dim=-1)
        else:
            position = tokens.argmax(dim=-1)
        return position + 1

    @torch.inference_mode()
    def encode_tokens(self, tokens: torch.Tensor, trim: bool = True) -> torch.Tensor:
        """Encode a batch of token rows ``[B, context_length]`` to unit vectors ``[B, d]`` (float32).

        With ``trim`` (and a tower that allows it) the transformer runs only over the batch's longest
        row; the result equals open_clip's ``encode_text`` up to float rounding.
        """
        tokens = tokens.to(self.device)
        tower = self._tower
        if not trim or tower is None:
            features = self.model.encode_text(tokens)
        else:
            lengths = self.token_lengths(tokens)
            length = int(lengths.max())
            tokens = tokens[:, :length]
            cast_dtype = tower.transformer.get_cast_dtype()
            x = tower.token_embedding(tokens).to(cast_dtype)
            x = x + tower.positional_embedding[:length].to(cast_dtype)
            blocks = tower.transformer.resblocks
            mask = tower.attn_mask[:length, :length].to(x.dtype)
            for block in blocks[:-1]:
                x = _block(block, x, mask)
            x = tower.ln_final(_block_at(blocks[-1], x, lengths - 1))
            projection = tower.text_projection
            if projection is not None:
                x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
            features = x
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def encode_texts(
        self,
        texts: Sequence[str],
        batch_size: int | None = None,
        trim: bool = True,
        on_batch: Callable[[int], object] | None = None,
    ) -> TextEmbeddings:
        """Encode captions to unit vectors ``[N, d]`` (float32, CPU), in the order given.

        Captions are sorted by token length so that each batch holds captions of similar length and
        the trimmed transformer does little padded work. ``on_batch`` is called with each batch's size.
        ``batch_size`` defaults to :attr:`text_batch_size`.
        """
        batch_size = batch_size or self.text_batch_size
        if not texts:
            return TextEmbeddings(torch.empty(0, self.dim), 0)
        tokens, truncated = self.tokenize(texts)
        order = torch.argsort(self.token_lengths(tokens), stable=True)
        out = torch.empty(len(texts), self.dim)
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            out[rows] = self.encode_tokens(tokens[rows], trim=trim).cpu()
            if on_batch is not None:
                on_batch(len(rows))
        return TextEmbeddings(out, truncated)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode preprocessed images ``[B, 3, H, W]`` to unit vectors ``[B, d]`` (float32, CPU)."""
        dtype = next(self.model.visual.parameters()).dtype
        features = self.model.encode_image(pixels.to(self.device, dtype=dtype))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()
