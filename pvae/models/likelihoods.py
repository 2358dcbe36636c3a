"""Observation models p(x | z): map a decoder's output to a distribution over ``x``.

Each likelihood is a small :class:`torch.nn.Module` (so a learned scale moves with ``.to()``
and is saved in ``state_dict``) with

- ``param_dim(x_dim)``: the decoder output width it needs;
- ``forward(out)``: a Pyro distribution with event shape ``(x_dim,)``;
- ``mean(out)``: E[x | z], for reconstructions and samples shown as images;
- ``check(x)``: raises :class:`ValueError` if ``x`` lies outside the support.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from pvae.distributions import IndependentBernoulli

__all__ = ["LIKELIHOODS", "MIN_DECODER_SCALE", "Bernoulli", "ContinuousBernoulli", "Gaussian",
           "Laplace", "make_likelihood"]


def _check_finite(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf values; drop or impute them before fitting "
                         "(pvae.inference.impute fills missing values of a trained model)")


class Bernoulli(nn.Module):
    """x_d | z ~ Bernoulli(sigmoid(f_d(z))), for binary data."""

    support = "binary {0, 1}"

    def param_dim(self, x_dim):
        return x_dim

    def forward(self, out):
        return IndependentBernoulli(out)

    def mean(self, out):
        return torch.sigmoid(out)

    def check(self, x):
        _check_finite(x)
        if not ((x == 0) | (x == 1)).all():
            raise ValueError(
                "the bernoulli likelihood needs binary data (0 or 1), but x has values in "
                f"[{x.min().item():.3g}, {x.max().item():.3g}] that are not all 0/1; binarize "
                "the data (binarize='static' or 'dynamic', --binarize) or pick a likelihood for "
                "continuous data (continuous-bernoulli, gaussian, laplace)")


class ContinuousBernoulli(nn.Module):
    """x_d | z ~ ContinuousBernoulli(sigmoid(f_d(z))), for intensities in [0, 1].

    The normalized Bernoulli density of Loaiza-Ganem & Cunningham (2019), "The continuous
    Bernoulli: fixing a pervasive error in variational autoencoders", eq. (7).
    """

    support = "[0, 1]"

    def param_dim(self, x_dim):
        return x_dim

    def forward(self, out):
        return dist.ContinuousBernoulli(logits=out, validate_args=False).to_event(1)

    def mean(self, out):
        return dist.ContinuousBernoulli(logits=out, validate_args=False).mean

    def check(self, x):
        _check_finite(x)
        if (x < 0).any() or (x > 1).any():
            raise ValueError(
                "the continuous-bernoulli likelihood needs data in [0, 1], but x has values in "
                f"[{x.min().item():.3g}, {x.max().item():.3g}]; rescale the data or use the "
                "gaussian or laplace likelihood")


#: Lower bound of a scale that the decoder outputs (``likelihood_scale="decoder"``), in the
#: data's units. Without one, a decoder can shrink the scale of a pixel that it predicts
#: exactly (a constant background, a value repeated across the data) towards zero and send the
#: likelihood to infinity: the Gaussian density is unbounded (Mattei & Frellsen 2018,
#: "Leveraging the Exact Likelihood of Deep Latent Variable Models", NeurIPS, §2.2). With the
#: bound, each pixel adds at most ``-log(MIN_DECODER_SCALE) - log(2 pi) / 2`` = 5.99 nats
#: (Gaussian); for [0, 1] intensities quantized to 256 levels and dequantized with uniform
#: noise, the noise's own standard deviation, 1 / (256 sqrt(12)) = 1.1e-3, is of that order.
MIN_DECODER_SCALE = 1e-3


class _LocScale(nn.Module):
    """Location-scale likelihood with a fixed scale, a learned per-dimension scale, or a scale
    that the decoder outputs per dimension and datapoint (``"decoder"``: the decoder then has
    ``2 * x_dim`` outputs, locations first, and the scale is
    ``MIN_DECODER_SCALE + softplus(raw)``)."""

    support = "real numbers"
    family = None

    def __init__(self, x_dim: int, scale: float | str = "learned"):
        super().__init__()
        self.decoder_scale = scale == "decoder"
        if scale == "learned":
            self.log_scale = nn.Parameter(torch.zeros(x_dim))
        elif not self.decoder_scale:
            try:
                scale = float(scale)
            except (TypeError, ValueError):
                scale = float("nan")
            if not scale > 0:
                raise ValueError(f"Expected a likelihood scale > 0, 'learned' or 'decoder', got "
                                 f"{scale}")
            self.register_buffer("log_scale", torch.full((x_dim,), float(torch.tensor(scale).log())))

    def param_dim(self, x_dim):
        return 2 * x_dim if self.decoder_scale else x_dim

    def loc_scale(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``loc, scale`` ``(..., x_dim)`` for the decoder output ``out``."""
        if self.decoder_scale:
            loc, raw = out.chunk(2, dim=-1)
            return loc, torch.nn.functional.softplus(raw) + MIN_DECODER_SCALE
        return out, self.log_scale.exp()

    def forward(self, out):
        return self.family(*self.loc_scale(out), validate_args=False).to_event(1)

    def mean(self, out):
        return self.loc_scale(out)[0]

    def check(self, x):
        _check_finite(x)


class Gaussian(_LocScale):
    """x_d | z ~ Normal(f_d(z), sigma_d^2), sigma fixed, learned per pixel, or an output of the
    decoder per pixel and datapoint, sigma_d(z) >= :data:`MIN_DECODER_SCALE` (the Gaussian
    decoder "with outputs representing the variance" of Kingma & Welling 2014, appendix C.2)."""

    family = dist.Normal


class Laplace(_LocScale):
    """x_d | z ~ Laplace(f_d(z), b_d), b fixed, learned per pixel or output by the decoder."""

    family = dist.Laplace


#: Likelihoods by the name used in model constructors and on the command line.
LIKELIHOODS = {
    "bernoulli": Bernoulli,
    "continuous-bernoulli": ContinuousBernoulli,
    "gaussian": Gaussian,
    "laplace": Laplace,
}


def make_likelihood(name: str, x_dim: int, scale: float | str = "learned") -> nn.Module:
    """Build a likelihood from its registry name.

    :param str name: a key of :data:`LIKELIHOODS`.
    :param int x_dim: data dimension D.
    :param scale: for ``gaussian``/``laplace``: ``"learned"`` (per pixel), ``"decoder"`` (an
        output of the decoder per pixel and datapoint, at least :data:`MIN_DECODER_SCALE`) or a
        fixed float.
    :raises ValueError: unknown name.
    """
    if name not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name!r}; choose one of {sorted(LIKELIHOODS)}")
    cls = LIKELIHOODS[name]
    return cls(x_dim, scale) if issubclass(cls, _LocScale) else cls()

