r"""Per-datapoint evaluation of any model meeting the contract: the importance-weighted
log-likelihood and the ELBO's terms, from the shared trace code of
:mod:`pvae.inference.traces` (guide traced, model replayed, every site reduced to
``(particles, datapoints)`` with unscaled log-densities, the model's enumerated sites summed
out, a data plate that subsamples itself covered).

The data come as a tensor ``x`` (with ``c``), cut into passes here, or as a
``torch.utils.data.DataLoader`` whose items are the programs' positional arguments (any
``collate_fn``, as Pyro's ``SVI.step(*args)`` takes them); either way a pass's datapoints are
those of the data plate in its trace. Results are floating point whatever the data's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pyro.poutine as poutine
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pvae import parallel
from pvae.contract import check_model, place_args, placement, prepare_data, program_args
from pvae.data import batches
from pvae.distributions import base_dist, closed_form_kl
from pvae.inference.handlers import select_observed
from pvae.inference.sizes import default_sizes, pass_rows
from pvae.inference.traces import (
    AmbiguousPlateError,
    Layout,
    PlateSizeError,
    features,
    forked_rng,
    guide_sites,
    has_auxiliary,
    in_model_order,
    layout,
    log_prob,
    own_rng,
    per_datapoint,
    reduce_site,
    sites,
    vectorizes,
    weights,
)
from pvae.inference.traces import _reduce as reduce_traces
from pvae.stats import mean_stderr
from pvae.validation import check_count

__all__ = ["ElboTerms", "IWResult", "elbo_terms", "iw_log_likelihood", "log_weights"]


class _Data:
    """An evaluation's data as passes of positional arguments: slices of a tensor ``x`` (and
    ``c``) placed where the model is, ``batch_size`` datapoints each, or the placed items of a
    ``DataLoader``.

    :raises TypeError: the model does not meet the contract, or ``x`` is not a tensor.
    :raises ValueError: ``c`` or ``batch_size`` beside a ``DataLoader``; bad tensors (see
        :func:`~pvae.contract.prepare_data`).
    """

    def __init__(self, model, x, c, device, who: str):
        self.loader = x if isinstance(x, DataLoader) else None
        self.batch_size = None
        if self.loader is None:
            self.x, self.c = prepare_data(model, x, c, device, who)
            self.device = self.x.device
            return
        check_model(model, who)
        if c is not None:
            raise ValueError(f"{who} got a DataLoader, whose items are the programs' positional "
                             "arguments: pass c=None (put c in the items)")
        if isinstance(model, torch.nn.Module):
            model.eval()
        self.device, self.dtype = placement(model, device)

    def passes(self):
        """The positional arguments of each pass, in order."""
        if self.loader is not None:
            for item in self.loader:
                yield place_args(item, self.device, self.dtype)
            return
        for xb, cb in batches(self.x, self.c, batch_size=self.batch_size):
            yield program_args(xb, cb)

    def first(self) -> tuple:
        return next(iter(self.passes()))

    def sizes(self, num_samples: int, batch_size, chunk_size) -> int:
        """Set the datapoints per pass (tensor data) and return the particles per pass: as
        given, or so that their product suits the device (:mod:`pvae.inference.sizes`);
        :attr:`rows` is that product, the budget of a trace that holds fewer datapoints than
        the pass (a plate that subsamples itself), ``None`` where ``chunk_size`` was given."""
        if self.loader is not None:
            if batch_size is not None:
                raise ValueError("a DataLoader's batches are its own: pass batch_size=None")
            first = self.first()[0]
            n = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else 1
            width = first[0].numel() if isinstance(first, torch.Tensor) and first.dim() else 1
            chunk = default_sizes(n, num_samples, self.device, width, 4, n, chunk_size)[1]
        else:
            self.batch_size, chunk = default_sizes(len(self.x), num_samples, self.device,
                                                   self.x[0].numel(), self.x.element_size(),
                                                   batch_size, chunk_size)
            n = self.batch_size
        self.rows = None if chunk_size is not None else chunk * n
        return chunk


def _layout(model, data: _Data, data_plate: str | None = None) -> Layout:
    """The :class:`~pvae.inference.traces.Layout` of the programs, found on the first
    datapoint (the cheapest trace) or, where that does not settle it, on the first pass; with
    ``vectorize`` tried there, torch's RNG forked (so that the caller's streams are those of a
    model that vectorizes without the try).

    One datapoint does not settle it for a guide with per-datapoint parameters (non-amortized:
    Pyro's ``AutoNormal`` on a plate of the batch's size, ``pyro.param`` of shape ``(N, ...)``),
    for plates that all hold one datapoint then, and for a program that draws a subsample of
    its data plate (Pyro refuses ``pyro.plate("data", n, subsample_size=m)`` for ``m > n``). A
    program that draws its own subsample gets the whole of ``x`` (a tensor) in one pass, as
    Pyro's examples give it: it holds m datapoints at a time itself, and no pass (the last one
    of a batching) can be smaller than m.

    :raises PlateSizeError: the programs disagree on the number of datapoints: a message saying
        how a guide with per-datapoint parameters is evaluated (any other error of the
        programs is raised as it is).
    """
    found = None
    if data.loader is None and len(data.x) > 1:
        args = program_args(data.x[:1], None if data.c is None else data.c[:1])
        try:
            found = layout(model.model, model.guide, args, data_plate)
        except (PlateSizeError, AmbiguousPlateError):
            pass
        except ValueError as error:
            if not _too_small(error):
                raise
    if found is None:
        args = data.first()
        try:
            found = layout(model.model, model.guide, args, data_plate)
        except PlateSizeError as error:
            raise PlateSizeError(
                f"{error}: a guide with per-datapoint parameters (non-amortized: Pyro's "
                "AutoNormal or AutoDelta on a plate of the batch's size, pyro.param of shape "
                "(N, ...)) is tied to the N datapoints it was fitted on and has no q(z | x) for "
                "others. Evaluate it on those data, in stored order and in one pass "
                "(batch_size=len(x)), or index its parameters with pyro.plate('data', N, "
                "subsample=idx) and pass idx as c") from None
        except ValueError as error:
            if not _too_small(error) or data.loader is not None or \
                    data.batch_size >= len(data.x):
                raise
            data.batch_size = len(data.x)
            args = data.first()
            found = layout(model.model, model.guide, args, data_plate)
    if found.subsample_size is not None and data.loader is None and \
            data.batch_size < len(data.x):
        data.batch_size = len(data.x)
        args = data.first()
    with forked_rng(data.device):
        vectorize = vectorizes(model.model, model.guide, args, found.nesting, found.plate,
                               subsample_size=found.subsample_size, enumerated=found.enumerated)
    return replace(found, vectorize=vectorize)


def _too_small(error: ValueError) -> bool:
    """Whether Pyro refused a plate's ``subsample_size`` larger than the pass."""
    return "subsample_size does not match len(subsample)" in str(error)


def _chunk(chunk: int, found: Layout, data: _Data, num_samples: int) -> int:
    """Particles per trace: ``chunk``, or where the data plate subsamples itself (a trace
    holds m datapoints of the pass) as many as fit the pass's budget of rows."""
    if found.subsample_size is None or data.rows is None:
        return chunk
    return max(1, min(num_samples, data.rows // found.subsample_size))


class _Programs:
    """A model's programs with only the observed sites ``observed`` scored
    (:class:`~pvae.inference.handlers.select_observed`)."""

    def __init__(self, model, observed):
        self.model, self.guide = select_observed(observed)(model.model), model.guide


def _select(model, data: _Data, observed):
    """``model``, or its programs scoring only the observed sites named in ``observed``
    (checked against a trace of the model on the first pass).

    :raises ValueError: ``observed`` is empty or names a site that is not observed.
    """
    if observed is None:
        return model
    observed = (observed,) if isinstance(observed, str) else tuple(observed)
    with forked_rng(data.device), poutine.block():
        tr = poutine.trace(model.model).get_trace(*data.first())
    names = [name for name, _ in sites(tr, True)]
    unknown = [n for n in observed if n not in names]
    if not observed or unknown:
        raise ValueError(f"observed must name some of the model's observed sites {names}, got "
                         f"{list(observed)}")
    return _Programs(model, observed)


def log_weights(model, x, *, c=None, num_samples: int = 1, data_plate: str | None = None,
                observed=None) -> torch.Tensor:
    """Log importance weights ``log p(x_n, z_nk) - log q(z_nk | x_n)``, shape
    ``(num_samples, N)``, in nats, with gradients (for custom objectives), all of ``x`` in one
    pass.

    :param data_plate: the data plate's name; by default found (see :func:`iw_log_likelihood`).
    :param observed: the observed sites in p(x_n | z) (see :func:`iw_log_likelihood`).
    :raises ValueError: a site outside the data plate, or bad ``x`` or ``observed``.
    """
    data = _Data(model, x, c, "auto", "log_weights")
    data.batch_size = len(data.x)
    programs = _select(model, data, observed)
    found = _layout(programs, data, data_plate)
    return weights(programs.model, programs.guide, data.first(), num_samples, found).log_weight


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
    masked sites, discrete latents sampled by the guide or enumerated by the model (summed out
    exactly, as ``TraceEnum_ELBO`` does: then p(x, z) has them marginalized), conditional models
    (then it estimates log p(x | c)), and data plates that are unsized or subsample themselves
    (every datapoint is scored: the plate is given subsamples that cover it). Log-probs are
    unscaled: ``poutine.scale`` (beta, subsampling) does not enter the log-mean-exp. The data
    plate is found on the first pass: the plate around the observed sites (``data_plate``
    names it where several qualify). A guide site without a density (``Delta``), or unmasked
    where the model masks its site, is refused: it has no importance weight.

    **Sharded over processes.** With a ``torch.distributed`` process group (under ``torchrun``)
    the passes are dealt out to the ranks in turn (pass ``b`` to rank ``b % world_size``), each
    rank computes its passes, and the per-datapoint results are gathered back in order on every
    rank. Every pass then draws its particles from torch's RNG seeded with ``seed + b`` (inside
    ``torch.random.fork_rng``, so the caller's RNG streams are untouched): a datapoint's value
    depends only on ``seed``, its pass and the pass sizes, not on which process computed it, so
    ``iw_log_likelihood(..., seed=s)`` in one process gives the same per-datapoint values as on
    any number of processes. The same ``batch_size`` and ``chunk_size`` must hold everywhere:
    the defaults depend on the device type only on a CPU, but on free memory on a GPU, so pass
    them for bitwise agreement there.

    :param model: an object with ``model(*args)`` and ``guide(*args)``.
    :param x: ``(N, ...)`` data (the whole set on every rank), or a
        ``torch.utils.data.DataLoader`` whose items are the programs' positional arguments
        (``model(*item)``; any ``collate_fn``), one pass per item, each item's datapoints those
        of the data plate in its trace.
    :param c: with a tensor ``x``: optional conditioning, ``(N,)`` or ``(N, c_dim)``, or a
        tuple of tensors aligned with ``x`` (programs ``model(x, *c)``, e.g. ``c=(t, y)`` for
        ``model(x, t, y)``); the estimate is of log p(every observed site | the inputs that are
        not observed).
    :param int num_samples: K >= 1 (5000 for reported test log-likelihoods).
    :param batch_size: datapoints per pass of a tensor ``x`` (default: chosen for the device,
        see :mod:`pvae.inference.sizes`: up to 250 on a CPU, 500 on a GPU).
    :param chunk_size: particles per pass (default: so that ``batch * chunk`` is what suits the
        device: a few thousand rows on a CPU, as many as memory allows on a GPU); memory is
        bounded by ``batch_size * chunk_size``, not by K: chunks are combined with a streaming
        log-sum-exp in float64.
    :param device: ``"auto"`` uses the model's device.
    :param bool progress: tqdm bar over passes (rank 0's).
    :param seed: ``None`` (draw from torch's global RNG, as it stands) or an int: pass ``b``
        draws after ``torch.manual_seed(seed + b)``. Sharded without a seed, rank 0 draws one
        from its RNG and sends it to the others.
    :param distributed: ``"auto"`` (shard when a process group is initialized), ``True``
        (needs one) or ``False`` (every process computes everything).
    :param data_plate: ``None`` (found) or the name of the per-datapoint plate.
    :param observed: ``None`` (every observed site: log p(x, y | t) for ``model(x, t, y)``
        observing x and y) or the names of the observed sites whose likelihood is estimated,
        the others left out of the weights: ``observed=("x",)`` gives log p(x | t), y
        marginalized (exact when y is a leaf of the model, as a label or a second view is).
    :returns: :class:`IWResult` (nats per datapoint, floating point: the log weights' dtype),
        the same on every rank.
    :raises ValueError: ``num_samples < 1``, bad ``batch_size``/``chunk_size``/``seed``/
        ``distributed``, data of the wrong width or with NaNs, a sample site outside the
        data plate (a global latent: the message says how to condition on it), a guide site
        without a density (``Delta``) or without the model's mask, sequential enumeration, or a
        guide with per-datapoint parameters (non-amortized) that cannot run on the passes asked
        for: it is evaluated on the data it was fitted on, in one pass
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
    data = _Data(model, x, c, device, "iw_log_likelihood")
    chunk_size = data.sizes(num_samples, batch_size, chunk_size)
    if sharded and seed is None:
        seed = parallel.broadcast(int(torch.randint(2**62, ())))
    model = _select(model, data, observed)
    with own_rng(seed, data.device):  # with a seed, the caller's streams stay as they were
        found = _layout(model, data, data_plate)
    rank, world = (parallel.rank(), parallel.world_size()) if sharded else (0, 1)
    dtypes = set()

    def one_pass(args) -> torch.Tensor:
        """``(2, n)``: the estimate and the ESS of the pass's datapoints."""
        lse = lse2 = None
        chunk = _chunk(chunk_size, found, data, num_samples)
        for start in range(0, num_samples, chunk):
            k = min(chunk, num_samples - start)
            logw = weights(model.model, model.guide, args, k, found).log_weight
            dtypes.add(logw.dtype)
            logw = logw.double()
            a, b = torch.logsumexp(logw, 0), torch.logsumexp(2 * logw, 0)
            lse = a if lse is None else torch.logaddexp(lse, a)
            lse2 = b if lse2 is None else torch.logaddexp(lse2, b)
        return torch.stack([lse - math.log(num_samples), torch.exp(2 * lse - lse2)])

    results = {}
    mine = [(b, args) for b, args in enumerate(data.passes()) if b % world == rank]
    for b, args in tqdm(mine, disable=not progress or rank != 0, desc="IW log-likelihood",
                        unit="batch"):
        with own_rng(None if seed is None else seed + b, data.device):
            results[b] = one_pass(args)
    both = torch.cat(parallel.gather_in_order(results) if sharded else
                     [results[b] for b in sorted(results)], dim=1).to(data.device)
    per_datapoint, ess = both[0], both[1]
    if not torch.isfinite(per_datapoint).all():
        raise FloatingPointError("the IW estimate is not finite for some datapoints: a log "
                                 "weight was NaN or -inf (data outside the likelihood's support?)")
    mean, stderr = mean_stderr(per_datapoint)
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.get_default_dtype()
    return IWResult(per_datapoint.to(dtype), mean, stderr, ess, num_samples)


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
        if not isinstance(per_dim, torch.Tensor):  # Pyro's 0.0 for a pair masked with False
            per_dim = torch.zeros_like(log_prob(q_site))
    except NotImplementedError:
        per_dim = q.log_prob(q_site["value"]) - p.log_prob(q_site["value"])
    return features(q_site, per_dim.expand(q_site["value"].shape), nesting, plate)


def _posterior_mean(q_site, nesting, plate):
    """E_q[z | x] per particle and datapoint, ``(K or 1, N, features)``."""
    try:
        mean = q_site["fn"].mean.expand(q_site["value"].shape)
    except NotImplementedError:
        mean = q_site["value"]
    if not torch.isfinite(mean).all():  # e.g. Categorical has no mean: average the particles
        mean = q_site["value"].to(mean.dtype)
    return features(q_site, mean, nesting, plate)


class _Terms:
    """The per-trace reduction of :func:`elbo_terms`: ``(k, n, ...)`` tensors of one trace
    pair, and what held for every trace seen (closed-form KLs, KL per dimension)."""

    def __init__(self, found: Layout):
        self.found, self.analytic, self.per_dim = found, True, True

    def __call__(self, guide_tr, model_tr, k):
        found = self.found
        nesting, plate = found.nesting, found.plate
        w = reduce_traces(guide_tr, model_tr, k, found)
        n = w["log_likelihood"].shape[1]
        out = {"reconstruction": w["log_likelihood"]}
        # an autoguide's z is a Delta of an auxiliary draw (its entropy is at the auxiliary
        # site), and an enumerated model's p(z) is a sum over its discrete sites: neither has a
        # closed form per site, nor a KL per dimension; nor has a guide with an observed site
        # (a pyro.factor: a term of log q that belongs to no latent site)
        plain = (not has_auxiliary(guide_tr) and not found.enumerated
                 and not any(site["is_observed"] for _, site in guide_sites(guide_tr)))
        same_order = plain and in_model_order(guide_tr, model_tr)
        self.per_dim = self.per_dim and plain
        kl, dims, means = [], [], []
        analytic = same_order
        for name, q_site in sites(guide_tr, False):
            p_site = model_tr.nodes[name]  # (a guide site the model lacks was refused)
            if analytic:
                try:
                    site_kl = closed_form_kl(q_site["fn"], p_site["fn"])
                    if not isinstance(site_kl, torch.Tensor):  # Pyro's 0.0 for mask=False
                        site_kl = torch.zeros_like(log_prob(q_site))
                    kl.append(reduce_site(name, q_site, site_kl, k, n, nesting, plate))
                except NotImplementedError:
                    analytic = False
            if self.per_dim:
                d = _kl_per_dim(q_site, p_site, nesting, plate, same_order)
                if d is None:
                    self.per_dim = False
                else:
                    dims.append(d.expand(k, -1, -1))
            means.append(_posterior_mean(q_site, nesting, plate).expand(k, -1, -1))
        self.analytic = self.analytic and analytic
        out["kl"] = (sum(kl[1:], kl[0]) if analytic and kl else
                     w["log_guide"] - w["log_prior"])
        out["means"] = torch.cat(means, -1) if means else out["kl"].new_zeros(k, n, 0)
        if self.per_dim:
            out["kl_per_dim"] = torch.cat(dims, -1) if dims else out["kl"].new_zeros(k, n, 0)
        return out


@torch.no_grad()
def elbo_terms(model, x, *, c=None, num_samples: int = 1, batch_size: int | None = None,
               chunk_size: int | None = None, active_threshold: float = 0.01, device="auto",
               data_plate: str | None = None, observed=None) -> ElboTerms:
    """ELBO, reconstruction term and KL per datapoint, KL per latent dimension and active units.

    The KL is analytic when Pyro/torch know KL(q || p) for every latent site (e.g. both
    Normal), Monte Carlo (``log q - log p`` at the sampled z) otherwise; hierarchical sites use
    the analytic KL conditioned on the sampled parents when the guide samples the latent sites
    in the model's order (Pyro's mean-field requirement of ``TraceMeanField_ELBO``). A guide
    that samples them in another order (a bottom-up guide q(z1 | x) q(z2 | z1) of a top-down
    model p(z2) p(z1 | z2)) makes a parent depend on its child's draw, so the conditional
    closed form would be biased: the KL is then Monte Carlo. Discrete sites that the model
    enumerates are summed out of log p(x, z), as ``TraceEnum_ELBO`` does: the KL is then
    ``E_q[log q(z) - log p(z)]`` with p(z) their sum, and the reconstruction term
    ``E_q[log p(x, z) - log p(z)]``. Active units: latent dims whose posterior mean varies across
    the data, ``Cov_x(E_q[z_j]) > active_threshold`` (Burda et al. 2015, §5.2); E_q[z] is the
    guide distribution's mean, or the particle average. Particles are vectorized, or traced one
    at a time for a model that does not broadcast over them (see :func:`iw_log_likelihood`),
    ``chunk_size`` at a time, so memory is bounded whatever ``num_samples``.

    :param x: ``(N, D)``, or a ``DataLoader`` of the programs' arguments (see
        :func:`iw_log_likelihood`).
    :param int num_samples: particles per datapoint for the Monte Carlo terms.
    :param data_plate: ``None`` (found, see :func:`iw_log_likelihood`) or the per-datapoint
        plate's name.
    :param observed: the observed sites of the reconstruction term (default: all; see
        :func:`iw_log_likelihood`).
    :param batch_size: datapoints per pass of a tensor ``x`` (default: chosen for the device,
        see :mod:`pvae.inference.sizes`).
    :param chunk_size: particles per pass (default: what suits the device with the pass).
    :returns: :class:`ElboTerms` (floating point whatever the data's dtype).
    :raises ValueError: ``num_samples < 1``, bad ``x``, or a program that evaluation refuses
        (see :func:`iw_log_likelihood`).
    """
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"Expected num_samples >= 1, got {num_samples!r}")
    data = _Data(model, x, c, device, "elbo_terms")
    if data.loader is None and batch_size is None:  # every particle in one pass, if it fits
        batch_size = max(1, min(len(data.x), pass_rows(data.device, data.x[0].numel(),
                                                       data.x.element_size()) // num_samples))
    chunk_size = data.sizes(num_samples, batch_size, chunk_size)
    model = _select(model, data, observed)
    found = _layout(model, data, data_plate)
    terms = _Terms(found)
    sums = []
    for args in data.passes():
        total = {}
        chunk = _chunk(chunk_size, found, data, num_samples)
        for start in range(0, num_samples, chunk):
            k = min(chunk, num_samples - start)
            out = per_datapoint(terms, model.model, model.guide, args, k, found)
            for key, value in out.items():
                value = value.sum(0)
                total[key] = value if key not in total else total[key] + value
        sums.append({key: value / num_samples for key, value in total.items()})
    recon = torch.cat([s["reconstruction"] for s in sums])
    kl = torch.cat([s["kl"] for s in sums])
    means = torch.cat([s["means"] for s in sums])
    # no variance over one datapoint, nor over no latent dims (torch warns on either)
    variance = means.var(0) if len(means) > 1 and means.numel() else torch.zeros_like(means[0])
    kl_per_dim = (torch.cat([s["kl_per_dim"] for s in sums]).sum(0) / len(recon)
                  if terms.per_dim else None)
    return ElboTerms(recon - kl, recon, kl, kl_per_dim, variance,
                     int((variance > active_threshold).sum()), terms.analytic)
