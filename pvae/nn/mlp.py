"""Fully connected networks and the activation registry."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pvae.validation import check_numel

__all__ = ["ACTIVATIONS", "MLP", "activation_layer"]

#: Activation functions by name (``--activation`` on the command line).
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU}


def activation_layer(name: str) -> nn.Module:
    """A new activation module by name (a key of :data:`ACTIVATIONS`).

    :raises ValueError: an unknown name, listing the known ones.
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


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
        layers, width = [], in_dim
        for i, h in enumerate(hidden_dims):
            check_numel(f"MLP layer {i} ({width} -> {h})", h, width)
            layers += [nn.Linear(width, h), activation_layer(activation)]
            width = h
        check_numel(f"MLP output layer ({width} -> {out_dim})", out_dim, width)
        layers.append(nn.Linear(width, out_dim))
        super().__init__(*layers)
