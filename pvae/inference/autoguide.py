r"""An amortized Gaussian guide built automatically from a model: one network on the batch's
data, a Gaussian head per local latent site.

Pyro's autoguides (``AutoNormal``, ``AutoDiagonalNormal``, ...) keep free parameters per
latent value: for a latent-variable model with one ``z_n`` per datapoint they are not
amortized and cannot score a datapoint they were not trained on. :class:`AutoAmortizedNormal`
is the amortized counterpart (Kingma & Welling 2014, section 2.2; the encoder of a VAE,
written for any model): it traces the model once, finds its latent sites inside the data
plate, and proposes each from

.. math::
    q_\phi(z_n \mid a_n) = \bigl(T_\#\, \mathcal{N}(\mu_\phi(a_n), \Sigma_\phi(a_n))\bigr),
    \qquad h_n = f_\phi(a_n),

where ``a_n`` is row n of the positional arguments named by ``inputs`` (by default x alone,
flattened; ``inputs=(0, 1)`` adds a conditioning c), ``f_phi`` a shared trunk (an MLP by
default), ``mu`` and ``Sigma`` (diagonal, or full through a Cholesky factor with a softplus
diagonal) linear heads per site in the site's unconstrained space, and ``T = biject_to(support)``
maps it onto the site's support (a ``LogNormal`` latent gets a log-normal guide, a simplex latent
a logistic-normal one). Each guide site carries the model site's mask (``poutine.mask`` or
``.mask(m)``, e.g. the padded steps of variable-length sequences), read from the model on every
call, since masks follow the data. Global latent sites (outside the data plate) get Pyro's
``AutoNormal``. Discrete sites that the model enumerates (``infer={"enumerate": "parallel"}``,
``@config_enumerate``) are left to the model, which sums them out (``TraceEnum_ELBO``); other
discrete sites are refused.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.infer.autoguide import AutoNormal
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import Independent, biject_to, constraints
from torch.distributions.transforms import ReshapeTransform

from pvae.contract import inputs_trusted
from pvae.inference.traces import find_data_plate, site_mask, sites, subsample_indices
from pvae.nn import MLP, activation_layer
from pvae.validation import check_choice, check_sizes

__all__ = ["AutoAmortizedNormal"]

#: Smallest scale of a diagonal head, and smallest diagonal of a Cholesky factor.
MIN_SCALE = 1e-4


@dataclass
class _LocalSite:
    """What the guide needs of one local latent site of the model."""

    name: str
    frames: list  # the site's plates, outermost first: (name, size, dim); the data plate's size None
    batch: torch.Size  # the value's batch dims right of the data dim (inner plates)
    event: torch.Size  # the unconstrained event shape
    transform: object  # biject_to(support), None for a real support
    masked: bool  # the model masks the site: the guide takes its mask on every call

    @property
    def size(self) -> int:
        """Unconstrained coordinates per datapoint."""
        return self.batch.numel() * self.event.numel()


@dataclass
class _DataPlate:
    """How the guide makes the model's data plate on each call.

    ``mode``: ``"full"`` (every datapoint of the batch: ``pyro.plate(name, n)``), ``"drawn"``
    (the model draws a subsample of ``subsample_size``: the guide draws it, the model replays
    it), ``"given"`` (the model's plate is given its subsample, the positional argument
    ``argument``, or with ``argument`` ``None`` whatever a trace of the model shows).
    """

    name: str
    dim: int
    mode: str
    size: int | None = None  # the full size, where fixed ("drawn" off the batch, "given")
    subsample_size: int | None = None
    argument: int | None = None


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _event_mask_varies(fn) -> bool:
    """Whether a ``.mask(m)`` under a ``.to_event`` varies within the event (a guide over the
    unconstrained event cannot take such a mask)."""
    event_dims = 0
    while isinstance(fn, (Independent, MaskedDistribution)):
        if isinstance(fn, Independent):
            event_dims += fn.reinterpreted_batch_ndims
        elif event_dims:
            shape = torch.as_tensor(fn._mask).shape
            if any(s != 1 for s in shape[max(len(shape) - event_dims, 0):]):
                return True
        fn = fn.base_dist
    return False


_instances = itertools.count()


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
    builds the trunk and the heads, so call it once on a batch — ``fit`` does, before
    training — before reading ``parameters()`` or loading a ``state_dict``; :meth:`setup` does
    it explicitly. The guide's sites are the model's local latent sites, with the same plates;
    the data plate is made as the model makes it (so each datapoint is scaled as in the model):
    a plate that draws its own subsample (``subsample_size``) is drawn by the guide and replayed
    by the model, the encoder reading the subsampled rows; a plate given its subsample
    (``pyro.plate("data", N, subsample=idx)`` with ``idx`` an argument) gets the same one. The
    guide registers its networks in Pyro's param store on each call (``pyro.module``), so it
    trains with ``pyro.infer.SVI`` as well as with ``fit``; it works with vectorized particles,
    ``iw_log_likelihood`` and ``inference_gap``.

    Masks cost a trace of the model per call (without gradients): the model's masks (of the
    latent sites) must follow from its arguments, as a sequence's length does, not from its
    latent draws. Models without masked latent sites pay nothing.

    :param model: the model program ``model(*args)``; its latent sites inside the
        ``data_plate`` are amortized, those outside get ``AutoNormal``, those it enumerates are
        left to it.
    :param inputs: the positions of the positional arguments the encoder reads, each a tensor
        with one row per datapoint (flattened and concatenated): ``(0,)`` (default) encodes
        x alone, ``(0, 1)`` x and the conditioning c of ``model(x, c)``. Index arguments,
        lengths and masks are for the model, not the encoder.
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
        the first call, the plate around the observed sites
        (:func:`~pvae.inference.traces.find_data_plate`).
    :param float init_scale: initial scale of every head (the heads' scale biases are set
        to it), small so that early draws stay near the means.

    :raises ValueError: on the first call: a discrete latent site the model does not
        enumerate, a latent site without the data plate's dim, a mask that varies within a
        site's event, ``covariance="full"`` for a site with plates inside the data plate, or a
        model without local latent sites; at construction: a bad option.
    :raises TypeError: an ``inputs`` entry that is not a tensor with one row per datapoint.
    """

    def __init__(self, model, *, inputs=(0,), encoder: nn.Module | None = None,
                 hidden_dims=(256,), covariance: str = "diagonal", activation: str = "relu",
                 data_plate: str | None = None, init_scale: float = 0.1):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be a Pyro program (a callable), got "
                            f"{type(model).__name__}")
        inputs = (inputs,) if isinstance(inputs, int) else tuple(inputs)
        if not inputs or not all(isinstance(i, int) and i >= 0 for i in inputs):
            raise ValueError(f"inputs must name positional arguments by their positions "
                             f"(ints >= 0, e.g. (0,) for x, (0, 1) for x and c), got {inputs!r}")
        self._model = [model]  # in a list: not a submodule (the model owns this guide)
        self.inputs = inputs
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
        self._plate: _DataPlate | None = None
        self._pyro_name = f"AutoAmortizedNormal_{next(_instances)}"  # its param-store prefix

    # -- building ---------------------------------------------------------------------------

    def _inputs(self, args: tuple) -> list[torch.Tensor]:
        out = []
        for i in self.inputs:
            if i >= len(args) or not isinstance(args[i], torch.Tensor) or args[i].dim() < 1:
                got = type(args[i]).__name__ if i < len(args) else "nothing"
                raise TypeError(f"AutoAmortizedNormal(inputs={self.inputs}) encodes positional "
                                f"argument {i}, which must be a tensor with one row per "
                                f"datapoint; the guide got {got} there")
            out.append(args[i])
        return out

    def setup(self, *args) -> None:
        """Trace the model on ``args`` and build the networks (done by the first call)."""
        model = self._model[0]
        with poutine.block(), torch.no_grad():
            trace = poutine.trace(model).get_trace(*args)
        inputs = self._inputs(args)
        # the plate of the observed sites that lie in plates (a global value conditioned with
        # poutine.condition is an input of the model, not its data)
        observed = [site for _, site in sites(trace, True)
                    if any(f.vectorized for f in site["cond_indep_stack"])]
        self.data_plate = find_data_plate(observed or trace, inputs[0].shape[0],
                                          self.data_plate)
        local, global_names = [], []
        for name, site in sites(trace, False):
            if site["infer"].get("enumerate"):
                continue  # the model sums it out
            if site["fn"].support.is_discrete:
                raise ValueError(
                    f"latent site {name!r} is discrete; AutoAmortizedNormal proposes continuous "
                    "latents only: enumerate it in the model (@config_enumerate, or "
                    "infer={'enumerate': 'parallel'}, trained with loss=TraceEnum_ELBO(...)), "
                    "which this guide then leaves to the model, or write a guide with a "
                    "Categorical/Bernoulli site for it and train with loss=ScoreFunctionELBO() or VIMCO()")
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
        self._plate = self._data_plate(trace, args, inputs[0].shape[0])
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

    def _data_plate(self, trace, args: tuple, rows: int) -> _DataPlate:
        """How the model makes its data plate, from its trace."""
        frame = next(f for _, site in sites(trace, None) for f in site["cond_indep_stack"]
                     if f.name == self.data_plate)
        site = trace.nodes.get(self.data_plate)
        if site is None or site["type"] != "sample" or not site_is_subsample(site):
            return _DataPlate(self.data_plate, frame.dim, "full")  # an unsized plate
        fn, value = site["fn"], site["value"]
        argument = next((i for i, a in enumerate(args) if a is value), None)
        if argument is not None:  # pyro.plate(name, N, subsample=idx), idx an argument
            return _DataPlate(self.data_plate, frame.dim, "given", fn.size, argument=argument)
        if fn.subsample_size is not None and fn.subsample_size < fn.size:
            return _DataPlate(self.data_plate, frame.dim, "drawn",
                              None if fn.size == rows else fn.size, fn.subsample_size)
        if len(value) == fn.size:
            return _DataPlate(self.data_plate, frame.dim, "full")
        return _DataPlate(self.data_plate, frame.dim, "given", fn.size)  # computed inside

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
        if _event_mask_varies(fn):
            raise ValueError(f"latent site {name!r} is masked within its event (.mask(m) "
                             "before .to_event with m varying over the event's entries); "
                             "AutoAmortizedNormal takes masks over whole batch elements: "
                             "mask with m of the site's batch shape")
        transform = None if _is_real(fn.support) else biject_to(fn.support)
        event = fn.event_shape if transform is None else transform.inv.forward_shape(
            fn.event_shape)
        plates = [(f.name, None if f.name == self.data_plate else
                   f.size if f.size > 0 else value.shape[batch_rank + f.dim], f.dim)
                  for f in frames]
        return _LocalSite(name, plates, torch.Size(value.shape[data_pos + 1:batch_rank]),
                          torch.Size(event), transform, site_mask(site) is not None)

    # -- the guide program ----------------------------------------------------------------

    def forward(self, *args, **kwargs):
        """The guide program: returns ``{site: value}`` of every latent site it samples."""
        if self._sites is None:
            self.setup(*args, **kwargs)
        if not inputs_trusted():  # its networks in Pyro's param store, for pyro.infer.SVI
            pyro.module(self._pyro_name, self)
        values = {}
        if self.global_guide is not None:
            values.update(self.global_guide(*args, **kwargs))
        inputs = self._inputs(args)
        data_plate, index = self._make_data_plate(args, inputs[0].shape[0])
        masks = self._masks(args, data_plate)
        dtype = next(iter(self.heads.values())).weight.dtype
        n = len(data_plate.indices) if index else inputs[0].shape[0]
        a = torch.cat([(t[data_plate.indices] if index else t).reshape(n, -1).to(dtype)
                       for t in inputs], -1)
        h = self.encoder(a)
        plates = {self.data_plate: data_plate}  # one plate object per name, shared by the sites
        for s in self._sites:
            values[s.name] = self._sample(s, self.heads[s.name](h), n, plates,
                                          masks.get(s.name))
        return values

    def _make_data_plate(self, args: tuple, rows: int):
        """The data plate for this call (made, not entered: a subsample is drawn, or given,
        now) and whether the encoder's rows are indexed by its subsample (the inputs hold the
        plate's full range)."""
        p = self._plate
        if p.mode == "full":
            return pyro.plate(p.name, rows, dim=p.dim), False
        if p.mode == "drawn":
            size = rows if p.size is None else p.size
            plate = pyro.plate(p.name, size, subsample_size=p.subsample_size, dim=p.dim)
            return plate, rows == size and rows != p.subsample_size
        if p.argument is not None:
            indices = args[p.argument]
        else:  # computed inside the model: read off a trace of it
            with poutine.block(), torch.no_grad():
                indices = poutine.trace(self._model[0]).get_trace(*args).nodes[p.name]["value"]
        plate = pyro.plate(p.name, p.size, subsample=indices, dim=p.dim)
        return plate, rows == p.size and rows != len(indices)

    def _masks(self, args: tuple, data_plate) -> dict:
        """The model's masks of the masked local sites on this call's datapoints, from a trace
        of the model (its data plate given this call's subsample)."""
        masked = [s.name for s in self._sites if s.masked]
        if not masked:
            return {}
        same = (subsample_indices(self.data_plate, data_plate.indices)
                if self._plate.mode == "drawn" else contextlib.nullcontext())
        with poutine.block(), torch.no_grad(), same:
            trace = poutine.trace(self._model[0]).get_trace(*args)
        return {name: site_mask(trace.nodes[name]) for name in masked}

    def _sample(self, s: _LocalSite, out: torch.Tensor, n: int, plates: dict,
                mask) -> torch.Tensor:
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
        for name, size, dim in s.frames:
            if name not in plates:
                plates[name] = pyro.plate(name, size, dim=dim)
        with poutine.mask(mask=mask) if mask is not None else contextlib.nullcontext():
            return _within([plates[f[0]] for f in s.frames], lambda: pyro.sample(s.name, fn))


def _within(plates, body):
    if not plates:
        return body()
    with plates[0]:
        return _within(plates[1:], body)
