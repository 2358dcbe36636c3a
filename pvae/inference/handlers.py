"""Effect handlers that turn any model and guide into the program an objective needs:
:class:`scale_latents` (beta-weighted KL), :class:`score_function` (REINFORCE gradients with
baselines), :class:`data_units` (how many datapoints a program's estimate stands for, to report
values per datapoint) and :class:`mask_entries` / :class:`select_observed` (the likelihood of
some entries of x, or of some observed sites, only). The handler that covers a
self-subsampling data plate, :class:`~pvae.inference.traces.subsample_indices`, lives with the
trace code that uses it."""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn

from pvae.distributions import base_dist
from pvae.inference.traces import DESELECTED, find_data_plate, plate_extent

__all__ = ["BASELINES", "data_units", "mask_entries", "observed_scale", "scale_latents",
           "score_function", "select_observed"]

#: Baseline options of the score-function estimator.
BASELINES = (None, "average", "neural")


class scale_latents(Messenger):
    """Multiply the log-density of every **latent** sample site by ``beta`` (observed sites are
    left alone), in the model and the guide alike: the beta-VAE objective
    E_q[log p(x|z)] - beta KL(q || p) (Higgins et al. 2017) for any model.

    ``beta`` is read at every site, so a training loop may change it between steps; it may be
    a 0-dim tensor (updated in place by a captured training step; never compared on the host).
    """

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.beta = beta

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg) \
                and (isinstance(self.beta, torch.Tensor) or self.beta != 1.0):
            msg["scale"] = self.beta * msg["scale"]


class mask_entries(Messenger):
    """Score only the entries of the observed site ``name`` where ``mask`` is true: its
    distribution, which must factorize over the entries (a ``.to_event(k)`` of a batch of
    univariate distributions, as every pvae likelihood is), becomes
    ``base.mask(mask).to_event(k)``, so ``log_prob`` sums the observed entries' terms alone
    (``pyro.poutine.mask`` masks whole batch elements, not entries of an event).

    :param str name: the observed site.
    :param torch.Tensor mask: bool, broadcastable to the site's ``batch_shape + event_shape``
        (``(N, D)`` for ``x`` of that shape).
    :raises ValueError: (when the site runs) its distribution does not factorize over entries.
    """

    def __init__(self, name: str, mask: torch.Tensor):
        super().__init__()
        self.name, self.mask = name, mask

    def _pyro_sample(self, msg):
        if msg["name"] != self.name:
            return
        fn = msg["fn"]
        base = base_dist(fn)
        if base.event_shape:
            raise ValueError(
                f"site {self.name!r} has a {type(base).__name__} distribution over whole "
                f"vectors (event shape {tuple(base.event_shape)}): masking some of its entries "
                "needs one that factorizes over them, a batch of univariate distributions "
                "made into one event with .to_event(...)")
        msg["fn"] = base.mask(self.mask).to_event(len(fn.event_shape))


class select_observed(Messenger):
    """Score only the observed sites named in ``names``: the others are masked out (their
    log-density counts as 0, as under ``pyro.poutine.mask(mask=False)``) and marked, so that
    evaluation leaves them out of the weights and of the search for the data plate
    (:func:`~pvae.inference.traces.sites`): importance weights then estimate the likelihood of
    the selected sites alone, the others marginalized: log p(x | t) for ``model(x, t, y)`` with
    ``names=("x",)``, when y is a leaf of the model.

    :param names: observed site names.
    """

    def __init__(self, names):
        super().__init__()
        self.names = frozenset(names)

    def _pyro_sample(self, msg):
        if msg["is_observed"] and msg["name"] not in self.names:
            msg["mask"] = torch.zeros((), dtype=torch.bool, device=msg["value"].device)
            msg["infer"] = {**msg["infer"], DESELECTED: True}


class data_units(Messenger):
    """How many datapoints a program's estimate stands for, read off its observed sites as they
    run: the datapoints in the data plate as the trace holds them (its subsample's size for a
    subsampled plate, the inferred size for an unsized ``pyro.plate("data")``) times the scale
    the observed sites carry (``N / n`` of a plate that subsamples n of N datapoints, times any
    ``poutine.scale``). An objective divides its value (a sum over the batch with the model's
    scales, as Pyro's ELBOs compute it) by :attr:`units` to report nats per datapoint,
    unscaled, whoever subsamples: pvae's batches with ``pyro.plate("data", N,
    subsample=idx)`` (units ``n * N / n = N``), ``subsample_size=m`` in the model's or the
    guide's plate (``m * N / m = N``, the plate's full size), ``poutine.scale(scale=s)`` around
    a plate of n (``n * s``). Only reads the messages: no host synchronization, nothing changed.

    :param data_plate: the data plate's name, where several plates could be it (by default
        found: :func:`~pvae.inference.traces.find_data_plate`).
    :param batch_size: the batch's leading size, a hint among several plates around the
        observed sites (``None``: no hint).

    :ivar scale: the observed sites' common scale (a float, or a tensor as ``poutine.scale``
        got it), 1.0 before any observed site is seen.
    :ivar bool agree: ``False`` when observed sites carried different float scales (a weighted
        objective: no single factor makes it per datapoint).
    """

    def __init__(self, data_plate: str | None = None, batch_size: int | None = None):
        super().__init__()
        self.data_plate, self.batch_size = data_plate, batch_size
        self.scale, self.agree, self.observed = 1.0, True, {}

    def _postprocess_message(self, msg):
        if msg["type"] != "sample" or not msg["is_observed"] or site_is_subsample(msg) \
                or msg["name"] in self.observed:  # (sequential particles: the first run's)
            return
        scale = msg["scale"]
        if not self.observed:
            self.scale = scale
        elif not isinstance(scale, torch.Tensor) and not isinstance(self.scale, torch.Tensor) \
                and scale != self.scale:
            self.agree = False
        self.observed[msg["name"]] = msg

    @property
    def num_data(self) -> int:
        """Datapoints in the data plate, as the program ran it.

        :raises ValueError: no observed site was seen, or they lie in no common plate.
        """
        observed = list(self.observed.values())
        if not observed:
            raise ValueError("the model has no observed site; condition the data with "
                             "pyro.sample('x', ..., obs=x)")
        return plate_extent(observed, find_data_plate(observed, self.batch_size,
                                                      self.data_plate))

    @property
    def units(self):
        """``num_data * scale``: the datapoints the estimate stands for (where the scales
        :attr:`agree`)."""
        return self.num_data * self.scale


#: The former name of :class:`data_units`, which now also counts the datapoints.
observed_scale = data_units


def baseline_key(site_name: str) -> str:
    """The key of a site's neural baseline in an ``nn.ModuleDict`` (which refuses dots)."""
    return site_name.replace(".", "__dot__")


class _Detached(TorchDistribution):
    """``fn`` sampled without a pathwise gradient (``has_rsample`` false), through every
    ``expand``: what the score-function estimator differentiates is ``log_prob`` alone."""

    has_rsample = False
    arg_constraints: dict = {}

    def __init__(self, fn):
        self.fn = fn
        super().__init__(fn.batch_shape, fn.event_shape, validate_args=False)

    @property
    def support(self):
        return self.fn.support

    @property
    def mean(self):
        return self.fn.mean

    @property
    def variance(self):
        return self.fn.variance

    def expand(self, batch_shape, _instance=None):
        return _Detached(self.fn.expand(batch_shape))

    def sample(self, sample_shape=()):
        with torch.no_grad():
            return self.fn.sample(torch.Size(sample_shape))

    def log_prob(self, value):
        return self.fn.log_prob(value)

    def entropy(self):
        return self.fn.entropy()


class score_function(Messenger):
    """Force the score-function (REINFORCE) gradient estimator on every latent site of a guide,
    and optionally attach Pyro baselines to them.

    Works on any guide, inside or outside plates: a reparameterizable site's distribution is
    wrapped so that it samples without a pathwise gradient and stays so when plates outside
    the handler (vectorized particles) expand it (Pyro's ``has_rsample_(False)`` on the base of
    an ``Independent`` does not survive that expansion).

    :param str baseline: ``None``, ``"average"`` (the constant ``average``: a decaying average
        of past per-datapoint ELBOs kept by the score-function estimator; Pyro's own
        decaying-average baseline keeps one value per position in the batch, which does not fit
        shuffled mini-batches) or ``"neural"`` (a small MLP of ``baseline_input`` per site,
        trained on the squared error to the downstream cost; Mnih & Gregor 2014).
    :param float average: the value of the ``"average"`` baseline.
    :param baseline_input: tensor ``(N, D)`` fed to neural baselines (usually ``x``).
    :param nets: an ``nn.ModuleDict`` holding the neural baseline networks, keyed by
        :func:`baseline_key` of the site name; created there on first use, so that whoever owns
        the dict owns (trains and saves) the networks.
    """

    def __init__(self, baseline: str | None = None, baseline_input=None, nets=None,
                 average: float = 0.0, hidden_dim: int = 64):
        super().__init__()
        if baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose one of {list(BASELINES)}")
        if baseline is not None and baseline_input is None:
            raise ValueError("baselines need baseline_input (the data x)")
        self.baseline, self.baseline_input = baseline, baseline_input
        self.nets = nn.ModuleDict() if nets is None else nets
        self.average, self.hidden_dim = average, hidden_dim

    def _pyro_sample(self, msg):
        if msg["is_observed"] or site_is_subsample(msg):
            return
        if msg["fn"].has_rsample:
            msg["fn"] = _Detached(msg["fn"])
        if self.baseline is not None:  # a dict of this site's own, filled in once sampled
            msg["infer"] = {**msg["infer"]}

    def _pyro_post_sample(self, msg):
        # the baselines take the shape of the site's draw, which plates outside this handler
        # (vectorized particles) set after it has seen the site: hence after sampling, in place
        # in the site's own infer dict (which the trace, recorded before this, shares)
        if self.baseline is None or msg["is_observed"] or site_is_subsample(msg):
            return
        x, shape = self.baseline_input, msg["fn"].batch_shape
        if self.baseline == "average":
            value = torch.full(shape, self.average, dtype=x.dtype, device=x.device)
            msg["infer"]["baseline"] = {"baseline_value": value}
        else:
            key = baseline_key(msg["name"])
            if key not in self.nets:
                self.nets[key] = nn.Sequential(
                    nn.Linear(x.shape[-1], self.hidden_dim), nn.Tanh(),
                    nn.Linear(self.hidden_dim, 1)).to(device=x.device, dtype=x.dtype)
            net = self.nets[key]
            msg["infer"]["baseline"] = {
                "nn_baseline": lambda inp, net=net: net(inp).squeeze(-1),
                "nn_baseline_input": x.expand(*shape, x.shape[-1]) if shape else x}
