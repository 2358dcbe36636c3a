r"""Training objectives as loss objects, as Pyro's ELBOs are: the caller builds one with its
settings and passes it to :func:`pvae.train.fit` (``fit(model, x, loss=IWAE(5))``), as to
``pyro.infer.SVI(model, guide, optim, loss=Trace_ELBO())``.

A loss is an ``nn.Module`` called as ``loss(model, guide, *args)`` that returns ``(value,
surrogate)``: the objective's value (summed over the mini-batch, nats, no gradient) and a
surrogate loss whose gradient is the estimator's gradient of ``-value``. Its settings are its
constructor's arguments, recorded as :attr:`SVILoss.config` (what a checkpoint stores and a
resume compares); whatever it learns or keeps between steps (baselines, averages) is in its
``state_dict()``. :meth:`SVILoss.bind` ties it to a model: :class:`SVIObjective`, the module
the training loop steps (the :class:`pvae.train.Objective` protocol). Every loss works on any
model meeting the model contract.

- :class:`ReparamELBO`: the L-sample ELBO with reparameterized gradients (Pyro's
  ``Trace_ELBO``, ``TraceMeanField_ELBO`` with ``analytic_kl``).
- :class:`ScoreFunctionELBO`: score-function (REINFORCE) gradients for every guide site, with
  Pyro's ``TraceGraph_ELBO``, optionally with a decaying-average or neural baselines.
- :class:`IWAE`: the importance-weighted bound with the standard or the doubly-reparameterized
  gradient.
- :class:`VIMCO`: the importance-weighted bound with multi-sample score-function gradients and
  leave-one-out baselines, for discrete latents.
- :class:`PyroLoss`: any Pyro ELBO (``TraceEnum_ELBO``, ``TraceCausalEffect_ELBO``, ...) or a
  callable ``(model, guide, *args) -> loss``; ``fit(..., loss=TraceEnum_ELBO())`` wraps one in
  it.

Every pvae loss takes ``beta``, the weight of the KL term (beta-VAE; a float or a schedule
``step -> beta``, :mod:`pvae.inference.schedules`), applied to the latent sites of model and
guide by :class:`~pvae.inference.handlers.scale_latents`. A new estimator is one subclass of
:class:`SVILoss` with a ``name``: it joins :data:`LOSSES` (``pvae train --estimator NAME``).
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.infer.elbo import ELBOModule
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.distributions import kl_divergence

from pvae import parallel
from pvae.config import RecordsConfig
from pvae.contract import check_model, trusted_inputs
from pvae.distributions import base_dist, detached
from pvae.inference.handlers import BASELINES, data_units, scale_latents, score_function
from pvae.inference.schedules import Constant, make_schedule, settled
from pvae.inference.traces import (
    PARTICLE_PLATES,
    data_layout,
    draws_subsample,
    forked_rng,
    guide_sites,
    in_model_order,
    log_prob,
    max_plate_nesting,
    plate_extent,
    reduce_site,
    site_shaped,
    sites,
    traces,
    vectorizes,
)
from pvae.stats import logmeanexp
from pvae.validation import check_count, check_float

__all__ = ["GRADIENTS", "IWAE", "LOSSES", "VIMCO", "PyroLoss", "ReparamELBO", "SVILoss",
           "SVIObjective", "ScoreFunctionELBO", "as_loss"]

#: Gradient variants of the IWAE estimator.
GRADIENTS = ("standard", "dreg")

#: pvae's losses by name (``pvae train --estimator NAME``); every subclass of :class:`SVILoss`
#: with a ``name`` joins it.
LOSSES: dict[str, type] = {}


class SVILoss(RecordsConfig, nn.Module):
    """Base of pvae's training losses. A subclass sets ``name`` (its key in :data:`LOSSES`),
    takes ``beta`` in its constructor and implements ``forward(model, guide, *args) -> (value,
    surrogate)``, summed over the mini-batch (see the module docstring).

    What the training layer asks of a loss besides that, with the defaults here:

    - :meth:`bind`: the :class:`SVIObjective` of a model;
    - :meth:`validation_loss`: the loss whose value is reported on validation data (the
      one-particle ELBO);
    - :meth:`capture_blocker`: why the step cannot be captured as a CUDA graph, or ``None``;
      :meth:`capturable_` switches to the host-sync-free path before capture;
    - :meth:`data_parallel_`: keep statistics of the global mini-batch under data-parallel
      training;
    - :attr:`reports_terms` and :attr:`last_kl`: whether the history gets the steps'
      reconstruction and KL, and the KL where the loss computes it from its own particles.
    """

    name: str | None = None
    #: the data plate's name where several plates could be it (``None``: found)
    data_plate: str | None = None
    #: whether the history gets the training reconstruction and KL of this loss's steps
    reports_terms = True
    #: the last step's KL summed over the batch (scaled as the value), where the loss computes
    #: it itself; ``None``: the objective derives it from the value and beta
    last_kl = None
    #: whether the loss sums out the model's enumerated discrete sites (pvae's losses do not:
    #: :class:`SVIObjective` refuses such models; a Pyro ELBO decides for itself)
    sums_out_enumerated = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            LOSSES[cls.name] = cls

    def __init__(self, beta=1.0):
        super().__init__()
        if not callable(beta):
            beta = check_float("beta", beta, minimum=0.0)
        self.beta = beta

    @property
    def config(self) -> dict:
        """``{"name": ..., **constructor arguments}``: what identifies the loss in a
        checkpoint (a schedule is recorded as its ``repr``)."""
        config = {"name": self.name or type(self).__name__, **super().config}
        beta = config.get("beta")
        if isinstance(beta, Constant):
            config["beta"] = beta.beta
        elif callable(beta):
            config["beta"] = repr(beta)
        return config

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "name")

    def bind(self, model) -> SVIObjective:
        """This loss on ``model``'s programs, as the module a training loop steps. What the loss
        found by tracing other programs (plate layouts) is forgotten; what it learned
        (baselines, averages: its ``state_dict``) is kept, as a model keeps its weights: build a
        fresh loss to start afresh.

        :raises TypeError: ``model`` does not meet the model contract.
        """
        check_model(model, "fit")
        self.forget_layout()
        return SVIObjective(model, self)

    def forget_layout(self) -> None:
        """Drop what was found by tracing the programs (found again on the next call)."""

    def validation_loss(self) -> SVILoss:
        """The loss whose value is reported on validation data: the plain ELBO, one particle."""
        return ReparamELBO()

    def capture_blocker(self) -> str | None:
        """Why the step cannot run as a captured CUDA graph (``None``: it can)."""
        return None

    def capturable_(self) -> None:
        """Compute the step without host synchronization from now on."""

    def data_parallel_(self) -> None:
        """Keep statistics over the global mini-batch (data-parallel training)."""


class ReparamELBO(SVILoss):
    """The (multi-sample) ELBO with reparameterized gradients (Kingma & Welling 2014; Bishop &
    Bishop, Deep Learning, eq. 19.16); particles are vectorized.

    Through Pyro's ``Trace_ELBO`` (``TraceMeanField_ELBO`` with ``analytic_kl``, where the guide
    samples the latent sites in the model's order; otherwise, as for a bottom-up guide of a
    hierarchical model, ``Trace_ELBO`` again, whose Monte Carlo KLs are unbiased there: see
    :func:`~pvae.inference.traces.in_model_order`). Once :meth:`capturable_` (a step captured
    as a CUDA graph) the same value and gradient come from the shared traces of
    :mod:`pvae.inference.traces` without host synchronization (Pyro's ELBOs call ``.item()``
    at every site): the sum over sites of their scaled, masked log-densities (or, with
    ``analytic_kl``, minus the closed-form KL where torch knows it), averaged over the
    particles. That path needs reparameterizable guide sites.

    :param int num_particles: samples of z per datapoint and step.
    :param bool analytic_kl: closed-form KL(q || p) where torch knows it.
    :param beta: the KL weight (float or schedule).
    :param data_plate: the data plate's name, for the captured path where several plates have
        the batch's size (by default found).
    """

    name = "reparam"

    def __init__(self, num_particles: int = 1, analytic_kl: bool = False, beta=1.0,
                 data_plate: str | None = None):
        super().__init__(beta)
        self.num_particles = check_count("num_particles", num_particles)
        self.analytic_kl, self.data_plate = bool(analytic_kl), data_plate
        self.capturable = False
        self.forget_layout()

    def validation_loss(self) -> SVILoss:
        return ReparamELBO(1, self.analytic_kl)

    def capturable_(self) -> None:
        self.capturable = True

    def forget_layout(self) -> None:
        cls = TraceMeanField_ELBO if self.analytic_kl else Trace_ELBO
        self.elbo = cls(num_particles=self.num_particles,
                        vectorize_particles=self.num_particles > 1)
        self._nesting = None  # found by tracing once, on the first capturable call
        self._mean_field = None  # with analytic_kl: whether the guide is in the model's order

    def forward(self, model, guide, *args):
        if not self.capturable:
            if self.analytic_kl and self._mean_field is None:  # decided once, on the first call
                with forked_rng(_device(args)):  # the training draws stay as they were
                    self._mean_field = in_model_order(*traces(model, guide, args))
                if not self._mean_field:  # TraceMeanField_ELBO's KLs would be biased
                    self.elbo = Trace_ELBO(num_particles=self.num_particles,
                                           vectorize_particles=self.num_particles > 1)
            loss = self.elbo.differentiable_loss(model, guide, *args)
            return -loss.detach(), loss
        elbo = self._trace_elbo(model, guide, args)
        return elbo.detach(), -elbo

    def _trace_elbo(self, model, guide, args) -> torch.Tensor:
        """Trace_ELBO's (TraceMeanField_ELBO's) particle sum, site by site in the same order."""
        K = self.num_particles
        if K > 1 and self._nesting is None:
            self._nesting = max_plate_nesting(model, guide, args, self.data_plate)
        guide_tr, model_tr = traces(model, guide, args, K if K > 1 else None, self._nesting or 0,
                                    block=False)
        q_sites = dict(guide_sites(guide_tr))
        for name, q_site in q_sites.items():
            if not q_site["fn"].has_rsample:
                raise ValueError(f"the captured reparameterized ELBO needs reparameterizable "
                                 f"guide sites; {name!r} is "
                                 f"{type(base_dist(q_site['fn'])).__name__}: train discrete "
                                 "latents with loss=ScoreFunctionELBO() or VIMCO() (eager)")
        elbo = 0.0
        # closed-form KLs only where the guide samples the latent sites in the model's order
        # (Pyro's mean-field requirement): otherwise a parent's draw depends on its child's
        analytic = self.analytic_kl and in_model_order(guide_tr, model_tr)
        for name, site in sites(model_tr, None):
            q_site = q_sites.get(name)
            if analytic and q_site is not None:
                try:  # as TraceMeanField_ELBO: torch's pairs only (no Normal -> MVN promotion)
                    kl = kl_divergence(q_site["fn"], site["fn"])
                except NotImplementedError:
                    pass
                else:
                    elbo = elbo - _scaled_sum(q_site, kl)
                    q_sites[name] = None  # its log q is inside the KL
                    continue
            elbo = elbo + _scaled_sum(site, site["fn"].log_prob(site["value"]))
        for q_site in q_sites.values():
            if q_site is not None:
                elbo = elbo - _scaled_sum(q_site, q_site["fn"].log_prob(q_site["value"]))
        return elbo / K


def _scaled_sum(site, lp) -> torch.Tensor:
    """A site's log-density (or KL) with its scale and mask applied, summed: Pyro's
    ``log_prob_sum``."""
    return scale_and_mask(lp, site["scale"], site["mask"]).sum()


class _TraceGraphSurrogate(TraceGraph_ELBO):
    """``TraceGraph_ELBO`` returning its ELBO estimate and surrogate loss without calling
    ``backward`` (which ``loss_and_grads`` does), so that the training loop owns the backward
    pass. The one place where pvae relies on a Pyro method outside its public API."""

    def loss_and_surrogate(self, model, guide, *args):
        return self._loss_and_surrogate_loss(model, guide, args, {})


class ScoreFunctionELBO(SVILoss):
    """The ELBO with score-function (REINFORCE) gradients for every latent site of the guide,
    through Pyro's ``TraceGraph_ELBO`` (which uses the model's dependency structure to keep only
    the downstream costs of each site) and :class:`~pvae.inference.handlers.score_function`.

    State (``state_dict``): the neural baselines' networks (``nets``, by site name) and the
    decaying average of the per-datapoint ELBO used by the ``"average"`` baseline. Under
    data-parallel training the average is of the global mini-batch's ELBO (summed over the
    processes), so that it is the same on every process, as in one process on that batch.

    :param int num_particles: samples per datapoint and step.
    :param baseline: ``None``, ``"average"`` or ``"neural"`` (Mnih & Gregor 2014).
    :param float baseline_beta: decay of the ``"average"`` baseline.
    :param beta: the KL weight.
    :param data_plate: the data plate's name where several plates have the batch's size (the
        ``"average"`` baseline counts its datapoints).
    """

    name = "score"

    def __init__(self, num_particles: int = 1, baseline: str | None = None,
                 baseline_beta: float = 0.9, beta=1.0, data_plate: str | None = None):
        super().__init__(beta)
        self.data_plate = data_plate
        if baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose one of {list(BASELINES)}")
        num_particles = check_count("num_particles", num_particles)
        self.elbo = _TraceGraphSurrogate(num_particles=num_particles,
                                         vectorize_particles=num_particles > 1)
        self.baseline, self.baseline_beta = baseline, baseline_beta
        self.nets = nn.ModuleDict()
        self.average = None  # decaying average of the per-datapoint ELBO
        self._global = False  # data-parallel: the average follows the global mini-batch

    def capture_blocker(self) -> str | None:
        return "the score-function ELBO reads the ELBO on the host every step (its baselines)"

    def data_parallel_(self) -> None:
        self._global = True

    def forward(self, model, guide, *args):
        average = 0.0 if self.average is None else self.average

        def scored_guide(*a):
            with score_function(self.baseline, a[0], self.nets, average):
                return guide(*a)

        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        with data_units(self.data_plate, None if first is None else first.shape[0]) as units:
            elbo, surrogate = self.elbo.loss_and_surrogate(model, scored_guide, *args)
        elbo = torch.as_tensor(elbo).detach()
        # under data-parallel training, the global mini-batch's ELBO: every rank keeps the same
        # average (and rank 0's checkpoint holds everyone's); one process: this batch's
        total, count = elbo.item(), units.units if units.agree else units.num_data
        if self._global:
            total, count = parallel.all_reduce_sum(total, count)
        per_datapoint = total / count
        self.average = per_datapoint if self.average is None else (
            self.baseline_beta * self.average + (1 - self.baseline_beta) * per_datapoint)
        return elbo, surrogate

    def get_extra_state(self):
        return {"average": self.average}

    def set_extra_state(self, state):
        self.average = state["average"]


class _ImportanceWeighted(SVILoss):
    """What IWAE and VIMCO share: K particles of the programs, vectorized in one trace (a plate
    left of the model's plates) or, for a model that does not broadcast over it (checked once,
    on the first batch, with :func:`~pvae.inference.traces.vectorizes`, which warns), one trace
    per particle; and the per-datapoint log importance weights ``(K, N)``."""

    def __init__(self, num_particles: int, beta, data_plate: str | None):
        super().__init__(beta)
        self.num_particles = check_count("num_particles", num_particles)
        self.data_plate = data_plate
        self._layout = None  # (nesting, data plate, vectorize), found once, on the first call

    def forget_layout(self) -> None:
        self._layout = None

    def _traces(self, model, guide, args) -> list:
        """``[(guide_trace, model_trace), ...]``: one vectorized pair, or K pairs."""
        if self._layout is None:
            nesting, plate = data_layout(model, guide, args, self.data_plate)
            with forked_rng(_device(args)):
                vectorize = vectorizes(model, guide, args, nesting, plate, task="training")
            self._layout = nesting, plate, vectorize
        nesting, _, vectorize = self._layout
        K = self.num_particles
        if vectorize:
            return [traces(model, guide, args, K, nesting, block=False)]
        return [traces(model, guide, args, None, nesting, block=False) for _ in range(K)]

    def _log_weights(self, parts, dreg: bool = False):
        """``(log_w, obs_scale)``: the ``(K, N)`` log weights of ``parts`` (N the datapoints of
        the data plate as the traces hold them) and the observed sites' scale."""
        nesting, plate, _ = self._layout
        k = self.num_particles if len(parts) == 1 else 1
        log_w, kl, obs_scale = [], [], None
        for guide_tr, model_tr in parts:
            part, obs_scale = _iw_log_weight(guide_tr, model_tr, k, nesting, plate, dreg)
            log_w.append(part)
            kl.append(_log_ratio(guide_tr, model_tr, k, nesting, plate))
        # the history's KL: E_q[log q - log p] per datapoint, summed over the batch
        self.last_kl = obs_scale * torch.cat(kl).mean(0).sum()
        return (torch.cat(log_w) if len(log_w) > 1 else log_w[0]), obs_scale


class IWAE(_ImportanceWeighted):
    r"""The importance-weighted bound, per datapoint n (Burda et al. 2015, eq. 8):

    .. math:: \mathcal{L}_K(x_n) = s_n \log \frac{1}{K} \sum_k \exp\Big(\log p(x_n|z_k)
              + \beta_n \big(\log p(z_k) - \log q(z_k|x_n)\big)\Big)

    with log-probs computed unscaled; ``s_n`` is the observed site's scale (mini-batch scaling,
    any common ``poutine.scale``), which multiplies the bound **after** the log-mean-exp (Pyro's
    ``RenyiELBO`` scales inside it, see pyro-ppl/pyro #3104, #2220), and
    ``beta_n = s_latent / s_n`` is the extra scale of the latent sites (``beta``; 1 by default,
    the plain IWAE bound).

    :param int num_particles: K (Burda et al. train with 5 and 50).
    :param str gradient: ``"standard"`` or ``"dreg"``, the doubly-reparameterized gradient of
        Tucker, Lawson, Gu & Maddison (2019), eq. (7): the guide's parameters get
        sum_k w~_k^2 d log w_k / dz_k dz_k/dphi (log q with stopped parameters), the model's
        the standard sum_k w~_k grad log w_k. DReG needs reparameterizable guide sites; with
        several guide sites it treats them as conditionally independent given x.
    :param beta: the KL weight.
    :param data_plate: the data plate's name where several plates have the batch's size.
    """

    name = "iwae"

    def __init__(self, num_particles: int = 5, gradient: str = "standard", beta=1.0,
                 data_plate: str | None = None):
        super().__init__(num_particles, beta, data_plate)
        if gradient not in GRADIENTS:
            raise ValueError(f"unknown gradient {gradient!r}; choose one of {GRADIENTS}")
        self.gradient = gradient

    def forward(self, model, guide, *args):
        dreg = self.gradient == "dreg"
        parts = self._traces(model, guide, args)
        log_w, obs_scale = self._log_weights(parts, dreg)  # (K, N)
        objective = (obs_scale * logmeanexp(log_w, 0)).sum()
        if not dreg:
            return objective.detach(), -objective
        nesting, plate, _ = self._layout
        k = self.num_particles if len(parts) == 1 else 1
        w_tilde = torch.softmax(log_w.detach(), 0)  # (K, N)
        for i, (guide_tr, _) in enumerate(parts):
            for _, site in sites(guide_tr, False):
                z = site["value"]
                if z.requires_grad:
                    # z's batch dims hold the particle and data dims; broadcast w~ onto them
                    weight = site_shaped(w_tilde[i * k:(i + 1) * k], site, nesting, plate)
                    if weight.dim() > z.dim():  # one particle, no particle dim: leading 1s
                        weight = weight.reshape(weight.shape[weight.dim() - z.dim():])
                    z.register_hook(lambda g, w=weight: g * w)
        surrogate = -(obs_scale * (w_tilde * log_w).sum(0)).sum()
        return objective.detach(), surrogate


def _device(args) -> torch.device:
    """The device of the programs' first tensor argument (the CPU without one)."""
    return next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))


def _dtype(args) -> torch.dtype:
    """The dtype of the programs' first floating-point tensor argument (torch's default
    without one)."""
    return next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()),
                torch.get_default_dtype())


def _log_ratio(guide_tr, model_tr, K, nesting, plate) -> torch.Tensor:
    """log q(z | x) - log p(z), unscaled and detached, ``(K, N)``."""
    N = plate_extent(model_tr, plate)
    ratio = 0.0
    for name, site in guide_sites(guide_tr):
        ratio = ratio + reduce_site(name, site, log_prob(site), K, N, nesting, plate)
    for name, site in sites(model_tr, False):
        ratio = ratio - reduce_site(name, site, log_prob(site), K, N, nesting, plate)
    return torch.as_tensor(ratio).detach().expand(K, N)


def _iw_log_weight(guide_tr, model_tr, K, nesting, plate, dreg):
    """``(log_w, obs_scale)``: the beta-weighted log importance weights ``(K, N)`` of one trace
    pair (see :class:`IWAE`; N the datapoints of the data plate as the trace holds them) and
    the observed sites' scale; with ``dreg`` log q with stopped parameters."""
    N = plate_extent(model_tr, plate)
    obs_scale = None
    log_w = 0.0
    for name, site in sites(model_tr, True):
        log_w = log_w + reduce_site(name, site, log_prob(site), K, N, nesting, plate)
        obs_scale = site["scale"]
    if obs_scale is None:
        raise ValueError("the model has no observed site")
    for name, site in sites(model_tr, False):
        beta = site["scale"] / obs_scale
        log_w = log_w + beta * reduce_site(name, site, log_prob(site), K, N, nesting, plate)
    for name, site in guide_sites(guide_tr):
        fn = site["fn"]
        if dreg:
            if site["is_observed"]:
                raise ValueError(f"gradient='dreg' does not take guides with observed sites "
                                 f"({name!r}: a pyro.factor in the guide, a term of log q with "
                                 "no density over z to reparameterize); use "
                                 "gradient='standard'")
            if site["infer"].get("is_auxiliary"):
                raise ValueError(f"gradient='dreg' does not take guides with auxiliary sites "
                                 f"({name!r}: a Pyro autoguide's unconstrained draw); use "
                                 "gradient='standard'")
            if not fn.has_rsample:
                raise ValueError(f"gradient='dreg' needs reparameterizable guide sites; "
                                 f"{name!r} is {type(base_dist(fn)).__name__}")
            fn = detached(fn)
        beta = site["scale"] / obs_scale
        log_w = log_w - beta * reduce_site(name, site, log_prob(site, fn), K, N, nesting, plate)
    return log_w, obs_scale


class VIMCO(_ImportanceWeighted):
    r"""The importance-weighted bound :math:`\mathcal{L}_K` (as :class:`IWAE`) with
    multi-sample score-function gradients and leave-one-out baselines (Mnih & Rezende 2016,
    "Variational inference for Monte Carlo objectives", eqs. 5-10): for discrete latents, or
    any guide, with no reparameterization.

    With :math:`\hat L = \log \frac1K \sum_k w_k` and, for each particle, the bound with
    :math:`w_k` replaced by the geometric mean of the others,
    :math:`\hat L_{-k} = \log \frac1K \big(\sum_{i \ne k} w_i + \exp(\frac{1}{K-1}
    \sum_{i \ne k} \log w_i)\big)`, the gradient estimate is

    .. math:: \sum_k \big(\hat L - \hat L_{-k}\big)\, \nabla \log q(z_k \mid x)
              + \sum_k \tilde w_k \nabla \log w_k,

    unbiased for :math:`\nabla \mathbb{E}[\hat L]` since :math:`\hat L_{-k}` does not depend on
    :math:`z_k`. The draws are not differentiated (every guide site is switched to the
    score-function estimator, :class:`~pvae.inference.handlers.score_function`).

    :param int num_particles: K >= 2 (the baselines leave one particle out).
    :param beta: the KL weight.
    :param data_plate: the data plate's name where several plates have the batch's size.
    """

    name = "vimco"

    def __init__(self, num_particles: int = 5, beta=1.0, data_plate: str | None = None):
        super().__init__(num_particles, beta, data_plate)
        if self.num_particles < 2:
            raise ValueError(f"VIMCO needs num_particles >= 2 (its baselines leave one "
                             f"particle out), got {num_particles}")

    def forward(self, model, guide, *args):
        K = self.num_particles
        with score_function():
            parts = self._traces(model, guide, args)
        log_w, obs_scale = self._log_weights(parts)  # (K, N)
        N = log_w.shape[1]
        nesting, plate, _ = self._layout
        k = K if len(parts) == 1 else 1
        log_q = torch.cat([sum((reduce_site(name, site, log_prob(site), k, N, nesting, plate)
                                for name, site in guide_sites(guide_tr)),
                               log_w.new_zeros(k, N)) for guide_tr, _ in parts])
        bound = logmeanexp(log_w, 0)  # (N,), differentiable through the densities' parameters
        w = log_w.detach()
        geometric = (w.sum(0, keepdim=True) - w) / (K - 1)  # (K, N): log of the others' mean
        eye = torch.eye(K, dtype=torch.bool, device=w.device).unsqueeze(-1)
        loo = torch.where(eye, geometric.unsqueeze(1), w.unsqueeze(0))  # [k, i, n]
        baseline = torch.logsumexp(loo, 1) - math.log(K)  # (K, N): L_{-k}
        signal = bound.detach() - baseline
        surrogate = -(obs_scale * ((signal * log_q).sum(0) + bound)).sum()
        return (obs_scale * bound).sum().detach(), surrogate


class PyroLoss(SVILoss):
    """Any Pyro ELBO, or any differentiable loss, as a pvae loss: ``loss`` is a
    ``pyro.infer.ELBO`` object with ``differentiable_loss`` (``Trace_ELBO``, ``TraceEnum_ELBO``
    for enumerated discrete latents, ``TraceMeanField_ELBO``, ``TraceCausalEffect_ELBO``,
    ``TraceTMC_ELBO``, their ``Jit*`` variants...) or a callable ``loss(model, guide, *args)``
    returning a 0-dim tensor to minimize, in nats summed over the mini-batch (with the model's
    own scales). The value reported is ``-loss``, so it is the ELBO exactly when ``loss`` is a
    negative ELBO (for ``TraceEnum_ELBO``: with the enumerated sites summed out, a bound at
    least as tight as the sampled one); validation reports the same. A callable that is an
    ``nn.Module`` is registered here, so that its parameters are trained and saved.
    ``fit(model, x, loss=TraceEnum_ELBO())`` wraps the ELBO in this class.

    :param beta: the KL weight (1: the loss as it is).
    :raises TypeError: ``loss`` is an ELBO without ``differentiable_loss`` (``TraceGraph_ELBO``,
        ``RenyiELBO`` step their own ``backward``: use :class:`ScoreFunctionELBO` /
        :class:`IWAE`), an ``ELBOModule`` (``Trace_ELBO()(model, guide)``: pass the ELBO
        itself), or not callable; at a step, the loss is not a 0-dim tensor.
    """

    reports_terms = False  # its value need not be an ELBO (enumerated sites, other bounds)
    sums_out_enumerated = True  # TraceEnum_ELBO does; Pyro's other ELBOs warn for themselves

    def __init__(self, loss, beta=1.0):
        super().__init__(beta)
        if isinstance(loss, ELBOModule):
            raise TypeError("loss is an ELBOModule (Trace_ELBO()(model, guide)), bound to "
                            "programs already; pass the ELBO itself: loss=Trace_ELBO()")
        if isinstance(loss, ELBO):
            if not callable(getattr(loss, "differentiable_loss", None)):
                raise TypeError(f"{type(loss).__name__} has no differentiable_loss (it runs its "
                                "own backward pass); use loss=ScoreFunctionELBO() for "
                                "TraceGraph_ELBO's score-function gradients or loss=IWAE(K) "
                                "for a multi-sample bound")
            self._loss, self._elbo = loss.differentiable_loss, loss
        elif callable(loss):
            self._elbo = None
            self._loss = loss
        else:
            raise TypeError(f"loss must be a pvae loss (ReparamELBO, IWAE, ...), a pyro.infer "
                            f"ELBO or a callable (model, guide, *args) -> loss, got "
                            f"{type(loss).__name__}")
        if isinstance(loss, nn.Module):
            self.module = loss
        self.loss_name = type(loss).__name__ if isinstance(loss, ELBO) else getattr(
            loss, "__qualname__", type(loss).__name__)

    @property
    def config(self) -> dict:
        """The loss's name, Pyro's numeric ELBO options and ``beta``."""
        config = {"name": self.loss_name}
        for key in ("num_particles", "max_plate_nesting", "max_iarange_nesting",
                    "vectorize_particles", "strict_enumeration_warning"):
            value = getattr(self._elbo, key, None)
            if isinstance(value, (bool, int, float)) and not (isinstance(value, float)
                                                              and value != value):
                config[key] = value
        config["beta"] = repr(self.beta) if callable(self.beta) else self.beta
        return config

    def validation_loss(self) -> SVILoss:
        return self

    def capture_blocker(self) -> str | None:
        return f"the loss {self.loss_name} (Pyro's ELBOs synchronize with the host)"

    def forward(self, model, guide, *args):
        if self._elbo is not None and not torch.is_grad_enabled():
            # validation: Pyro's differentiable_loss refuses a loss without gradient
            # (a Python float: in the data's dtype, so that a float64 model's is not rounded)
            loss = torch.tensor(self._elbo.loss(model, guide, *args), device=_device(args),
                                dtype=_dtype(args))
            return -loss, loss
        loss = self._loss(model, guide, *args)
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
            raise TypeError(f"the loss {self.loss_name} must return a 0-dim tensor, got "
                            f"{type(loss).__name__}"
                            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        return -loss.detach(), loss


class _Seen(Messenger):
    """Notes the names of the latent sample sites a program runs into ``names`` (with
    ``enumerated``, only those marked for enumeration)."""

    def __init__(self, names: list, enumerated: bool = False):
        super().__init__()
        self.names, self.enumerated = names, enumerated

    def _pyro_sample(self, msg):
        if not msg["is_observed"] and (not self.enumerated
                                       or msg["infer"].get("enumerate") is not None):
            self.names.append(msg["name"])


def as_loss(loss) -> SVILoss:
    """``loss`` as a pvae loss: itself, or a Pyro ELBO / callable wrapped in :class:`PyroLoss`.

    :raises TypeError: see :class:`PyroLoss`.
    """
    return loss if isinstance(loss, SVILoss) else PyroLoss(loss)


class SVIObjective(nn.Module):
    """The training objective of one model: a loss bound to the model's programs, with beta /
    KL annealing, as the module a training loop steps (the :class:`pvae.train.Objective`
    protocol).

    ``objective(*batch)`` returns ``(value, loss)``, both per datapoint: the objective's value
    (the beta-weighted ELBO or IWAE bound, nats, no gradient) and the surrogate loss to
    differentiate. Per datapoint means: the loss's sums over the batch divided by the number
    of datapoints they stand for (:class:`~pvae.inference.handlers.data_units`): the
    datapoints ``n`` in the data plate as the model's trace holds them times the scale ``s``
    of its observed sites, so that a program that subsamples or scales its data term
    (``pyro.plate("data", N, subsample=idx)``: ``n s = N``; ``subsample_size=m`` in the
    model's or the guide's plate: ``m * N / m = N``; ``poutine.scale(scale=s)``) still reports
    the unscaled ELBO per datapoint, and its loss (hence its gradient) is that of the ELBO per
    datapoint. Where the observed sites carry different scales no single ``s`` exists: nothing
    is divided out beyond ``n``, with one warning. :attr:`num_data` holds the last call's
    ``n`` (what an epoch's mean weights the call's value by). The model's own ``state_dict``
    is not part of this module's (it is saved beside it); the loss's state and the values of
    Pyro param-store parameters that the programs use (user models with ``pyro.param``) are.

    :param model: an object meeting the model contract.
    :param SVILoss loss: the loss; its ``beta`` is applied to the latent sites with
        :class:`~pvae.inference.handlers.scale_latents`.
    :param beta: ``None`` (the loss's) or a float or schedule in its place (validation: 1).

    :ivar bool trusted: set it once the whole dataset has been checked: steps then run with
        Pyro's validation off and built-in models skip their per-call checks
        (:func:`pvae.contract.trusted_inputs`).
    """

    value_name = "elbo"

    def __init__(self, model, loss: SVILoss, beta=None):
        super().__init__()
        self.estimator = loss
        self.schedule = make_schedule(loss.beta if beta is None else beta)
        self.kl_scale = scale_latents(self.schedule(0))
        object.__setattr__(self, "program", model)  # not a submodule: saved on its own
        if isinstance(self.schedule, Constant) and self.schedule.beta == 1.0:
            self._model, self._guide = model.model, model.guide  # plain ELBO: no handler
        else:
            self._model, self._guide = self.kl_scale(model.model), self.kl_scale(model.guide)
        self._store_names: list[str] = []
        self.trusted, self._warned, self._step = False, False, 0
        self._enumeration_checked = False  # on the first call
        self._terms = None  # this epoch's sums: reconstruction, datapoints, KL, datapoints
        self._global = False  # data-parallel: the sums are all-reduced
        self.num_data = None  #: datapoints in the last call's data plate

    @property
    def config(self) -> dict:
        """The loss's settings (:attr:`SVILoss.config`)."""
        return self.estimator.config

    def forward(self, *batch):
        first = batch[0] if batch else None
        hint = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else None
        with contextlib.ExitStack() as stack:
            if self.trusted:
                stack.enter_context(trusted_inputs())
                stack.enter_context(pyro.validation_enabled(False))
            # the data plate, where fit named it for the estimators that trace the programs
            scale = stack.enter_context(data_units(self.estimator.data_plate, hint))
            if self._enumeration_checked:
                value, surrogate = self.estimator(self._model, self._guide, *batch)
            else:
                value, surrogate = self._first_call(batch)
        n = self.num_data = scale.num_data
        units = n
        if not scale.agree:
            if not self._warned:
                warnings.warn("the model's observed sites carry different scales "
                              "(poutine.scale): the training value is reported per datapoint "
                              "without removing them", RuntimeWarning, stacklevel=2)
                self._warned = True
        elif isinstance(scale.scale, torch.Tensor) or scale.scale != 1.0:
            units = n * scale.scale
        value, surrogate = value / units, surrogate / units
        if self.trusted and self.estimator.reports_terms:
            self._record_terms(scale.observed.values(), value, units, n)
        return value, surrogate

    def _first_call(self, batch):
        """The loss on ``batch``, noting the sites the programs run: a loss that does not sum
        out the model's enumerated discrete sites would draw them from the prior instead, a
        biased ELBO or IWAE bound with no error.

        :raises ValueError: the model enumerates a site that the guide does not sample and the
            loss does not sum out (naming the site and the loss, and what to use instead).
        """
        enumerated, proposed = [], []
        model, guide = self._model, self._guide
        if not self.estimator.sums_out_enumerated:
            model, guide = _Seen(enumerated, True)(model), _Seen(proposed)(guide)
        try:
            return self.estimator(model, guide, *batch)
        finally:  # also when the loss failed on such a site (a KeyError of Pyro's, say)
            names = [name for name in enumerated if name not in proposed]
            if names:
                raise ValueError(
                    f"the model enumerates the discrete site {names[0]!r} (@config_enumerate or "
                    "infer={'enumerate': ...}) and the guide does not sample it: "
                    f"{type(self.estimator).__name__} does not sum enumerated sites out (it "
                    "would draw them from the prior and report a biased value); train with "
                    "loss=pyro.infer.TraceEnum_ELBO(max_plate_nesting=...), which sums them "
                    "out, or sample the site in the guide (iw_log_likelihood and elbo_terms sum "
                    "it out either way)")
            self._enumeration_checked = True

    def _record_terms(self, observed, value, units, n: int) -> None:
        """Add this step's reconstruction term E_q[log p(x | z)] (from the observed sites the
        step ran: scaled and masked as in the value, averaged over vectorized particles) and
        KL (the loss's own where it has one; else (reconstruction - value) / beta, for steps
        with beta > 0) to the epoch's sums, on the device (no host synchronization: a captured
        step adds in place)."""
        recon = 0.0
        for msg in observed:
            lp = scale_and_mask(msg["fn"].log_prob(msg["value"]), msg["scale"], msg["mask"])
            particles = math.prod(f.size for f in msg["cond_indep_stack"]
                                  if f.name in PARTICLE_PLATES)
            recon = recon + lp.detach().sum() / particles
        recon = recon / units

        def on_device(v):  # a fill, not a host-to-device copy: capturable
            return v.double() if isinstance(v, torch.Tensor) else value.new_full(
                (), float(v), dtype=torch.float64)

        beta = on_device(self.kl_scale.beta)
        if self.estimator.last_kl is not None:
            kl, weight = on_device(self.estimator.last_kl / units), on_device(n)
        else:  # value = recon - beta KL; nothing to learn of the KL at beta = 0
            positive = beta > 0
            kl = torch.where(positive, (on_device(recon) - value.detach().double())
                             / torch.where(positive, beta, torch.ones_like(beta)),
                             torch.zeros_like(beta))
            weight = on_device(n) * positive
        if self._terms is None:
            self._terms = value.new_zeros(4, dtype=torch.float64)
        self._terms.add_(torch.stack([on_device(recon) * n, on_device(n), kl * weight, weight]))

    def validation(self) -> SVIObjective:
        """The objective whose value is reported on validation data: the loss's
        :meth:`~SVILoss.validation_loss` on the same model, beta 1."""
        return SVIObjective(self.program, self.estimator.validation_loss(), beta=1.0)

    def capture_blocker(self) -> str | None:
        """Why the step cannot be captured as a CUDA graph, or ``None`` (the loss's answer)."""
        return self.estimator.capture_blocker()

    def data_parallel_(self) -> None:
        """Under data-parallel training: the loss keeps statistics of the global batch, and the
        epoch's terms are summed over the processes."""
        self.estimator.data_parallel_()
        self._global = True

    def set_step(self, step: int) -> None:
        """Set beta for optimizer step ``step`` (counted from 0 over the whole run); in place
        when beta is a device tensor (:meth:`capturable_`)."""
        self._step = step
        beta = self.schedule(step)
        if isinstance(self.kl_scale.beta, torch.Tensor):
            self.kl_scale.beta.fill_(beta)
        else:
            self.kl_scale.beta = beta

    def capturable_(self, like: torch.Tensor):
        """Prepare a captured step: the loss's host-sync-free path, and a scheduled beta held
        in a 0-dim tensor with ``like``'s device and dtype, updated in place by
        :meth:`set_step`, so that a captured step reads the current value. Returns ``self``."""
        self.estimator.capturable_()
        if not isinstance(self.schedule, Constant):
            self.kl_scale.beta = like.new_full((), float(self.kl_scale.beta))
        return self

    def metrics(self) -> dict:
        """What the history records of the epoch: beta at its last step, and (for pvae's
        losses) the epoch's training reconstruction term and KL, nats per datapoint (summed
        over the steps since the last call, which resets them)."""
        out = {"beta": float(self.kl_scale.beta)}
        if self._terms is not None:
            recon, n, kl, weight = self._terms.tolist()
            if self._global:
                recon, n, kl, weight = parallel.all_reduce_sum(recon, n, kl, weight)
            out.update(train_reconstruction=recon / n if n else math.nan,
                       train_kl=kl / weight if weight else math.nan)
            self._terms.zero_()
        return out

    def settled(self) -> bool:
        """Whether the objective no longer changes with the step: beta has finished warming up,
        or is in the flat part of a cycle (early stopping and the best checkpoint wait for
        it)."""
        return settled(self.schedule, self._step)

    def needs_whole_batches(self, *batch) -> bool:
        """Whether the programs take no fewer datapoints than ``batch`` (a whole mini-batch):
        they draw a subsample of a plate themselves (``subsample_size``), seen on one trace of
        the guide (which draws the subsample the model replays) with torch's RNG forked; a
        trace that fails answers ``False`` (the probe's own run reports the error)."""
        with forked_rng(_device(batch)):
            try:
                return draws_subsample(self.program.guide, batch)
            except Exception:  # noqa: BLE001 (reported by the probe's own run)
                return False

    def trainable_parameters(self, *batch) -> list[torch.Tensor]:
        """The model's ``nn.Module`` parameters, this objective's own (neural baselines) and
        the Pyro param-store parameters that the programs touch on ``batch`` (found with a
        param-only trace, as ``pyro.infer.SVI`` does), without duplicates. Runs the objective
        once on ``batch``, which also creates lazily built parts.

        :raises ValueError: there is nothing to train.
        """
        with poutine.trace(param_only=True) as tr:
            self(*batch)
        params = {}
        if isinstance(self.program, nn.Module):
            params.update((id(p), p) for p in self.program.parameters() if p.requires_grad)
        params.update((id(p), p) for p in self.parameters() if p.requires_grad)
        own = set(params)
        for site in tr.trace.nodes.values():
            p = site["value"].unconstrained()
            params.setdefault(id(p), p)
        if not params:
            raise ValueError("the model and guide have no trainable parameters: register networks "
                             "with pyro.module(...) or make the model a torch.nn.Module")
        store = dict(pyro.get_param_store().named_parameters())
        self._store_names = [k for k, p in store.items() if id(p) in params and id(p) not in own]
        return list(params.values())

    def param_store_names(self) -> list[str]:
        """The Pyro param-store parameters the programs train (found by
        :meth:`trainable_parameters`)."""
        return list(self._store_names)

    def get_extra_state(self):
        store = dict(pyro.get_param_store().named_parameters())
        return {"param_store": {k: store[k].detach().clone() for k in self._store_names
                                if k in store}}

    def set_extra_state(self, state):
        store = dict(pyro.get_param_store().named_parameters())
        with torch.no_grad():
            for name, value in state.get("param_store", {}).items():
                if name in store:
                    store[name].copy_(value)
