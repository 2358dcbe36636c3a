r"""Per-datapoint evaluation of any model meeting the contract: the importance-weighted
log-likelihood and the ELBO's terms, from the shared trace code of
:mod:`pvae.inference.traces` (guide traced, model replayed, every site reduced to
``(particles, datapoints)`` with unscaled log-densities).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro.poutine as poutine
import torch
from tqdm.auto import tqdm

from pvae import parallel
from pvae.contract import prepare_data, program_args
from pvae.data import batches
from pvae.distributions import base_dist, closed_form_kl
from pvae.inference.handlers import select_observed
from pvae.inference.sizes import default_sizes, pass_rows
from pvae.inference.traces import (
    AmbiguousPlateError,
    PlateSizeError,
    data_layout,
    features,
    forked_rng,
    has_auxiliary,
    in_model_order,
    log_prob,
    own_rng,
    reduce_site,
    sites,
    vectorizes,
    weights,
)
from pvae.stats import mean_stderr
from pvae.validation import check_count

__all__ = ["ElboTerms", "IWResult", "elbo_terms", "iw_log_likelihood", "log_weights"]


def _layout(model, x, c, rows: int = 1, data_plate: str | None = None
            ) -> tuple[int, bool, str]:
    """``(nesting, vectorize, plate)``: the plate nesting of the model and guide and their
    data plate (:func:`~pvae.inference.traces.data_layout`), from one trace of the first
    datapoint, and whether they run with vectorized particles (tried on it with torch's RNG
    forked, so that the caller's streams are those of a model that vectorizes without the
    try).

    A guide with per-datapoint parameters (non-amortized: Pyro's ``AutoNormal`` on a plate of
    the batch's size, ``pyro.param`` of shape ``(N, ...)``) does not run on one datapoint, and
    on one datapoint every size-1 plate around the observed sites looks like the data plate;
    then the first ``rows`` datapoints (the evaluation's first pass) are traced instead.

    :raises PlateSizeError: neither runs because of the data plate's size: a message saying
        how such a guide is evaluated (any other error of the programs is raised as it is).
    """
    args = program_args(x[:1], None if c is None else c[:1])
    try:
        nesting, plate = data_layout(model.model, model.guide, args, data_plate)
    except (PlateSizeError, AmbiguousPlateError):
        rows = min(rows, len(x))
        if rows <= 1:
            raise
        args = program_args(x[:rows], None if c is None else c[:rows])
        try:
            nesting, plate = data_layout(model.model, model.guide, args, data_plate)
        except PlateSizeError as batch:
            raise PlateSizeError(
                f"the model and guide run neither on one datapoint nor on a pass of {rows} "
                f"({batch}): a guide with per-datapoint parameters "
                "(non-amortized: Pyro's AutoNormal on a plate of the batch's size, pyro.param of "
                "shape (N, ...)) is tied to the N datapoints it was fitted on and has no q(z | x) "
                "for others. Evaluate it on those data, in stored order and in one pass "
                "(batch_size=len(x)), or index its parameters with pyro.plate('data', N, "
                "subsample=idx) and pass idx as c") from None
    with forked_rng(x.device):
        return nesting, vectorizes(model.model, model.guide, args, nesting, plate), plate


def _weights(model, x, c, num_particles, layout):
    nesting, vectorize, plate = layout
    return weights(model.model, model.guide, program_args(x, c), num_particles, nesting,
                   vectorize, plate=plate)


class _Programs:
    """A model's programs with only the observed sites ``observed`` scored
    (:class:`~pvae.inference.handlers.select_observed`)."""

    def __init__(self, model, observed):
        self.model, self.guide = select_observed(observed)(model.model), model.guide


def _select(model, x, c, observed):
    """``model``, or its programs scoring only the observed sites named in ``observed``
    (checked against a trace of the first datapoint).

    :raises ValueError: ``observed`` is empty or names a site that is not observed.
    """
    if observed is None:
        return model
    observed = (observed,) if isinstance(observed, str) else tuple(observed)
    with forked_rng(x.device):
        with poutine.block():
            tr = poutine.trace(model.model).get_trace(*program_args(x[:1], None if c is None
                                                                    else c[:1]))
    names = [name for name, _ in sites(tr, True)]
    unknown = [n for n in observed if n not in names]
    if not observed or unknown:
        raise ValueError(f"observed must name some of the model's observed sites {names}, got "
                         f"{list(observed)}")
    return _Programs(model, observed)


def log_weights(model, x, *, c=None, num_samples: int = 1, data_plate: str | None = None,
                observed=None) -> torch.Tensor:
    """Log importance weights ``log p(x_n, z_nk) - log q(z_nk | x_n)``, shape
    ``(num_samples, N)``, in nats, with gradients (for custom objectives).

    :param data_plate: the data plate's name; by default found (see :func:`iw_log_likelihood`).
    :param observed: the observed sites in p(x_n | z) (see :func:`iw_log_likelihood`).
    :raises ValueError: a site outside the data plate, or bad ``x`` or ``observed``.
    """
    x, c = prepare_data(model, x, c, "auto")
    programs = _select(model, x, c, observed)
    return _weights(programs, x, c, num_samples,
                    _layout(programs, x, c, len(x), data_plate)).log_weight


# ---------------------------------------------------------------------------------------------
# Importance-weighted log-likelihood


@dataclass
class IWResult:
    """Importance-weighted estimate of log p(x) (or log p(x | c)).

    :ivar torch.Tensor per_datapoint: ``(N,)``, nats.
    :ivar float mean: mean over datapoints, nats per datapoint.
    :ivar float stderr: standard error of ``mean`` over datapoints.
    :ivar torch.Tensor ess: ``(N,)`` effective sample size of the normalized weights,
        ``(sum w)^2 / sum w^2``, between 1 and ``num_samples``.
    :ivar int num_samples: K.
    """

    per_datapoint: torch.Tensor
    mean: float
    stderr: float
    ess: torch.Tensor
    num_samples: int

    def __repr__(self):
        return (f"IWResult(mean={self.mean:.4f} ± {self.stderr:.4f} nats, K={self.num_samples}, "
                f"N={len(self.per_datapoint)}, median ESS={self.ess.median().item():.1f})")



@torch.no_grad()
def iw_log_likelihood(model, x, *, c=None, num_samples: int = 5000, batch_size: int | None = None,
                      chunk_size: int | None = None, device="auto", progress: bool = False,
                      seed: int | None = None, distributed="auto",
                      data_plate: str | None = None, observed=None) -> IWResult:
    r"""Importance-weighted estimate of log p(x), per datapoint (Burda, Grosse & Salakhutdinov
    2015, "Importance Weighted Autoencoders", eq. 8, the bound :math:`\mathcal{L}_K`):

    .. math:: \log p(x) \approx \log \frac{1}{K} \sum_{k=1}^K
              \frac{p(x, z_k)}{q(z_k \mid x)}, \quad z_k \sim q(z \mid x).

    A lower bound in expectation that increases with K and tends to log p(x). Works for any
    model meeting the contract: several latent sites, nested plates inside the data plate,
    discrete latents, and conditional models (then it estimates log p(x | c)). Log-probs are
    unscaled: ``poutine.scale`` (beta, subsampling) does not enter the log-mean-exp. The data
    plate is found on a trace of the first datapoint: the plate around the observed sites with
    the batch's size, whatever its name (``data_plate`` names it where several qualify).

    **Sharded over processes.** With a ``torch.distributed`` process group (under ``torchrun``)
    the batches of datapoints are dealt out to the ranks in turn (batch ``b`` to rank
    ``b % world_size``), each rank computes its batches, and the per-datapoint results are
    gathered back in the order of ``x`` on every rank. Every batch then draws its particles from
    torch's RNG seeded with ``seed + b`` (inside ``torch.random.fork_rng``, so the caller's RNG
    streams are untouched): a datapoint's value depends only on ``seed``, its batch and the
    pass sizes, not on which process computed it, so ``iw_log_likelihood(..., seed=s)`` in one
    process gives the same per-datapoint values as on any number of processes. The same
    ``batch_size`` and ``chunk_size`` must hold everywhere: the defaults depend on the device
    type only on a CPU, but on free memory on a GPU, so pass them for bitwise agreement there.

    :param model: an object with ``model(x, c=None)`` and ``guide(x, c=None)``.
    :param torch.Tensor x: ``(N, D)`` data (the whole set on every rank).
    :param c: optional conditioning, ``(N,)`` or ``(N, c_dim)``, or a tuple of tensors aligned
        with ``x`` (programs ``model(x, *c)``, e.g. ``c=(t, y)`` for ``model(x, t, y)``); the
        estimate is of log p(every observed site | the inputs that are not observed).
    :param int num_samples: K >= 1 (5000 for reported test log-likelihoods).
    :param batch_size: datapoints per pass (default: chosen for the device, see
        :mod:`pvae.inference.sizes`: up to 250 on a CPU, 500 on a GPU).
    :param chunk_size: particles per pass (default: so that ``batch * chunk`` is what suits the
        device: a few thousand rows on a CPU, as many as memory allows on a GPU); memory is
        bounded by ``batch_size * chunk_size``, not by K: chunks are combined with a streaming
        log-sum-exp in float64.
    :param device: ``"auto"`` uses the model's device.
    :param bool progress: tqdm bar over datapoint batches (rank 0's).
    :param seed: ``None`` (draw from torch's global RNG, as it stands) or an int: batch ``b``
        draws after ``torch.manual_seed(seed + b)``. Sharded without a seed, rank 0 draws one
        from its RNG and sends it to the others.
    :param distributed: ``"auto"`` (shard when a process group is initialized), ``True``
        (needs one) or ``False`` (every process computes everything).
    :param data_plate: ``None`` (found) or the name of the per-datapoint plate.
    :param observed: ``None`` (every observed site: log p(x, y | t) for ``model(x, t, y)``
        observing x and y) or the names of the observed sites whose likelihood is estimated,
        the others left out of the weights: ``observed=("x",)`` gives log p(x | t), y
        marginalized (exact when y is a leaf of the model, as a label or a second view is).
    :returns: :class:`IWResult` (nats per datapoint), the same on every rank.
    :raises ValueError: ``num_samples < 1``, bad ``batch_size``/``chunk_size``/``seed``/
        ``distributed``, data of the wrong width or with NaNs, a sample site outside the
        data plate, or a guide with per-datapoint parameters (non-amortized) that cannot
        run on the passes asked for: it is evaluated on the data it was fitted on, in one pass
        (``batch_size=len(x)``), or with plate subsampling by indices passed as ``c``.
    """
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"Expected num_samples (K) >= 1, got {num_samples!r}")
    for name, v in (("batch_size", batch_size), ("chunk_size", chunk_size)):
        if v is not None and not (isinstance(v, int) and v >= 1):
            raise ValueError(f"Expected {name} >= 1 or None, got {v!r}")
    if seed is not None:
        seed = check_count("seed", seed, 0)
    sharded = _sharded(distributed)
    x, c = prepare_data(model, x, c, device)
    batch_size, chunk_size = default_sizes(len(x), num_samples, x.device, x[0].numel(),
                                           x.element_size(), batch_size, chunk_size)
    if sharded and seed is None:
        seed = parallel.broadcast(int(torch.randint(2**62, ())))
    model = _select(model, x, c, observed)
    with own_rng(seed, x.device):  # the trace that finds the nesting draws too
        layout = _layout(model, x, c, batch_size, data_plate)
    rank, world = (parallel.rank(), parallel.world_size()) if sharded else (0, 1)

    def one_batch(xb, cb) -> torch.Tensor:
        """``(2, n)``: the estimate and the ESS of the batch's datapoints."""
        lse = xb.new_full((len(xb),), -math.inf, dtype=torch.float64)
        lse2 = lse.clone()
        for start in range(0, num_samples, chunk_size):
            k = min(chunk_size, num_samples - start)
            logw = _weights(model, xb, cb, k, layout).log_weight.double()
            lse = torch.logaddexp(lse, torch.logsumexp(logw, 0))
            lse2 = torch.logaddexp(lse2, torch.logsumexp(2 * logw, 0))
        return torch.stack([lse - math.log(num_samples), torch.exp(2 * lse - lse2)])

    results = {}
    mine = [(b, xb, cb) for b, (xb, cb) in enumerate(batches(x, c, batch_size=batch_size))
            if b % world == rank]
    for b, xb, cb in tqdm(mine, disable=not progress or rank != 0, desc="IW log-likelihood",
                          unit="batch"):
        with own_rng(None if seed is None else seed + b, x.device):
            results[b] = one_batch(xb, cb)
    both = torch.cat(parallel.gather_in_order(results) if sharded else
                     [results[b] for b in sorted(results)], dim=1).to(x.device)
    per_datapoint, ess = both[0], both[1]
    if not torch.isfinite(per_datapoint).all():
        raise FloatingPointError("the IW estimate is not finite for some datapoints: a log "
                                 "weight was NaN or -inf (data outside the likelihood's support?)")
    mean, stderr = mean_stderr(per_datapoint)
    return IWResult(per_datapoint.to(x.dtype), mean, stderr, ess, num_samples)


def _sharded(distributed) -> bool:
    """Whether evaluation is split over the ranks of a process group (see ``distributed``)."""
    if distributed not in ("auto", True, False):
        raise ValueError(f"distributed must be 'auto', True or False, got {distributed!r}")
    if distributed is True and not parallel.is_distributed():
        raise ValueError("distributed=True needs a torch.distributed process group: launch with "
                         "torchrun, or call torch.distributed.init_process_group first")
    return distributed is not False and parallel.is_distributed()


# ---------------------------------------------------------------------------------------------
# ELBO terms and posterior-collapse diagnostics


@dataclass
class ElboTerms:
    """The ELBO and its terms, per datapoint, in nats.

    ``elbo = reconstruction - kl``.

    :ivar torch.Tensor elbo: ``(N,)``.
    :ivar torch.Tensor reconstruction: ``(N,)``, E_q[log p(x | z)].
    :ivar torch.Tensor kl: ``(N,)``, KL(q(z | x) || p(z)) (summed over latent sites).
    :ivar kl_per_dim: ``(latent_dim,)`` mean KL per latent dimension (latent sites
        concatenated), or ``None`` where a site's distributions do not factorize.
    :ivar torch.Tensor posterior_mean_variance: ``(latent_dim,)``, Cov_x(E_q[z_j]).
    :ivar int active_units: number of dims with ``Cov_x(E_q[z_j]) > threshold`` (Burda et al.
        2015, §5.2).
    :ivar bool analytic_kl: whether the KL was computed in closed form.
    """

    elbo: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: torch.Tensor | None
    posterior_mean_variance: torch.Tensor
    active_units: int
    analytic_kl: bool

    def summary(self) -> dict:
        """Means and standard errors (nats per datapoint) as plain floats."""
        out = {}
        for name in ("elbo", "reconstruction", "kl"):
            out[name], out[f"{name}_stderr"] = mean_stderr(getattr(self, name))
        out["active_units"] = self.active_units
        out["latent_dim"] = len(self.posterior_mean_variance)
        out["analytic_kl"] = self.analytic_kl
        if self.kl_per_dim is not None:
            out["kl_per_dim"] = [round(v, 6) for v in self.kl_per_dim.tolist()]
        return out



def _kl_per_dim(q_site, p_site, nesting, plate, closed_form: bool = True):
    """Per-dimension KL of a factorized site, ``(K or 1, N, features)``, or ``None``."""
    q, p = base_dist(q_site["fn"]), base_dist(p_site["fn"])
    if q.event_shape or p.event_shape:
        return None
    try:
        if not closed_form:
            raise NotImplementedError
        per_dim = closed_form_kl(q, p)
    except NotImplementedError:
        per_dim = q.log_prob(q_site["value"]) - p.log_prob(q_site["value"])
    return features(q_site, per_dim.expand(q_site["value"].shape), nesting, plate)


def _posterior_mean(q_site, nesting, plate):
    """E_q[z | x] per datapoint, ``(N, features)``."""
    try:
        mean = q_site["fn"].mean.expand(q_site["value"].shape)
    except NotImplementedError:
        mean = q_site["value"]
    if not torch.isfinite(mean).all():  # e.g. Categorical has no mean: average the particles
        mean = q_site["value"].to(mean.dtype)
    return features(q_site, mean, nesting, plate).mean(0)


@torch.no_grad()
def elbo_terms(model, x, *, c=None, num_samples: int = 1, batch_size: int | None = None,
               active_threshold: float = 0.01, device="auto",
               data_plate: str | None = None, observed=None) -> ElboTerms:
    """ELBO, reconstruction term and KL per datapoint, KL per latent dimension and active units.

    The KL is analytic when Pyro/torch know KL(q || p) for every latent site (e.g. both
    Normal), Monte Carlo (``log q - log p`` at the sampled z) otherwise; hierarchical sites use
    the analytic KL conditioned on the sampled parents when the guide samples the latent sites
    in the model's order (Pyro's mean-field requirement of ``TraceMeanField_ELBO``). A guide
    that samples them in another order (a bottom-up guide q(z1 | x) q(z2 | z1) of a top-down
    model p(z2) p(z1 | z2)) makes a parent depend on its child's draw, so the conditional
    closed form would be biased: the KL is then Monte Carlo. Active units: latent dims whose
    posterior mean varies across the data, ``Cov_x(E_q[z_j]) > active_threshold`` (Burda et al.
    2015, §5.2); E_q[z] is the guide distribution's mean, or the particle average.

    :param torch.Tensor x: ``(N, D)``.
    :param int num_samples: particles per datapoint for the Monte Carlo terms.
    :param data_plate: ``None`` (found, see :func:`iw_log_likelihood`) or the per-datapoint
        plate's name.
    :param observed: the observed sites of the reconstruction term (default: all; see
        :func:`iw_log_likelihood`).
    :param batch_size: datapoints per pass (default: chosen for the device with all
        ``num_samples`` particles in one pass, see :mod:`pvae.inference.sizes`).
    :returns: :class:`ElboTerms`.
    :raises ValueError: ``num_samples < 1`` or bad ``x`` (see :func:`iw_log_likelihood`).
    """
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"Expected num_samples >= 1, got {num_samples!r}")
    x, c = prepare_data(model, x, c, device)
    batch_size = batch_size or max(1, min(len(x), pass_rows(x.device, x[0].numel(),
                                                            x.element_size()) // num_samples))
    model = _select(model, x, c, observed)
    layout = _layout(model, x, c, batch_size, data_plate)
    nesting, vectorize, plate = layout
    if not vectorize and num_samples > 1:
        raise ValueError("the model does not run with vectorized particles (see the warning), "
                         "and elbo_terms keeps every particle's trace: pass num_samples=1, or "
                         "let the model broadcast over extra leading dims")
    elbo, recon, kl, per_dim, means = [], [], [], [], []
    analytic = True
    for xb, cb in batches(x, c, batch_size=batch_size):
        w = _weights(model, xb, cb, num_samples, layout)
        shape = (num_samples, len(xb))
        kl_b, dims_b, means_b = xb.new_zeros(shape), [], []
        # an autoguide's z is a Delta of an auxiliary draw (its entropy is at the auxiliary
        # site): no closed form per site, no KL per dimension
        auxiliary = has_auxiliary(w.guide_trace)
        same_order = not auxiliary and in_model_order(w.guide_trace, w.model_trace)
        analytic = analytic and same_order
        if auxiliary:
            per_dim = None
        for name, q_site in sites(w.guide_trace, False):
            p_site = w.model_trace.nodes[name]
            try:
                if not same_order:
                    raise NotImplementedError
                site_kl = closed_form_kl(q_site["fn"], p_site["fn"])
            except NotImplementedError:
                analytic = False
                site_kl = log_prob(q_site) - log_prob(p_site)
            kl_b = kl_b + reduce_site(name, q_site, site_kl, *shape, nesting, plate)
            d = (_kl_per_dim(q_site, p_site, nesting, plate, same_order)
                 if per_dim is not None else None)
            if d is None:
                per_dim = None
            else:
                dims_b.append(d.mean(0).sum(0))
            means_b.append(_posterior_mean(q_site, nesting, plate))
        if not analytic:
            kl_b = w.log_guide - w.log_prior
        recon.append(w.log_likelihood.mean(0))
        kl.append(kl_b.mean(0))
        elbo.append(recon[-1] - kl[-1])
        if per_dim is not None:
            per_dim.append(torch.cat(dims_b) if dims_b else x.new_zeros(0))
        means.append(torch.cat(means_b, -1) if means_b else x.new_zeros(len(xb), 0))
    means = torch.cat(means)
    variance = means.var(0) if len(means) > 1 else torch.zeros_like(means[0])
    kl_per_dim = torch.stack(per_dim).sum(0) / len(x) if per_dim else None
    return ElboTerms(torch.cat(elbo), torch.cat(recon), torch.cat(kl), kl_per_dim, variance,
                     int((variance > active_threshold).sum()), analytic)

