r"""Filling in missing data with any trained model meeting the model contract: the VAE, the
CVAE, the hierarchical VAE, PPCA, or your own Pyro program.

For an image x with observed pixels o and missing pixels m, the posterior predictive of the
missing part is p(x_m | x_o) = E_{p(z | x_o)}[p(x_m | z)], z all the latent sites.
:func:`impute` estimates it by self-normalized importance sampling over z with the likelihood
of the **observed pixels only** in the weights (:class:`~pvae.inference.handlers.mask_entries`
on the model's observed site). The proposal is a defensive mixture (Hesterberg 1995) of the
amortized guide, fed the current fill of x, and the prior (the model's own latent sites run
forward),

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
from dataclasses import dataclass, replace

import pyro
import pyro.poutine as poutine
import torch
from torch import nn

from pvae import stats
from pvae.contract import (
    check_model,
    place_data,
    placement,
    program_args,
    to_placement,
    trusted_inputs,
)
from pvae.inference.handlers import mask_entries
from pvae.inference.sizes import pass_rows
from pvae.inference.traces import (
    features,
    forked_rng,
    has_auxiliary,
    layout,
    own_rng,
    replayed_log_density,
    sites,
    vectorizes,
    weights,
)
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
           chunk_size: int | None = None, seed: int | None = None,
           data_plate: str | None = None) -> Imputation:
    """Fill in the missing entries of ``x`` (where ``mask`` is 0/False) with a trained model.

    :param model: any object meeting the model contract (``model(x, c=None)`` and
        ``guide(x, c=None)`` Pyro programs, README "Your own model") whose observed site of
        ``x`` has a distribution that factorizes over the entries of x (a ``.to_event(1)`` of
        univariate distributions, as every pvae likelihood is): :class:`pvae.models.VAE`,
        ``CVAE``, ``HierarchicalVAE``, ``PPCA`` and user programs.
    :param torch.Tensor x: ``(N, D)``; missing entries may hold anything, NaN included.
    :param torch.Tensor mask: ``(N, D)`` bool or 0/1: 1 = observed (may be all 0, e.g. for a
        structured-prediction CVAE whose ``c`` is the observed part).
    :param c: conditioning for a conditional model (a tensor, or a tuple of tensors).
    :param int num_samples: importance samples of z per datapoint.
    :param int num_draws: posterior-predictive draws to return: particles resampled by weight,
        each with a fresh x ~ p(x | z) (the particles' chunks are traced again from their RNG
        states, and x drawn once per draw: ``num_draws`` times the final pass's sampling of x).
    :param int num_gibbs: pseudo-Gibbs refinements of the proposal's input before the final
        importance-sampling pass (0: the missing entries start at the mean of the observed ones).
    :param float prior_fraction: share ``a`` of the samples drawn from the prior in the
        defensive mixture proposal (0: the guide alone; 1: the prior alone).
    :param chunk_size: samples of z per pass (default: chosen for the device and ``N``, see
        :mod:`pvae.inference.sizes`).
    :param seed: ``None`` (torch's global RNG, as it stands) or an int: the draws come from
        ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng`` (the caller's streams are
        left alone), so the same seed gives the same imputation.
    :param data_plate: the name of the data plate, where it cannot be found (see
        :func:`~pvae.inference.iw_log_likelihood`).
    :returns: :class:`Imputation`.
    :raises ValueError: shapes disagree, non-binary mask, NaN in observed entries,
        ``prior_fraction`` outside [0, 1], no observed site holding ``x``, a likelihood that
        does not factorize over entries, or a guide with auxiliary sites (a Pyro autoguide)
        mixed with prior draws (pass ``prior_fraction=0``).
    :raises TypeError: the model does not meet the model contract.
    """
    check_model(model, "impute")
    if x.shape != mask.shape or x.dim() != 2:
        raise ValueError(f"x and mask must both have shape (N, D), got {tuple(x.shape)} and "
                         f"{tuple(mask.shape)}")
    num_samples, num_draws = check_count("num_samples", num_samples), check_count("num_draws",
                                                                                  num_draws)
    num_gibbs = check_count("num_gibbs", num_gibbs, 0)
    prior_fraction = check_probability("prior_fraction", prior_fraction)
    if chunk_size is not None:
        check_count("chunk_size", chunk_size)
    if seed is not None:
        check_count("seed", seed, 0)
    device, dtype = placement(model, "auto", x)
    x, mask = to_placement(x, device, dtype), mask.to(device)
    if mask.dtype != torch.bool:
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must be boolean or 0/1 (1 = observed)")
        mask = mask.bool()
    x_obs = torch.where(mask, x, torch.zeros_like(x))
    if not torch.isfinite(x_obs).all():
        raise ValueError("observed entries of x (mask = 1) contain NaN or inf")
    x_obs, c = place_data(x_obs, c, device, dtype)
    if isinstance(model, nn.Module):
        model.eval()
    chunk_size = chunk_size or max(1, pass_rows(device, x.shape[-1], x.element_size()) // len(x))
    row_mean = x_obs.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1)
    fill = torch.where(mask, x_obs, row_mean.expand_as(x))
    with own_rng(seed, device), trusted_inputs(), pyro.validation_enabled(False):
        sampler = _Sampler(model, mask, program_args(fill, c), prior_fraction, data_plate)
        for _ in range(num_gibbs + 1):
            args = program_args(fill, c)
            log_w, means = sampler.run(args, num_samples, chunk_size)
            w = torch.softmax(log_w, 0)  # (K, N)
            fill = torch.where(mask, x_obs, (w.unsqueeze(-1) * means).sum(0))
        # draws from p(x_m | x_o): particles resampled by weight, x ~ p(x | z) drawn afresh
        idx = torch.multinomial(w.T, num_draws, replacement=True).T  # (S, N)
        x_draw = sampler.draws(args, idx)
    ess = stats.ess(log_w, 0)
    log_evidence = torch.logsumexp(log_w, 0) - math.log(num_samples)
    return Imputation(fill, torch.where(mask, x_obs, x_draw), ess, log_evidence)


class _Sampler:
    """The importance sampler of :func:`impute` for one model and mask: particles from the
    guide and from the prior, with the weights of the defensive mixture."""

    def __init__(self, model, mask, args: tuple, prior_fraction: float, data_plate):
        self.guide, self.prior_fraction = model.guide, prior_fraction
        device = args[0].device
        with forked_rng(device):  # looking at the programs leaves the draws alone
            found = layout(model.model, model.guide, args, data_plate)
            if found.subsample_size is not None or found.enumerated:
                raise ValueError("impute needs a model that scores every datapoint it is given "
                                 "and samples every latent site from the guide; this one "
                                 + ("enumerates discrete sites" if found.enumerated else
                                    "subsamples its data plate itself"))
            self.nesting, self.plate = found.nesting, found.plate
            self.site = _data_site(model, args)
            self.model = mask_entries(self.site, mask)(model.model)
            self.vectorize = vectorizes(self.model, model.guide, args, self.nesting,
                                        self.plate, task="imputing")
            self.layout = replace(found, vectorize=self.vectorize)
            with poutine.block():
                self.auxiliary = has_auxiliary(poutine.trace(model.guide).get_trace(*args))

        def prior(*a):  # the model's latent sites run forward: a guide that is the prior
            with poutine.block(hide_fn=lambda msg: msg.get("is_observed", False)):
                return model.model(*a)

        self.prior = prior
        self.chunks = []  # the last run's (proposal, start, size, RNG states before the chunk)

    def run(self, args: tuple, num_samples: int, chunk_size: int):
        """``(log_w, means)``: ``(K, N)`` log weights and ``(K, N, D)`` E[x | z_k]; the first
        ``K - round(a K)`` particles from the guide fed ``args``, the rest from the prior.

        :raises ValueError: a guide with auxiliary sites in a mixture with the prior.
        """
        num_prior = round(self.prior_fraction * num_samples)
        a = num_prior / num_samples
        if 0 < num_prior < num_samples and self.auxiliary:
            raise ValueError("the guide has auxiliary sites (a Pyro autoguide): its density at "
                             "the prior's draws is not defined site by site; impute with "
                             "prior_fraction=0 (guide draws only) or 1 (prior draws only)")
        out, self.chunks = [], []
        offset = 0
        for proposal, total in ((self.guide, num_samples - num_prior), (self.prior, num_prior)):
            step = chunk_size if self.vectorize else 1
            for start in range(0, total, step):
                k = min(step, total - start)
                self.chunks.append((proposal, offset, k, _rng_state(args[0].device)))
                offset += k
                w = self._particles(proposal, args, k)
                log_p = w.log_prior
                if a == 0.0:
                    log_pi = w.log_guide
                elif a == 1.0:
                    log_pi = log_p
                else:
                    log_q = w.log_guide if proposal is self.guide else replayed_log_density(
                        self.guide, w.guide_trace, args, k if self.vectorize else None,
                        self.layout)  # the guide's density at the prior's draws
                    log_pi = torch.logaddexp(log_p + math.log(a), log_q + math.log1p(-a))
                out.append((w.log_likelihood + log_p - log_pi, self._x(w, k, "mean")))
        return tuple(torch.cat(parts) for parts in zip(*out))

    def draws(self, args: tuple, idx: torch.Tensor) -> torch.Tensor:
        """``(S, N, D)``: for every draw ``s`` and datapoint ``n``, x ~ p(x | z) for the
        particle ``idx[s, n]`` of the last :meth:`run`, its z drawn again from the RNG state
        its chunk started from (so the same z), its x afresh."""
        device = args[0].device
        after = _rng_state(device)
        out = None
        for proposal, start, k, state in self.chunks:
            hit = (idx >= start) & (idx < start + k)  # (S, N): draws from this chunk
            if not hit.any():
                continue
            _set_rng_state(state, device)
            w = self._particles(proposal, args, k)  # the chunk's particles, the same z again
            _set_rng_state(after, device)
            local = (idx - start).clamp(0, k - 1)
            for s in range(len(idx)):
                x = self._x(w, k, "sample")  # (k, N, D): a fresh draw for every particle
                picked = x.gather(0, local[s][None, :, None].expand(1, -1, x.shape[-1]))[0]
                if out is None:
                    out = picked.new_zeros((len(idx), *picked.shape))
                out[s] = torch.where(hit[s, :, None], picked, out[s])
            after = _rng_state(device)
        return out

    def _particles(self, proposal, args, k):
        return weights(self.model, proposal, args, k, self.layout)

    def _x(self, w, k: int, what: str) -> torch.Tensor:
        """``(k, N, D)``: the likelihood's mean, or one draw, for each particle of ``w``."""
        site = w.model_trace.nodes[self.site]
        t = site["fn"].mean if what == "mean" else site["fn"].sample()
        return features(site, t, self.nesting, self.plate).expand(k, -1, -1)


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda"
                                   else None)


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _data_site(model, args: tuple) -> str:
    """The name of the model's observed site whose value is ``x`` (``args[0]``).

    :raises ValueError: there is none.
    """
    with poutine.block():
        tr = poutine.trace(model.model).get_trace(*args)
    observed = dict(sites(tr, True))
    for name, site in observed.items():  # the site given x itself, else one of x's shape
        if site["value"] is args[0]:
            return name
    for name, site in observed.items():
        if site["value"].shape == args[0].shape:
            return name
    raise ValueError(f"impute needs an observed site holding x (shape {tuple(args[0].shape)}), "
                     "e.g. pyro.sample('x', ..., obs=x); the model observes "
                     f"{[n for n, _ in sites(tr, True)]}")
