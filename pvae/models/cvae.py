"""The conditional VAE p(z | c) p(x | z, c) with guide q(z | x, c)."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch

from pvae.contract import inputs_trusted
from pvae.models.base import LatentVariableModel, gaussian_guide, marginal_scale
from pvae.models.likelihoods import make_likelihood
from pvae.models.vae import build_networks
from pvae.nn import GaussianEncoder
from pvae.validation import check_choice, check_count, check_sizes

__all__ = ["CVAE"]

PRIORS = ("standard", "learned")


class CVAE(LatentVariableModel):
    r"""Conditional variational autoencoder (Sohn, Lee & Yan 2015; Bishop & Bishop, Deep
    Learning, §19.2), with a standard or a learned class-conditional prior.

    Generative story and guide::

        z | c ~ N(0, I)  or  N(loc(c), diag(scale(c)^2))     site "z"
        x | z, c ~ likelihood(f_theta(z, c))                  site "x" (observed)
        q(z | x, c) = N(loc_phi(x, c), diag(scale_phi(x, c)^2))      guide="diagonal"
                   or N(loc_phi(x, c), L_phi(x, c) L_phi(x, c)^T)     guide="full"

    inside ``pyro.plate("data", batch, dim=-1)``.

    :param int x_dim: data dimension D.
    :param int latent_dim: dimension of z.
    :param int num_classes: ``c`` is an int64 class label ``(batch,)`` in ``[0, num_classes)``,
        one-hot encoded inside; or
    :param int c_dim: ``c`` is a real conditioning vector ``(batch, c_dim)`` (e.g. the observed
        part of an image, for structured output prediction). Give exactly one of the two.
    :param hidden_dims: hidden widths of the encoder; the decoder mirrors them and the learned
        prior network uses the last one.
    :param str likelihood: see :class:`pvae.models.VAE` (also ``likelihood_scale``).
    :param str guide: ``"diagonal"`` or ``"full"`` covariance of q(z | x, c), as for
        :class:`pvae.models.VAE`.
    :param str prior: ``"standard"`` (N(0, I), the usual CVAE) or ``"learned"`` (a network
        p(z | c)).
    :param network: ``"mlp"`` or ``"conv"`` (see :class:`pvae.models.VAE`: the encoder
        convolves the image ``x`` and appends ``c`` to its features; the decoder maps
        ``[z, c]`` through a dense layer to transposed convolutions), or a pair
        ``(encoder, decoder)`` on ``[x, c]`` and ``[z, c]`` (:func:`build_networks`).
    :param image_shape: ``(height, width)`` of ``x``, for ``network="conv"``.
    :param channels: convolution channels, for ``network="conv"``.
    :raises ValueError: both or neither of ``num_classes`` / ``c_dim``, unknown prior, guide or
        network, ``"conv"`` without an ``image_shape`` matching ``x_dim``.
    """

    def __init__(self, x_dim: int, latent_dim: int, *, num_classes: int | None = None,
                 c_dim: int | None = None, hidden_dims: Sequence[int] = (400,),
                 likelihood: str = "bernoulli", likelihood_scale: float | str = "learned",
                 activation: str = "relu", prior: str = "standard", guide: str = "diagonal",
                 network: str = "mlp", image_shape: Sequence[int] | None = None,
                 channels: Sequence[int] = (32, 64)):
        super().__init__()
        if (num_classes is None) == (c_dim is None):
            raise ValueError("give exactly one of num_classes (c is a class label) or c_dim "
                             "(c is a real vector)")
        x_dim, latent_dim = check_count("x_dim", x_dim), check_count("latent_dim", latent_dim)
        if num_classes is not None:
            width = num_classes = check_count("num_classes", num_classes)
        else:
            width = c_dim = check_count("c_dim", c_dim)
        self.prior_type = check_choice("prior", prior, PRIORS)
        self.x_dim, self.latent_dim = x_dim, latent_dim
        self.num_classes, self.c_dim, self.c_width = num_classes, c_dim, width
        self.hidden_dims = check_sizes("hidden_dims", hidden_dims)
        self.likelihood = make_likelihood(likelihood, x_dim, likelihood_scale)
        #: q(z | x, c) on [x, c] and p(x | z, c) on [z, c]
        self.encoder, self.decoder = build_networks(
            x_dim, latent_dim, self.hidden_dims, self.likelihood, activation, guide, network,
            image_shape, channels, c_width=width)
        #: p(z | c), for prior="learned"
        self.prior_net = (GaussianEncoder(width, self.hidden_dims[-1:], latent_dim, activation)
                          if prior == "learned" else None)

    # -- conditioning --------------------------------------------------------------------------

    def embed(self, c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``c`` as a float tensor ``(batch, c_width)`` with ``like``'s dtype and device
        (one-hot for class labels).

        :raises ValueError: ``c`` missing, of the wrong shape or width, labels out of range.
        :raises TypeError: ``c`` is not one tensor (e.g. several data arguments).
        """
        if c is None:
            raise ValueError("CVAE needs the conditioning c: class labels (batch,) or vectors "
                             f"(batch, {self.c_dim})")
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"CVAE takes one conditioning tensor c, got {c!r}: class labels "
                            f"(batch,) or vectors (batch, {self.c_dim})")
        if self.num_classes is not None:
            if c.is_floating_point() or c.dim() != 1:
                raise ValueError(f"c must be int64 class labels of shape (batch,), got dtype "
                                 f"{c.dtype} and shape {tuple(c.shape)}")
            if not inputs_trusted() and len(c) and (c.min() < 0 or c.max() >= self.num_classes):
                raise ValueError(f"class labels must lie in [0, {self.num_classes}), got values "
                                 f"in [{c.min().item()}, {c.max().item()}]")
            # one-hot by comparison: no host synchronization (F.one_hot checks the range)
            classes = torch.arange(self.num_classes, device=c.device)
            return (c.unsqueeze(-1) == classes).to(like)
        if c.dim() != 2 or c.shape[-1] != self.c_dim:
            raise ValueError(f"c must have shape (batch, {self.c_dim}), got {tuple(c.shape)}")
        return c.to(like)

    def check_data(self, x: torch.Tensor | None, c=None) -> None:
        """Check a whole dataset once (a training loop then trusts its batches): ``x`` inside
        the likelihood's support (unless ``None``: binarized on the fly), ``c`` of the right
        shape and, for labels, in range.

        :raises ValueError: what is wrong and how to fix it.
        """
        super().check_data(x, c)
        self.embed(c, torch.empty(0, device=c.device if c is not None else None))

    def prior(self, ce: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``loc, scale`` of p(z | c) for embedded ``ce`` ``(batch, c_width)``."""
        if self.prior_net is None:
            zeros = ce.new_zeros(ce.shape[:-1] + (self.latent_dim,))
            return zeros, zeros + 1.0
        return self.prior_net(ce)

    def _decode_out(self, z, ce):
        return self.decoder(torch.cat([z, ce.expand(*z.shape[:-1], ce.shape[-1])], -1))

    # -- Pyro programs -------------------------------------------------------------------------

    def model(self, x: torch.Tensor, c=None) -> None:
        """p(z | c) p(x | z, c). ``x``: ``(batch, x_dim)``; ``c``: ``(batch,)`` labels or
        ``(batch, c_dim)``."""
        self._register()
        x = self._check_x(x)
        ce = self.embed(c, x)
        if len(ce) != len(x):
            raise ValueError(f"c has {len(ce)} rows but x has {len(x)}")
        if not inputs_trusted():
            self.likelihood.check(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            loc, scale = self.prior(ce)
            z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
            pyro.sample("x", self.likelihood(self._decode_out(z, ce)), obs=x)

    def guide(self, x: torch.Tensor, c=None) -> None:
        """q(z | x, c)."""
        self._register()
        x = self._check_x(x)
        ce = self.embed(c, x)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", gaussian_guide(*self.encoder(torch.cat([x, ce], -1))))

    def _loc_scale(self, xc):
        loc, scale = self.encoder(xc)
        return loc, marginal_scale(loc, scale)

    # -- conveniences --------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, x, c=None):
        """``loc, scale`` of q(z | x, c), each ``(batch, latent_dim)``, on the model's device
        (marginal standard deviations for ``guide="full"``)."""
        x = self._check_x(self._place(x))
        return self._loc_scale(torch.cat([x, self.embed(c, x)], -1))

    @torch.no_grad()
    def decode(self, z, c=None):
        """E[x | z, c]: ``(batch, latent_dim) -> (batch, x_dim)``."""
        z = self._place(z)
        return self.likelihood.mean(self._decode_out(z, self.embed(c, z)))

    @torch.no_grad()
    def reconstruct(self, x, c=None):
        return self.decode(self.encode(x, c)[0], c)

    @torch.no_grad()
    def sample(self, num_samples: int, c=None, generator: torch.Generator | None = None,
               z: torch.Tensor | None = None) -> torch.Tensor:
        """E[x | z, c] for z ~ p(z | c) (or the given ``z``): ``(num_samples, x_dim)``. ``c`` is
        one label / vector for all samples, or one per sample."""
        if c is None:
            raise ValueError("CVAE.sample needs c (a label or conditioning vector)")
        c = torch.as_tensor(c, device=self.device)
        if self.num_classes is not None and c.dim() == 0:
            c = c.expand(num_samples)
        elif self.c_dim is not None and c.dim() == 1:
            c = c.expand(num_samples, -1)
        ce = self.embed(c, torch.empty(0, device=self.device, dtype=self.dtype))
        if z is None:
            loc, scale = self.prior(ce)
            eps = torch.randn(loc.shape, device=self.device, dtype=self.dtype,
                              generator=generator)
            z = loc + scale * eps
        return self.likelihood.mean(self._decode_out(z, ce))
