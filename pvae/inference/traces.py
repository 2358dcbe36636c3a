r"""Shared trace code: the guide traced and the model replayed against it, with vectorized
particles, and the per-datapoint reduction of every site's log-density. Objectives and
evaluation import this module and never each other.

Everything here takes plain callables ``model(*args)`` and ``guide(*args)`` (Pyro programs
meeting the model contract) and a tuple ``args`` of their positional arguments. The **data
plate** is found, not named (:func:`find_data_plate`): the plate around the model's observed
sites whose size is the batch's, ``args[0].shape[0]`` (built-in models call it ``"data"``;
Pyro's scanVI example ``"batch"``); a ``data_plate=`` argument names it where that is
ambiguous. For every datapoint n and particle k each site's **unscaled** log-probability is
summed over its event dims and over every plate except the data plate, giving

    log w_nk = log p(x_n | z_nk) + log p(z_nk) - log q(z_nk | x_n),   z_nk ~ q(z | x_n).

Particles are vectorized with an outer plate to the left of the model's own plates.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample

__all__ = ["PARTICLE_PLATE", "AmbiguousPlateError", "PlateSizeError", "Weights", "data_layout",
           "features", "find_data_plate", "log_prob", "max_plate_nesting", "reduce_site",
           "site_shaped", "sites", "traces", "vectorizes", "weights"]

#: Name of the plate that vectorizes particles.
PARTICLE_PLATE = "_pvae_particles"

_OUTSIDE_DATA = ("sample site {name!r} is outside pyro.plate({plate!r}, ...), the data plate "
                 "(the plate of the batch's size around the observed sites); per-datapoint "
                 "estimates need every sample site of the model and guide inside it (global "
                 "latent variables have no per-datapoint weight)")


class PlateSizeError(ValueError):
    """The model and guide disagree on the size of the data plate (Pyro's "Shape mismatch
    inside plate", or sites of the two programs in data plates of different sizes): typically
    a guide with per-datapoint parameters run on other datapoints than it was built for."""


class AmbiguousPlateError(ValueError):
    """Several plates of the batch's size enclose the observed sites and none is named
    ``"data"``: pass ``data_plate=``. (On one datapoint, every size-1 plate qualifies.)"""


def sites(trace, observed: bool | None, auxiliary: bool = False):
    """``(name, site)`` of the sample sites that carry a density: observed ones (``True``),
    latent ones (``False``) or both (``None``); subsample and deterministic sites are skipped,
    and so are auxiliary ones unless ``auxiliary``. A guide's log-density q(z | x) is the sum
    over its sites **with** the auxiliary ones: Pyro's autoguides draw an unconstrained value
    at an auxiliary site and return z through a ``Delta`` that carries only the Jacobian term
    (``AutoNormal``), as Pyro's ELBOs count it; pairing guide sites with the model's latent
    sites (same names) leaves them out."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if site["infer"].get("_deterministic") or (
                site["infer"].get("is_auxiliary") and not auxiliary):
            continue
        if observed is None or bool(site["is_observed"]) == observed:
            yield name, site


def in_model_order(guide_tr, model_tr) -> bool:
    """Whether the guide samples the latent sites in the model's order: Pyro's mean-field
    requirement of ``TraceMeanField_ELBO``. Only then is a site's closed-form KL, taken with
    the other sites' draws held fixed, unbiased: a bottom-up guide q(z1 | x) q(z2 | z1) of a
    top-down model p(z2) p(z1 | z2) draws the parent z2 after, and dependent on, its child."""
    return [n for n, _ in sites(guide_tr, False)] == [n for n, _ in sites(model_tr, False)]


def _data_frame(name, site, plate: str):
    for frame in site["cond_indep_stack"]:
        if frame.name == plate:
            return frame
    if site["infer"].get("is_auxiliary"):
        raise ValueError(f"the guide's auxiliary site {name!r} is outside the data plate "
                         f"pyro.plate({plate!r}, ...): an autoguide with one joint latent over all datapoints "
                         "(AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariate"
                         "Normal...) has no per-datapoint q(z_n | x_n), so per-datapoint "
                         "estimates cannot be computed; use AutoNormal (one Normal per site, "
                         "inside the model's plates) or an amortized guide (AutoAmortizedNormal)")
    raise ValueError(_OUTSIDE_DATA.format(name=name, plate=plate))


def _particles(num_particles: int | None, nesting: int):
    """The vectorized particle plate at dim ``-(nesting + 1)``, or nothing for ``None``."""
    if num_particles is None:
        return contextlib.nullcontext()
    return pyro.plate(PARTICLE_PLATE, num_particles, dim=-(nesting + 1))


def traces(model, guide, args: tuple, num_particles: int | None = None,
           nesting: int = 0, block: bool = True):
    """``(guide_trace, model_trace)``: the guide traced and the model replayed against it,
    with ``num_particles`` vectorized particles in a plate at dim ``-(nesting + 1)`` (none when
    ``num_particles`` is ``None``). With ``block`` (evaluation) handlers outside see none of
    the programs' sites; objectives pass ``block=False`` so that a param-only trace around them
    finds the parameters they use, as around Pyro's own ELBOs."""
    with poutine.block() if block else contextlib.nullcontext(), _particles(num_particles, nesting):
        guide_tr = poutine.trace(guide).get_trace(*args)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args)
    return guide_tr, model_tr


def find_data_plate(model_trace, batch_size: int, data_plate: str | None = None) -> str:
    """The name of the data plate in a model trace: the plate that encloses every observed site
    and has ``batch_size`` elements (its subsample's, for a subsampled plate), or the plate
    named ``data_plate``, checked to enclose them; where several plates qualify, the one named
    ``"data"``.

    :raises PlateSizeError: the plates around the observed sites (or ``data_plate``) have other
        sizes than the batch (e.g. a guide with per-datapoint parameters run on other data).
    :raises AmbiguousPlateError: several plates of the batch's size enclose the observed sites
        (pass ``data_plate=``).
    :raises ValueError: the model has no observed site, or the observed sites share no plate.
    """
    observed = [site for _, site in sites(model_trace, True)]
    if not observed:
        raise ValueError("the model has no observed site; condition the data with "
                         "pyro.sample('x', ..., obs=x)")
    common = [f for f in observed[0]["cond_indep_stack"] if f.vectorized
              and all(any(g.name == f.name for g in s["cond_indep_stack"]) for s in observed)]
    if data_plate is not None:
        frame = next((f for f in common if f.name == data_plate), None)
        if frame is None:
            raise ValueError(f"data_plate={data_plate!r} does not enclose every observed site; "
                             f"the plates around them: {[f.name for f in common]}")
        if int(frame.size) != batch_size:
            raise PlateSizeError(f"pyro.plate({data_plate!r}) has size {int(frame.size)}, "
                                 f"the batch {batch_size} datapoints")
        return data_plate
    sized = [f.name for f in common if int(f.size) == batch_size]
    if len(sized) == 1:
        return sized[0]
    if len(sized) > 1:
        if "data" in sized:
            return "data"
        raise AmbiguousPlateError(f"plates {sized} all have the batch's size {batch_size} and "
                                  "enclose the observed sites; name the data plate with "
                                  "data_plate=")
    if common:
        raise PlateSizeError(f"no plate around the observed sites has the batch's size "
                             f"{batch_size}: {[(f.name, int(f.size)) for f in common]}")
    raise ValueError("the observed sites lie in no common plate; per-datapoint estimates need "
                     "them inside one plate over the batch, pyro.plate('data', len(x))")


def data_layout(model, guide, args: tuple, data_plate: str | None = None) -> tuple[int, str]:
    """Trace once without particles: find the data plate (:func:`find_data_plate`), check that
    every sample site lies in it and that the guide samples every latent site of the model,
    and return ``(nesting, plate)``: the deepest plate nesting and the data plate's name.

    :raises ValueError: a sample site outside the data plate, or a latent site of the model
        that the guide does not sample (the model would draw it from its prior and the
        estimate would score that draw as if the guide had proposed it: biased, silently).
    :raises PlateSizeError: a data plate of another size than the batch, or programs that
        disagree on it (Pyro's "Shape mismatch inside plate").
    """
    try:
        guide_tr, model_tr = traces(model, guide, args)
    except ValueError as error:
        if "Shape mismatch inside plate" in str(error):  # Pyro's broadcast check
            raise PlateSizeError(str(error).splitlines()[0]) from error
        raise
    batch = args[0].shape[0]
    plate = find_data_plate(model_tr, batch, data_plate)
    sizes = {int(_data_frame(name, site, plate).size) for tr in (guide_tr, model_tr)
             for name, site in sites(tr, None, auxiliary=True)}
    if sizes - {batch}:
        raise PlateSizeError(f"the model's and the guide's sites lie in data plates "
                             f"pyro.plate({plate!r}) of sizes {sorted(sizes)}, on a batch of "
                             f"{batch} datapoints")
    proposed = {name for name, _ in sites(guide_tr, False)}
    for name, _ in sites(model_tr, False):
        if name not in proposed:
            raise ValueError(f"the model's latent site {name!r} is not sampled by the guide; "
                             "importance weights and ELBO terms need a guide site of the same "
                             "name for every latent site of the model")
    dims = [-f.dim for tr in (guide_tr, model_tr) for _, s in sites(tr, None, True)
            for f in s["cond_indep_stack"] if f.vectorized]
    return max(dims, default=0), plate


def max_plate_nesting(model, guide, args: tuple, data_plate: str | None = None) -> int:
    """The deepest plate nesting of the programs on ``args``, after the checks of
    :func:`data_layout`."""
    return data_layout(model, guide, args, data_plate)[0]


def reduce_site(name, site, lp, num_particles, num_data, nesting, plate: str) -> torch.Tensor:
    """Sum ``lp`` (the site's batch-shaped log-density or KL) over every dim but the particle
    and data-plate dims (``plate``, from :func:`data_layout`); returns
    ``(num_particles, num_data)``.

    :raises ValueError: the site is outside the data plate, or ``lp`` has more dims than the
        site's plates.
    """
    data_dim = _data_frame(name, site, plate).dim
    rank = nesting + 1
    if lp.dim() > rank:
        raise ValueError(f"site {name!r} has batch shape {tuple(lp.shape)} with more dims than "
                         "its plates; declare the extra dims as event dims with .to_event(...)")
    lp = lp.reshape((1,) * (rank - lp.dim()) + lp.shape)
    other = [d for d in range(-rank + 1, 0) if d != data_dim]
    if other:
        lp = lp.sum(other, keepdim=True)
    return lp.reshape(lp.shape[-rank], lp.shape[data_dim]).expand(num_particles, num_data)


def log_prob(site, fn=None) -> torch.Tensor:
    """The site's log-density at its value, batch-shaped, with its mask applied but **not**
    its scale (``poutine.scale``: beta, subsampling); ``fn`` replaces the site's distribution
    (e.g. with detached parameters)."""
    lp = (site["fn"] if fn is None else fn).log_prob(site["value"])
    return scale_and_mask(lp, 1.0, site["mask"])


def site_shaped(t: torch.Tensor, site, nesting: int, plate: str) -> torch.Tensor:
    """Place a ``(K, N)`` tensor on a site value's particle and data-plate dims, with size-1
    dims elsewhere, so that it broadcasts against the value."""
    K, N = t.shape
    rank = nesting + 1
    shape = [1] * rank
    shape[0], shape[rank + _data_frame(site["name"], site, plate).dim] = K, N
    return t.reshape(shape + [1] * len(site["fn"].event_shape))


def features(site, t: torch.Tensor, nesting: int, plate: str) -> torch.Tensor:
    """Rearrange a site-shaped tensor (batch dims, then the site's event dims) to
    ``(K or 1, N, features)``: the particle dim, the data plate's dim, everything else flat."""
    event_dims = len(site["fn"].event_shape)
    rank = nesting + 1
    t = t.reshape((1,) * (rank + event_dims - t.dim()) + t.shape)
    t = t.movedim(rank + _data_frame(site["name"], site, plate).dim, 1)
    return t.reshape(t.shape[0], t.shape[1], -1)


@dataclass
class Weights:
    """Per-datapoint log-densities of one set of particles, each ``(K, N)``, nats."""

    log_likelihood: torch.Tensor  #: log p(x | z), the observed sites
    log_prior: torch.Tensor  #: log p(z), the model's latent sites
    log_guide: torch.Tensor  #: log q(z | x)
    guide_trace: object
    model_trace: object

    @property
    def log_weight(self) -> torch.Tensor:
        """log p(x, z) - log q(z | x), ``(K, N)``."""
        return self.log_likelihood + self.log_prior - self.log_guide


def weights(model, guide, args: tuple, num_particles: int, nesting: int,
            vectorize: bool = True, *, plate: str) -> Weights:
    """Trace ``num_particles`` particles for the batch ``args`` (``args[0]`` is ``(N, ...)``)
    and reduce every site to ``(K, N)``: vectorized in a particle plate, or with
    ``vectorize=False`` one particle at a time without it (for models that do not broadcast
    over a leading dim; then the returned traces are those of the last particle).

    :raises ValueError: the model has no observed site, or a site is outside the data plate
        ``plate`` (from :func:`data_layout`).
    """
    if vectorize:
        return _reduce(*traces(model, guide, args, num_particles, nesting), args, num_particles,
                       nesting, plate)
    parts = [_reduce(*traces(model, guide, args, None, nesting), args, 1, nesting, plate)
             for _ in range(num_particles)]
    return Weights(*(torch.cat([getattr(w, f) for w in parts]) for f in
                     ("log_likelihood", "log_prior", "log_guide")),
                   parts[-1].guide_trace, parts[-1].model_trace)


def _reduce(guide_tr, model_tr, args, num_particles, nesting, plate) -> Weights:
    x = args[0]
    shape = (num_particles, x.shape[0])
    parts = {"obs": x.new_zeros(shape), "prior": x.new_zeros(shape), "guide": x.new_zeros(shape)}
    for key, tr, observed in (("obs", model_tr, True), ("prior", model_tr, False),
                              ("guide", guide_tr, False)):
        for name, site in sites(tr, observed, auxiliary=key == "guide"):
            parts[key] = parts[key] + reduce_site(name, site, log_prob(site), *shape, nesting,
                                                  plate)
    if not any(True for _ in sites(model_tr, True)):
        raise ValueError("the model has no observed site; condition the data with "
                         "pyro.sample('x', ..., obs=x)")
    return Weights(parts["obs"], parts["prior"], parts["guide"], guide_tr, model_tr)


def own_rng(seed: int | None, device: torch.device):
    """With a seed, a context in which torch's RNGs (CPU and ``device``) are seeded with it and
    restored afterwards; without one, nothing (the global streams are used as they stand)."""
    if seed is None:
        return contextlib.nullcontext()
    return _seeded(seed, device)


def forked_rng(device: torch.device):
    """A context whose draws leave torch's RNG streams (CPU, and ``device`` on CUDA) as they
    were: for traces that only look at a program (its shapes, plates, sites)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    with forked_rng(device):
        torch.manual_seed(seed)
        yield


def has_auxiliary(trace) -> bool:
    """Whether a guide trace has auxiliary sites (Pyro's autoguides: a site's value is a
    ``Delta`` of an auxiliary draw, whose entropy sits at the auxiliary site)."""
    return any(site["infer"].get("is_auxiliary")
               for _, site in sites(trace, False, auxiliary=True))


def replayed_log_density(program, trace, args: tuple, num_particles: int | None, nesting: int,
                         plate: str) -> torch.Tensor:
    """log q(z) of ``program`` (a guide) at the latent values of ``trace`` (drawn by another
    program with the same particle layout), reduced per datapoint to ``(K, N)``; ``K`` is 1
    without a particle plate (``num_particles`` ``None``)."""
    with poutine.block(), _particles(num_particles, nesting):
        tr = poutine.trace(poutine.replay(program, trace=trace)).get_trace(*args)
    shape = (num_particles or 1, args[0].shape[0])
    total = args[0].new_zeros(shape)
    for name, site in sites(tr, False, auxiliary=True):
        total = total + reduce_site(name, site, log_prob(site), *shape, nesting, plate)
    return total


def vectorizes(model, guide, args: tuple, nesting: int, plate: str,
               task: str = "evaluating") -> bool:
    """Whether the programs run with vectorized particles (a plate left of their own plates):
    tried with two particles on ``args``; when that fails and one particle without the plate
    works, ``False``, with a warning (the model does not broadcast over a leading dim, e.g. it
    indexes with a boolean mask or reshapes with explicit sizes: evaluation, or the IWAE
    objective in training, then loops over particles, as Pyro's
    ``Trace_ELBO(vectorize_particles=False)`` does). ``task`` names the caller in the warning.

    :raises Exception: the error of the vectorized run when the plain run fails too (the
        model's own error, not a particle problem).
    """
    try:
        weights(model, guide, args, 2, nesting, plate=plate)
        return True
    except Exception as vectorized_error:
        try:
            weights(model, guide, args, 1, nesting, vectorize=False, plate=plate)
        except Exception:
            raise vectorized_error from None
        warnings.warn(
            "the model does not run with vectorized particles (a plate of particles left of its "
            f"own plates failed: {type(vectorized_error).__name__}: "
            f"{str(vectorized_error).splitlines()[0][:200]}); {task} one particle at a "
            "time, which is slower for large K. To vectorize, let every tensor operation "
            "broadcast over extra leading dims (index with ..., reshape with -1, x.shape[-2:])",
            RuntimeWarning, stacklevel=3)
        return False
