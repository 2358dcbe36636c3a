r"""Probabilistic PCA: the latent-variable model whose posterior and marginal likelihood are
known exactly (Tipping & Bishop 1999; Bishop, PRML §12.2).

    z ~ N(0, I_q),   x | z ~ N(W z + mu, sigma^2 I_D)
    p(z | x) = N(M^-1 W^T (x - mu), sigma^2 M^-1),   M = W^T W + sigma^2 I_q
    p(x)     = N(mu, W W^T + sigma^2 I_D)
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from pvae.contract import inputs_trusted
from pvae.models.base import LatentVariableModel
from pvae.validation import check_choice, check_count

__all__ = ["PPCA"]

GUIDES = ("full", "diagonal")


def _check_finite(x, what="x"):
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or inf values; drop or impute them first")


class PPCA(LatentVariableModel):
    r"""Probabilistic PCA as a Pyro model with a linear amortized guide.

    Generative story and guide::

        z ~ N(0, I_latent_dim)                          site "z"
        x | z ~ N(W z + mu, sigma^2 I_x_dim)            site "x" (observed)
        q(z | x) = N(A x + b, Sigma_q)                  Sigma_q = L L^T (full) or diagonal

    inside ``pyro.plate("data", batch, dim=-1)``. With ``guide="full"`` the guide family
    contains the exact posterior (Bishop & Bishop, Deep Learning, exercise 19.3), so SVI can
    reach the maximum-likelihood solution; ``guide="diagonal"`` is the mean-field family.

    :param int x_dim: data dimension D.
    :param int latent_dim: q, with ``1 <= q < D``.
    :param str guide: ``"full"`` (Cholesky-factor covariance) or ``"diagonal"``.
    :raises ValueError: ``latent_dim`` outside ``[1, x_dim)`` or unknown guide.

    Parameters: ``W`` ``(D, q)``, ``mu`` ``(D,)``, ``log_sigma`` ``()``; guide ``A`` ``(q, D)``,
    ``b`` ``(q,)`` and ``scale_tril_raw`` ``(q, q)`` (full) or ``log_scale`` ``(q,)``.
    """

    def __init__(self, x_dim: int, latent_dim: int, guide: str = "full"):
        super().__init__()
        x_dim, latent_dim = check_count("x_dim", x_dim, 2), check_count("latent_dim", latent_dim, 0)
        if not 1 <= latent_dim < x_dim:
            raise ValueError(f"PPCA needs 1 <= latent_dim < x_dim, got latent_dim={latent_dim!r}, "
                             f"x_dim={x_dim!r}")
        check_choice("guide", guide, GUIDES)
        self.x_dim, self.latent_dim, self.guide_type = x_dim, latent_dim, guide
        q, D = latent_dim, x_dim
        self.W = nn.Parameter(torch.randn(D, q) / math.sqrt(D))
        self.mu = nn.Parameter(torch.zeros(D))
        self.log_sigma = nn.Parameter(torch.zeros(()))
        self.A = nn.Parameter(torch.zeros(q, D))
        self.b = nn.Parameter(torch.zeros(q))
        if guide == "full":
            self.scale_tril_raw = nn.Parameter(torch.zeros(q, q))
        else:
            self.log_scale = nn.Parameter(torch.zeros(q))

    # -- parameters ---------------------------------------------------------------------------

    @property
    def sigma2(self) -> torch.Tensor:
        """Observation noise variance sigma^2 (scalar tensor)."""
        return torch.exp(2 * self.log_sigma)

    def guide_scale_tril(self) -> torch.Tensor:
        """Cholesky factor of the guide covariance Sigma_q, ``(q, q)``."""
        if self.guide_type == "diagonal":
            return torch.diag(self.log_scale.exp())
        raw = self.scale_tril_raw
        return raw.tril(-1) + torch.diag(F.softplus(raw.diagonal()) / math.log(2) + 1e-6)

    def _M(self) -> torch.Tensor:
        q = self.latent_dim
        return self.W.T @ self.W + self.sigma2 * torch.eye(q, dtype=self.W.dtype,
                                                           device=self.W.device)

    # -- Pyro programs -------------------------------------------------------------------------

    def model(self, x: torch.Tensor, c=None) -> None:
        """p(z) p(x | z); ``x``: ``(batch, x_dim)``."""
        self._register()
        x = self._check_x(x)
        if c is not None:
            raise ValueError("PPCA is unconditional and takes c=None")
        if not inputs_trusted():
            _check_finite(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            loc = x.new_zeros(x.shape[0], self.latent_dim)
            z = pyro.sample("z", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
            loc = z @ self.W.T + self.mu
            pyro.sample("x", dist.Normal(loc, self.log_sigma.exp()).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, c=None) -> None:
        """q(z | x) = N(A x + b, Sigma_q)."""
        self._register()
        x = self._check_x(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", self.guide_distribution(x))

    def guide_distribution(self, x: torch.Tensor):
        """q(z | x) as a distribution with batch shape ``(N,)`` and event shape ``(q,)``."""
        loc = x @ self.A.T + self.b
        if self.guide_type == "diagonal":
            return dist.Normal(loc, self.log_scale.exp()).to_event(1)
        return dist.MultivariateNormal(loc, scale_tril=self.guide_scale_tril())

    # -- exact inference -----------------------------------------------------------------------

    def exact_posterior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        """p(z | x) = N(M^-1 W^T (x - mu), sigma^2 M^-1) (PRML eq. 12.42), batch shape ``(N,)``.

        :param torch.Tensor x: ``(N, x_dim)``.
        """
        x = self._check_x(x)
        M = self._M()
        L = torch.linalg.cholesky(M)
        loc = torch.cholesky_solve(((x - self.mu) @ self.W).T, L).T
        cov = self.sigma2 * torch.cholesky_inverse(L)
        return dist.MultivariateNormal(loc, covariance_matrix=cov)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) = log N(x; mu, W W^T + sigma^2 I), ``(N,)`` nats, in O(N D q + q^3):
        the Woodbury identity C^-1 = (I - W M^-1 W^T) / sigma^2 and the matrix determinant
        lemma log|C| = (D - q) log sigma^2 + log|M|; no D x D matrix is formed.

        :param torch.Tensor x: ``(N, x_dim)``.
        :raises ValueError: wrong width or NaN data.
        """
        x = self._check_x(x)
        _check_finite(x)
        D, q = self.x_dim, self.latent_dim
        sigma2 = self.sigma2
        L = torch.linalg.cholesky(self._M())
        r = x - self.mu
        proj = torch.linalg.solve_triangular(L, (r @ self.W).T, upper=False)  # (q, N)
        quad = ((r * r).sum(-1) - (proj * proj).sum(0)) / sigma2
        logdet = (D - q) * torch.log(sigma2) + 2 * torch.log(torch.diagonal(L)).sum()
        return -0.5 * (D * math.log(2 * math.pi) + logdet + quad)

    def mean_field_kl_floor(self) -> torch.Tensor:
        """The smallest KL(q || p(z | x)) a diagonal Gaussian q can reach, nats (the same for
        every x): the mean-field optimum keeps the exact mean and takes precisions equal to the
        diagonal of the exact precision M / sigma^2, giving ``0.5 (sum_i log M_ii - log|M|)``
        (Bishop, PRML §10.1.2)."""
        M = self._M()
        return 0.5 * (torch.log(torch.diagonal(M)).sum() - torch.logdet(M))

    # -- closed-form maximum likelihood --------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def closed_form(cls, x: torch.Tensor, latent_dim: int, guide: str = "full",
                    ddof: int = 0) -> PPCA:
        """The maximum-likelihood PPCA of Tipping & Bishop (1999), eqs. (7)-(8): mu = sample
        mean, sigma^2 = mean of the discarded eigenvalues of the sample covariance,
        W = U_q (Lambda_q - sigma^2 I)^{1/2}; its guide is set to the exact posterior (or, for
        ``guide="diagonal"``, to the mean-field optimum).

        :param torch.Tensor x: ``(N, D)`` data; the result has its dtype and device.
        :param int latent_dim: q.
        :param int ddof: 0 for the ML covariance (divide by N); 1 divides by N - 1 as
            scikit-learn's ``PCA`` does.
        :raises ValueError: NaN data, fewer datapoints than ``latent_dim + 1``, or a bad
            ``latent_dim``.
        """
        if x.dim() != 2:
            raise ValueError(f"x must have shape (N, D), got {tuple(x.shape)}")
        N, D = x.shape
        model = cls(D, latent_dim, guide).to(device=x.device, dtype=x.dtype)
        _check_finite(x)
        if N <= latent_dim:
            raise ValueError(f"PPCA.closed_form needs more datapoints than latent dims, got "
                             f"N={N} <= latent_dim={latent_dim}")
        x64 = x.double()
        mu = x64.mean(0)
        xc = x64 - mu
        cov = xc.T @ xc / (N - ddof)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        q = latent_dim
        sigma2 = evals[q:].mean().clamp_min(torch.finfo(x.dtype).tiny)
        W = evecs[:, :q] * (evals[:q] - sigma2).clamp_min(0).sqrt()
        model.W.copy_(W)
        model.mu.copy_(mu)
        model.log_sigma.copy_(0.5 * sigma2.log())
        model.set_guide_to_optimum()
        return model

    @torch.no_grad()
    def set_guide_to_optimum(self) -> None:
        """Set the guide to the best member of its family for the current W, mu, sigma: the
        exact posterior (full) or the mean-field optimum (diagonal)."""
        M = self._M()
        A = torch.linalg.solve(M, self.W.T)  # M^-1 W^T
        self.A.copy_(A)
        self.b.copy_(-A @ self.mu)
        if self.guide_type == "full":
            L = torch.linalg.cholesky(self.sigma2 * torch.linalg.inv(M))
            raw_diag = torch.log(torch.expm1(L.diagonal().clamp_min(1e-6) * math.log(2)))
            self.scale_tril_raw.copy_(L.tril(-1) + torch.diag(raw_diag))
        else:
            self.log_scale.copy_(0.5 * (self.sigma2 / M.diagonal()).log())

    # -- conveniences --------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, x, c=None):
        """``loc, scale`` of q(z | x): ``(N, q)`` each (scale: marginal standard deviations)."""
        qd = self.guide_distribution(self._check_x(self._place(x)))
        return qd.mean, qd.variance.sqrt()

    @torch.no_grad()
    def decode(self, z, c=None):
        """E[x | z] = W z + mu: ``(N, q) -> (N, D)``."""
        return self._place(z) @ self.W.T + self.mu

    @torch.no_grad()
    def reconstruct(self, x, c=None):
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def sample(self, num_samples, c=None, generator=None):
        """E[x | z] for z from the prior: ``(num_samples, D)``."""
        z = torch.randn(num_samples, self.latent_dim, device=self.device, dtype=self.dtype,
                        generator=generator)
        return self.decode(z)
