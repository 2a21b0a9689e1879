"""Projectors: a CLIP embedding ``[B, d]`` to K prefix vectors ``[B, K, W]`` for the language model.

``model.projector`` picks one: ``mlp`` (:class:`MLPProjector`) or ``transformer``
(:class:`TransformerProjector`), both ClipCap's.
"""

from __future__ import annotations

import torch
from torch import nn


class MLPProjector(nn.Module):
    """ClipCap's MLP: ``[B, d]`` → ``[B, K, W]`` through one tanh hidden layer of (K·W)/2 units."""

    def __init__(self, clip_dim: int, width: int, prefix_length: int):
        super().__init__()
        self.prefix_length, self.width = prefix_length, width
        hidden = prefix_length * width // 2
        self.net = nn.Sequential(
            nn.Linear(clip_dim, hidden), nn.Tanh(), nn.Linear(hidden, prefix_length * width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1, self.prefix_length, self.width)


class TransformerProjector(nn.Module):
    """ClipCap's transformer mapper: K tokens from a linear map plus K learned queries, through layers.

    ``[B, d]`` → ``[B, K, W]`` (the outputs at the learned queries' positions).
    """

    def __init__(self, clip_dim: int, width: int, prefix_length: int, layers: int, heads: int = 8):
        super().__init__()
        self.prefix_length, self.width = prefix_length, width
        self.linear = nn.Linear(clip_dim, prefix_length * width)
        self.queries = nn.Parameter(torch.randn(prefix_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.linear(x).view(-1, self.prefix_length, self.width)
        queries = self.queries.unsqueeze(0).expand(len(x), -1, -1)
        return self.encoder(torch.cat([tokens, queries], dim=1))[:, self.prefix_length :]


def build_projector(kind: str, clip_dim: int, width: int, prefix_length: int, layers: int) -> nn.Module:
    """The projector ``model.projector`` names (``mlp`` or ``transformer``, of ``layers`` layers)."""
    if kind == "mlp":
        return MLPProjector(clip_dim, width, prefix_length)
    return TransformerProjector(clip_dim, width, prefix_length, layers)
