"""The variational autoencoder as a Pyro model and amortized guide."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch

from pvae.contract import inputs_trusted
from pvae.models.base import LatentVariableModel, gaussian_guide, marginal_scale
from pvae.models.likelihoods import make_likelihood
from pvae.nn import (
    COVARIANCES,
    MLP,
    ConvDecoder,
    ConvEncoder,
    GaussianEncoder,
    activation_layer,
)
from pvae.validation import check_choice, check_count, check_sizes

__all__ = ["NETWORKS", "VAE", "build_networks"]

#: Network families of the VAEs (``network=``, ``--network``).
NETWORKS = ("mlp", "conv")


def build_networks(x_dim: int, latent_dim: int, hidden_dims, likelihood, activation: str,
                   guide: str = "diagonal", network: str = "mlp", image_shape=None,
                   channels=(32, 64), c_width: int = 0):
    """The encoder q(z | x) (a :class:`pvae.nn.GaussianEncoder`) and decoder p(x | z) (the
    likelihood's parameters) of a VAE; with ``c_width``, those of a conditional VAE,
    q(z | x, c) on ``[x, c]`` and p(x | z, c) on ``[z, c]`` (``c`` embedded, ``c_width`` wide).

    ``network="mlp"``: MLPs with ``hidden_dims``, the decoder mirroring them. ``"conv"``:
    :class:`pvae.nn.ConvEncoder` with ``channels`` then a dense layer of ``hidden_dims[-1]``
    (``c`` joins the convolutions' features there), and :class:`pvae.nn.ConvDecoder` mirroring
    it, for images of ``image_shape`` kept flat (``x_dim == height * width``).

    ``network`` may also be a pair ``(encoder, decoder)`` of your own modules: ``encoder(x)``
    returns ``loc, scale`` (``(..., latent_dim)`` each, or a Cholesky factor
    ``(..., latent_dim, latent_dim)``: e.g. a :class:`pvae.nn.GaussianEncoder` with any
    ``trunk``) and ``decoder(z)`` the likelihood's parameters ``(..., likelihood.param_dim(x_dim))``.

    :raises ValueError: unknown ``guide`` / ``network``; ``"conv"`` without an
        ``image_shape`` matching ``x_dim``, or without ``hidden_dims``.
    :raises TypeError: a ``network`` pair that is not two :class:`torch.nn.Module`.
    """
    check_choice("guide", guide, COVARIANCES)
    if isinstance(network, (tuple, list)) and len(network) == 2 and not isinstance(network[0], str):
        if not all(isinstance(m, torch.nn.Module) for m in network):
            raise TypeError("network must be 'mlp', 'conv' or a pair (encoder, decoder) of "
                            f"torch.nn.Module, got {[type(m).__name__ for m in network]}")
        return tuple(network)
    check_choice("network", network, NETWORKS)
    out_dim = likelihood.param_dim(x_dim)
    if network == "mlp":
        return (GaussianEncoder(x_dim + c_width, hidden_dims, latent_dim, activation,
                                covariance=guide),
                MLP(latent_dim + c_width, hidden_dims[::-1], out_dim, activation))
    if image_shape is None:
        raise ValueError("network='conv' needs image_shape=(height, width) of the flattened "
                         "images (--network conv takes it from the dataset)")
    image_shape = check_sizes("image_shape", image_shape)
    if len(image_shape) != 2 or image_shape[0] * image_shape[1] != x_dim:
        raise ValueError(f"image_shape {image_shape} does not hold x_dim={x_dim} pixels; give "
                         "the (height, width) of the flattened one-channel images")
    if not hidden_dims:
        raise ValueError("network='conv' needs hidden_dims: the width of the dense layer after "
                         "the convolutions")
    trunk = ConvEncoder(image_shape, channels, hidden_dims[-1], activation, extra_dim=c_width)
    encoder = GaussianEncoder(x_dim + c_width, hidden_dims[-1:], latent_dim, activation,
                              covariance=guide, trunk=trunk)
    decoder = torch.nn.Sequential(
        MLP(latent_dim + c_width, (), hidden_dims[-1]), activation_layer(activation),
        ConvDecoder(hidden_dims[-1], image_shape, channels, out_dim // x_dim, activation))
    return encoder, decoder


class VAE(LatentVariableModel):
    r"""Variational autoencoder (Kingma & Welling 2014; Rezende, Mohamed & Wierstra 2014).

    Generative story and guide::

        z ~ N(0, I_latent_dim)                      site "z"
        x | z ~ likelihood(f_theta(z))              site "x"   (observed)
        q(z | x) = N(loc_phi(x), diag(scale_phi(x)^2))        guide="diagonal"
                or N(loc_phi(x), L_phi(x) L_phi(x)^T)          guide="full"

    all inside ``pyro.plate("data", batch, dim=-1)``.

    :param int x_dim: data dimension D (784 for 28x28 images).
    :param int latent_dim: dimension of z.
    :param hidden_dims: hidden widths of the encoder; the decoder mirrors them.
    :param str likelihood: ``bernoulli`` (binary data), ``continuous-bernoulli`` ([0, 1]
        intensities), ``gaussian`` or ``laplace`` (real data).
    :param likelihood_scale: ``"learned"`` (per pixel), ``"decoder"`` (an output of the decoder
        per pixel and datapoint, bounded below by
        :data:`pvae.models.likelihoods.MIN_DECODER_SCALE`) or a fixed float, for
        ``gaussian``/``laplace``.
    :param str activation: hidden activation (``relu``, ``tanh``, ...).
    :param str guide: ``"diagonal"`` or ``"full"`` covariance of q(z | x) (a lower-triangular
        ``scale_tril`` with a softplus diagonal, see :class:`pvae.nn.GaussianEncoder`; its KL to
        the prior is known in closed form, so ``analytic_kl=True`` applies).
    :param network: ``"mlp"``, ``"conv"`` (strided convolutions and transposed
        convolutions, :class:`pvae.nn.ConvEncoder` / :class:`pvae.nn.ConvDecoder`, followed and
        preceded by a dense layer of ``hidden_dims[-1]``), or a pair ``(encoder, decoder)`` of
        your own modules (see :func:`build_networks`; ``hidden_dims``, ``activation`` and
        ``guide`` then do not apply, and :attr:`config` holds the modules, so such a model is
        saved by its ``state_dict`` and rebuilt by your code, not from a run folder).
    :param image_shape: ``(height, width)`` of the flattened images, for ``network="conv"``.
    :param channels: convolution channels, for ``network="conv"``.
    :raises ValueError: bad sizes, unknown likelihood / guide / network, ``"conv"`` without a
        matching ``image_shape``.

    Sites: ``"z"`` (latent, shape ``(batch, latent_dim)``), ``"x"`` (observed,
    ``(batch, x_dim)``); plate ``"data"``.

    >>> import torch
    >>> vae = VAE(x_dim=64, latent_dim=2, hidden_dims=(32,))
    >>> vae.sample(5).shape
    torch.Size([5, 64])
    """

    def __init__(self, x_dim: int, latent_dim: int, hidden_dims: Sequence[int] = (400,),
                 likelihood: str = "bernoulli", likelihood_scale: float | str = "learned",
                 activation: str = "relu", guide: str = "diagonal", network: str = "mlp",
                 image_shape: Sequence[int] | None = None, channels: Sequence[int] = (32, 64)):
        super().__init__()
        self.x_dim, self.latent_dim = check_count("x_dim", x_dim), check_count("latent_dim",
                                                                                latent_dim)
        self.hidden_dims = check_sizes("hidden_dims", hidden_dims)
        self.likelihood = make_likelihood(likelihood, x_dim, likelihood_scale)
        #: q(z | x) and p(x | z) (the likelihood's parameters as a function of z)
        self.encoder, self.decoder = build_networks(
            x_dim, latent_dim, self.hidden_dims, self.likelihood, activation, guide, network,
            image_shape, channels)

    # -- Pyro programs -------------------------------------------------------------------------

    def model(self, x: torch.Tensor, c=None) -> None:
        """p(z) p(x | z). ``x``: ``(batch, x_dim)``; ``c`` must be ``None``."""
        self._register()
        x = self._check_x(x)
        self._check_c(c)
        if not inputs_trusted():
            self.likelihood.check(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            loc = x.new_zeros(x.shape[0], self.latent_dim)
            z = pyro.sample("z", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor, c=None) -> None:
        """q(z | x). ``x``: ``(batch, x_dim)``."""
        self._register()
        x = self._check_x(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", gaussian_guide(*self.encoder(x)))

    def _check_c(self, c) -> None:
        if c is not None:
            raise ValueError("VAE is unconditional and takes c=None; use pvae.models.CVAE to "
                             "condition on c")

    def _loc_scale(self, x):
        loc, scale = self.encoder(x)
        return loc, marginal_scale(loc, scale)

    # -- conveniences --------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, x: torch.Tensor, c=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``loc, scale`` of q(z | x), each ``(batch, latent_dim)``, on the model's device
        (``x`` may be anywhere); ``scale`` holds the marginal standard deviations for
        ``guide="full"``."""
        self._check_c(c)
        return self._loc_scale(self._check_x(self._place(x)))

    @torch.no_grad()
    def decode(self, z: torch.Tensor, c=None) -> torch.Tensor:
        """E[x | z] under the likelihood: ``(batch, latent_dim) -> (batch, x_dim)``."""
        self._check_c(c)
        return self.likelihood.mean(self.decoder(self._place(z)))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, c=None) -> torch.Tensor:
        """E[x | z = E_q[z | x]]: ``(batch, x_dim) -> (batch, x_dim)``."""
        return self.decode(self.encode(x, c)[0], c)

    @torch.no_grad()
    def sample(self, num_samples: int, c=None, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """Draw z from the prior and return E[x | z]: shape ``(num_samples, x_dim)``."""
        z = torch.randn(num_samples, self.latent_dim, device=self.device, dtype=self.dtype,
                        generator=generator)
        return self.decode(z, c)
