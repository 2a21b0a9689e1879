"""The modality gap as a Gaussian, N(μ, LLᵀ), and the baseline and control kinds behind the same interface.

How each kind moves embeddings (t: a caption's text embedding, v: an image embedding, z, z₁, z₂ ~ N(0, I)
drawn independently; μ and Σ are the setting's estimate, L the Cholesky factor that the gap file stores:
the noise covariance the kind uses, except for ``norm-matched``, whose L is Σ's):

======================  ========================  =================  ======================================
kind                    ``sample``                ``to_text``        noise covariance; reference
======================  ========================  =================  ======================================
none                    t                         v                  none; no bridging
isotropic               t + L·z                   v                  σ₀²I (σ₀² = 0.016); CapDec's noise
mean-shift              t                         v − μ              none; the mean gap alone
mean-shift-isotropic    t + L·z                   v − μ              σ₀²I; CapDec's noise, μ removed at
                                                                     inference
capdec-offset           t + μ + L·z               v                  σ₀²I; CapDec's ``--add_modality_offset``
mean-isotropic-matched  t + L·z                   v − μ              s²I with s² = tr Σ / d (``total``) or
                                                                     the tangential match (``tangential``)
norm-matched            t + ‖L·z₁‖·z₂/‖z₂‖        v − μ              (tr Σ / d)·I, with the Gaussian's
                                                                     noise norms; L = chol Σ
diagonal                t + L·z                   v − μ              diag Σ: no correlations
rotated                 t + L·z                   v − μ              RΣRᵀ, R a seeded random rotation: Σ's
                                                                     spectrum in other directions
gaussian                t + L·z                   v − μ              Σ; TIPCap, text space
close                   t + μ + L·z               v                  9Σ + 0.12²·I; CLOSE's adapter
cov-noise               t + μ + L·z               v                  Σ; the Gaussian on the image side
memory                  t                         softmax(v·Tᵀ/τ)·T  none; DeCap (T: text memory)
======================  ========================  =================  ======================================

Every noise covariance is multiplied by ``gap.noise_scale`` (default 1) when fitted. With ``renorm`` every
output is scaled back to unit length, as CLIP embeddings are.

**Controls of the Gaussian's shape.** The decoder reads normalise(t + n), and renormalisation removes the
part of n along t: what survives is the tangential noise, of expected size tr S − tᵀSt for noise
covariance S. ``mean-isotropic-matched`` keeps Σ's total variance but not its tangential part (tr Σ·(1 −
1/d) against tr Σ − E[tᵀΣt]), and its noise norms are tighter (var ‖n‖² = 2 tr S², least for isotropic
S). Three kinds separate these from the directions: ``rotated`` keeps Σ's whole spectrum (trace, norms'
spread) and moves its directions; ``norm-matched`` draws isotropic directions with the Gaussian's noise
norms (a scale mixture: its covariance is (tr Σ/d)·I, but ‖n‖ is distributed as ‖L·z‖); and ``gap.match:
tangential`` sets the matched kind's s² so that s²·(d − 1) = tr Σ − E[tᵀΣt] over the caption store.

``capdec-offset`` follows CapDec (github.com/DavidHuji/CapDec): ``train.py --add_modality_offset`` loads
``offset_to_add_in_training`` = center_image − center_text (``others/modality_offset_calculator.py``: the
means of 20,000 normalised COCO image and caption embeddings, RN50x4) and ``noise_injection`` adds it after
the noise: x = t/‖t‖ + σ₀·z + offset, then x/‖x‖ (σ₀² = ``--noise_variance``, 0.016 in the README); at
inference ``predictions_runner.py`` without its own flag feeds the normalised image embedding. Here the
offset is the setting's μ. Training with the noise alone and inferring with ``predictions_runner.py
--add_modality_offset``, which adds center_text − center_image to the normalised image embedding (and does
not renormalise), is ``mean-shift-isotropic`` instead; that kind was called ``mean-isotropic`` before, and
gap files saved under that name load as it.

``close`` follows allenai/close (``close/model/language_adapters.py``, class ``CovNoise``, selected by
``--l_adapter cov``): at training x = t + shift; x = x + 3·s, s ~ N(0, C); x = x + 0.12·z; x/‖x‖, and at
inference the normalised image embedding as it is. ``shift`` and ``C`` are its precomputed mean and
covariance of the image–text differences (files ``*-mean-diff.pkl`` and ``*-cov-diff.pkl``), here μ and Σ
of the setting; 0.12 is ``train.py``'s default noise for single-caption captioning (``s-cap``), with its
default CLIP ViT-L/14 (d = 768). The sum of the two independent draws is one draw from N(0, 9Σ + 0.12²·I),
which is what is stored.

CapDec's σ₀² and CLOSE's 0.12 were set for CLIPs of width 640 and 768; ``gap.scale_to_dim`` carries them
to the embedding's width d at the same expected cosine between a noised and a clean unit embedding,
≈ 1/sqrt(1 + dσ²) for isotropic noise: σ² → σ₀²·d₀/d (:func:`tipcap.gap.fit.scaled_to_dim`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from tipcap.config import GAP_KINDS
from tipcap.errors import TipcapError
from tipcap.io import save_safetensors

GAP_FORMAT = "tipcap-gap"
GAP_VERSION = 1

TRAIN_NOISE_KINDS = frozenset(
    {"isotropic", "mean-shift-isotropic", "capdec-offset", "mean-isotropic-matched", "norm-matched",
     "diagonal", "rotated", "gaussian", "close", "cov-noise"}
)  # fmt: skip
"""Kinds that add noise to the training input: N(0, LLᵀ), or ``norm-matched``'s scale mixture."""
LEARNABLE_KINDS = frozenset({"isotropic", "gaussian", "close", "cov-noise"})
"""Noise kinds whose full factor L may be trained (the others' noise has a shape that training would lose)."""
RENAMED_KINDS = {"mean-isotropic": "mean-shift-isotropic"}
"""Former kind names, read from older gap files as the kind that computes the same."""
_TRAIN_SHIFT = {"cov-noise", "close", "capdec-offset"}
_INFER_SHIFT = {
    "mean-shift", "mean-shift-isotropic", "mean-isotropic-matched", "norm-matched", "diagonal", "rotated",
    "gaussian",
}  # fmt: skip


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def added_noise_covariance(kind: str, factor_covariance: torch.Tensor) -> torch.Tensor:
    """The covariance ``[d, d]`` of the noise a kind's ``sample`` adds, from the LLᵀ ``[d, d]`` it stores.

    LLᵀ for the Gaussian noise kinds; (tr LLᵀ / d)·I for ``norm-matched`` (isotropic directions, norms of
    ‖L·z‖); zero for the kinds without training noise (whatever factor an older file stored).
    """
    if kind not in TRAIN_NOISE_KINDS:
        return torch.zeros_like(factor_covariance)
    if kind == "norm-matched":
        dim = factor_covariance.shape[-1]
        identity = torch.eye(dim, dtype=factor_covariance.dtype, device=factor_covariance.device)
        return torch.trace(factor_covariance) / dim * identity
    return factor_covariance


class Gap(nn.Module):
    """A modality-gap model: mean μ ``[d]`` and Cholesky factor L ``[d, d]`` of Σ = LLᵀ, plus its kind.

    Args:
        kind: one of :data:`tipcap.config.GAP_KINDS` (see the module table).
        mu: the mean gap μ = E[v − t], ``[d]``.
        scale_tril: lower-triangular L with positive diagonal, ``[d, d]``.
        renorm: rescale outputs to unit length.
        clip: identity of the CLIP the gap was fitted on (as in embedding stores' keys).
        memory: ``[M, d]`` text embeddings for the ``memory`` kind.
        tau: softmax temperature of the ``memory`` kind.
        learnable: make μ and L trainable parameters (L through its strictly lower part and the log of
            its diagonal, so the diagonal stays positive); the values given become the prior of
            :meth:`kl_to_prior`.
        info: how the gap was fitted (setting, counts), saved with it.
        provenance: the record of its fit (:mod:`tipcap.provenance`), saved with it.
    """

    def __init__(
        self,
        kind: str,
        mu: torch.Tensor,
        scale_tril: torch.Tensor,
        *,
        renorm: bool = True,
        clip: dict[str, Any] | None = None,
        memory: torch.Tensor | None = None,
        tau: float = 0.01,
        learnable: bool = False,
        info: dict[str, Any] | None = None,
        provenance: dict[str, Any] | None = None,
    ):
        super().__init__()
        if kind not in GAP_KINDS:
            raise TipcapError(f"gap kind {kind!r}: use one of {', '.join(GAP_KINDS)}.")
        dim = mu.shape[-1]
        if scale_tril.shape != (dim, dim):
            raise ValueError(f"scale_tril must be [{dim}, {dim}], got {tuple(scale_tril.shape)}")
        if kind == "memory" and (memory is None or memory.shape[-1] != dim):
            raise TipcapError(f"a memory gap needs a text memory of width {dim}.")
        if learnable and kind not in LEARNABLE_KINDS:
            kinds = ", ".join(sorted(LEARNABLE_KINDS))
            raise TipcapError(f"a learnable gap is one of kinds {kinds}, not {kind!r}.")
        self.kind = kind
        self.renorm = renorm
        self.clip = clip
        self.tau = tau
        self.learnable = learnable
        self.info = dict(info or {})
        self.provenance = provenance
        mu = mu.detach().to(torch.float32)
        scale_tril = torch.tril(scale_tril.detach().to(torch.float32))
        if learnable:
            if not bool((torch.diagonal(scale_tril) > 0).all()):
                raise TipcapError("a learnable gap needs a covariance factor with a positive diagonal.")
            self.mu = nn.Parameter(mu.clone())
            self.tril_offdiag = nn.Parameter(torch.tril(scale_tril, -1))
            self.log_diag = nn.Parameter(torch.log(torch.diagonal(scale_tril)))
            self.register_buffer("prior_mu", mu.clone())
            self.register_buffer("prior_scale_tril", scale_tril.clone())
        else:
            self.register_buffer("mu", mu)
            self.register_buffer("fixed_scale_tril", scale_tril)
        self.register_buffer("memory", None if memory is None else memory.detach().to(torch.float16))

    @property
    def dim(self) -> int:
        """Embedding width d."""
        return int(self.mu.shape[-1])

    @property
    def scale_tril(self) -> torch.Tensor:
        """L ``[d, d]``, lower triangular (differentiable when learnable)."""
        if self.learnable:
            return torch.tril(self.tril_offdiag, -1) + torch.diag(torch.exp(self.log_diag))
        return self.fixed_scale_tril

    @property
    def covariance(self) -> torch.Tensor:
        """Σ = LLᵀ ``[d, d]``."""
        scale_tril = self.scale_tril
        return scale_tril @ scale_tril.T

    @property
    def training_noise_covariance(self) -> torch.Tensor:
        """The covariance ``[d, d]`` of the noise ``sample`` adds (:func:`added_noise_covariance`)."""
        return added_noise_covariance(self.kind, self.covariance)

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return _normalize(x) if self.renorm else x

    def sample(
        self,
        t: torch.Tensor,
        generator: torch.Generator | None = None,
        row_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training input from text embeddings ``[B, d]``: fresh noise per row (see the kind table), its
        standard deviation multiplied row by row by ``row_scale`` ``[B]`` when given."""
        x = t.to(self.mu.dtype)
        if self.kind in TRAIN_NOISE_KINDS:
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            noise = z @ self.scale_tril.T
            if self.kind == "norm-matched":  # the Gaussian's norm ‖L·z₁‖ along a uniform direction z₂/‖z₂‖
                direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                noise = noise.norm(dim=-1, keepdim=True) * _normalize(direction)
            if row_scale is not None:
                noise = noise * row_scale.to(device=x.device, dtype=x.dtype).unsqueeze(-1)
            x = x + noise
        if self.kind in _TRAIN_SHIFT:
            x = x + self.mu
        return self._out(x)

    def text_side(self, t: torch.Tensor) -> torch.Tensor:
        """The noise-free training input for text embeddings ``[B, d]``: t, or t + μ in image space."""
        x = t.to(self.mu.dtype)
        if self.kind in _TRAIN_SHIFT:
            x = x + self.mu
        return self._out(x)

    def to_text(self, v: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """Inference input from image embeddings ``[B, d]`` (see the kind table)."""
        x = v.to(self.mu.dtype)
        if self.kind in _INFER_SHIFT:
            x = x - self.mu
        elif self.kind == "memory":
            x = self._project_on_memory(x, chunk)
        return self._out(x)

    def _project_on_memory(self, v: torch.Tensor, chunk: int) -> torch.Tensor:
        """softmax(v·Tᵀ/τ)·T over the memory T in chunks of ``chunk`` rows (an online softmax)."""
        running_max = torch.full((v.shape[0], 1), -math.inf, device=v.device, dtype=v.dtype)
        weight_sum = torch.zeros(v.shape[0], 1, device=v.device, dtype=v.dtype)
        weighted = torch.zeros_like(v)
        for block in self.memory.split(chunk):
            block = block.to(v.device, v.dtype)
            logits = v @ block.T / self.tau
            new_max = torch.maximum(running_max, logits.max(dim=1, keepdim=True).values)
            rescale = torch.exp(running_max - new_max)
            weights = torch.exp(logits - new_max)
            weight_sum = weight_sum * rescale + weights.sum(dim=1, keepdim=True)
            weighted = weighted * rescale + weights @ block
            running_max = new_max
        return weighted / weight_sum

    def kl_to(self, prior_mu: torch.Tensor, prior_scale_tril: torch.Tensor) -> torch.Tensor:
        """KL(N(μ, LLᵀ) ‖ N(μ₀, L₀L₀ᵀ)) in closed form (a scalar, differentiable in μ and L)."""
        scale_tril = self.scale_tril
        prior_scale_tril = prior_scale_tril.to(scale_tril)
        ratio = torch.linalg.solve_triangular(prior_scale_tril, scale_tril, upper=False)
        offset = torch.linalg.solve_triangular(
            prior_scale_tril, (self.mu - prior_mu.to(self.mu)).unsqueeze(-1), upper=False
        )
        log_det = torch.log(torch.diagonal(scale_tril)).sum()
        prior_log_det = torch.log(torch.diagonal(prior_scale_tril)).sum()
        return 0.5 * ((ratio**2).sum() + (offset**2).sum() - self.dim) + prior_log_det - log_det

    def kl_to_prior(self) -> torch.Tensor:
        """KL to the values the learnable gap started from (its fitted estimate)."""
        if not self.learnable:
            raise ValueError("only a learnable gap has a prior")
        return self.kl_to(self.prior_mu, self.prior_scale_tril)

    def check_clip(self, identity: dict[str, Any] | None, what: str) -> None:
        """Refuse to combine this gap with embeddings of another CLIP.

        Raises:
            TipcapError: naming both CLIPs when ``identity`` differs from the gap's.
        """
        if self.clip is not None and identity is not None and identity != self.clip:
            raise TipcapError(
                f"the gap was fitted on CLIP {_describe(self.clip)}, but {what} was built with "
                f"{_describe(identity)}; fit the gap on embeddings of the same CLIP."
            )

    def save(self, path: str | Path) -> None:
        """Write a safetensors file (written to a temporary name, then renamed), with the provenance
        record of its fit (:mod:`tipcap.provenance`) when it has one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"mu": self.mu.detach(), "scale_tril": self.scale_tril.detach()}
        if self.learnable:
            tensors["prior_mu"] = self.prior_mu
            tensors["prior_scale_tril"] = self.prior_scale_tril
        if self.memory is not None:
            tensors["memory"] = self.memory
        metadata = {
            "format": GAP_FORMAT,
            "version": str(GAP_VERSION),
            "kind": self.kind,
            "renorm": json.dumps(self.renorm),
            "tau": json.dumps(self.tau),
            "learnable": json.dumps(self.learnable),
            "clip": json.dumps(self.clip),
            "info": json.dumps(self.info),
        }
        if self.provenance is not None:
            metadata["provenance"] = json.dumps(self.provenance)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_safetensors(tensors, path, metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, name: str | None = None) -> Gap:
        """Read a gap file written by :meth:`save`.

        ``name`` is the flag or config key that gave ``path`` (``data.gap``, ``--mu-from``), named with the
        command that writes a missing file.

        Raises:
            TipcapError: when the file is missing, not a gap file, of an unknown version, or holds NaN or
                infinite values.
        """
        path = Path(path)
        if not path.is_file():
            where = f"{name} {path}" if name else str(path)
            raise TipcapError(
                f"{where}: no such gap file; fit it with `tipcap fit-gap --setting SETTING --texts STORE "
                f"[--images STORE] --out {path}`."
            )
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                names = list(f.keys())
                tensors = {name: f.get_tensor(name) for name in names}
        except Exception as e:  # safetensors raises its own error type for malformed files
            raise TipcapError(f"{path}: not a safetensors gap file ({e}).") from None
        if metadata.get("format") != GAP_FORMAT:
            raise TipcapError(f"{path}: not a tipcap gap file (write one with 'tipcap fit-gap').")
        version = metadata.get("version", "")
        if not version.isdigit() or int(version) > GAP_VERSION:
            raise TipcapError(f"{path}: gap file version {version!r}; this tipcap reads up to {GAP_VERSION}.")
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise TipcapError(
                    f"{path}: its {name} holds NaN or infinite values; fit the gap again ('tipcap fit-gap')."
                )
        try:
            return cls._from_saved(metadata, tensors)
        except (KeyError, ValueError) as e:
            raise TipcapError(f"{path}: damaged gap file ({type(e).__name__}: {e}).") from None

    @classmethod
    def _from_saved(cls, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> Gap:
        """Rebuild a gap from a file's metadata and tensors (KeyError/ValueError when incomplete)."""
        kind = metadata["kind"]
        kind = RENAMED_KINDS.get(kind, kind)  # the one place where a former kind name is read
        gap = cls(
            kind,
            tensors["prior_mu"] if "prior_mu" in tensors else tensors["mu"],
            tensors["prior_scale_tril"] if "prior_scale_tril" in tensors else tensors["scale_tril"],
            renorm=json.loads(metadata["renorm"]),
            clip=json.loads(metadata["clip"]),
            memory=tensors.get("memory"),
            tau=json.loads(metadata["tau"]),
            learnable=json.loads(metadata["learnable"]),
            info=json.loads(metadata["info"]),
            provenance=json.loads(metadata["provenance"]) if "provenance" in metadata else None,
        )
        if gap.learnable:
            with torch.no_grad():
                gap.mu.copy_(tensors["mu"])
                gap.tril_offdiag.copy_(torch.tril(tensors["scale_tril"], -1))
                gap.log_diag.copy_(torch.log(torch.diagonal(tensors["scale_tril"])))
        return gap


def _describe(identity: dict[str, Any]) -> str:
    return f"{identity.get('model')} ({identity.get('pretrained')})"
