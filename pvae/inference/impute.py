r"""Filling in missing data with a trained VAE or CVAE.

For an image x with observed pixels o and missing pixels m, the posterior predictive of the
missing part is p(x_m | x_o) = E_{p(z | x_o)}[p(x_m | z)]. :func:`impute` estimates it by
self-normalized importance sampling over z with the likelihood of the **observed pixels only**
in the weights. The proposal is a defensive mixture (Hesterberg 1995) of the amortized guide,
fed the current fill of x, and the prior,

    pi(z) = (1 - a) q(z | x_fill) + a p(z),
    w_k ∝ p(x_o | z_k) p(z_k) / pi(z_k),

with a fixed share a of the samples drawn from each component and the mixture density in the
weights (the balance heuristic, Veach & Guibas 1995; Owen & Zhou 2000). The guide is trained
on complete images and is narrower than p(z | x_o) when much is missing; the prior part keeps
the estimate sound then (with nothing observed the weights are ~ uniform over prior draws).
Optionally a few refinements of the fill come first, in the spirit of the pseudo-Gibbs sampler
of Rezende, Mohamed & Wierstra (2014, §F): the current imputation is fed back to the guide,
which improves the proposal without changing what is estimated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributions import Normal

from pvae import stats
from pvae.contract import placement, to_placement
from pvae.inference.sizes import pass_rows
from pvae.validation import check_count, check_probability

__all__ = ["Imputation", "impute"]


@dataclass
class Imputation:
    """Result of :func:`impute`.

    :ivar torch.Tensor mean: ``(N, D)``: observed pixels as given, missing ones replaced by the
        posterior-mean imputation E[x_m | x_o].
    :ivar torch.Tensor samples: ``(num_draws, N, D)`` draws from p(x_m | x_o) (observed pixels
        kept).
    :ivar torch.Tensor ess: ``(N,)`` effective sample size of the importance weights.
    :ivar torch.Tensor log_evidence: ``(N,)`` estimate of log p(x_o) (or log p(x_o | c)).
    """

    mean: torch.Tensor
    samples: torch.Tensor
    ess: torch.Tensor
    log_evidence: torch.Tensor


@torch.no_grad()
def impute(model, x: torch.Tensor, mask: torch.Tensor, *, c=None, num_samples: int = 1000,
           num_draws: int = 10, num_gibbs: int = 0, prior_fraction: float = 0.5,
           chunk_size: int | None = None, generator: torch.Generator | None = None
           ) -> Imputation:
    """Fill in the missing entries of ``x`` (where ``mask`` is 0/False) with a trained VAE/CVAE.

    :param model: a model with ``likelihood`` (``likelihood(out)`` a distribution over x,
        ``likelihood.mean(out)``) and ``imputation_parts(c, like)`` giving the Gaussian prior's
        ``loc, scale``, ``decode(z)`` and the guide's ``guide(x) -> (loc, scale)``: the
        built-in :class:`pvae.models.VAE` and :class:`pvae.models.CVAE`.
    :param torch.Tensor x: ``(N, D)``; missing entries may hold anything, NaN included.
    :param torch.Tensor mask: ``(N, D)`` bool or 0/1: 1 = observed (may be all 0, e.g. for a
        structured-prediction CVAE whose ``c`` is the observed part).
    :param c: conditioning for a CVAE.
    :param int num_samples: importance samples of z per datapoint.
    :param int num_draws: posterior-predictive draws to return.
    :param int num_gibbs: pseudo-Gibbs refinements of the proposal's input before the final
        importance-sampling pass (0: the missing entries start at the mean of the observed ones).
    :param float prior_fraction: share ``a`` of the samples drawn from the prior p(z | c) in the
        defensive mixture proposal (0: the guide alone; 1: the prior alone).
    :param chunk_size: samples of z per pass (default: chosen for the device and ``N``, see
        :mod:`pvae.inference.sizes`).
    :returns: :class:`Imputation`.
    :raises ValueError: shapes disagree, non-binary mask, NaN in observed entries,
        ``prior_fraction`` outside [0, 1].
    :raises TypeError: the model does not offer ``imputation_parts`` and ``likelihood``.
    """
    for attr in ("imputation_parts", "likelihood"):
        if not hasattr(model, attr):
            raise TypeError(f"impute needs a model with a Gaussian latent and amortized guide "
                            f"(pvae.models.VAE or CVAE: {attr}); {type(model).__name__} has none")
    if x.shape != mask.shape or x.dim() != 2:
        raise ValueError(f"x and mask must both have shape (N, D), got {tuple(x.shape)} and "
                         f"{tuple(mask.shape)}")
    num_samples, num_draws = check_count("num_samples", num_samples), check_count("num_draws",
                                                                                  num_draws)
    num_gibbs = check_count("num_gibbs", num_gibbs, 0)
    prior_fraction = check_probability("prior_fraction", prior_fraction)
    if chunk_size is not None:
        check_count("chunk_size", chunk_size)
    device, dtype = placement(model, "auto", x)
    x, mask = to_placement(x, device, dtype), mask.to(device)
    if mask.dtype != torch.bool:
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must be boolean or 0/1 (1 = observed)")
        mask = mask.bool()
    x_obs = torch.where(mask, x, torch.zeros_like(x))
    if not torch.isfinite(x_obs).all():
        raise ValueError("observed entries of x (mask = 1) contain NaN or inf")
    model.eval()
    if c is not None:
        c = to_placement(c, device, dtype)
    prior_loc, prior_scale, decode, guide = model.imputation_parts(c, x)
    chunk_size = chunk_size or max(1, pass_rows(device, x.shape[-1], x.element_size()) // len(x))
    row_mean = x_obs.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1)
    fill = torch.where(mask, x_obs, row_mean.expand_as(x))
    num_prior = round(prior_fraction * num_samples)
    a = num_prior / num_samples
    p = Normal(prior_loc, prior_scale)

    def draw(loc, scale, k):
        eps = torch.randn((k, *loc.shape), generator=generator, device=loc.device,
                          dtype=loc.dtype)
        return loc + scale * eps

    for _ in range(num_gibbs + 1):
        q = Normal(*guide(fill))
        log_w, means, zs = [], [], []
        for start in range(0, num_samples, chunk_size):
            k = min(chunk_size, num_samples - start)
            # samples [0, num_samples - num_prior) from the guide, the rest from the prior
            k_q = min(max(num_samples - num_prior - start, 0), k)
            z = torch.cat([draw(q.loc, q.scale, k_q), draw(p.loc, p.scale, k - k_q)])
            log_p, log_q = p.log_prob(z).sum(-1), q.log_prob(z).sum(-1)
            if a == 0.0:
                log_pi = log_q
            elif a == 1.0:
                log_pi = log_p
            else:
                log_pi = torch.logaddexp(log_p + math.log(a), log_q + math.log1p(-a))
            out = decode(z)
            lik = model.likelihood(out).base_dist
            log_px = (lik.log_prob(x_obs.expand(*out.shape[:-1], x_obs.shape[-1])) * mask).sum(-1)
            log_w.append(log_px + log_p - log_pi)
            means.append(model.likelihood.mean(out))
            zs.append(z)
        log_w = torch.cat(log_w)  # (K, N)
        w = torch.softmax(log_w, 0)
        mean = (w.unsqueeze(-1) * torch.cat(means)).sum(0)
        fill = torch.where(mask, x_obs, mean)
    ess = stats.ess(log_w, 0)
    log_evidence = torch.logsumexp(log_w, 0) - math.log(num_samples)
    # draws: resample z by weight, then x_m ~ p(x_m | z)
    idx = torch.multinomial(w.T, num_draws, replacement=True, generator=generator).T  # (S, N)
    z_all = torch.cat(zs)  # (K, N, L)
    z_draw = torch.gather(z_all, 0, idx.unsqueeze(-1).expand(-1, -1, z_all.shape[-1]))
    x_draw = model.likelihood(decode(z_draw)).sample()
    samples = torch.where(mask, x_obs, x_draw)
    return Imputation(fill, samples, ess, log_evidence)
