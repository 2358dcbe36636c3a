"""Network building blocks: MLPs and the Gaussian encoder head of amortized guides."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ACTIVATIONS", "MLP", "GaussianEncoder"]

#: Activation functions by name (``--activation`` on the command line).
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU}


class MLP(nn.Sequential):
    """Fully connected network ``in_dim -> hidden_dims... -> out_dim``.

    :param int in_dim: input width.
    :param hidden_dims: widths of the hidden layers (may be empty: a linear map).
    :param int out_dim: output width.
    :param str activation: a key of :data:`ACTIVATIONS`, applied after every hidden layer.

    Input ``(..., in_dim)``, output ``(..., out_dim)``.
    """

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], out_dim: int,
                 activation: str = "relu"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of "
                             f"{sorted(ACTIVATIONS)}")
        layers, width = [], in_dim
        for h in hidden_dims:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, out_dim))
        super().__init__(*layers)


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
