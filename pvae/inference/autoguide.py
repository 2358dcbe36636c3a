r"""An amortized Gaussian guide built automatically from a model: one network on a batch's
inputs, a Gaussian head per local latent site.

Pyro's autoguides (``AutoNormal``, ``AutoDiagonalNormal``, ...) keep free parameters per
latent value: for a latent-variable model with one ``z_n`` per datapoint they are not
amortized and cannot score a datapoint they were not trained on. :class:`AutoAmortizedNormal`
is the amortized counterpart (Kingma & Welling 2014, section 2.2; the encoder of a VAE,
written for any model): it traces the model once, finds its latent sites inside the ``"data"``
plate, and proposes each from

.. math::
    q_\phi(z_n \mid a_n) = \bigl(T_\#\, \mathcal{N}(\mu_\phi(a_n), \Sigma_\phi(a_n))\bigr),
    \qquad h_n = f_\phi(a_n),

where ``a_n`` is row n of the model's positional tensor arguments (the data and any
conditioning inputs, each flattened and concatenated), ``f_phi`` a shared trunk (an MLP by
default), ``mu`` and ``Sigma`` (diagonal, or full through a Cholesky factor with a softplus
diagonal) linear heads per site in the site's unconstrained space, and ``T = biject_to(support)``
maps it onto the site's support (a ``LogNormal`` latent gets a log-normal guide, a simplex latent
a logistic-normal one). Global latent sites (outside the ``"data"`` plate) get Pyro's
``AutoNormal``. Discrete latent sites are refused: train them with an explicit guide and the
score-function estimator, or sum them out with enumeration.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoNormal
from torch import nn
from torch.distributions import biject_to, constraints
from torch.distributions.transforms import ReshapeTransform

from pvae.inference.traces import find_data_plate, sites
from pvae.nn import MLP, activation_layer
from pvae.validation import check_choice, check_sizes

__all__ = ["AutoAmortizedNormal"]

#: Smallest scale of a diagonal head, and smallest diagonal of a Cholesky factor.
MIN_SCALE = 1e-4


@dataclass
class _LocalSite:
    """What the guide needs of one local latent site of the model."""

    name: str
    frames: list  # the site's plates: (name, size, dim, subsampled)
    batch: torch.Size  # the value's batch dims right of the data dim (inner plates)
    event: torch.Size  # the unconstrained event shape
    transform: object  # biject_to(support), None for a real support

    @property
    def size(self) -> int:
        """Unconstrained coordinates per datapoint."""
        return self.batch.numel() * self.event.numel()


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _tensor_args(args: tuple) -> tuple[int, list[torch.Tensor]]:
    """The batch size and the positional tensor arguments with that leading size."""
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 1]
    if not tensors:
        raise ValueError("AutoAmortizedNormal encodes the model's positional tensor arguments "
                         "(the data, shape (N, ...)); the guide was called without any")
    n = tensors[0].shape[0]
    return n, [t for t in tensors if t.shape[0] == n]


class AutoAmortizedNormal(nn.Module):
    """An amortized Gaussian guide for any model meeting the model contract, built on its
    first call.

    Use it as the ``guide`` of a model object::

        class MyModel(nn.Module):
            def __init__(self):
                super().__init__()
                self.decoder = ...
                self.guide = AutoAmortizedNormal(self.model, hidden_dims=(256,))

            def model(self, x, c=None):
                ...

    The first call traces ``model(*args)`` once (its sites hidden from outer handlers) and
    builds the trunk and the heads, so call it once on a batch — ``fit`` does, with its first
    batch — before reading ``parameters()`` or loading a ``state_dict``; :meth:`setup` does
    it explicitly. The guide's sites are the model's local latent sites, with the same plates
    (a plate subsampled in the model is subsampled to the batch's rows here: each datapoint is
    scaled as in the model), so the guide works with vectorized particles, ``fit``'s
    estimators, ``iw_log_likelihood`` and ``inference_gap``.

    :param model: the model program ``model(*args)``; its latent sites inside the
        ``data_plate`` are amortized, those outside get ``AutoNormal``.
    :param encoder: a network from the concatenated inputs ``(N, D_in)`` to features
        ``(N, H)`` with an ``out_dim`` attribute ``H``; ``None`` builds ``MLP(D_in,
        hidden_dims[:-1], hidden_dims[-1])`` followed by the activation (or, for
        ``hidden_dims=()``, uses the inputs themselves: a linear guide).
    :param hidden_dims: widths of the default trunk's layers.
    :param str covariance: ``"diagonal"`` (mean-field within each site) or ``"full"`` (one
        Cholesky factor per site and datapoint over all its coordinates: sites without plates
        inside the data plate only).
    :param str activation: the default trunk's activation (a key of ``pvae.nn.ACTIVATIONS``).
    :param data_plate: name of the model's per-datapoint plate; ``None`` (default): found on
        the first call, the plate of the batch's size around the observed sites
        (:func:`~pvae.inference.traces.find_data_plate`).
    :param float init_scale: initial scale of every head (the heads' scale biases are set
        to it), small so that early draws stay near the means.

    :raises ValueError: on the first call: a discrete latent site, a latent site without the
        data plate's dim, ``covariance="full"`` for a site with plates inside the data plate,
        or a model without local latent sites; at construction: a bad option.
    """

    def __init__(self, model, *, encoder: nn.Module | None = None, hidden_dims=(256,),
                 covariance: str = "diagonal", activation: str = "relu",
                 data_plate: str | None = None, init_scale: float = 0.1):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be a Pyro program (a callable), got "
                            f"{type(model).__name__}")
        self._model = [model]  # in a list: not a submodule (the model owns this guide)
        self.covariance = check_choice("covariance", covariance, ("diagonal", "full"))
        self.hidden_dims = check_sizes("hidden_dims", hidden_dims)
        self.activation, self.data_plate = activation, data_plate
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale!r}")
        self.init_scale = float(init_scale)
        self.encoder = encoder
        self.heads = nn.ModuleDict()
        self.global_guide = None
        self._sites: list[_LocalSite] | None = None

    # -- building ---------------------------------------------------------------------------

    def setup(self, *args) -> None:
        """Trace the model on ``args`` and build the networks (done by the first call)."""
        model = self._model[0]
        with poutine.block(), torch.no_grad():
            trace = poutine.trace(model).get_trace(*args)
        n, inputs = _tensor_args(args)
        # the data plate: named, or found (the plate of the batch's size around the data)
        self.data_plate = find_data_plate(trace, n, self.data_plate)
        local, global_names = [], []
        for name, site in sites(trace, False):
            if site["fn"].support.is_discrete:
                raise ValueError(
                    f"latent site {name!r} is discrete; AutoAmortizedNormal proposes continuous "
                    "latents only: write a guide with a categorical/Bernoulli site for it and "
                    "train with loss=ScoreFunctionELBO() or VIMCO(), or sum it out with enumeration "
                    "(infer={'enumerate': 'parallel'} and a TraceEnum_ELBO)")
            frames = [f for f in site["cond_indep_stack"] if f.vectorized]
            data = [f for f in frames if f.name == self.data_plate]
            if not data:
                global_names.append(name)
                continue
            local.append(self._local_site(name, site, data[0], frames))
        if not local:
            raise ValueError(f"the model has no latent site inside pyro.plate("
                             f"{self.data_plate!r}, ...) to amortize; use Pyro's AutoNormal "
                             "for a model with only global latents")
        floats = [t for t in inputs if t.is_floating_point()]
        dtype = floats[0].dtype if floats else torch.get_default_dtype()
        in_dim = sum(t[:1].reshape(1, -1).shape[1] for t in inputs)
        if self.encoder is None:
            if self.hidden_dims:
                self.encoder = nn.Sequential(
                    MLP(in_dim, self.hidden_dims[:-1], self.hidden_dims[-1], self.activation),
                    activation_layer(self.activation))
                self.encoder.out_dim = self.hidden_dims[-1]
            else:
                self.encoder = nn.Identity()
                self.encoder.out_dim = in_dim
        scale_bias = float(torch.log(torch.expm1(torch.tensor(self.init_scale - MIN_SCALE))))
        for s in local:
            d = s.size
            full = self.covariance == "full" and d > 1
            head = nn.Linear(self.encoder.out_dim, d + (d * (d + 1) // 2 if full else d))
            with torch.no_grad():
                head.weight.mul_(0.1)
                head.bias.zero_()
                if full:  # the Cholesky factor's diagonal entries, in tril_indices order
                    rows, cols = torch.tril_indices(d, d)
                    head.bias[d + (rows == cols).nonzero().squeeze(-1)] = scale_bias
                else:
                    head.bias[d:] = scale_bias
            self.heads[s.name] = head
        self._sites = local
        if global_names:
            self.global_guide = AutoNormal(poutine.block(model, expose=global_names),
                                           init_scale=self.init_scale)
        self.to(inputs[0].device, dtype)

    def _local_site(self, name, site, data_frame, frames) -> _LocalSite:
        fn = site["fn"]
        value = site["value"]
        batch_rank = value.dim() - len(fn.event_shape)
        data_pos = batch_rank + data_frame.dim
        if data_pos < 0:
            raise ValueError(f"latent site {name!r} has a value of shape {tuple(value.shape)} "
                             f"without the {self.data_plate!r} plate's dim; give its "
                             "distribution that batch dim")
        inner = [f for f in frames if f.dim > data_frame.dim]
        if self.covariance == "full" and inner:
            raise ValueError(f"covariance='full' needs latent sites without plates inside "
                             f"{self.data_plate!r}; site {name!r} is in "
                             f"{[f.name for f in inner]}: use covariance='diagonal'")
        transform = None if _is_real(fn.support) else biject_to(fn.support)
        event = fn.event_shape if transform is None else transform.inv.forward_shape(
            fn.event_shape)
        return _LocalSite(name, [(f.name, f.size, f.dim, f.size != value.shape[data_pos])
                                 for f in frames],
                          torch.Size(value.shape[data_pos + 1:batch_rank]), torch.Size(event),
                          transform)

    # -- the guide program ----------------------------------------------------------------

    def forward(self, *args, **kwargs):
        """The guide program: returns ``{site: value}`` of every latent site it samples."""
        if self._sites is None:
            self.setup(*args, **kwargs)
        values = {}
        if self.global_guide is not None:
            values.update(self.global_guide(*args, **kwargs))
        n, inputs = _tensor_args(args)
        dtype = next(iter(self.heads.values())).weight.dtype
        a = torch.cat([t.reshape(n, -1).to(dtype) for t in inputs], -1)
        h = self.encoder(a)
        plates = {}  # one plate object per name, shared by the sites
        for s in self._sites:
            values[s.name] = self._sample(s, self.heads[s.name](h), n, plates)
        return values

    def _sample(self, s: _LocalSite, out: torch.Tensor, n: int, plates: dict) -> torch.Tensor:
        d = s.size
        loc = out[:, :d]
        if self.covariance == "full" and d > 1:  # no inner plates: s.batch is all ones
            rows, cols = torch.tril_indices(d, d, device=out.device)
            raw = out[:, d:]
            L = out.new_zeros(n, d, d)
            L[:, rows, cols] = torch.where(rows == cols, nn.functional.softplus(raw) + MIN_SCALE,
                                           raw)
            ones = (1,) * len(s.batch)
            base = dist.MultivariateNormal(loc.reshape(n, *ones, d),
                                           scale_tril=L.reshape(n, *ones, d, d))
            if s.event != torch.Size([d]):
                base = dist.TransformedDistribution(base, [ReshapeTransform((d,), s.event)])
        else:
            shape = (n, *s.batch, *s.event)
            scale = nn.functional.softplus(out[:, d:]) + MIN_SCALE
            base = dist.Normal(loc.reshape(shape), scale.reshape(shape)).to_event(len(s.event))
        fn = base if s.transform is None else dist.TransformedDistribution(base, [s.transform])
        for name, size, dim, subsampled in s.frames:
            if name in plates:
                continue
            if name != self.data_plate:
                plates[name] = pyro.plate(name, size, dim=dim)
            elif subsampled:  # scaled by size / n, as in the model
                plates[name] = pyro.plate(name, size, dim=dim,
                                          subsample=torch.arange(n, device=out.device))
            else:
                plates[name] = pyro.plate(name, n, dim=dim)
        return _within([plates[f[0]] for f in s.frames], lambda: pyro.sample(s.name, fn))


def _within(plates, body):
    if not plates:
        return body()
    with plates[0]:
        return _within(plates[1:], body)
