"""Convolutional networks for image data kept flat, ``(..., D)`` with ``D = H * W``: a strided
convolutional trunk for encoders and a transposed-convolution decoder that restores the exact
image size.

"When applied to image data, the encoder is typically based on convolutions and the decoder
based on transpose convolutions" (Bishop & Bishop, Deep Learning, §19.2); the layout
(stride-2 3x3 convolutions halving the resolution, their transposes doubling it) follows the
DCGAN-style VAEs of the literature (Radford, Metz & Chintala 2016).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pvae.nn.mlp import activation_layer
from pvae.validation import check_count, check_sizes

__all__ = ["ConvDecoder", "ConvEncoder", "conv_sizes"]


def _check_image_shape(image_shape) -> tuple[int, int]:
    shape = check_sizes("image_shape", image_shape)
    if len(shape) != 2:
        raise ValueError(f"image_shape must be (height, width) of one-channel images, got "
                         f"{tuple(image_shape)!r}")
    return shape


def conv_sizes(image_shape, num_layers: int) -> list[tuple[int, int]]:
    """Spatial sizes after each stride-2 convolution (kernel 3, padding 1): ``ceil(size / 2)``
    per layer, the input size first: ``num_layers + 1`` pairs ``(height, width)``."""
    sizes = [tuple(image_shape)]
    for _ in range(num_layers):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def _flat_batch(x: torch.Tensor, event_dims: int):
    """``x`` with every leading (batch, particle) dim folded into one, and the leading shape."""
    lead = x.shape[: x.dim() - event_dims]
    return x.reshape(-1, *x.shape[x.dim() - event_dims:]), lead


class ConvEncoder(nn.Module):
    """Convolutional trunk of q(z | x): ``(..., H * W [+ extra_dim]) -> (..., out_dim)``.

    The flat image is reshaped to one channel ``(1, H, W)``, passed through stride-2 3x3
    convolutions with ``channels`` output channels each (every one halving the resolution,
    rounded up), flattened and mapped by a linear layer to ``out_dim`` features (no activation
    after it: the head that follows applies one, as for :class:`pvae.nn.MLP` trunks). With
    ``extra_dim``, the input's last ``extra_dim`` entries (a conditional model's ``c``, appended
    to the image as its guide does) skip the convolutions and join the flattened features
    before the linear layer.

    :param image_shape: ``(height, width)``.
    :param channels: output channels of the convolutions, e.g. ``(32, 64)``.
    :param int out_dim: width of the output features.
    :param str activation: a key of :data:`pvae.nn.ACTIVATIONS`, after every convolution.
    :param int extra_dim: width of the non-image inputs after the pixels (0: none).
    :raises ValueError: bad ``image_shape``, ``channels``, ``extra_dim`` or activation.
    """

    def __init__(self, image_shape: Sequence[int], channels: Sequence[int], out_dim: int,
                 activation: str = "relu", extra_dim: int = 0):
        super().__init__()
        activation_layer(activation)  # checked before any layer is built
        self.image_shape = _check_image_shape(image_shape)
        self.extra_dim = check_count("extra_dim", extra_dim, 0)
        channels = check_sizes("channels", channels)
        layers, c_in = [], 1
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), activation_layer(activation)]
            c_in = c
        self.convs = nn.Sequential(*layers)
        h, w = conv_sizes(self.image_shape, len(channels))[-1]
        self.linear = nn.Linear(c_in * h * w + self.extra_dim, check_count("out_dim", out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = self.image_shape[0] * self.image_shape[1]
        if x.shape[-1] != pixels + self.extra_dim:
            raise ValueError(f"ConvEncoder takes {pixels} pixels of a {self.image_shape} image"
                             + (f" and {self.extra_dim} extra inputs" if self.extra_dim else "")
                             + f" per row, got rows of {x.shape[-1]}")
        flat, lead = _flat_batch(x, 1)
        h = self.convs(flat[:, :pixels].reshape(-1, 1, *self.image_shape)).flatten(1)
        if self.extra_dim:
            h = torch.cat([h, flat[:, pixels:]], -1)
        return self.linear(h).reshape(*lead, -1)


class ConvDecoder(nn.Module):
    """Transposed-convolution network of p(x | z): ``(..., in_dim) -> (..., out_channels * H * W)``.

    A linear layer and activation map the input to the feature maps of the smallest
    resolution, ``channels[-1]`` of them; stride-2 transposed convolutions (kernel 3, padding
    1, output padding chosen so that every layer undoes one encoder halving exactly) bring them
    back to ``(out_channels, H, W)``, flattened channel-major: the likelihood's parameters
    ``[channel 0 pixels, channel 1 pixels, ...]`` (e.g. a Gaussian's loc then scale).

    :param int in_dim: width of the input (``latent_dim``, plus ``c`` for conditional models).
    :param image_shape: ``(height, width)``.
    :param channels: the encoder's convolution channels, e.g. ``(32, 64)``; the decoder runs
        them in reverse.
    :param int out_channels: likelihood parameters per pixel.
    :param str activation: after every layer but the last.
    :raises ValueError: bad sizes or activation.
    """

    def __init__(self, in_dim: int, image_shape: Sequence[int], channels: Sequence[int],
                 out_channels: int = 1, activation: str = "relu"):
        super().__init__()
        activation_layer(activation)  # checked before any layer is built
        self.image_shape = _check_image_shape(image_shape)
        channels = check_sizes("channels", channels)
        sizes = conv_sizes(self.image_shape, len(channels))
        self.start = (channels[-1], *sizes[-1])
        self.linear = nn.Sequential(
            nn.Linear(check_count("in_dim", in_dim), channels[-1] * sizes[-1][0] * sizes[-1][1]),
            activation_layer(activation))
        outs = (*channels[::-1][1:], check_count("out_channels", out_channels))
        layers, c_in = [], channels[-1]
        for i, c in enumerate(outs):
            (h_in, w_in), (h, w) = sizes[-1 - i], sizes[-2 - i]
            layers.append(nn.ConvTranspose2d(c_in, c, 3, stride=2, padding=1,
                                             output_padding=(h - 2 * h_in + 1, w - 2 * w_in + 1)))
            if i < len(outs) - 1:
                layers.append(activation_layer(activation))
            c_in = c
        self.deconvs = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat, lead = _flat_batch(z, 1)
        h = self.linear(flat).reshape(-1, *self.start)
        return self.deconvs(h).flatten(1).reshape(*lead, -1)
