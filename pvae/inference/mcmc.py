r"""Reference posteriors by Hamiltonian Monte Carlo, and sample-based comparison of an
approximate posterior with them.

For a handful of datapoints of any model meeting the model contract, :func:`nuts_posterior`
draws from the exact posterior of each datapoint separately,

.. math::
    p_\theta(z \mid x_n) \propto p_\theta(z)\, p_\theta(x_n \mid z),

with the No-U-Turn Sampler (Hoffman & Gelman 2014) as implemented in Pyro: the model program
is run on the single datapoint ``x[n:n+1]``, its latent sites are sampled and its observed
sites are conditioned on the data. The model's parameters (``pyro.module`` / ``pyro.param``
sites) are constants: NUTS samples only sample sites. :func:`guide_samples` draws from the
amortized guide :math:`q_\phi(z \mid x_n)` in the same layout, and :func:`compare_samples`
compares two sets of draws per datapoint: standardized mean errors, variance ratios and the
energy distance (Székely & Rizzo 2013).

Draws are stored per latent site as ``(chains, draws, N, *site_shape)``, the datapoint dim
after the draws; ``site_shape`` is the shape of the site's value to the right of the
data plate's dim (inner plates, then event dims), e.g. ``(latent_dim,)`` for a VAE.

References:

- M. D. Hoffman & A. Gelman (2014), "The No-U-Turn Sampler: Adaptively Setting Path Lengths
  in Hamiltonian Monte Carlo", JMLR 15, 1593-1623.
- A. Vehtari, A. Gelman, D. Simpson, B. Carpenter & P.-C. Bürkner (2021),
  "Rank-Normalization, Folding, and Localization: An Improved R-hat for Assessing Convergence
  of MCMC", Bayesian Analysis 16(2), 667-718 (R-hat, bulk ESS and MCSE of ``summary()``).
- G. J. Székely & M. L. Rizzo (2013), "Energy statistics: A class of statistics based on
  distances", Journal of Statistical Planning and Inference 143(8), 1249-1272.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.ops.stats import effective_sample_size

from pvae.contract import fixed_parameters, prepare_data, program_args, trusted_inputs
from pvae.inference.traces import PARTICLE_PLATE, data_layout, sites
from pvae.stats import mean_stderr
from pvae.validation import check_count

__all__ = ["ENERGY_MAX_DRAWS", "PosteriorSamples", "SampleComparison", "compare_samples",
           "energy_distance", "guide_samples", "nuts_posterior"]

#: At most this many draws per datapoint and set enter the energy distance (O(n^2) pairs).
ENERGY_MAX_DRAWS = 1000


# -- draws ---------------------------------------------------------------------------------------

@dataclass
class PosteriorSamples:
    """Posterior draws of every latent site for ``N`` datapoints.

    :ivar dict draws: site name -> tensor ``(chains, draws, N, *site_shape)`` on the CPU, in
        the model's dtype.
    :ivar str method: ``"nuts"`` or ``"guide"``.
    :ivar divergences: NUTS only: number of divergent transitions after warmup per chain and
        datapoint, ``(chains, N)`` integers; ``None`` for guide draws.
    :ivar diverging: NUTS only: which draws ended a divergent trajectory,
        ``(chains, draws, N)`` booleans; ``None`` for guide draws.
    :ivar float seconds: wall-clock time the draws took, seconds.
    """

    draws: dict[str, torch.Tensor]
    method: str = "nuts"
    divergences: torch.Tensor | None = None
    diverging: torch.Tensor | None = field(default=None, repr=False)
    seconds: float = float("nan")

    @property
    def num_chains(self) -> int:
        return next(iter(self.draws.values())).shape[0]

    @property
    def num_draws(self) -> int:
        """Draws per chain."""
        return next(iter(self.draws.values())).shape[1]

    @property
    def num_datapoints(self) -> int:
        return next(iter(self.draws.values())).shape[2]

    def flat(self) -> torch.Tensor:
        """All sites' draws with their site dims flattened and concatenated (sites in the order
        of :attr:`draws`): ``(chains, draws, N, D_latent)``, float64."""
        C, S, N = self.num_chains, self.num_draws, self.num_datapoints
        return torch.cat([d.reshape(C, S, N, -1).double() for d in self.draws.values()], -1)

    def to_inference_data(self):
        """The draws as an ArviZ ``InferenceData``: one posterior variable per latent site
        ``(chain, draw, datapoint, <site>_dim_0, ...)``, and for NUTS draws a sample-stats
        variable ``diverging`` ``(chain, draw, datapoint)``."""
        import arviz as az  # optional at import time: ArviZ is slow to import

        posterior, dims = {}, {}
        for name, d in self.draws.items():
            posterior[name] = d.numpy()
            dims[name] = ["datapoint"] + [f"{name}_dim_{i}" for i in range(d.dim() - 3)]
        sample_stats = None
        if self.diverging is not None:
            sample_stats = {"diverging": self.diverging.numpy()}
            dims["diverging"] = ["datapoint"]
        return az.from_dict(posterior=posterior, sample_stats=sample_stats,
                            coords={"datapoint": list(range(self.num_datapoints))}, dims=dims)

    def summary(self, **kwargs):
        """``arviz.summary`` of the draws: a pandas DataFrame with a row per site, datapoint
        and latent coordinate (``"z[0, 1]"``: datapoint 0, dim 1) and the columns ``mean``,
        ``sd``, ``mcse_mean``, ``mcse_sd``, ``ess_bulk``, ``ess_tail`` and ``r_hat`` (rank-
        normalized split R-hat, Vehtari et al. 2021; NaN for a single chain). Values are not
        rounded unless ``round_to`` says so; ``kwargs`` go to ``arviz.summary``."""
        import arviz as az  # optional at import time: ArviZ is slow to import

        kwargs.setdefault("round_to", "none")
        return az.summary(self.to_inference_data(), var_names=list(self.draws), **kwargs)

    def convergence(self) -> dict:
        """The convergence checks of the draws, over all sites, datapoints and coordinates:
        ``max_r_hat`` (rank-normalized split R-hat, Vehtari et al. 2021, which should be at
        most 1.01; NaN for one chain), ``min_ess_bulk`` and ``min_ess_tail`` (ArviZ's), and
        ``divergences`` (total divergent transitions after warmup; 0 for guide draws)."""
        s = self.summary()
        return {"max_r_hat": float(s["r_hat"].max()), "min_ess_bulk": float(s["ess_bulk"].min()),
                "min_ess_tail": float(s["ess_tail"].min()),
                "divergences": 0 if self.divergences is None else int(self.divergences.sum()),
                "num_chains": self.num_chains, "num_draws": self.num_draws}


def _data_pos(name, site, value_dim: int, plate: str) -> int:
    """Position of the data plate's dim (``plate``, found by
    :func:`~pvae.inference.traces.data_layout`) in the site's value (``value_dim`` dims)."""
    frames = [f for f in site["cond_indep_stack"] if f.name == plate]
    if not frames:  # checked by data_layout
        raise ValueError(f"sample site {name!r} is outside pyro.plate({plate!r}, ...)")
    pos = value_dim - len(site["fn"].event_shape) + frames[0].dim
    if pos < 0:
        raise ValueError(f"latent site {name!r} has a value of {value_dim} dims, without the "
                         f"{plate!r} plate's dim; give its distribution that batch dim")
    return pos


def _rearrange(name, value: torch.Tensor, pos: int, lead: int) -> torch.Tensor:
    """``value`` with ``lead`` leading dims (draws, or chains and draws), the data dim at
    ``lead + pos``: -> ``(*lead, N, *site_shape)``; the dims left of the data dim (plates
    outside the data plate) must have size 1."""
    outer = value.shape[lead:lead + pos]
    if any(s != 1 for s in outer):
        raise ValueError(f"latent site {name!r} lies in a plate outside the data plate "
                         f"(value shape {tuple(value.shape[lead:])}); per-datapoint draws need "
                         "every plate of a latent site inside the data plate")
    return value.reshape(value.shape[:lead] + value.shape[lead + pos:])


@contextlib.contextmanager
def _threads(num_threads: int | None):
    """torch's intra-op threads set to ``num_threads`` (``None``: unchanged), restored on exit."""
    before = torch.get_num_threads()
    if num_threads is not None and num_threads != before:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _chain_seed(seed: int, n: int, chain: int) -> int:
    """An independent seed for each datapoint and chain (numpy's ``SeedSequence``)."""
    return int(np.random.SeedSequence([seed, n, chain]).generate_state(1, np.uint32)[0])


# -- NUTS ----------------------------------------------------------------------------------------

def nuts_posterior(model, x: torch.Tensor, c=None, *, num_samples: int = 500,
                   warmup_steps: int = 500, num_chains: int = 4, seed: int = 0,
                   progress: bool = False, max_tree_depth: int = 10,
                   target_accept_prob: float = 0.8, num_threads: int | None = 1
                   ) -> PosteriorSamples:
    r"""Draws from the exact posterior p(z | x_n) of each datapoint by NUTS (Hoffman & Gelman
    2014), a reference for amortized guides.

    For every datapoint n and chain, ``pyro.infer.MCMC(NUTS(model.model))`` runs on the model
    program called with ``x[n:n+1]`` (and ``c[n:n+1]``): the latent sites of that datapoint
    are sampled, its observed sites conditioned. Step size and a diagonal mass matrix are
    adapted during the ``warmup_steps`` (discarded); chains start at a uniform draw in
    [-2, 2] of the unconstrained space (Pyro's ``init_to_uniform``). Chains run one after
    another in this process, chain k of the n-th datapoint seeded from ``(seed, n, k)``: the
    draws are reproducible, and those of a datapoint do not depend on the rows after it.

    The model's parameters are constants: Pyro's HMC samples only sample sites (``pyro.param``
    and ``pyro.module`` sites are not latent variables) and differentiates the potential only
    with respect to them; on top of that, an ``nn.Module`` model's parameters are switched to
    ``requires_grad=False`` and the model to eval mode for the run (both restored), so that
    no graph is built through the weights and dropout or batch norm cannot make the potential
    random. Built-in models skip their per-call checks and ``pyro.module`` registration
    inside the sampler (the data are checked once beforehand). Discrete latent sites that
    Pyro can enumerate are summed out, and have no draws.

    Cost: (warmup_steps + num_samples) x num_chains x N NUTS iterations of up to
    2^max_tree_depth - 1 gradient evaluations each, at batch size 1. Tensors that small gain
    nothing from torch's intra-op threads, and on a busy CPU the threads' synchronization
    dominates (a VAE(784, 50, (400,)) gradient took 1.6 ms with one thread and 13 ms with two
    on a loaded 2-core machine), so by default the sampler runs with one thread
    (``num_threads``; torch's setting is restored afterwards).

    :param model: an object meeting the model contract (``model.model(x, c=None)``,
        ``model.guide(x, c=None)``, every sample site inside one data plate of any name: see
        README "Your own model").
    :param torch.Tensor x: ``(N, ...)``, a handful of datapoints; moved to the model's device
        and dtype.
    :param c: optional conditioning tensor with one row per row of ``x``.
    :param int num_samples: draws kept per chain.
    :param int warmup_steps: adaptation steps per chain (discarded), >= 0.
    :param int num_chains: chains per datapoint (4 or more for a meaningful R-hat).
    :param int seed: seed of the random streams (Pyro's global ones, ``pyro.set_rng_seed``,
        are reseeded for every chain).
    :param bool progress: show Pyro's progress bar.
    :param int max_tree_depth: NUTS's limit on the doubling of a trajectory.
    :param float target_accept_prob: target of the step-size adaptation, in (0, 1); raise it
        (0.9-0.99) when there are divergences.
    :param num_threads: torch's intra-op threads (``torch.set_num_threads``) while sampling,
        or ``None`` to leave them as they are.
    :returns: :class:`PosteriorSamples` with ``draws[site]`` ``(num_chains, num_samples, N,
        *site_shape)`` and the divergences per chain and datapoint; a ``RuntimeWarning`` says
        when there were any (the draws near them may be biased).
    :raises TypeError: ``model`` does not meet the contract; a size is not an integer.
    :raises ValueError: a size out of range, ``x`` not ``(N, ...)`` with N >= 1 or not
        finite, ``c`` of another length, a sample site outside the data plate, or a
        model without continuous latent sites.
    """
    num_samples = check_count("num_samples", num_samples)
    warmup_steps = check_count("warmup_steps", warmup_steps, 0)
    num_chains = check_count("num_chains", num_chains)
    max_tree_depth = check_count("max_tree_depth", max_tree_depth)
    if not isinstance(target_accept_prob, (int, float)) or not 0 < target_accept_prob < 1:
        raise ValueError(f"target_accept_prob must be a number in (0, 1), got "
                         f"{target_accept_prob!r}")
    if num_threads is not None:
        num_threads = check_count("num_threads", num_threads)
    x, c = prepare_data(model, x, c, "auto", "nuts_posterior", eval_mode=False)
    N = len(x)
    start = time.perf_counter()
    chains, diverging = [], torch.zeros(num_chains, num_samples, N, dtype=torch.bool)
    for n in range(N):
        args = program_args(x[n:n + 1], None if c is None else c[n:n + 1])
        # the model's own checks, once; also refuses sites outside the data plate
        nesting, plate = data_layout(model.model, model.guide, args)
        with poutine.block():
            proto = poutine.trace(model.model).get_trace(*args)
        latent = {name: site for name, site in sites(proto, False)
                  if not site["fn"].has_enumerate_support}
        if not latent:
            raise ValueError("the model has no continuous latent site for NUTS to sample; its "
                             "latent sites must be pyro.sample sites without obs=")
        per_chain = []
        for k in range(num_chains):
            pyro.set_rng_seed(_chain_seed(seed, n, k))
            kernel = pyro.infer.NUTS(model.model, max_plate_nesting=nesting,
                                     max_tree_depth=max_tree_depth,
                                     target_accept_prob=float(target_accept_prob))
            mcmc = pyro.infer.MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps,
                                   num_chains=1, disable_progbar=not progress)
            with fixed_parameters(model), trusted_inputs(), _threads(num_threads):
                mcmc.run(*args)
            samples = mcmc.get_samples()
            per_chain.append({
                name: _rearrange(name, samples[name].detach().cpu(),
                                 _data_pos(name, site, samples[name].dim() - 1, plate), 1)
                for name, site in latent.items()})
            divergent = mcmc.diagnostics()["divergences"]["chain 0"]
            diverging[k, torch.as_tensor(divergent, dtype=torch.long), n] = True
        chains.append({name: torch.stack([d[name] for d in per_chain]) for name in latent})
    draws = {name: torch.cat([ch[name] for ch in chains], 2) for name in chains[0]}
    divergences = diverging.sum(1)
    if divergences.any():
        warnings.warn(f"NUTS had {divergences.sum().item()} divergent transitions after warmup "
                      f"(per datapoint: {divergences.sum(0).tolist()}); the draws may be biased "
                      "near regions of high curvature: raise target_accept_prob (e.g. 0.95) "
                      "and check PosteriorSamples.divergences", RuntimeWarning, stacklevel=2)
    return PosteriorSamples(draws, "nuts", divergences, diverging, time.perf_counter() - start)


# -- the guide ----------------------------------------------------------------------------------

@torch.no_grad()
def guide_samples(model, x: torch.Tensor, c=None, *, num_samples: int = 2000,
                  seed: int = 0) -> PosteriorSamples:
    """Independent draws from the amortized guide q(z | x_n) of each datapoint, in the layout
    of :func:`nuts_posterior` with one chain.

    The guide program runs once on all of ``x`` with ``num_samples`` vectorized particles (a
    ``pyro.plate`` left of the model's plates); the draws of every latent site of the model
    are kept.

    :param model: an object meeting the model contract.
    :param torch.Tensor x: ``(N, ...)``; moved to the model's device and dtype.
    :param c: optional conditioning tensor with one row per row of ``x``.
    :param int num_samples: draws per datapoint.
    :param int seed: seed of torch's (and Pyro's) random streams.
    :returns: :class:`PosteriorSamples` with ``draws[site]`` ``(1, num_samples, N,
        *site_shape)``.
    :raises TypeError: ``model`` does not meet the contract.
    :raises ValueError: a bad ``num_samples`` or ``x``, a sample site outside the data
        plate, or a latent site of the model that the guide does not sample.
    """
    num_samples = check_count("num_samples", num_samples)
    x, c = prepare_data(model, x, c, "auto", "guide_samples", eval_mode=False)
    args = program_args(x, c)
    start = time.perf_counter()
    pyro.set_rng_seed(seed)
    with fixed_parameters(model):
        nesting, plate = data_layout(model.model, model.guide, args)
        with poutine.block():
            model_tr = poutine.trace(model.model).get_trace(*args)
            with pyro.plate(PARTICLE_PLATE, num_samples, dim=-(nesting + 1)):
                guide_tr = poutine.trace(model.guide).get_trace(*args)
    draws = {}
    for name, _ in sites(model_tr, False):
        site = guide_tr.nodes[name]
        value = site["value"]
        # value: (K, ..., N at the data dim, ..., *event), batch rank nesting + 1
        pos = _data_pos(name, site, value.dim(), plate) - 1
        draws[name] = _rearrange(name, value.detach().cpu(), pos, 1)[None]
    return PosteriorSamples(draws, "guide", seconds=time.perf_counter() - start)


# -- comparison ---------------------------------------------------------------------------------

@dataclass
class SampleComparison:
    """An approximate posterior's draws against reference draws, per datapoint ``n`` and
    latent coordinate ``d`` (all sites' coordinates flattened and concatenated, in the order
    of :attr:`sites`).

    :ivar mean_error_sd: (mean_approx - mean_ref) / sd_ref, ``(N, D)``: the mean error in
        posterior standard deviations.
    :ivar mean_error_mcse: its Monte Carlo standard error, sqrt(var_ref / ESS_ref +
        var_approx / ESS_approx) / sd_ref, ``(N, D)``.
    :ivar variance_ratio: var_approx / var_ref, ``(N, D)`` (below 1: the approximation is too
        narrow).
    :ivar energy_distance: the energy distance between the two sets of draws, ``(N,)``,
        computed on coordinates standardized by the reference's mean and sd (unitless).
    :ivar ess_reference: effective sample size of the reference draws, ``(N, D)``.
    :ivar ess_approx: effective sample size of the approximate draws, ``(N, D)``.
    :ivar list sites: the latent sites compared, with the number of coordinates of each.
    """

    mean_error_sd: torch.Tensor
    mean_error_mcse: torch.Tensor
    variance_ratio: torch.Tensor
    energy_distance: torch.Tensor
    ess_reference: torch.Tensor
    ess_approx: torch.Tensor
    sites: list[tuple[str, int]]

    def summary(self) -> dict:
        """Means over datapoints and coordinates: ``mean_abs_error_sd`` (mean of
        |mean_error_sd|), ``max_abs_error_sd``, ``variance_ratio`` (mean), ``log_variance_ratio``
        (mean of log var_approx / var_ref, 0 when the widths agree), ``energy_distance`` and
        its standard error over datapoints (NaN for one datapoint)."""
        energy, energy_se = mean_stderr(self.energy_distance)
        return {
            "mean_abs_error_sd": self.mean_error_sd.abs().mean().item(),
            "max_abs_error_sd": self.mean_error_sd.abs().max().item(),
            "variance_ratio": self.variance_ratio.mean().item(),
            "log_variance_ratio": self.variance_ratio.log().mean().item(),
            "energy_distance": energy,
            "energy_distance_stderr": energy_se,
            "num_datapoints": self.energy_distance.numel(),
            "num_coordinates": self.variance_ratio.shape[-1],
        }

    def per_datapoint(self) -> list[dict]:
        """One row per datapoint: ``mean_abs_error_sd`` and ``max_abs_error_sd`` over its
        coordinates, the ``variance_ratio`` mean, min and max, ``log_variance_ratio`` (mean)
        and the ``energy_distance``."""
        vr = self.variance_ratio
        return [{"mean_abs_error_sd": self.mean_error_sd[n].abs().mean().item(),
                 "max_abs_error_sd": self.mean_error_sd[n].abs().max().item(),
                 "variance_ratio": vr[n].mean().item(),
                 "variance_ratio_min": vr[n].min().item(),
                 "variance_ratio_max": vr[n].max().item(),
                 "log_variance_ratio": vr[n].log().mean().item(),
                 "energy_distance": self.energy_distance[n].item()} for n in range(len(vr))]


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Energy distance between the samples ``a`` ``(n, D)`` and ``b`` ``(m, D)`` (Székely &
    Rizzo 2013):

    .. math::
        \mathcal{E} = 2\,\overline{|a - b|} - \overline{|a - a'|} - \overline{|b - b'|},

    Euclidean norms, the within-sample means over distinct pairs (U-statistics, unbiased for
    independent draws: about 0 when both come from one distribution, so it may be slightly
    negative), in float64. The population value is 0 exactly when the two distributions agree.

    :raises ValueError: fewer than two draws in either set, or different widths.
    """
    a, b = a.double(), b.double()
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"energy_distance needs (n, D) and (m, D) draws, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    n, m = len(a), len(b)
    if n < 2 or m < 2:
        raise ValueError(f"energy_distance needs at least two draws in each set, got {n} and {m}")
    ab = torch.cdist(a, b).mean()
    aa = torch.cdist(a, a).sum() / (n * (n - 1))
    bb = torch.cdist(b, b).sum() / (m * (m - 1))
    return 2 * ab - aa - bb


def _thin(t: torch.Tensor, max_draws: int) -> torch.Tensor:
    """At most ``max_draws`` rows of ``t``, evenly spaced (deterministic; spans every chain)."""
    if len(t) <= max_draws:
        return t
    return t[torch.linspace(0, len(t) - 1, max_draws).round().long()]


def compare_samples(reference: PosteriorSamples, approx: PosteriorSamples) -> SampleComparison:
    """Compare approximate posterior draws (e.g. :func:`guide_samples`) with reference draws
    (e.g. :func:`nuts_posterior`) of the same datapoints, per datapoint and latent coordinate.

    The reference's sites are compared (each site's coordinates flattened, sites
    concatenated); ``approx`` must have each of them with the same shape, and any further
    sites of ``approx`` (e.g. discrete ones that NUTS summed out) are ignored. Effective sample
    sizes are Pyro's (Geyer's initial monotone sequence over all chains, ``pyro.ops.stats``);
    the energy distance is computed on coordinates standardized by the reference's mean and
    sd (so that it is unitless and comparable across datapoints of different posterior
    widths), from at most :data:`ENERGY_MAX_DRAWS` evenly spaced draws of each set.

    :param PosteriorSamples reference: the reference draws.
    :param PosteriorSamples approx: the draws to assess.
    :returns: :class:`SampleComparison`.
    :raises TypeError: an argument is not :class:`PosteriorSamples`.
    :raises ValueError: a site of ``reference`` missing from ``approx``, different site
        shapes or numbers of datapoints, fewer than two draws, or a reference coordinate with
        zero variance.
    """
    for name, value in (("reference", reference), ("approx", approx)):
        if not isinstance(value, PosteriorSamples):
            raise TypeError(f"{name} must be PosteriorSamples (from nuts_posterior or "
                            f"guide_samples), got {type(value).__name__}")
    missing = [s for s in reference.draws if s not in approx.draws]
    if missing:
        raise ValueError(f"approx has no draws of the reference's sites {missing}; it has "
                         f"{sorted(approx.draws)}")
    for name, ref in reference.draws.items():
        if approx.draws[name].shape[2:] != ref.shape[2:]:
            raise ValueError(f"site {name!r}: reference draws are (chains, draws, "
                             f"{', '.join(map(str, ref.shape[2:]))}) but approx draws are "
                             f"{tuple(approx.draws[name].shape)}; compare the same datapoints")
    for name, s in (("reference", reference), ("approx", approx)):
        if s.num_chains * s.num_draws < 2:
            raise ValueError(f"{name} needs at least two draws per datapoint")
    approx = PosteriorSamples({name: approx.draws[name] for name in reference.draws},
                              approx.method)
    site_dims = [(name, math.prod(d.shape[3:])) for name, d in reference.draws.items()]
    ref, app = reference.flat(), approx.flat()  # (C, S, N, D)
    ref_flat, app_flat = ref.flatten(0, 1), app.flatten(0, 1)  # (C S, N, D)
    mean_r, var_r = ref_flat.mean(0), ref_flat.var(0)
    mean_a, var_a = app_flat.mean(0), app_flat.var(0)
    if (var_r <= 0).any():
        raise ValueError("a coordinate of the reference draws has zero variance (a stuck "
                         "chain?); the comparison is standardized by the reference's sd")
    sd_r = var_r.sqrt()
    ess_r = effective_sample_size(ref, chain_dim=0, sample_dim=1).clamp_min(1)
    ess_a = effective_sample_size(app, chain_dim=0, sample_dim=1).clamp_min(1)
    mcse = (var_r / ess_r + var_a / ess_a).sqrt() / sd_r
    std_r, std_a = (ref_flat - mean_r) / sd_r, (app_flat - mean_r) / sd_r
    energy = torch.stack([
        energy_distance(_thin(std_r[:, n], ENERGY_MAX_DRAWS), _thin(std_a[:, n], ENERGY_MAX_DRAWS))
        for n in range(ref.shape[2])])
    return SampleComparison((mean_a - mean_r) / sd_r, mcse, var_a / var_r, energy, ess_r, ess_a,
                            site_dims)
