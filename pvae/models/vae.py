"""The variational autoencoder as a Pyro model and amortized guide."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch

from pvae.contract import inputs_trusted
from pvae.distributions import ReparamNormal
from pvae.models.base import LatentVariableModel
from pvae.models.likelihoods import make_likelihood
from pvae.nn import MLP, GaussianEncoder
from pvae.validation import check_count, check_sizes

__all__ = ["VAE"]


class VAE(LatentVariableModel):
    r"""Variational autoencoder (Kingma & Welling 2014; Rezende, Mohamed & Wierstra 2014).

    Generative story and guide::

        z ~ N(0, I_latent_dim)                      site "z"
        x | z ~ likelihood(f_theta(z))              site "x"   (observed)
        q(z | x) = N(loc_phi(x), diag(scale_phi(x)^2))

    all inside ``pyro.plate("data", batch, dim=-1)``.

    :param int x_dim: data dimension D (784 for 28x28 images).
    :param int latent_dim: dimension of z.
    :param hidden_dims: hidden widths of the encoder; the decoder mirrors them.
    :param str likelihood: ``bernoulli`` (binary data), ``continuous-bernoulli`` ([0, 1]
        intensities), ``gaussian`` or ``laplace`` (real data).
    :param likelihood_scale: ``"learned"`` (per pixel) or a fixed float, for
        ``gaussian``/``laplace``.
    :param str activation: hidden activation (``relu``, ``tanh``, ...).

    Sites: ``"z"`` (latent, shape ``(batch, latent_dim)``), ``"x"`` (observed,
    ``(batch, x_dim)``); plate ``"data"``.

    >>> import torch
    >>> vae = VAE(x_dim=64, latent_dim=2, hidden_dims=(32,))
    >>> vae.sample(5).shape
    torch.Size([5, 64])
    """

    def __init__(self, x_dim: int, latent_dim: int, hidden_dims: Sequence[int] = (400,),
                 likelihood: str = "bernoulli", likelihood_scale: float | str = "learned",
                 activation: str = "relu"):
        super().__init__()
        self.x_dim, self.latent_dim = check_count("x_dim", x_dim), check_count("latent_dim",
                                                                                latent_dim)
        self.hidden_dims = check_sizes("hidden_dims", hidden_dims)
        self.likelihood = make_likelihood(likelihood, x_dim, likelihood_scale)
        #: q(z | x)
        self.encoder = GaussianEncoder(x_dim, self.hidden_dims, latent_dim, activation)
        #: p(x | z): the likelihood's parameters as a function of z
        self.decoder = MLP(latent_dim, self.hidden_dims[::-1],
                           self.likelihood.param_dim(x_dim), activation)

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
            loc, scale = self.encoder(x)
            pyro.sample("z", ReparamNormal(loc, scale).to_event(1))

    def _check_c(self, c) -> None:
        if c is not None:
            raise ValueError("VAE is unconditional and takes c=None; use pvae.models.CVAE to "
                             "condition on c")

    def imputation_parts(self, c, like: torch.Tensor):
        """The pieces :func:`pvae.inference.impute` needs, for a batch like ``like``
        ``(batch, x_dim)``: ``(prior_loc, prior_scale, decode, guide)`` with the prior's
        ``(batch, latent_dim)`` parameters, ``decode(z)`` the likelihood's parameters for z
        ``(..., batch, latent_dim)``, and ``guide(x)`` the guide's ``loc, scale`` for a filled-in
        ``x`` ``(batch, x_dim)``."""
        self._check_c(c)
        zeros = like.new_zeros(like.shape[0], self.latent_dim)
        return zeros, zeros + 1.0, self.decoder, self.encoder

    # -- conveniences --------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, x: torch.Tensor, c=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``loc, scale`` of q(z | x), each ``(batch, latent_dim)``, on the model's device
        (``x`` may be anywhere)."""
        self._check_c(c)
        return self.encoder(self._check_x(self._place(x)))

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
