"""Prompts: entity vocabulary, training-prompt sampling, CLIP zero-shot entities, prompt interaction module.

A *prompt* is a short list of entity words ("dog", "frisbee") that steers the caption. During training the
words come from the ground-truth caption (:meth:`EntityVocabulary.extract`), randomly thinned and padded
with a distractor (:func:`sample_training_prompt`) so that the decoder uses a prompt without trusting it
blindly; at inference they are given by the user or chosen by CLIP zero-shot classification of the image
against the vocabulary (:func:`entity_text_embeddings`, :func:`zero_shot_entities`).

The decoder sees prompt words through their frozen CLIP text embeddings: :class:`PromptInteraction` lets the
K prefix vectors attend to them through a residual gate that starts half open (tanh 0.5 ≈ 0.46: a gate at
zero would leave the attention without gradient); rows without prompt words take exactly the
prompt-free path. :func:`hard_prompt` is the ViECap-style text baseline.

Shapes: ``B`` batch, ``K`` prefix length, ``P`` prompt words, ``V`` vocabulary entries, ``d`` CLIP dimension.
"""

from __future__ import annotations

import importlib.resources
import random
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tipcap.errors import TipcapError

_WORD = re.compile(r"[a-z0-9]+")

PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
)


def _words(text: str) -> list[str]:
    """Lower-cased word tokens of a text: runs of ``[a-z0-9]``, everything else is a separator."""
    return _WORD.findall(text.lower())


def default_vocabulary_path() -> Path:
    """The packaged vocabulary, ``tipcap/resources/entities.json``."""
    return Path(str(importlib.resources.files("tipcap") / "resources" / "entities.json"))


class EntityVocabulary:
    """Canonical entity names and the word forms that denote them ("puppies" → "dog", "sofa" → "couch").

    Extraction is plain vocabulary matching over word tokens (no NLTK or spaCy data), longest form first,
    through one dict lookup per candidate span.

    Attributes:
        names: canonical names, in file order (the 80 COCO categories first in the packaged file).
        source: the file's description of where the vocabulary comes from.
    """

    def __init__(self, entities: Iterable[tuple[str, Sequence[str]]], source: str = "") -> None:
        """Build the lookup table.

        Args:
            entities: ``(name, forms)`` pairs; the name is a form of itself even when not listed.
            source: a description of the vocabulary.

        Raises:
            ValueError: a name is empty or repeated, a form has no word characters, or a form belongs to
                two entities.
        """
        self.names: list[str] = []
        self.source = source
        self._table: dict[tuple[str, ...], str] = {}
        for name, forms in entities:
            if not _words(name):
                raise ValueError(f"entity name {name!r} has no word characters")
            if name in self.names:
                raise ValueError(f"entity {name!r} is listed twice")
            self.names.append(name)
            for form in [name, *forms]:
                key = tuple(_words(form))
                if not key:
                    raise ValueError(f"form {form!r} of entity {name!r} has no word characters")
                owner = self._table.setdefault(key, name)
                if owner != name:
                    raise ValueError(f"form {form!r} belongs to both {owner!r} and {name!r}")
        self._max_len = max((len(key) for key in self._table), default=0)

    @classmethod
    def load(cls, path: str | Path | None = None) -> EntityVocabulary:
        """Read a vocabulary JSON: ``{"source": str, "entities": [{"name": str, "forms": [str, ...]}, ...]}``.

        Args:
            path: the file; ``None`` for the vocabulary shipped with the package.

        Raises:
            TipcapError: the file is missing, not JSON, or not of that shape (the message names the file).
        """
        path = default_vocabulary_path() if path is None else Path(path)
        # Imported here: the data package pulls in more than this module needs at import time.
        from tipcap.io import load_json

        doc = load_json(path)
        entries = doc.get("entities") if isinstance(doc, dict) else None
        if not isinstance(entries, list) or not entries:
            raise TipcapError(f'{path}: expected an object with a non-empty "entities" list.')
        pairs: list[tuple[str, list[str]]] = []
        for i, entry in enumerate(entries):
            name = entry.get("name") if isinstance(entry, dict) else None
            forms = entry.get("forms", []) if isinstance(entry, dict) else None
            if (
                not isinstance(name, str)
                or not isinstance(forms, list)
                or not all(isinstance(f, str) for f in forms)
            ):
                raise TipcapError(
                    f'{path}: entities[{i}] must be {{"name": string, "forms": [string, ...]}}, '
                    f"got {entry!r}."
                )
            pairs.append((name, forms))
        source = doc.get("source", "")
        try:
            return cls(pairs, source=source if isinstance(source, str) else "")
        except ValueError as e:
            raise TipcapError(f"{path}: {e}.") from None

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def forms(self) -> dict[str, str]:
        """Every form (words joined by single spaces) mapped to its canonical name."""
        return {" ".join(key): name for key, name in self._table.items()}

    def forms_by_name(self) -> dict[str, list[str]]:
        """Each entity's forms (words joined by single spaces, its name's first), by canonical name."""
        found: dict[str, list[str]] = {name: [" ".join(_words(name))] for name in self.names}
        for form, name in self.forms().items():
            if form not in found[name]:
                found[name].append(form)
        return found

    def extract(self, caption: str) -> list[str]:
        """Canonical names of the entities a caption mentions, in order of first mention, without repeats.

        At each word the longest matching form wins, and matching resumes after it: "a hot dog stand" gives
        ``["hot dog"]``, not ``"dog"``; "traffic lights" gives ``["traffic light"]``.
        """
        words = _words(caption)
        found: dict[str, None] = {}
        i, n = 0, len(words)
        while i < n:
            for length in range(min(self._max_len, n - i), 0, -1):
                name = self._table.get(tuple(words[i : i + length]))
                if name is not None:
                    found.setdefault(name)
                    i += length
                    break
            else:
                i += 1
        return list(found)


def sample_training_prompt(
    entities: list[str],
    vocabulary_names: list[str],
    rng: random.Random,
    drop_entity: float = 0.4,
    drop_all: float = 0.5,
    distractor: float = 0.1,
    max_words: int = 8,
) -> list[str]:
    """A noisy training prompt from a caption's entities.

    With probability ``drop_all`` the prompt is empty; otherwise each entity is kept independently with
    probability ``1 - drop_entity``, then with probability ``distractor`` one vocabulary name that is not
    among ``entities`` is added; the words are shuffled and cut to ``max_words``. Deterministic given
    ``rng``'s state.
    """
    for label, p in (("drop_entity", drop_entity), ("drop_all", drop_all), ("distractor", distractor)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{label} must be a probability in [0, 1], got {p}")
    if max_words < 0:
        raise ValueError(f"max_words must be >= 0, got {max_words}")
    if rng.random() < drop_all:
        return []
    words = [entity for entity in entities if rng.random() >= drop_entity]
    if rng.random() < distractor:
        truth = set(entities)
        candidates = [name for name in vocabulary_names if name not in truth]
        if candidates:
            words.append(rng.choice(candidates))
    rng.shuffle(words)
    return words[:max_words]


def entity_text_embeddings(
    encode_texts: Callable[[list[str]], torch.Tensor],
    names: list[str],
    templates: Sequence[str] = PROMPT_TEMPLATES,
) -> torch.Tensor:
    """Prompt-ensembled CLIP text embeddings of entity names.

    Args:
        encode_texts: maps ``N`` strings to ``[N, d]`` embeddings (e.g.
            ``lambda xs: encoder.encode_texts(xs).embeddings``); called once, with every name × template.
        names: ``V`` entity names.
        templates: format strings with one ``{}``.

    Returns:
        ``[V, d]`` float32: per name, the mean of its L2-normalised template embeddings, renormalised.
    """
    if not names:
        raise ValueError("names is empty")
    if not templates:
        raise ValueError("templates is empty")
    texts = [template.format(name) for name in names for template in templates]
    embeddings = encode_texts(texts)
    if embeddings.dim() != 2 or embeddings.shape[0] != len(texts):
        raise ValueError(
            f"encode_texts returned shape {tuple(embeddings.shape)} for {len(texts)} texts, "
            f"expected [{len(texts)}, d]"
        )
    embeddings = F.normalize(embeddings.float(), dim=-1)
    return F.normalize(embeddings.view(len(names), len(templates), -1).mean(dim=1), dim=-1)


def zero_shot_scores(
    image_embeddings: torch.Tensor,
    entity_embeddings: torch.Tensor,
    names: list[str],
    top_k: int = 3,
    threshold: float | None = None,
    temperature: float = 100.0,
) -> list[list[tuple[str, float]]]:
    """CLIP zero-shot classification of images against the entity vocabulary, with probabilities.

    Args:
        image_embeddings: ``[B, d]`` CLIP image embeddings (normalised here).
        entity_embeddings: ``[V, d]`` entity text embeddings (normalised here), e.g. from
            :func:`entity_text_embeddings`.
        names: the ``V`` names, in the rows' order.
        top_k: at most this many names per image.
        threshold: when given, keep only names whose probability is at least this.
        temperature: multiplies the cosine similarities before the softmax over ``V``.

    Returns:
        ``B`` lists of (name, probability), most probable first.
    """
    if image_embeddings.dim() != 2 or entity_embeddings.dim() != 2:
        raise ValueError(
            f"expected image embeddings [B, d] and entity embeddings [V, d], got "
            f"{tuple(image_embeddings.shape)} and {tuple(entity_embeddings.shape)}"
        )
    if image_embeddings.shape[1] != entity_embeddings.shape[1]:
        raise ValueError(
            f"embedding dimensions differ: images {image_embeddings.shape[1]}, "
            f"entities {entity_embeddings.shape[1]}"
        )
    if entity_embeddings.shape[0] != len(names):
        raise ValueError(f"{entity_embeddings.shape[0]} entity embeddings for {len(names)} names")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    images = F.normalize(image_embeddings.float(), dim=-1)
    entities = F.normalize(entity_embeddings.float().to(images.device), dim=-1)
    probs = (temperature * images @ entities.T).softmax(dim=-1)
    values, indices = probs.topk(min(top_k, len(names)), dim=-1)
    return [
        [
            (names[i], p)
            for p, i in zip(row_values, row_indices, strict=True)
            if threshold is None or p >= threshold
        ]
        for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True)
    ]


def zero_shot_entities(
    image_embeddings: torch.Tensor,
    entity_embeddings: torch.Tensor,
    names: list[str],
    top_k: int = 3,
    threshold: float | None = None,
    temperature: float = 100.0,
) -> list[list[str]]:
    """The names of :func:`zero_shot_scores`: ``B`` lists of names, most probable first."""
    scored = zero_shot_scores(image_embeddings, entity_embeddings, names, top_k, threshold, temperature)
    return [[name for name, _ in row] for row in scored]


def hard_prompt(words: list[str]) -> str:
    """ViECap's text prompt: ``["dog", "frisbee"]`` → ``"There are dog, frisbee in image."``, and
    ``"There are something in image."`` for no words.

    As ViECap's ``compose_discrete_prompts`` (github.com/FeiElysia/ViECap, ``utils.py``) writes it, placed
    after the prefix (its ``--soft_prompt_first``). ViECap trains with every caption entity masked with
    probability 0.4 (``--prob_of_random_mask 0.4``, ``scripts/train_coco.sh``), never the whole prompt and
    no distractor (in tipcap: ``train.prompt_drop_entity: 0.4``, ``prompt_drop_all: 0``,
    ``prompt_distractor: 0``), and at inference takes CLIP's top 3 entities (softmax of 100·cos) of
    probability at least 0.2 (``infer_by_batch.py``; its COCO and Flickr30k evaluation scripts pass 0.4
    and 0.3 with their own vocabularies): ``eval.top_k: 3``, ``eval.threshold: 0.2``.
    """
    return f"There are {', '.join(words) if words else 'something'} in image."


def pad_prompt_embeddings(
    prompts: Sequence[Sequence[str]], entity_embeddings: torch.Tensor, names: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch prompt words as padded embeddings for :class:`PromptInteraction`.

    Args:
        prompts: ``B`` lists of names, each found in ``names``.
        entity_embeddings: ``[V, d]``, row ``i`` for ``names[i]``.
        names: the ``V`` names.

    Returns:
        ``[B, P, d]`` embeddings (zeros at padding) and a ``[B, P]`` bool mask, True at real words, where
        ``P`` is the longest prompt (0 when all are empty).

    Raises:
        KeyError: a word is not among ``names`` (encode such words with :func:`entity_text_embeddings`).
    """
    index = {name: i for i, name in enumerate(names)}
    width = max((len(words) for words in prompts), default=0)
    rows = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for b, words in enumerate(prompts):
        for p, word in enumerate(words):
            if word not in index:
                raise KeyError(f"prompt word {word!r} is not in the entity vocabulary")
            rows[b, p] = index[word]
            mask[b, p] = True
    rows, mask = rows.to(entity_embeddings.device), mask.to(entity_embeddings.device)
    embeddings = entity_embeddings[rows] * mask.unsqueeze(-1).to(entity_embeddings.dtype)
    return embeddings, mask


def prompt_word_embeddings(
    prompts: Sequence[Sequence[str]],
    entity_embeddings: torch.Tensor,
    names: Sequence[str],
    encode_texts: Callable[[list[str]], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pad_prompt_embeddings` for any words: ``[B, P, d]`` and a mask ``[B, P]``.

    Words among ``names`` take their row of ``entity_embeddings`` ``[V, d]``; others are encoded with
    ``encode_texts`` (a CLIP text encoder, prompt-ensembled like the vocabulary) or refused when none is
    given.
    """
    known = set(names)
    unknown = sorted({word for words in prompts for word in words if word not in known})
    table, names = entity_embeddings.float(), list(names)
    if unknown:
        if encode_texts is None:
            raise TipcapError(f"prompt words outside the entity vocabulary: {', '.join(unknown)}.")
        vectors = entity_text_embeddings(encode_texts, unknown, PROMPT_TEMPLATES)
        table, names = torch.cat([table, vectors.to(table)]), [*names, *unknown]
    return pad_prompt_embeddings(prompts, table, names)


class _CrossAttentionBlock(nn.Module):
    """Pre-norm: ``x + attn(LN(x), words, words)``, then ``x + MLP(LN(x))``; ``x`` is ``[B, K, width]``."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width),
            nn.GELU(),
            nn.Linear(4 * width, width),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, words: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, K, width]``, ``words`` ``[B, P, width]``, ``ignore`` ``[B, P]`` (True = padding)."""
        attended, _ = self.attn(self.attn_norm(x), words, words, key_padding_mask=ignore, need_weights=False)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x))


class PromptInteraction(nn.Module):
    """Prompt interaction module: the prefix attends to prompt-word embeddings through a residual gate.

    Prompt words' CLIP embeddings ``[B, P, clip_dim]`` are centred, projected to ``width`` (Linear, then
    LayerNorm), then ``layers`` pre-norm cross-attention blocks refine the prefix ``[B, K, width]``
    (queries) against them (keys and values). The output is ``prefix + tanh(gate) * (refined - prefix)``
    with a scalar ``gate``. Rows without prompt words (all-False mask) and ``prompts=None`` give exactly
    ``prefix`` whatever the gate, so "no prompt" is the prompt-free path.

    The gate starts open (``gate_init`` 0.5, tanh 0.46): the cross-attention's gradient is proportional
    to tanh(gate), so a gate starting at 0 leaves it untrained, and the gate then has nothing to open for
    (on the toy world it stayed within 0.01 of 0 and prompts changed nothing). ``gate_init=0`` makes the
    module the identity at initialisation, for adding it to a trained prompt-free decoder.
    """

    def __init__(
        self,
        clip_dim: int,
        width: int,
        layers: int = 2,
        heads: int = 8,
        dropout: float = 0.0,
        gate_init: float = 0.5,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.clip_dim = clip_dim
        self.width = width
        self.project = nn.Linear(clip_dim, width)
        # Words' CLIP embeddings share most of their length; centred (on the vocabulary's mean, see
        # set_word_mean) their differences are what the projection and its LayerNorm see.
        self.register_buffer("word_mean", torch.zeros(clip_dim))
        self.word_norm = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(_CrossAttentionBlock(width, heads, dropout) for _ in range(layers))
        self.gate = nn.Parameter(torch.full((), float(gate_init)))

    @torch.no_grad()
    def set_word_mean(self, vocabulary_embeddings: torch.Tensor) -> None:
        """Centre prompt words on the mean of the vocabulary's embeddings ``[V, clip_dim]``."""
        self.word_mean.copy_(vocabulary_embeddings.float().mean(0))

    def words(self, prompts: torch.Tensor) -> torch.Tensor:
        """Prompt words in the model's width: ``[B, P, clip_dim]`` CLIP embeddings → ``[B, P, width]``
        (centred, projected, layer-normalised)."""
        prompts = prompts.to(dtype=self.project.weight.dtype)
        return self.word_norm(self.project(prompts - self.word_mean))

    def forward(
        self,
        prefix: torch.Tensor,
        prompts: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Steer the prefix with the prompt words.

        Args:
            prefix: ``[B, K, width]`` prefix embeddings.
            prompts: ``[B, P, clip_dim]`` CLIP text embeddings of the prompt words, or None for no prompt.
            prompt_mask: ``[B, P]`` bool, True at real words; None when every position is a real word.

        Returns:
            ``[B, K, width]``: ``prefix + tanh(gate) * (refined - prefix)``, exactly ``prefix`` for rows
            without words.
        """
        if prefix.dim() != 3 or prefix.shape[-1] != self.width:
            raise ValueError(f"prefix must be [B, K, {self.width}], got {tuple(prefix.shape)}")
        if prompts is None:
            return prefix
        if prompts.dim() != 3 or prompts.shape[0] != prefix.shape[0] or prompts.shape[-1] != self.clip_dim:
            raise ValueError(
                f"prompts must be [{prefix.shape[0]}, P, {self.clip_dim}], got {tuple(prompts.shape)}"
            )
        batch, count = prompts.shape[0], prompts.shape[1]
        if count == 0:
            return prefix
        if prompt_mask is None:
            prompt_mask = torch.ones(batch, count, dtype=torch.bool, device=prompts.device)
        elif prompt_mask.shape != (batch, count):
            raise ValueError(f"prompt_mask must be [{batch}, {count}], got {tuple(prompt_mask.shape)}")
        prompt_mask = prompt_mask.to(device=prefix.device, dtype=torch.bool)
        has_words = prompt_mask.any(dim=1)  # [B]
        # Attention over only padded keys is a softmax over nothing (NaN): let such rows see one dummy key,
        # then discard their result below.
        ignore = ~prompt_mask
        ignore[:, 0] &= has_words
        words = self.words(prompts.to(prefix.device))
        refined = prefix
        for block in self.blocks:
            refined = block(refined, words, ignore)
        refined = torch.where(has_words[:, None, None], refined, prefix)
        return prefix + torch.tanh(self.gate) * (refined - prefix)
