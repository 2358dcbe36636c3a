r"""Shared trace code: the guide traced and the model replayed against it, with vectorized
particles, and the per-datapoint reduction of every site's log-density. Objectives and
evaluation import this module and never each other.

Everything here takes plain callables ``model(*args)`` and ``guide(*args)`` (Pyro programs
meeting the model contract) and a tuple ``args`` of their positional arguments. The **data
plate** is found, not named (:func:`find_data_plate`): the plate that encloses every observed
site (built-in models call it ``"data"``; Pyro's scanVI example ``"batch"``), sized, unsized
(``pyro.plate("data")``) or subsampled; ``data_plate=`` names it where several qualify. Its
datapoints are those the trace holds (:func:`plate_extent`: a subsample's, or the inferred
size of an unsized plate), never counted from ``args``. For every datapoint n and particle k
each site's **unscaled** log-probability is summed over its event dims and over every plate
except the data plate, giving

    log w_nk = log p(x_n | z_nk) + log p(z_nk) - log q(z_nk | x_n),   z_nk ~ q(z | x_n),

with the model's enumerated discrete sites summed out of log p (as ``TraceEnum_ELBO`` does).
Particles are vectorized with an outer plate to the left of the model's own plates, or traced
one at a time for programs that do not broadcast over it (:func:`vectorizes`); a data plate
that draws its own subsample is covered in subsamples of its size (:func:`per_datapoint`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.distributions.util import scale_and_mask
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import Independent

__all__ = ["DESELECTED", "PARTICLE_PLATE", "AmbiguousPlateError", "Layout", "PlateSizeError",
           "Weights", "check_masks", "check_proposals", "data_layout", "draws_subsample",
           "features", "find_data_plate", "guide_sites", "layout", "log_prob", "max_plate_nesting",
           "per_datapoint", "plate_extent", "reduce_site", "site_mask", "site_shaped", "sites",
           "subsample_indices", "traces", "vectorizes", "weights"]

#: Name of the plate that vectorizes particles.
PARTICLE_PLATE = "_pvae_particles"
#: Plates that vectorize particles, pvae's and Pyro's ELBOs' (``vectorize_particles=True``):
#: never the data plate.
PARTICLE_PLATES = frozenset({PARTICLE_PLATE, "num_particles_vectorized"})
#: ``infer`` key of the observed sites that evaluation leaves out (``observed=``).
DESELECTED = "_pvae_deselected"

_OUTSIDE_DATA = ("latent site {name!r} is outside pyro.plate({plate!r}, ...), the data plate "
                 "(the plate around the observed sites): a global latent variable is shared by "
                 "every datapoint, so it has no per-datapoint weight and log p(x_n) is not "
                 "defined datapoint by datapoint. To evaluate given a value of it, condition "
                 "the model on it (poutine.condition(model, data={{{name!r}: value}})), hide it "
                 "from the guide (poutine.block(guide, hide=[{name!r}])) and pass "
                 "observed=[the other observed sites]; or make it a local latent inside the "
                 "data plate")


class PlateSizeError(ValueError):
    """The model and guide disagree on the size of the data plate (Pyro's "Shape mismatch
    inside plate", or sites of the two programs in data plates of different sizes): typically
    a guide with per-datapoint parameters run on other datapoints than it was built for."""


class AmbiguousPlateError(ValueError):
    """Several plates enclose the observed sites, none is named ``"data"`` and the batch's
    size does not single one out: pass ``data_plate=``."""


def sites(trace, observed: bool | None, auxiliary: bool = False):
    """``(name, site)`` of the sample sites that carry a density: observed ones (``True``),
    latent ones (``False``) or both (``None``); subsample and deterministic sites are skipped,
    and so are observed sites left out of an estimate (``observed=``, :data:`DESELECTED`) and
    auxiliary latent ones unless ``auxiliary``. A ``pyro.factor`` is an observed site (of
    Pyro's ``Unit`` distribution, marked auxiliary): a term of log p(x, z) in a model, of log q
    in a guide, as Pyro's ELBOs count it. A guide's log-density q(z | x) is the sum over its
    sites **with** the auxiliary ones: Pyro's autoguides draw an unconstrained value at an
    auxiliary site and return z through a ``Delta`` that carries only the Jacobian term
    (``AutoNormal``), as Pyro's ELBOs count it; pairing guide sites with the model's latent
    sites (same names) leaves them out."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        infer = site["infer"]
        if infer.get("_deterministic") or infer.get(DESELECTED) or (
                infer.get("is_auxiliary") and not site["is_observed"] and not auxiliary):
            continue
        if observed is None or bool(site["is_observed"]) == observed:
            yield name, site


def guide_sites(guide_tr):
    """``(name, site)`` of the sites of a guide's log-density log q: its latent and auxiliary
    draws **and its factors** (``pyro.factor``, an observed auxiliary site), as Pyro's ELBOs
    count them; a guide's other observed sites (``obs=c``, given data) are no part of q."""
    return ((name, site) for name, site in sites(guide_tr, None, auxiliary=True)
            if not site["is_observed"] or site["infer"].get("is_auxiliary"))


def in_model_order(guide_tr, model_tr) -> bool:
    """Whether the guide samples the latent sites in the model's order: Pyro's mean-field
    requirement of ``TraceMeanField_ELBO``. Only then is a site's closed-form KL, taken with
    the other sites' draws held fixed, unbiased: a bottom-up guide q(z1 | x) q(z2 | z1) of a
    top-down model p(z2) p(z1 | z2) draws the parent z2 after, and dependent on, its child."""
    return [n for n, _ in sites(guide_tr, False)] == [n for n, _ in sites(model_tr, False)]


# ---------------------------------------------------------------------------------------------
# The data plate


def _plates(site) -> list:
    """The site's vectorized plates, outermost first, without the particle plates."""
    return [f for f in site["cond_indep_stack"]
            if f.vectorized and f.name not in PARTICLE_PLATES]


def _frame(site, plate: str):
    return next((f for f in site["cond_indep_stack"] if f.name == plate), None)


def _site_extent(site, frame) -> int:
    """The datapoints of ``frame`` at this site: the plate's size as the trace holds it (a
    subsample's), or for an unsized plate (size -1) the site's batch shape at its dim (1 where
    the site broadcasts)."""
    if frame.size > 0:
        return int(frame.size)
    shape = site["fn"].batch_shape
    return int(shape[frame.dim]) if len(shape) >= -frame.dim else 1


def plate_extent(site_list, plate: str) -> int:
    """The number of datapoints in ``plate`` as a trace holds them: its subsample's size when
    it subsamples (``pyro.plate("data", N, subsample_size=m)``: m), its size otherwise, or for
    an unsized plate (``pyro.plate("data")``) the largest extent of its sites' batch shapes at
    its dim.

    :param site_list: a trace, or sites (Pyro messages) in the plate.
    """
    if hasattr(site_list, "nodes"):
        site_list = [site for _, site in sites(site_list, None, auxiliary=True)]
    extents = [_site_extent(site, frame) for site in site_list
               if (frame := _frame(site, plate)) is not None]
    return max(extents, default=1)


def find_data_plate(model_trace, batch_size: int | None = None,
                    data_plate: str | None = None) -> str:
    """The name of the data plate: the plate that encloses every observed site (the particle
    plates aside), or the plate named ``data_plate``, checked to enclose them. Where several
    enclose them, the one named ``"data"``, else the one whose datapoints (subsample or full
    size) number ``batch_size``, the batch's leading size, a hint.

    :param model_trace: a trace of the model, or its observed sites (Pyro messages).
    :raises AmbiguousPlateError: several plates enclose the observed sites and neither rule
        picks one (pass ``data_plate=``).
    :raises ValueError: the model has no observed site, an observed site lies outside every
        plate around the others (a global value conditioned with ``poutine.condition``), or
        ``data_plate`` does not enclose them; each message names the sites.
    """
    observed = ([site for _, site in sites(model_trace, True)] if hasattr(model_trace, "nodes")
                else list(model_trace))
    if not observed:
        raise ValueError("the model has no observed site; condition the data with "
                         "pyro.sample('x', ..., obs=x)")
    names = [site["name"] for site in observed]
    common = [f for f in _plates(observed[0])
              if all(_frame(site, f.name) is not None for site in observed)]
    if data_plate is not None:
        if not any(f.name == data_plate for f in common):
            raise ValueError(f"data_plate={data_plate!r} does not enclose every observed site "
                             f"{names}; the plates around them all: {[f.name for f in common]}")
        return data_plate
    if not common:
        raise ValueError(_no_common_plate(observed))
    if len(common) == 1:
        return common[0].name
    if any(f.name == "data" for f in common):
        return "data"
    sized = [f.name for f in common
             if batch_size is not None and batch_size in (plate_extent(observed, f.name),
                                                          f.full_size)]
    if len(sized) == 1:
        return sized[0]
    found = [(f.name, plate_extent(observed, f.name)) for f in common]
    raise AmbiguousPlateError(f"plates {found} (name, datapoints) all enclose the observed "
                              f"sites {names} and none is named 'data'"
                              + (f" or alone has the batch's size {batch_size}"
                                 if batch_size is not None else "")
                              + "; name the data plate with data_plate=")


def _no_common_plate(observed) -> str:
    """The message for observed sites that share no plate, naming them and their plates."""
    where = {site["name"]: [f.name for f in _plates(site)] for site in observed}
    loose = [name for name, plates in where.items() if not plates]
    placed = {name: plates for name, plates in where.items() if plates}
    if loose and placed:
        return (f"observed site{'s' if len(loose) > 1 else ''} {loose} lie{'' if len(loose) > 1 else 's'} "
                f"in no plate, the other observed sites in {placed}: per-datapoint estimates "
                "need every observed site inside the data plate. A global value conditioned "
                "with poutine.condition is an input, not data: leave it out of the estimate with "
                f"observed={sorted(placed)!r} (or pass it to the model as an argument)")
    if loose:
        return (f"the observed sites {loose} lie in no plate: per-datapoint estimates need them "
                "inside one plate over the datapoints, e.g. `with pyro.plate('data', len(x)):` "
                "around pyro.sample('x', ..., obs=x)")
    return (f"the observed sites lie in no common plate ({where}): per-datapoint estimates need "
            "them all inside one plate over the datapoints, pyro.plate('data', ...); leave the "
            "others out with observed=[...]")


def _data_frame(name, site, plate: str):
    frame = _frame(site, plate)
    if frame is not None:
        return frame
    if site["is_observed"]:
        raise ValueError(f"observed site {name!r} is outside the data plate "
                         f"pyro.plate({plate!r}, ...); leave it out with observed=[...]")
    if site["infer"].get("is_auxiliary"):
        raise ValueError(f"the guide's auxiliary site {name!r} is outside the data plate "
                         f"pyro.plate({plate!r}, ...) while the model's latent sites are inside "
                         "it: an autoguide with one joint latent over all datapoints "
                         "(AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariate"
                         "Normal...) has no per-datapoint q(z_n | x_n), so per-datapoint "
                         "estimates cannot be computed; use AutoNormal (one Normal per site, "
                         "inside the model's plates) or an amortized guide (AutoAmortizedNormal)")
    raise ValueError(_OUTSIDE_DATA.format(name=name, plate=plate))


# ---------------------------------------------------------------------------------------------
# Tracing


def _particles(num_particles: int | None, nesting: int):
    """The vectorized particle plate at dim ``-(nesting + 1)``, or nothing for ``None``."""
    if num_particles is None:
        return contextlib.nullcontext()
    return pyro.plate(PARTICLE_PLATE, num_particles, dim=-(nesting + 1))


def traces(model, guide, args: tuple, num_particles: int | None = None,
           nesting: int = 0, block: bool = True, enumerate: bool = False, subsample=None):
    """``(guide_trace, model_trace)``: the guide traced and the model replayed against it,
    with ``num_particles`` vectorized particles in a plate at dim ``-(nesting + 1)`` (none when
    ``num_particles`` is ``None``). With ``block`` (evaluation) handlers outside see none of
    the programs' sites; objectives pass ``block=False`` so that a param-only trace around them
    finds the parameters they use, as around Pyro's own ELBOs. With ``enumerate`` the model's
    sites marked ``infer={"enumerate": "parallel"}`` that the guide does not sample take all
    their values at once, in dims left of the particle plate (``poutine.enum``, as in
    ``TraceEnum_ELBO``). ``subsample``, a :class:`subsample_indices` handler, gives a
    self-subsampling plate its subsample."""
    if enumerate:
        model = poutine.enum(model, first_available_dim=-(nesting + 2))
    with poutine.block() if block else contextlib.nullcontext(), \
            subsample if subsample is not None else contextlib.nullcontext(), \
            _particles(num_particles, nesting):
        guide_tr = poutine.trace(guide).get_trace(*args)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args)
    return guide_tr, model_tr


def _batch_size(args: tuple) -> int | None:
    """The leading size of the first argument, where it is a tensor: a hint, not a rule."""
    first = args[0] if args else None
    return first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else None


@dataclass(frozen=True)
class Layout:
    """How a pair of programs lays out its datapoints and particles (:func:`layout`).

    :ivar int nesting: the deepest plate nesting (the particle plate goes left of it).
    :ivar str plate: the data plate's name.
    :ivar subsample_size: ``m`` when the data plate draws its own subsample of m datapoints
        (``subsample_size=m`` in the guide's or the model's plate): evaluation then covers the
        plate in subsamples of m; ``None`` otherwise.
    :ivar bool enumerated: whether the model enumerates discrete sites, summed out of the
        weights as ``TraceEnum_ELBO`` does.
    :ivar bool vectorize: whether particles are vectorized (see :func:`vectorizes`).
    """

    nesting: int
    plate: str
    subsample_size: int | None = None
    enumerated: bool = False
    vectorize: bool = True


def layout(model, guide, args: tuple, data_plate: str | None = None) -> Layout:
    """Trace once without particles and check what per-datapoint estimates need: the data
    plate (:func:`find_data_plate`) around every sample site, one number of datapoints in it
    for both programs, a guide site for every latent site of the model but those it enumerates
    (``infer={"enumerate": "parallel"}``), guide sites with a density (:func:`check_proposals`)
    and the model's masks on them (:func:`check_masks`). Returns the :class:`Layout`
    (``vectorize`` left ``True``: see :func:`vectorizes`).

    :raises ValueError: a sample site outside the data plate (the model's sites are looked at
        first, so a global latent is named as the model's site); a latent site of the model
        that the guide does not sample (the model would draw it from its prior and the
        estimate would score that draw as if the guide had proposed it: biased, silently);
        sequential enumeration; a guide site without a density, or unmasked where the model
        masks it.
    :raises PlateSizeError: programs that disagree on the data plate's size (Pyro's "Shape
        mismatch inside plate").
    """
    try:
        guide_tr, model_tr = traces(model, guide, args)
    except ValueError as error:
        if "Shape mismatch inside plate" in str(error):  # Pyro's broadcast check
            raise PlateSizeError(str(error).splitlines()[0]) from error
        raise
    plate = find_data_plate(model_tr, _batch_size(args), data_plate)
    extents = {}
    for tr in (model_tr, guide_tr):
        for name, site in sites(tr, None, auxiliary=True):
            frame = _data_frame(name, site, plate)
            n = _site_extent(site, frame)
            if frame.size > 0 or n > 1:  # (a site of an unsized plate may broadcast over it)
                extents.setdefault(n, name)
            if site["is_observed"]:
                _check_observed_rows(name, site, frame, n)
    if len(extents) > 1:
        raise PlateSizeError(f"the model's and the guide's sites hold different numbers of "
                             f"datapoints in the data plate pyro.plate({plate!r}): "
                             f"{ {name: n for n, name in extents.items()} }")
    enumerated = _enumerated(model_tr, guide_tr)
    proposed = {name for name, _ in sites(guide_tr, False)}
    for name, site in sites(model_tr, False):
        if name not in proposed and name not in enumerated:
            raise ValueError(
                f"the model's latent site {name!r} is not sampled by the guide; importance "
                "weights and ELBO terms need a guide site of the same name for every latent "
                "site of the model" + (", or, for a discrete site, enumeration in the model "
                                       "(@config_enumerate, or infer={'enumerate': 'parallel'})"
                                       if site["fn"].support.is_discrete else ""))
    check_proposals(guide_tr, model_tr)
    check_masks(guide_tr, model_tr)
    # every sample statement's plates, deterministic sites' too: a particle plate must clear them
    dims = [-f.dim for tr in (guide_tr, model_tr) for s in tr.nodes.values()
            if s["type"] == "sample" for f in s["cond_indep_stack"] if f.vectorized]
    return Layout(max(dims, default=0), plate, _drawn_subsample(guide_tr, model_tr, plate),
                  bool(enumerated))


def _check_observed_rows(name, site, frame, n: int) -> None:
    """An observed value holds one row per datapoint of the data plate, not one broadcast over
    them (the data of one datapoint scored n times).

    :raises PlateSizeError: naming the site.
    """
    value = site["value"]
    pos = value.dim() - len(site["fn"].event_shape) + frame.dim
    if pos >= 0 and value.shape[pos] != n:
        raise PlateSizeError(f"observed site {name!r} holds {value.shape[pos]} datapoints but "
                             f"pyro.plate({frame.name!r}) has {n}")


def _enumerated(model_tr, guide_tr) -> set:
    """The model's sites that enumeration sums out (marked, and not sampled by the guide).

    :raises ValueError: sequential enumeration, or a marked site without finite support."""
    names = set()
    for name, site in sites(model_tr, False):
        how = site["infer"].get("enumerate")
        if how is None or name in guide_tr.nodes:
            continue
        if how != "parallel":
            raise ValueError(f"the model's site {name!r} is marked infer={{'enumerate': "
                             f"{how!r}}}; evaluation sums enumerated sites out in parallel: "
                             "mark it 'parallel' (@config_enumerate's default)")
        if not site["fn"].has_enumerate_support:
            raise ValueError(f"the model's site {name!r} is marked for enumeration but "
                             f"{type(site['fn']).__name__} has no finite support to sum over")
        names.add(name)
    return names


def _drawn_subsample(guide_tr, model_tr, plate: str) -> int | None:
    """The subsample size ``m`` of a data plate that draws its own subsample (in the guide, or
    in the model with nothing to replay), ``None`` when it takes every datapoint or is given
    its subsample."""
    for tr in (guide_tr, model_tr):
        site = tr.nodes.get(plate)
        if site is not None and site["type"] == "sample" and site_is_subsample(site):
            fn = site["fn"]
            # subsample_size=1 on a plate of one datapoint (evaluation's first probe) draws
            # nothing there, but one datapoint of any larger plate
            if fn.subsample_size is not None and (fn.subsample_size < fn.size or fn.size == 1):
                return int(fn.subsample_size)
            return None
    return None


def data_layout(model, guide, args: tuple, data_plate: str | None = None) -> tuple[int, str]:
    """``(nesting, plate)`` of :func:`layout`, with its checks."""
    found = layout(model, guide, args, data_plate)
    return found.nesting, found.plate


def max_plate_nesting(model, guide, args: tuple, data_plate: str | None = None) -> int:
    """The deepest plate nesting of the programs on ``args``, after the checks of
    :func:`layout`."""
    return data_layout(model, guide, args, data_plate)[0]


# ---------------------------------------------------------------------------------------------
# What evaluation refuses: guide sites without a density, or without the model's masks


def innermost(fn):
    """The distribution under ``Independent``, ``.mask(...)`` and ``.expand(...)`` wrappers."""
    while isinstance(fn, (Independent, MaskedDistribution, ExpandedDistribution)):
        fn = fn.base_dist
    return fn


def check_proposals(guide_tr, model_tr) -> None:
    """Refuse guide sites that are no proposal: a ``Delta`` (a point mass has no density, so no
    importance weight and no KL exist), unless it is how a Pyro autoguide returns the value of
    an auxiliary draw (whose density is at the auxiliary site); a latent site that the model
    does not have (its density would enter log q with nothing in log p to match it); and a site
    whose distribution is discrete where the model's is continuous, or the other way round (its
    ``log_prob`` is then no density over the latent's support).

    :raises ValueError: naming the site and what to use instead.
    """
    auxiliary = has_auxiliary(guide_tr)
    for name, q_site in sites(guide_tr, False):
        q = innermost(q_site["fn"])
        if isinstance(q, dist.Delta) and not auxiliary:
            raise ValueError(
                f"the guide's site {name!r} is a Delta (a point mass, e.g. Pyro's AutoDelta "
                "for MAP estimation): it has no density, so no importance weight and no KL "
                "exist for it; evaluate with a guide that has a density at every latent site "
                "(AutoNormal, AutoAmortizedNormal, a Normal around the point estimate)")
        p_site = model_tr.nodes.get(name)
        if p_site is None or p_site["type"] != "sample":
            raise ValueError(
                f"the guide's latent site {name!r} is not in the model: log q would count a "
                "draw that p(x, z) never scores (Pyro warns 'Found vars in guide but not "
                "model'), and the weights and the ELBO would be wrong (not even a bound); "
                f"sample {name!r} in the model too, or leave it out of the guide")
        p_discrete, q_discrete = p_site["fn"].support.is_discrete, q_site["fn"].support.is_discrete
        if p_discrete != q_discrete:
            kind = {True: "discrete", False: "continuous"}
            raise ValueError(
                f"the guide's site {name!r} is {kind[q_discrete]} "
                f"({type(q).__name__}) where the model's is {kind[p_discrete]} "
                f"({type(innermost(p_site['fn'])).__name__}): its log_prob is no density over "
                "the latent's support, so the weights would be meaningless; give the guide a "
                f"{kind[p_discrete]} distribution at {name!r}")


def site_mask(site):
    """The boolean mask over a site's batch shape: its ``poutine.mask`` and the masks of
    ``.mask(...)`` distributions under its ``.to_event`` wrappers (an event counts where any of
    its entries does), combined; ``None`` for an unmasked site."""
    masks = [] if site["mask"] is None else [torch.as_tensor(site["mask"])]
    fn, event_dims = site["fn"], 0
    while isinstance(fn, (Independent, MaskedDistribution, ExpandedDistribution)):
        if isinstance(fn, Independent):
            event_dims += fn.reinterpreted_batch_ndims
        elif isinstance(fn, MaskedDistribution):
            mask = torch.as_tensor(fn._mask)
            if event_dims:
                mask = mask.reshape((1,) * max(event_dims - mask.dim(), 0) + mask.shape)
                mask = mask.any(list(range(-event_dims, 0)))
            masks.append(mask)
        fn = fn.base_dist
    if not masks:
        return None
    mask = masks[0]
    for m in masks[1:]:
        mask = mask & m
    return mask


def check_masks(guide_tr, model_tr) -> None:
    """Refuse a guide site that is unmasked (or masked otherwise) where the model masks its
    site: its log q would count entries that the model's log p leaves out (the padded steps of
    a variable-length sequence), and every weight would be off by their entropy.

    :raises ValueError: naming the site and saying how to pass the mask on.
    """
    for name, q_site in sites(guide_tr, False):
        p_site = model_tr.nodes.get(name)
        if p_site is None or p_site["type"] != "sample":
            continue
        p_mask = site_mask(p_site)
        if p_mask is None:
            continue
        q_mask = site_mask(q_site)
        shape = torch.broadcast_shapes(p_site["fn"].batch_shape, q_site["fn"].batch_shape,
                                       p_mask.shape, () if q_mask is None else q_mask.shape)
        q_mask = p_mask.new_ones(()) if q_mask is None else q_mask.to(p_mask.device)
        if not torch.equal(p_mask.expand(shape), q_mask.expand(shape)):
            raise ValueError(
                f"the model masks its latent site {name!r} (poutine.mask or .mask(...): "
                f"entries left out of log p) but the guide's site {name!r} is "
                f"{'unmasked' if site_mask(q_site) is None else 'masked otherwise'}: log q "
                "would count entries that the model ignores (the entropy of padded steps) and "
                "every weight would be off by it; give the guide's site the model's mask (the "
                "same .mask(m) or poutine.mask(mask=m)), as AutoAmortizedNormal does")


# ---------------------------------------------------------------------------------------------
# Per-datapoint reduction


def _to_particles_and_data(lp, data_dim: int, num_particles, num_data, nesting) -> torch.Tensor:
    """A batch-shaped tensor (particle dim at ``-(nesting + 1)``, data dim at ``data_dim``)
    summed over its other dims: ``(num_particles, num_data)``."""
    rank = nesting + 1
    lp = lp.reshape((1,) * (rank - lp.dim()) + lp.shape)
    other = [d for d in range(-rank + 1, 0) if d != data_dim]
    if other:
        lp = lp.sum(other, keepdim=True)
    return lp.reshape(lp.shape[-rank], lp.shape[data_dim]).expand(num_particles, num_data)


def reduce_site(name, site, lp, num_particles, num_data, nesting, plate: str) -> torch.Tensor:
    """Sum ``lp`` (the site's batch-shaped log-density or KL) over every dim but the particle
    and data-plate dims (``plate``, from :func:`layout`); returns ``(num_particles,
    num_data)``.

    :raises ValueError: the site is outside the data plate, or ``lp`` has more dims than the
        site's plates.
    """
    data_dim = _data_frame(name, site, plate).dim
    if lp.dim() > nesting + 1:
        raise ValueError(f"site {name!r} has batch shape {tuple(lp.shape)} with more dims than "
                         "its plates; declare the extra dims as event dims with .to_event(...)")
    return _to_particles_and_data(lp, data_dim, num_particles, num_data, nesting)


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


def _summed_out(model_tr, observed: bool | None, num_particles, num_data, nesting,
                plate: str) -> torch.Tensor:
    """log p of the model's sites (all: ``None``, or the latent ones: ``False``) with the
    enumerated sites summed out, per particle and datapoint, ``(K, N)``: Pyro's tensor
    variable elimination (``pyro.ops.contract.contract_to_tensor`` in the log ring, as
    ``TraceEnum_ELBO`` contracts its model factors), down to the particle and data plates;
    other plates are product-contracted."""
    if not hasattr(model_tr, "symbol_to_dim"):
        model_tr.symbolize_dims()
    tree, sum_dims = OrderedDict(), set()
    for _, site in sites(model_tr, observed):
        term = packed.pack(log_prob(site), site["infer"]["_dim_to_symbol"])
        ordinal = frozenset(model_tr.plate_to_symbol[f.name] for f in site["cond_indep_stack"]
                            if f.vectorized)
        tree.setdefault(ordinal, []).append(term)
        if site["infer"].get("_enumerate_symbol") is not None:
            sum_dims.add(site["infer"]["_enumerate_symbol"])
    symbols = model_tr.plate_to_symbol
    sizes = {symbols[plate]: num_data}
    if PARTICLE_PLATE in symbols:
        sizes[symbols[PARTICLE_PLATE]] = num_particles
    term = contract_to_tensor(tree, sum_dims, target_ordinal=frozenset(sizes),
                              ring=LogRing(dim_to_size=sizes))
    lp = packed.unpack(term, model_tr.symbol_to_dim)
    return _to_particles_and_data(lp, model_tr.symbol_to_dim[symbols[plate]], num_particles,
                                  num_data, nesting)


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


def _total(parts: list, like: torch.Tensor | None):
    """The sum of ``parts``; with none, zeros like ``like`` (or ``None``)."""
    if parts:
        return sum(parts[1:], parts[0])
    return None if like is None else torch.zeros_like(like)


def _reduce(guide_tr, model_tr, num_particles, layout: Layout) -> dict:
    """The three log-densities of one trace pair, ``(K, N)`` each (see :class:`Weights`), with
    the checks of :func:`check_proposals` and :func:`check_masks`."""
    nesting, plate = layout.nesting, layout.plate
    check_proposals(guide_tr, model_tr)
    check_masks(guide_tr, model_tr)
    if not any(True for _ in sites(model_tr, True)):
        raise ValueError("the model has no observed site; condition the data with "
                         "pyro.sample('x', ..., obs=x)")
    shape = (num_particles, plate_extent(model_tr, plate))
    guide = [reduce_site(name, site, log_prob(site), *shape, nesting, plate)
             for name, site in guide_sites(guide_tr)]
    if layout.enumerated:  # log p(x, z) and log p(z) with the discrete sites summed out
        log_prior = _summed_out(model_tr, False, *shape, nesting, plate)
        log_likelihood = _summed_out(model_tr, None, *shape, nesting, plate) - log_prior
    else:
        log_likelihood, log_prior = (
            _total([reduce_site(name, site, log_prob(site), *shape, nesting, plate)
                    for name, site in sites(model_tr, observed)], None)
            for observed in (True, False))
        log_prior = torch.zeros_like(log_likelihood) if log_prior is None else log_prior
    return {"log_likelihood": log_likelihood, "log_prior": log_prior,
            "log_guide": torch.zeros_like(log_likelihood) if not guide else _total(guide, None)}


class subsample_indices(Messenger):
    """Make a plate that draws its own subsample (``pyro.plate(name, N, subsample_size=m)``)
    take ``indices`` instead: evaluation scores every datapoint of such a plate by covering
    ``range(N)`` with subsamples of ``m`` (see
    :func:`per_datapoint`). The guide's draw is replaced, and the model
    replays it, as Pyro's ELBOs replay any subsample; a subsample the program gives itself
    (``subsample=idx``) is left alone.

    :param str name: the plate.
    :param torch.Tensor indices: ``(m,)`` int64, the plate's subsample size.
    :ivar size: the plate's full size N, once a subsample was replaced (else ``None``).
    """

    def __init__(self, name: str, indices: torch.Tensor):
        super().__init__()
        self.name, self.indices, self.size = name, indices, None

    def _pyro_sample(self, msg):
        if msg["name"] == self.name and site_is_subsample(msg) and msg["value"] is None:
            msg["value"] = self.indices.to(msg["fn"].device)
            self.size = msg["fn"].size


def per_datapoint(fn, model, guide, args: tuple, num_particles: int, layout: Layout) -> dict:
    """Run ``fn(guide_trace, model_trace, k)`` -- a dict of tensors ``(k, n, ...)`` for the k
    particles of one trace pair and the n datapoints it holds -- over ``num_particles``
    particles (one vectorized trace, or with ``layout.vectorize`` off one trace per particle)
    and every datapoint of the data plate: where the plate draws its own subsample of m
    (``layout.subsample_size``) it is given the subsamples ``[0, m)``, ``[m, 2m)``, ... (the
    last one ending at the plate's size, its overlap dropped) with
    :class:`subsample_indices`. Returns the dict with every
    particle along dim 0 and every datapoint along dim 1.

    :raises ValueError: a subsample the program gives itself where the layout found it drawn.
    """
    m = layout.subsample_size
    if m is None:
        return _over_particles(fn, model, guide, args, num_particles, layout)
    parts, start, size = [], 0, None
    while size is None or start < size:
        first = start if size is None else min(start, size - m)
        handler = subsample_indices(layout.plate, torch.arange(first, first + m))
        out = _over_particles(fn, model, guide, args, num_particles, layout, handler)
        if handler.size is None:
            raise ValueError(f"the data plate pyro.plate({layout.plate!r}) drew its own subsample "
                             "on the first pass but not on this one; evaluation covers a "
                             "self-subsampling plate in subsamples of its size")
        size = handler.size
        parts.append({k: v[:, start - first:] for k, v in out.items()})
        start = first + m
    return {k: torch.cat([p[k] for p in parts], 1) for k in parts[0]}


def _over_particles(fn, model, guide, args, num_particles, layout: Layout,
                    subsample=None) -> dict:
    enum = layout.enumerated
    if layout.vectorize:
        return fn(*traces(model, guide, args, num_particles, layout.nesting, enumerate=enum,
                          subsample=subsample), num_particles)
    outs = [fn(*traces(model, guide, args, None, layout.nesting, enumerate=enum,
                       subsample=subsample), 1)
            for _ in range(num_particles)]
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def weights(model, guide, args: tuple, num_particles: int, layout: Layout) -> Weights:
    """Trace ``num_particles`` particles for the batch ``args`` and reduce every site to
    ``(K, N)``, N the datapoints of the data plate (:func:`per_datapoint`: vectorized or one
    particle at a time, a self-subsampling plate covered); the returned traces are the last
    ones run.

    :raises ValueError: the model has no observed site, a site is outside the data plate, or
        a guide site has no density or lacks the model's mask.
    """
    last = {}

    def reduce(guide_tr, model_tr, k):
        last["traces"] = guide_tr, model_tr
        return _reduce(guide_tr, model_tr, k, layout)

    parts = per_datapoint(reduce, model, guide, args, num_particles, layout)
    return Weights(parts["log_likelihood"], parts["log_prior"], parts["log_guide"],
                   *last["traces"])


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


def replayed_log_density(program, trace, args: tuple, num_particles: int | None,
                         layout: Layout) -> torch.Tensor:
    """log q(z) of ``program`` (a guide) at the latent values of ``trace`` (drawn by another
    program with the same particle layout), reduced per datapoint to ``(K, N)``; ``K`` is 1
    without a particle plate (``num_particles`` ``None``)."""
    with poutine.block(), _particles(num_particles, layout.nesting):
        tr = poutine.trace(poutine.replay(program, trace=trace)).get_trace(*args)
    shape = (num_particles or 1, plate_extent(tr, layout.plate))
    parts = [reduce_site(name, site, log_prob(site), *shape, layout.nesting, layout.plate)
             for name, site in sites(tr, False, auxiliary=True)]
    return _total(parts, torch.zeros(shape))


def vectorizes(model, guide, args: tuple, nesting: int, plate: str, task: str = "evaluating",
               *, subsample_size: int | None = None, enumerated: bool = False) -> bool:
    """Whether the programs run with vectorized particles (a plate left of their own plates):
    tried with two particles on ``args`` (a data plate that draws its own subsample of
    ``subsample_size`` on its first subsample; the model's enumerated sites summed out where
    ``enumerated``); when that fails and one particle without the plate works, ``False``, with a
    warning (the model does not broadcast over a leading dim, e.g. it indexes with a boolean
    mask or reshapes with explicit sizes: evaluation, or the IWAE objective in training, then
    loops over particles, as Pyro's ``Trace_ELBO(vectorize_particles=False)`` does). ``task``
    names the caller in the warning.

    :raises Exception: the error of the vectorized run when the plain run fails too (the
        model's own error, not a particle problem).
    """
    found = Layout(nesting, plate, subsample_size, enumerated)

    def first():  # a self-subsampling plate on its first subsample
        return (None if subsample_size is None else
                subsample_indices(plate, torch.arange(subsample_size)))

    def reduce(guide_tr, model_tr, k):
        return _reduce(guide_tr, model_tr, k, found)

    try:
        _over_particles(reduce, model, guide, args, 2, found, first())
        return True
    except Exception as vectorized_error:
        try:
            _over_particles(reduce, model, guide, args, 1, replace(found, vectorize=False),
                            first())
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


def draws_subsample(program, args: tuple) -> bool:
    """Whether a program (a guide: it runs first in every ELBO, and the model replays its
    subsample) draws a subsample of a plate itself (``pyro.plate(name, n, subsample_size=m)``
    with ``m < n``), seen on one trace of ``args`` without particles, its sites hidden from
    outer handlers: such a program takes no batch of fewer than m datapoints."""
    with poutine.block():
        trace = poutine.trace(program).get_trace(*args)
    return any(site["type"] == "sample" and site_is_subsample(site)
               and site["fn"].subsample_size is not None
               and site["fn"].subsample_size < site["fn"].size
               for site in trace.nodes.values())
