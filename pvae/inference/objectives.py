r"""Training objectives: gradient estimators of the ELBO and the IWAE bound, and
:class:`SVIObjective`, which binds one to a model as the module a training loop steps.

An estimator is an ``nn.Module`` called as ``estimator(model, guide, *args)`` that returns
``(objective, surrogate)``: the objective's value (summed over the mini-batch, nats, no
gradient) and a surrogate loss whose gradient is the estimator's gradient of ``-objective``.
Whatever an estimator learns or keeps between steps (baselines) is in its ``state_dict()``.
All estimators work on any model meeting the model contract.

- ``"reparam"``: Pyro's ``Trace_ELBO`` (``TraceMeanField_ELBO`` with ``analytic_kl``), the
  L-sample ELBO with reparameterized gradients (Bishop & Bishop, Deep Learning, eq. 19.16).
- ``"score"``: Pyro's ``TraceGraph_ELBO`` with every latent site of the guide forced to the
  score-function (REINFORCE) estimator by :class:`~pvae.inference.handlers.score_function`,
  optionally with a decaying-average or neural baselines (Mnih & Gregor 2014).
- ``"iwae"``: the importance-weighted bound (Burda et al. 2015, eq. 8), per datapoint, with the
  standard or the doubly-reparameterized gradient (DReG; Tucker et al. 2019, eq. 7).

:class:`LossEstimator` wraps any Pyro ELBO object (``TraceEnum_ELBO``, ``TraceCausalEffect_ELBO``,
...) or a callable ``(model, guide, *args) -> loss`` as an estimator of the same kind.
"""

from __future__ import annotations

import contextlib
import warnings

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.infer.elbo import ELBOModule
from torch import nn
from torch.distributions import kl_divergence

from pvae import parallel
from pvae.contract import trusted_inputs
from pvae.distributions import base_dist, detached
from pvae.inference.handlers import BASELINES, data_units, scale_latents, score_function
from pvae.inference.schedules import Constant, make_schedule
from pvae.inference.traces import (
    data_layout,
    forked_rng,
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

__all__ = ["CAPTURABLE", "ESTIMATORS", "GRADIENTS", "IWAEEstimator", "LossEstimator",
           "ReparamEstimator", "SVIObjective", "ScoreEstimator", "make_estimator"]

#: Gradient variants of the IWAE estimator.
GRADIENTS = ("standard", "dreg")


class ReparamEstimator(nn.Module):
    """The (multi-sample) ELBO with reparameterized gradients (Kingma & Welling 2014; Bishop &
    Bishop, Deep Learning, eq. 19.16); particles are vectorized.

    By default through Pyro's ``Trace_ELBO`` (``TraceMeanField_ELBO`` with ``analytic_kl``,
    where the guide samples the latent sites in the model's order; otherwise, as for a
    bottom-up guide of a hierarchical model, ``Trace_ELBO`` again, whose Monte Carlo KLs are
    unbiased there: see :func:`~pvae.inference.traces.in_model_order`).
    With ``capturable=True`` the same value and gradient are computed from the shared traces
    of :mod:`pvae.inference.traces` without any host synchronization (Pyro's ELBOs call
    ``.item()`` at every site), so that the whole training step can run on any device and be
    captured as a CUDA graph: the sum over sites of their scaled, masked log-densities (or,
    with ``analytic_kl``, minus the closed-form KL where torch knows it), averaged over the
    particles. It needs reparameterizable guide sites.
    """

    def __init__(self, num_particles: int = 1, analytic_kl: bool = False,
                 capturable: bool = False, data_plate: str | None = None):
        super().__init__()
        cls = TraceMeanField_ELBO if analytic_kl else Trace_ELBO
        self.elbo = cls(num_particles=num_particles, vectorize_particles=num_particles > 1)
        self.num_particles, self.analytic_kl, self.capturable = num_particles, analytic_kl, capturable
        self.data_plate = data_plate
        self._nesting = None  # found by tracing once, on the first capturable call
        self._mean_field = None  # with analytic_kl: whether the guide is in the model's order

    def forward(self, model, guide, *args):
        if not self.capturable:
            if self.analytic_kl and self._mean_field is None:  # decided once, on the first call
                with forked_rng(args[0].device):  # the training draws stay as they were
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
        guide_sites = dict(sites(guide_tr, False, auxiliary=True))
        for name, q_site in guide_sites.items():
            if not q_site["fn"].has_rsample:
                raise ValueError(f"the capturable reparam ELBO needs reparameterizable guide "
                                 f"sites; {name!r} is {type(base_dist(q_site['fn'])).__name__}: "
                                 "use estimator='score' (eager) for discrete latents")
        elbo = 0.0
        # closed-form KLs only where the guide samples the latent sites in the model's order
        # (Pyro's mean-field requirement): otherwise a parent's draw depends on its child's
        analytic = self.analytic_kl and in_model_order(guide_tr, model_tr)
        for name, site in sites(model_tr, None):
            q_site = guide_sites.get(name)
            if analytic and q_site is not None:
                try:  # as TraceMeanField_ELBO: torch's pairs only (no Normal -> MVN promotion)
                    kl = kl_divergence(q_site["fn"], site["fn"])
                except NotImplementedError:
                    pass
                else:
                    elbo = elbo - _scaled_sum(q_site, kl)
                    guide_sites[name] = None  # its log q is inside the KL
                    continue
            elbo = elbo + _scaled_sum(site, site["fn"].log_prob(site["value"]))
        for q_site in guide_sites.values():
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


class ScoreEstimator(nn.Module):
    """The ELBO with score-function gradients for every latent site of the guide, through
    Pyro's ``TraceGraph_ELBO`` (which uses the model's dependency structure to keep only the
    downstream costs of each site) and :class:`~pvae.inference.handlers.score_function`.

    State (``state_dict``): the neural baselines' networks (``nets``, by site name) and the
    decaying average of the per-datapoint ELBO used by the ``"average"`` baseline. Under
    data-parallel training the average is of the global mini-batch's ELBO (summed over the
    processes), so that it is the same on every process, as in one process on that batch.
    """

    def __init__(self, num_particles: int = 1, baseline: str | None = None,
                 baseline_beta: float = 0.9):
        super().__init__()
        if baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose one of {list(BASELINES)}")
        self.elbo = _TraceGraphSurrogate(num_particles=num_particles,
                                         vectorize_particles=num_particles > 1)
        self.baseline, self.baseline_beta = baseline, baseline_beta
        self.nets = nn.ModuleDict()
        self.average = None  # decaying average of the per-datapoint ELBO
        #: set by data-parallel training (:func:`pvae.train.distributed.wrap`): the average
        #: then follows the global mini-batch's ELBO, all-reduced over the processes
        self.data_parallel = False

    def forward(self, model, guide, *args):
        average = 0.0 if self.average is None else self.average

        def scored_guide(*a):
            with score_function(self.baseline, a[0], self.nets, average):
                return guide(*a)

        elbo, surrogate = self.elbo.loss_and_surrogate(model, scored_guide, *args)
        elbo = torch.as_tensor(elbo).detach()
        # under data-parallel training, the global mini-batch's ELBO: every rank keeps the same
        # average (and rank 0's checkpoint holds everyone's); one process: this batch's
        total, count = elbo.item(), args[0].shape[0]
        if self.data_parallel:
            total, count = parallel.all_reduce_sum(total, count)
        per_datapoint = total / count
        self.average = per_datapoint if self.average is None else (
            self.baseline_beta * self.average + (1 - self.baseline_beta) * per_datapoint)
        return elbo, surrogate

    def get_extra_state(self):
        return {"average": self.average}

    def set_extra_state(self, state):
        self.average = state["average"]


class IWAEEstimator(nn.Module):
    r"""The importance-weighted bound, per datapoint n (Burda et al. 2015, eq. 8):

    .. math:: \mathcal{L}_K(x_n) = s_n \log \frac{1}{K} \sum_k \exp\Big(\log p(x_n|z_k)
              + \beta_n \big(\log p(z_k) - \log q(z_k|x_n)\big)\Big)

    with log-probs computed unscaled; ``s_n`` is the observed site's scale (mini-batch scaling,
    any common ``poutine.scale``), which multiplies the bound **after** the log-mean-exp (Pyro's
    ``RenyiELBO`` scales inside it, see pyro-ppl/pyro #3104, #2220), and
    ``beta_n = s_latent / s_n`` is the extra scale of the latent sites (beta / KL annealing
    through :class:`~pvae.inference.handlers.scale_latents`; 1 by default, the plain IWAE bound).

    The K particles are one vectorized trace (a plate left of the model's plates); a model
    that does not broadcast over it (checked once, on the first batch, with
    :func:`~pvae.inference.traces.vectorizes`, which warns) is traced once per particle.

    :param int num_particles: K.
    :param str gradient: ``"standard"`` or ``"dreg"``, the doubly-reparameterized gradient of
        Tucker, Lawson, Gu & Maddison (2019), eq. (7): the guide's parameters get
        sum_k w~_k^2 d log w_k / dz_k dz_k/dphi (log q with stopped parameters), the model's
        the standard sum_k w~_k grad log w_k. DReG needs reparameterizable guide sites; with
        several guide sites it treats them as conditionally independent given x.
    """

    def __init__(self, num_particles: int = 1, gradient: str = "standard",
                 data_plate: str | None = None):
        super().__init__()
        if gradient not in GRADIENTS:
            raise ValueError(f"unknown gradient {gradient!r}; choose one of {GRADIENTS}")
        self.num_particles, self.gradient, self.data_plate = num_particles, gradient, data_plate
        # (nesting, data plate, vectorize), found by tracing once, on the first call
        self._layout = None

    def forward(self, model, guide, *args):
        K = self.num_particles
        if self._layout is None:
            nesting, plate = data_layout(model, guide, args, self.data_plate)
            x = args[0]
            with forked_rng(x.device):
                vectorize = vectorizes(model, guide, args, nesting, plate, task="training")
            self._layout = nesting, plate, vectorize
        nesting, plate, vectorize = self._layout
        dreg = self.gradient == "dreg"
        # the K particles in one vectorized trace, or (a model that does not broadcast over a
        # leading particle dim) one trace per particle, as Trace_ELBO(vectorize_particles=False)
        parts = ([traces(model, guide, args, K, nesting, block=False)] if vectorize else
                 [traces(model, guide, args, None, nesting, block=False) for _ in range(K)])
        k = K if vectorize else 1
        log_w, obs_scale = [], None
        for guide_tr, model_tr in parts:
            part, obs_scale = _iw_log_weight(guide_tr, model_tr, k, nesting, plate, dreg)
            log_w.append(part)
        log_w = torch.cat(log_w) if len(log_w) > 1 else log_w[0]  # (K, N)
        objective = (obs_scale * logmeanexp(log_w, 0)).sum()
        if not dreg:
            return objective.detach(), -objective
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


def _iw_log_weight(guide_tr, model_tr, K, nesting, plate, dreg):
    """``(log_w, obs_scale)``: the beta-weighted log importance weights ``(K, N)`` of one trace
    pair (see :class:`IWAEEstimator`; N the datapoints of the data plate as the trace holds
    them) and the observed sites' scale; with ``dreg`` log q with stopped parameters."""
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
    for name, site in sites(guide_tr, False, auxiliary=True):
        fn = site["fn"]
        if dreg:
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


class LossEstimator(nn.Module):
    """Any Pyro ELBO, or any differentiable loss, as an estimator: ``loss`` is a
    ``pyro.infer.ELBO`` object with ``differentiable_loss`` (``Trace_ELBO``, ``TraceEnum_ELBO``
    for enumerated discrete latents, ``TraceMeanField_ELBO``, ``TraceCausalEffect_ELBO``,
    ``TraceTMC_ELBO``, their ``Jit*`` variants...) or a callable ``loss(model, guide, *args)``
    returning a 0-dim tensor to minimize, in nats summed over the mini-batch (with the model's
    own scales). The value reported is ``-loss``, so it is the ELBO exactly when ``loss`` is a
    negative ELBO (for ``TraceEnum_ELBO``: with the enumerated sites summed out, a bound at
    least as tight as the sampled one). A callable that is an ``nn.Module`` is registered here,
    so that its parameters are trained and saved.

    :raises TypeError: ``loss`` is an ELBO without ``differentiable_loss`` (``TraceGraph_ELBO``,
        ``RenyiELBO`` step their own ``backward``: use ``estimator="score"`` / ``"iwae"``), an
        ``ELBOModule`` (``Trace_ELBO()(model, guide)``: pass the ELBO itself), or not callable;
        at a step, the loss is not a 0-dim tensor.
    """

    def __init__(self, loss):
        super().__init__()
        if isinstance(loss, ELBOModule):
            raise TypeError("loss is an ELBOModule (Trace_ELBO()(model, guide)), bound to "
                            "programs already; pass the ELBO itself: loss=Trace_ELBO()")
        if isinstance(loss, ELBO):
            if not callable(getattr(loss, "differentiable_loss", None)):
                raise TypeError(f"{type(loss).__name__} has no differentiable_loss (it runs its "
                                "own backward pass); use estimator='score' for TraceGraph_ELBO's "
                                "score-function gradients or estimator='iwae' for a "
                                "multi-sample bound")
            self._loss, self._elbo = loss.differentiable_loss, loss
        elif callable(loss):
            self._elbo = None
            self._loss = loss
        else:
            raise TypeError(f"loss must be a pyro.infer ELBO or a callable (model, guide, *args) "
                            f"-> loss, got {type(loss).__name__}")
        if isinstance(loss, nn.Module):
            self.module = loss
        self.name = type(loss).__name__ if isinstance(loss, ELBO) else getattr(
            loss, "__qualname__", type(loss).__name__)

    def forward(self, model, guide, *args):
        if self._elbo is not None and not torch.is_grad_enabled():
            # validation: Pyro's differentiable_loss refuses a loss without gradient
            loss = args[0].new_tensor(self._elbo.loss(model, guide, *args))
            return -loss, loss
        loss = self._loss(model, guide, *args)
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
            raise TypeError(f"the loss {self.name} must return a 0-dim tensor, got "
                            f"{type(loss).__name__}"
                            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        return -loss.detach(), loss


#: Registry of estimators by name (``--estimator`` on the command line).
ESTIMATORS = {"reparam": ReparamEstimator, "score": ScoreEstimator, "iwae": IWAEEstimator}
#: Estimators whose step runs without host synchronization (see ``capturable``).
CAPTURABLE = ("reparam", "iwae")


def make_estimator(estimator: str = "reparam", *, num_particles: int = 1,
                   analytic_kl: bool = False, baseline: str | None = None,
                   gradient: str = "standard", capturable: bool = False,
                   data_plate: str | None = None) -> nn.Module:
    """Build an estimator by name.

    :param str estimator: ``"reparam"``, ``"score"`` or ``"iwae"``.
    :param int num_particles: samples per datapoint (K for IWAE), >= 1.
    :param bool analytic_kl: closed-form KL (``reparam`` only).
    :param baseline: ``None``, ``"average"`` or ``"neural"`` (``score`` only).
    :param str gradient: ``"standard"`` or ``"dreg"`` (``iwae`` only).
    :param bool capturable: an estimator whose step has no host synchronization (runs on any
        device, can be captured as a CUDA graph): ``reparam`` computed from pvae's traces, and
        ``iwae`` (always capturable).
    :param data_plate: the data plate's name, for the estimators that trace the programs
        themselves (``iwae``, capturable ``reparam``) where more than one plate could be it
        (by default found: see :func:`~pvae.inference.traces.find_data_plate`).
    :raises ValueError: unknown names, ``num_particles < 1``, options that do not apply to the
        estimator, or ``capturable`` with ``score`` (its baselines need the ELBO on the host).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {sorted(ESTIMATORS)}")
    if not (isinstance(num_particles, int) and num_particles >= 1):
        raise ValueError(f"Expected num_particles >= 1, got {num_particles!r}")
    if analytic_kl and estimator != "reparam":
        raise ValueError("analytic_kl applies to estimator='reparam' only")
    if baseline is not None and estimator != "score":
        raise ValueError("baseline applies to estimator='score' only")
    if gradient != "standard" and estimator != "iwae":
        raise ValueError("gradient='dreg' applies to estimator='iwae' only")
    if capturable and estimator not in CAPTURABLE:
        raise ValueError(f"estimator={estimator!r} cannot be captured (it reads the ELBO on the "
                         f"host every step); capturable estimators: {CAPTURABLE}")
    if estimator == "reparam":
        return ReparamEstimator(num_particles, analytic_kl, capturable=capturable,
                                data_plate=data_plate)
    if estimator == "score":
        return ScoreEstimator(num_particles, baseline)
    return IWAEEstimator(num_particles, gradient, data_plate)


class SVIObjective(nn.Module):
    """The training objective of one model: an estimator bound to the model's programs, with
    beta / KL annealing, as the module a training loop steps.

    ``objective(*batch)`` returns ``(value, loss)``, both per datapoint: the objective's value
    (the beta-weighted ELBO or IWAE bound, nats, no gradient) and the surrogate loss to
    differentiate. Per datapoint means: the estimator's sums over the batch divided by the
    number of datapoints they stand for (:class:`~pvae.inference.handlers.data_units`): the
    datapoints ``n`` in the data plate as the model's trace holds them times the scale ``s``
    of its observed sites, so that a program that subsamples or scales its data term
    (``pyro.plate("data", N, subsample=idx)``: ``n s = N``; ``subsample_size=m`` in the
    model's or the guide's plate: ``m * N / m = N``; ``poutine.scale(scale=s)``) still reports
    the unscaled ELBO per datapoint, and its loss (hence its gradient) is that of the ELBO per
    datapoint. Where the observed sites carry different scales no single ``s`` exists: nothing
    is divided out beyond ``n``, with one warning. :attr:`num_data` holds the last call's
    ``n`` (what an epoch's mean weights the call's value by). The model's own ``state_dict``
    is not part of this module's (it is saved beside it); the estimator's state and the
    values of Pyro param-store parameters that the programs use (user models with
    ``pyro.param``) are.

    :param model: an object meeting the model contract.
    :param estimator: from :func:`make_estimator`.
    :param beta: a float or a schedule ``step -> beta`` (:mod:`pvae.inference.schedules`),
        applied to the latent sites with :class:`~pvae.inference.handlers.scale_latents`.

    :ivar bool trusted: set it once the whole dataset has been checked: steps then run with
        Pyro's validation off and built-in models skip their per-call checks
        (:func:`pvae.contract.trusted_inputs`).
    """

    def __init__(self, model, estimator: nn.Module, beta=1.0):
        super().__init__()
        self.estimator = estimator
        self.schedule = make_schedule(beta)
        self.kl_scale = scale_latents(self.schedule(0))
        object.__setattr__(self, "program", model)  # not a submodule: saved on its own
        if isinstance(self.schedule, Constant) and self.schedule.beta == 1.0:
            self._model, self._guide = model.model, model.guide  # plain ELBO: no handler
        else:
            self._model, self._guide = self.kl_scale(model.model), self.kl_scale(model.guide)
        self._store_names: list[str] = []
        self.trusted, self._warned = False, False
        self.num_data = None  #: datapoints in the last call's data plate

    def forward(self, *batch):
        first = batch[0] if batch else None
        hint = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else None
        with contextlib.ExitStack() as stack:
            if self.trusted:
                stack.enter_context(trusted_inputs())
                stack.enter_context(pyro.validation_enabled(False))
            # the data plate, where fit named it for the estimators that trace the programs
            plate = getattr(self.estimator, "data_plate", None)
            scale = stack.enter_context(data_units(plate, hint))
            value, surrogate = self.estimator(self._model, self._guide, *batch)
        n = self.num_data = scale.num_data
        value, surrogate = value / n, surrogate / n
        if not scale.agree:
            if not self._warned:
                warnings.warn("the model's observed sites carry different scales "
                              "(poutine.scale): the training value is reported per datapoint "
                              "without removing them", RuntimeWarning, stacklevel=2)
                self._warned = True
        elif isinstance(scale.scale, torch.Tensor) or scale.scale != 1.0:
            value, surrogate = value / scale.scale, surrogate / scale.scale
        return value, surrogate

    def set_step(self, step: int) -> None:
        """Set beta for optimizer step ``step`` (counted from 0 over the whole run); in place
        when beta is a device tensor (:meth:`capturable_`)."""
        beta = self.schedule(step)
        if isinstance(self.kl_scale.beta, torch.Tensor):
            self.kl_scale.beta.fill_(beta)
        else:
            self.kl_scale.beta = beta

    def capturable_(self, like: torch.Tensor):
        """Hold a scheduled beta in a 0-dim tensor with ``like``'s device and dtype, updated in
        place by :meth:`set_step`, so that a captured step reads the current value. Returns
        ``self``."""
        if not isinstance(self.schedule, Constant):
            self.kl_scale.beta = like.new_full((), float(self.kl_scale.beta))
        return self

    def metrics(self) -> dict:
        """Settings of the current step worth recording in the history."""
        return {"beta": float(self.kl_scale.beta)}

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
