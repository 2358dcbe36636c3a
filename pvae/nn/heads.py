"""Gaussian heads of amortized guides and learned priors: a network of the conditioning
input that outputs a location and a positive scale."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from pvae.nn.mlp import ACTIVATIONS, MLP

__all__ = ["GaussianEncoder"]


class GaussianEncoder(nn.Module):
    """q(z | x) = N(loc(x), diag(scale(x)^2)): an MLP trunk with a loc and a scale head.

    :param int in_dim: input width (``x_dim``, or ``x_dim + c_dim`` for conditional guides).
    :param hidden_dims: widths of the trunk's hidden layers.
    :param int latent_dim: width of z.
    :param str activation: see :class:`MLP`.

    ``forward(x)`` maps ``(..., in_dim)`` to ``loc, scale``, each ``(..., latent_dim)``, with
    ``scale = softplus(.) + 1e-5`` so that it is positive and bounded away from zero.
    """

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], latent_dim: int,
                 activation: str = "relu"):
        super().__init__()
        hidden_dims = tuple(hidden_dims)
        self.trunk = (MLP(in_dim, hidden_dims[:-1], hidden_dims[-1], activation)
                      if hidden_dims else nn.Identity())
        self.act = ACTIVATIONS[activation]() if hidden_dims else nn.Identity()
        width = hidden_dims[-1] if hidden_dims else in_dim
        self.head = nn.Linear(width, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw_scale = self.head(self.act(self.trunk(x))).chunk(2, dim=-1)
        return loc, F.softplus(raw_scale) + 1e-5
