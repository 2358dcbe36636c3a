r"""Gradient estimators of the ELBO and the IWAE bound, and beta / KL-annealing schedules.

An estimator is called as ``estimator(model, guide, *args)`` and returns
``(objective, surrogate)``: the objective's value (summed over the mini-batch, nats, no
gradient) and a surrogate loss whose gradient is the estimator's gradient of ``-objective``.
:func:`pvae.inference.fit` differentiates the surrogate; all estimators work on any model
meeting the model contract.

- ``"reparam"``: Pyro's ``Trace_ELBO`` (``TraceMeanField_ELBO`` with ``analytic_kl``), the
  L-sample ELBO with reparameterized gradients (Bishop & Bishop, Deep Learning, eq. 19.16).
- ``"score"``: Pyro's ``TraceGraph_ELBO`` with every latent site of the guide forced to the
  score-function (REINFORCE) estimator by :func:`score_function`, optionally with Pyro's
  decaying-average or neural baselines (Mnih & Gregor 2014).
- ``"iwae"``: the importance-weighted bound (Burda et al. 2015, eq. 8), per datapoint, with the
  standard or the doubly-reparameterized gradient (DReG; Tucker et al. 2019, eq. 7).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pyro
import torch
from pyro.infer import Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import Independent, MultivariateNormal

__all__ = ["BASELINES", "ESTIMATORS", "Constant", "Cyclical", "IWAEEstimator", "LinearWarmup",
           "gradient_variance",
           "ReparamEstimator", "ScoreEstimator", "make_estimator", "make_schedule",
           "scale_latents", "score_function"]


# ---------------------------------------------------------------------------------------------
# Effect handlers


class scale_latents(Messenger):
    """Multiply the log-density of every **latent** sample site by ``beta`` (observed sites are
    left alone), in the model and the guide alike: the beta-VAE objective
    E_q[log p(x|z)] - beta KL(q || p) (Higgins et al. 2017) for any model.

    ``beta`` is read at every site, so a training loop may change it between steps.
    """

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.beta = beta

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg) \
                and self.beta != 1.0:
            msg["scale"] = self.beta * msg["scale"]


def _base(fn):
    while isinstance(fn, Independent):
        fn = fn.base_dist
    return fn


class score_function(Messenger):
    """Force the score-function (REINFORCE) gradient estimator on every latent site of a guide,
    and optionally attach Pyro baselines to them.

    Works on any guide: it acts on each site's base distribution (under ``Independent``
    wrappers, where ``has_rsample_`` cannot be called) after the plates have expanded it.

    :param str baseline: ``None``, ``"average"`` (the constant ``average``: a decaying average
        of past per-datapoint ELBOs kept by :class:`ScoreEstimator`; Pyro's own decaying-average
        baseline keeps one value per position in the batch, which does not fit shuffled
        mini-batches) or ``"neural"`` (a small MLP of ``baseline_input`` per site, trained on
        the squared error to the downstream cost; Mnih & Gregor 2014).
    :param float average: the value of the ``"average"`` baseline.
    :param baseline_input: tensor ``(N, D)`` fed to neural baselines (usually ``x``).
    :param dict nets: where neural baseline networks live, by site name (created on first use
        and registered with ``pyro.module`` so that ``fit`` trains them).
    """

    def __init__(self, baseline: str | None = None, baseline_input=None, nets=None,
                 average: float = 0.0, hidden_dim: int = 64):
        super().__init__()
        if baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose one of {list(BASELINES)}")
        if baseline is not None and baseline_input is None:
            raise ValueError("baselines need baseline_input (the data x)")
        self.baseline, self.baseline_input = baseline, baseline_input
        self.nets = {} if nets is None else nets
        self.average, self.hidden_dim = average, hidden_dim

    def _pyro_sample(self, msg):
        if msg["is_observed"] or site_is_subsample(msg):
            return
        base = _base(msg["fn"])
        if base.has_rsample:
            if not hasattr(base, "has_rsample_"):
                raise TypeError(f"site {msg['name']!r}: cannot switch {type(base).__name__} to "
                                "score-function gradients; use pyro.distributions")
            base.has_rsample_(False)
        if self.baseline == "average":
            x = self.baseline_input
            value = torch.full(msg["fn"].batch_shape, self.average, dtype=x.dtype, device=x.device)
            msg["infer"] = {**msg["infer"], "baseline": {"baseline_value": value}}
        elif self.baseline == "neural":
            x = self.baseline_input
            net = self.nets.get(msg["name"])
            if net is None:
                net = nn.Sequential(nn.Linear(x.shape[-1], self.hidden_dim), nn.Tanh(),
                                    nn.Linear(self.hidden_dim, 1)).to(device=x.device,
                                                                     dtype=x.dtype)
                self.nets[msg["name"]] = net
            pyro.module(f"pvae_baseline_{id(self.nets)}_{msg['name']}", net)
            shape = msg["fn"].batch_shape
            msg["infer"] = {**msg["infer"], "baseline": {
                "nn_baseline": lambda inp, net=net: net(inp).squeeze(-1),
                "nn_baseline_input": x.expand(*shape, x.shape[-1]) if shape else x}}


#: Baseline options of the score-function estimator.
BASELINES = (None, "average", "neural")


# ---------------------------------------------------------------------------------------------
# Estimators


class ReparamEstimator:
    """The (multi-sample) ELBO with reparameterized gradients through Pyro's ``Trace_ELBO``
    (``TraceMeanField_ELBO`` when ``analytic_kl``); particles are vectorized."""

    def __init__(self, num_particles: int = 1, analytic_kl: bool = False):
        cls = TraceMeanField_ELBO if analytic_kl else Trace_ELBO
        self.elbo = cls(num_particles=num_particles, vectorize_particles=num_particles > 1)

    def __call__(self, model, guide, *args):
        loss = self.elbo.differentiable_loss(model, guide, *args)
        return -loss.detach(), loss


class ScoreEstimator:
    """The ELBO with score-function gradients for every latent site of the guide, through
    Pyro's ``TraceGraph_ELBO`` (which uses the model's dependency structure to keep only the
    downstream costs of each site) and :func:`score_function`."""

    def __init__(self, num_particles: int = 1, baseline: str | None = None,
                 baseline_beta: float = 0.9):
        if baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose one of {list(BASELINES)}")
        self.elbo = TraceGraph_ELBO(num_particles=num_particles,
                                    vectorize_particles=num_particles > 1)
        self.baseline, self.baseline_beta = baseline, baseline_beta
        self.nets: dict = {}
        self.average = None  # decaying average of the per-datapoint ELBO

    def __call__(self, model, guide, *args):
        average = 0.0 if self.average is None else self.average

        def scored_guide(*a):
            with score_function(self.baseline, a[0], self.nets, average):
                return guide(*a)

        elbo, surrogate = self.elbo._loss_and_surrogate_loss(model, scored_guide, args, {})
        elbo = torch.as_tensor(elbo).detach()
        per_datapoint = elbo.item() / args[0].shape[0]
        self.average = per_datapoint if self.average is None else (
            self.baseline_beta * self.average + (1 - self.baseline_beta) * per_datapoint)
        return elbo, surrogate


def _detached(fn):
    """The same distribution with its parameters detached (for DReG's log q)."""
    if isinstance(fn, Independent):
        return Independent(_detached(fn.base_dist), fn.reinterpreted_batch_ndims)
    if isinstance(fn, MultivariateNormal):
        return type(fn)(fn.loc.detach(), scale_tril=fn.scale_tril.detach())
    params = {k: getattr(fn, k).detach() for k in fn.arg_constraints if k in fn.__dict__}
    if not params:
        raise TypeError(f"DReG cannot detach the parameters of {type(fn).__name__}")
    return type(fn)(**params)


class IWAEEstimator:
    r"""The importance-weighted bound, per datapoint n (Burda et al. 2015, eq. 8):

    .. math:: \mathcal{L}_K(x_n) = s_n \log \frac{1}{K} \sum_k \exp\Big(\log p(x_n|z_k)
              + \beta_n \big(\log p(z_k) - \log q(z_k|x_n)\big)\Big)

    with log-probs computed unscaled; ``s_n`` is the observed site's scale (mini-batch scaling,
    any common ``poutine.scale``), which multiplies the bound **after** the log-mean-exp (Pyro's
    ``RenyiELBO`` scales inside it, see pyro-ppl/pyro #3104, #2220), and
    ``beta_n = s_latent / s_n`` is the extra scale of the latent sites (beta / KL annealing
    through :class:`scale_latents`; 1 by default, the plain IWAE bound).

    :param int num_particles: K.
    :param str gradient: ``"standard"`` or ``"dreg"``, the doubly-reparameterized gradient of
        Tucker, Lawson, Gu & Maddison (2019), eq. (7): the guide's parameters get
        sum_k w~_k^2 d log w_k / dz_k dz_k/dphi (log q with stopped parameters), the model's
        the standard sum_k w~_k grad log w_k. DReG needs reparameterizable guide sites; with
        several guide sites it treats them as conditionally independent given x.
    """

    def __init__(self, num_particles: int = 1, gradient: str = "standard"):
        if gradient not in GRADIENTS:
            raise ValueError(f"unknown gradient {gradient!r}; choose one of {GRADIENTS}")
        self.num_particles, self.gradient = num_particles, gradient
        self._nesting = None

    def __call__(self, model, guide, *args):
        from pvae.inference.evaluate import _max_plate_nesting, _reduce, _sites, _traces

        x, c = args[0], (args[1] if len(args) > 1 else None)
        K, N = self.num_particles, x.shape[0]
        if self._nesting is None:
            self._nesting = _max_plate_nesting(SimpleNamespace(model=model, guide=guide), x, c)
        nesting = self._nesting
        guide_tr, model_tr = _traces(SimpleNamespace(model=model, guide=guide), x, c, K, nesting)
        obs_scale = None
        log_w = x.new_zeros(K, N)
        for name, site in _sites(model_tr, True):
            log_w = log_w + _reduce(name, site, site["fn"].log_prob(site["value"]), K, N, nesting)
            obs_scale = site["scale"]
        if obs_scale is None:
            raise ValueError("the model has no observed site")
        dreg = self.gradient == "dreg"
        for name, site in _sites(model_tr, False):
            beta = site["scale"] / obs_scale
            log_w = log_w + beta * _reduce(name, site, site["fn"].log_prob(site["value"]), K, N,
                                           nesting)
        for name, site in _sites(guide_tr, False):
            fn = site["fn"]
            if dreg:
                if not fn.has_rsample:
                    raise ValueError(f"gradient='dreg' needs reparameterizable guide sites; "
                                     f"{name!r} is {type(_base(fn)).__name__}")
                fn = _detached(fn)
            beta = site["scale"] / obs_scale
            log_w = log_w - beta * _reduce(name, site, fn.log_prob(site["value"]), K, N, nesting)
        bound = torch.logsumexp(log_w, 0) - math.log(K)
        objective = (obs_scale * bound).sum()
        if not dreg:
            return objective.detach(), -objective
        w_tilde = torch.softmax(log_w.detach(), 0)  # (K, N)
        for _, site in _sites(guide_tr, False):
            z = site["value"]
            if z.requires_grad:
                # z's batch dims hold the particle and data dims; broadcast w~ onto them
                weight = _site_shaped(w_tilde, site, nesting)
                z.register_hook(lambda g, w=weight: g * w)
        surrogate = -(obs_scale * (w_tilde * log_w).sum(0)).sum()
        return objective.detach(), surrogate


def _site_shaped(t, site, nesting):
    """Place a ``(K, N)`` tensor on a site value's particle and ``"data"`` dims, with size-1
    dims elsewhere, so that it broadcasts against the value."""
    K, N = t.shape
    rank = nesting + 1
    event_dims = len(site["fn"].event_shape)
    data_dim = next(f.dim for f in site["cond_indep_stack"] if f.name == "data")
    shape = [1] * rank
    shape[0], shape[rank + data_dim] = K, N
    return t.reshape(shape + [1] * event_dims)


#: Gradient variants of the IWAE estimator.
GRADIENTS = ("standard", "dreg")

#: Registry of estimators by name (``--estimator`` on the command line).
ESTIMATORS = {"reparam": ReparamEstimator, "score": ScoreEstimator, "iwae": IWAEEstimator}


def make_estimator(estimator: str = "reparam", *, num_particles: int = 1,
                   analytic_kl: bool = False, baseline: str | None = None,
                   gradient: str = "standard"):
    """Build an estimator by name.

    :param str estimator: ``"reparam"``, ``"score"`` or ``"iwae"``.
    :param int num_particles: samples per datapoint (K for IWAE), >= 1.
    :param bool analytic_kl: closed-form KL (``reparam`` only).
    :param baseline: ``None``, ``"average"`` or ``"neural"`` (``score`` only).
    :param str gradient: ``"standard"`` or ``"dreg"`` (``iwae`` only).
    :raises ValueError: unknown names, ``num_particles < 1``, or options that do not apply to
        the estimator.
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
    if estimator == "reparam":
        return ReparamEstimator(num_particles, analytic_kl)
    if estimator == "score":
        return ScoreEstimator(num_particles, baseline)
    return IWAEEstimator(num_particles, gradient)


# ---------------------------------------------------------------------------------------------
# beta schedules


class Constant:
    """beta(step) = beta."""

    def __init__(self, beta: float = 1.0):
        self.beta = float(beta)

    def __call__(self, step: int) -> float:
        return self.beta

    def __repr__(self):
        return f"Constant({self.beta})"


class LinearWarmup:
    """KL annealing (Bowman et al. 2016): beta rises linearly from ``start`` to ``end`` over
    ``num_steps`` optimizer steps, then stays at ``end``."""

    def __init__(self, num_steps: int, start: float = 0.0, end: float = 1.0):
        if num_steps < 1:
            raise ValueError(f"Expected num_steps >= 1, got {num_steps}")
        self.num_steps, self.start, self.end = num_steps, float(start), float(end)

    def __call__(self, step: int) -> float:
        t = min(step / self.num_steps, 1.0)
        return self.start + t * (self.end - self.start)

    def __repr__(self):
        return f"LinearWarmup({self.num_steps}, start={self.start}, end={self.end})"


class Cyclical:
    """Cyclical annealing (Fu et al. 2019): in every period of ``period`` steps beta rises
    linearly from 0 to ``end`` during the first ``ratio`` of the period, then stays there."""

    def __init__(self, period: int, ratio: float = 0.5, end: float = 1.0):
        if period < 1 or not 0 < ratio <= 1:
            raise ValueError(f"Expected period >= 1 and 0 < ratio <= 1, got {period}, {ratio}")
        self.period, self.ratio, self.end = period, ratio, float(end)

    def __call__(self, step: int) -> float:
        t = (step % self.period) / (self.period * self.ratio)
        return self.end * min(t, 1.0)

    def __repr__(self):
        return f"Cyclical({self.period}, ratio={self.ratio}, end={self.end})"


def make_schedule(beta=1.0, kl_warmup_steps: int = 0, kl_cycle_steps: int = 0):
    """A schedule from command-line style settings: a float or callable ``beta``; a linear
    warm-up from 0 to ``beta`` over ``kl_warmup_steps``; or cyclical annealing with period
    ``kl_cycle_steps``."""
    if callable(beta):
        return beta
    if kl_warmup_steps and kl_cycle_steps:
        raise ValueError("choose either kl_warmup_steps or kl_cycle_steps, not both")
    if kl_warmup_steps:
        return LinearWarmup(kl_warmup_steps, 0.0, beta)
    if kl_cycle_steps:
        return Cyclical(kl_cycle_steps, 0.5, beta)
    return Constant(beta)


# ---------------------------------------------------------------------------------------------
# Gradient-variance diagnostics


def gradient_variance(model, x: torch.Tensor, *, estimator: str = "reparam",
                      num_estimates: int = 200, num_particles: int = 1,
                      baseline: str | None = None, gradient: str = "standard",
                      warmup_steps: int = 0, c=None, seed: int = 0) -> dict:
    """Mean and variance of an estimator's gradient over independent estimates at fixed
    parameters, per parameter group (the first component of each parameter's name, e.g.
    ``encoder``, ``decoder``).

    Each estimate is the gradient of the surrogate loss per datapoint on the same batch ``x``.
    Neural baselines, which start untrained, can be fitted first for ``warmup_steps`` Adam
    steps on the baseline's own parameters (the model's parameters stay fixed).

    :param model: an ``nn.Module`` meeting the model contract.
    :param torch.Tensor x: one mini-batch ``(B, D)``.
    :returns: ``{group: {"mean_sq": ..., "variance": ..., "snr": ..., "num_params": ...},
        "total": {...}}`` where ``variance`` is the summed per-coordinate variance (trace of the
        gradient covariance), ``mean_sq`` the squared norm of the mean gradient, and ``snr`` the
        mean over coordinates of |mean| / sd (Rainforth et al. 2018).
    """
    if not isinstance(model, nn.Module):
        raise TypeError("gradient_variance needs an nn.Module model (to name parameter groups)")
    est = make_estimator(estimator, num_particles=num_particles, baseline=baseline,
                         gradient=gradient)
    args = (x,) if c is None else (x, c)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    pyro.set_rng_seed(seed)
    if warmup_steps and baseline == "neural":
        est(model.model, model.guide, *args)  # creates the baseline networks
        opt = torch.optim.Adam([p for net in est.nets.values() for p in net.parameters()],
                               lr=1e-2)
        for _ in range(warmup_steps):
            opt.zero_grad()
            est(model.model, model.guide, *args)[1].backward()
            opt.step()
    grads = []
    for _ in range(num_estimates):
        model.zero_grad(set_to_none=True)
        surrogate = est(model.model, model.guide, *args)[1] / x.shape[0]
        gs = torch.autograd.grad(surrogate, [p for _, p in named], allow_unused=True)
        grads.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                for g, (_, p) in zip(gs, named)]))
    g = torch.stack(grads).double()  # (num_estimates, P)
    mean, var = g.mean(0), g.var(0)
    out, start = {}, 0
    groups: dict[str, list] = {}
    for n, p in named:
        groups.setdefault(n.split(".")[0], []).append(slice(start, start + p.numel()))
        start += p.numel()
    groups["total"] = [slice(0, start)]
    for name, slices in groups.items():
        idx = torch.cat([torch.arange(s.start, s.stop) for s in slices])
        m, v = mean[idx], var[idx]
        out[name] = {"mean_sq": (m**2).sum().item(), "variance": v.sum().item(),
                     "snr": (m.abs() / v.sqrt().clamp_min(1e-30)).mean().item(),
                     "num_params": len(idx)}
    return out
