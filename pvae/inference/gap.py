r"""The inference gap and its two parts (Cremer, Li & Duvenaud 2018, "Inference Suboptimality
in Variational Autoencoders", ICML, eqs. 3-4), per datapoint:

.. math::
    \underbrace{\log p(x) - \mathcal{L}[q_\phi]}_{\text{inference gap}}
    = \underbrace{\log p(x) - \mathcal{L}[q^*]}_{\text{approximation gap}}
    + \underbrace{\mathcal{L}[q^*] - \mathcal{L}[q_\phi]}_{\text{amortization gap}}

where :math:`q_\phi(z \mid x)` is the amortized guide and :math:`q^*` the best member of the
same family for that datapoint alone: free per-datapoint parameters, started at the encoder's
output and optimized on the ELBO of that datapoint (semi-amortized refinement). log p(x) is
the importance-weighted estimate with ``num_samples`` particles drawn from :math:`q^*`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import MultivariateNormal, Normal

from pvae.contract import fixed_parameters, prepare_data, program_args
from pvae.distributions import base_dist
from pvae.inference.traces import layout as find_layout
from pvae.inference.traces import sites, traces, weights
from pvae.stats import mean_stderr
from pvae.validation import check_choice, check_count, check_float

__all__ = ["InferenceGap", "RefinedGuide", "inference_gap"]


class RefinedGuide(nn.Module):
    """A non-amortized guide with the family of a model's amortized guide: for every latent
    site and datapoint its own Gaussian parameters, started at the guide's output for ``x``.

    Supported guide sites: ``Normal`` (any ``.to_event``: a diagonal Gaussian) and
    ``MultivariateNormal`` (full covariance, ``scale_tril`` parameterized by its strictly lower
    part and the log of its diagonal). A site whose guide distribution depends on another
    site's sample (hierarchical guides) starts at its distribution given the guide's first
    draw, and gets free parameters like any other.

    :param model: an object meeting the model contract.
    :param args: the batch of datapoints, ``(x,)`` or ``(x, c)``.
    :param str family: ``"guide"`` (the guide's own family) or ``"full"`` (vector-valued Normal
        sites get a full-covariance Gaussian, started at the guide's diagonal one: a more
        flexible family, whose approximation gap is smaller).
    :raises TypeError: a guide site of another family (the family ``q*`` would belong to is
        then not defined here).
    :raises ValueError: unknown ``family``.
    """

    def __init__(self, model, args: tuple, family: str = "guide"):
        super().__init__()
        check_choice("family", family, ("guide", "full"))
        guide_tr, _ = traces(model.model, model.guide, args)
        self.sites = []  # (name, key, kind, event_dims, frames)
        self.locs, self.scales = nn.ParameterDict(), nn.ParameterDict()
        for i, (name, site) in enumerate(sites(guide_tr, False)):
            fn, key = site["fn"], f"site{i}"
            base = base_dist(fn)
            frames = [(f.name, f.size, f.dim) for f in site["cond_indep_stack"] if f.vectorized]
            if isinstance(base, MultivariateNormal):
                L = base.scale_tril.expand(*base.batch_shape, *base.event_shape,
                                           *base.event_shape).detach()
                raw = L.tril(-1) + torch.diag_embed(L.diagonal(dim1=-2, dim2=-1).log())
                kind, event_dims = "mvn", 0
                self.scales[key] = nn.Parameter(raw.clone())
            elif isinstance(base, Normal) and family == "full" and len(fn.event_shape) == 1:
                kind, event_dims = "mvn", 0
                scale = base.scale.expand(base.batch_shape).detach()
                self.scales[key] = nn.Parameter(torch.diag_embed(scale.log()))
            elif isinstance(base, Normal):
                kind = "normal"
                event_dims = len(fn.event_shape)
                self.scales[key] = nn.Parameter(
                    base.scale.expand(base.batch_shape).detach().log().clone())
            else:
                raise TypeError(f"inference_gap refines Normal and MultivariateNormal guide sites; "
                                f"site {name!r} is {type(base).__name__}")
            shape = base.batch_shape + base.event_shape
            self.locs[key] = nn.Parameter(base.loc.expand(shape).detach().clone())
            self.sites.append((name, key, kind, event_dims, frames))

    def distribution(self, key: str, kind: str, event_dims: int):
        loc, raw = self.locs[key], self.scales[key]
        if kind == "mvn":
            L = raw.tril(-1) + torch.diag_embed(raw.diagonal(dim1=-2, dim2=-1).exp())
            return dist.MultivariateNormal(loc, scale_tril=L)
        return dist.Normal(loc, raw.exp()).to_event(event_dims)

    def forward(self, *args):
        """The guide program: the same site names, inside the same plates."""
        for name, key, kind, event_dims, frames in self.sites:
            with contextlib.ExitStack() as stack:
                for plate_name, size, dim in frames:
                    stack.enter_context(pyro.plate(plate_name, size, dim=dim))
                pyro.sample(name, self.distribution(key, kind, event_dims))


class _Program:
    """The model with another guide: what ``weights`` traces."""

    def __init__(self, model, guide):
        self.model, self.guide = model.model, guide


@dataclass
class InferenceGap:
    """Per-datapoint log-likelihood and ELBOs, ``(N,)`` tensors in nats, each with the Monte
    Carlo standard error of its own estimate.

    :ivar log_likelihood: IW estimate of log p(x) with ``num_samples`` draws from q*.
    :ivar elbo_amortized: ELBO of the amortized guide q_phi(z | x).
    :ivar elbo_refined: ELBO of q*, the per-datapoint optimum of the same family.
    :ivar approximation_gap: log p(x) - ELBO(q*).
    :ivar amortization_gap: ELBO(q*) - ELBO(q_phi).
    :ivar total_gap: log p(x) - ELBO(q_phi).
    """

    log_likelihood: torch.Tensor
    log_likelihood_mcse: torch.Tensor
    elbo_amortized: torch.Tensor
    elbo_amortized_mcse: torch.Tensor
    elbo_refined: torch.Tensor
    elbo_refined_mcse: torch.Tensor
    num_samples: int
    num_elbo_samples: int
    num_steps: int

    @property
    def approximation_gap(self) -> torch.Tensor:
        return self.log_likelihood - self.elbo_refined

    @property
    def amortization_gap(self) -> torch.Tensor:
        return self.elbo_refined - self.elbo_amortized

    @property
    def total_gap(self) -> torch.Tensor:
        return self.log_likelihood - self.elbo_amortized

    def summary(self) -> dict:
        """Means over datapoints with their standard errors (nats per datapoint); the
        ``*_mcse`` entries are the root-mean-square Monte Carlo error of one datapoint's
        estimate."""
        out = {"num_datapoints": len(self.log_likelihood), "iw_num_samples": self.num_samples,
               "elbo_num_samples": self.num_elbo_samples, "refinement_steps": self.num_steps}
        for name in ("log_likelihood", "elbo_amortized", "elbo_refined", "total_gap",
                     "approximation_gap", "amortization_gap"):
            out[name], out[f"{name}_stderr"] = mean_stderr(getattr(self, name))
        for name in ("log_likelihood", "elbo_amortized", "elbo_refined"):
            out[f"{name}_mcse"] = getattr(self, f"{name}_mcse").double().pow(2).mean().sqrt().item()
        return out


@torch.no_grad()
def _elbo(program, args, num_samples, layout, chunk=256):
    """Per-datapoint ELBO estimate and its Monte Carlo standard error, ``(N,)`` each."""
    total, total_sq = 0.0, 0.0
    for start in range(0, num_samples, chunk):
        k = min(chunk, num_samples - start)
        log_w = weights(program.model, program.guide, args, k, layout).log_weight.double()
        total, total_sq = total + log_w.sum(0), total_sq + log_w.pow(2).sum(0)
    mean = total / num_samples
    var = (total_sq / num_samples - mean**2).clamp_min(0) * num_samples / max(num_samples - 1, 1)
    return mean, (var / num_samples).sqrt()


@torch.no_grad()
def _iw(program, args, num_samples, layout, chunk=256):
    """IW estimate of log p(x) and its delta-method Monte Carlo error ``sqrt((K/ESS - 1) / K)``."""
    lse = lse2 = None
    for start in range(0, num_samples, chunk):
        k = min(chunk, num_samples - start)
        log_w = weights(program.model, program.guide, args, k, layout).log_weight.double()
        a, b = torch.logsumexp(log_w, 0), torch.logsumexp(2 * log_w, 0)
        lse = a if lse is None else torch.logaddexp(lse, a)
        lse2 = b if lse2 is None else torch.logaddexp(lse2, b)
    ess = torch.exp(2 * lse - lse2)
    return lse - math.log(num_samples), ((num_samples / ess - 1).clamp_min(0) / num_samples).sqrt()


def inference_gap(model, x: torch.Tensor, *, c=None, num_steps: int = 500, lr: float = 0.05,
                  num_particles: int = 32, num_elbo_samples: int = 1000,
                  num_samples: int = 5000, family: str = "guide", device="auto",
                  seed: int = 0) -> InferenceGap:
    """Split the inference gap of ``x``'s datapoints into approximation and amortization gaps
    (Cremer, Li & Duvenaud 2018): refine a copy of the guide's output per datapoint
    (:class:`RefinedGuide`) with Adam on the ELBO, then estimate log p(x) (IW with draws from
    the refined guide), ELBO(q*) and ELBO(q_phi).

    Works for any model meeting the contract whose guide sites are ``Normal`` or
    ``MultivariateNormal`` (the family q* belongs to is the guide's). The model's parameters
    stay fixed. The datapoints are refined together (their ELBOs are independent, so the joint
    optimum is the per-datapoint one). A model's enumerated discrete sites are summed out of
    the bound that is refined (``TraceEnum_ELBO``), as they are of the ELBOs reported.

    :param torch.Tensor x: ``(N, D)`` datapoints (a hundred is typical).
    :param int num_steps: Adam steps of the refinement.
    :param float lr: Adam's initial learning rate for the refinement (it decays exponentially
        to 1% of it by the last step).
    :param int num_particles: reparameterized samples per datapoint and step.
    :param int num_elbo_samples: samples per datapoint for each final ELBO estimate.
    :param int num_samples: K of the IW estimate of log p(x).
    :param str family: the family of q*: ``"guide"`` (the guide's) or ``"full"``
        (full-covariance Gaussians for vector-valued Normal sites), see :class:`RefinedGuide`.
    :returns: :class:`InferenceGap` (nats per datapoint).
    :raises TypeError: a guide site that is neither Normal nor MultivariateNormal.
    :raises ValueError: bad sizes or data.
    """
    for name, value in (("num_steps", num_steps), ("num_particles", num_particles),
                        ("num_elbo_samples", num_elbo_samples), ("num_samples", num_samples)):
        check_count(name, value, 0 if name == "num_steps" else 1)
    check_float("lr", lr, minimum=0.0, strict=True)
    x, c = prepare_data(model, x, c, device, "inference_gap")
    args = program_args(x, c)
    pyro.set_rng_seed(seed)
    layout = find_layout(model.model, model.guide, args)
    nesting = layout.nesting
    refined = RefinedGuide(model, args, family)
    with fixed_parameters(model):
        # the bound that _elbo reports: with a model's enumerated discrete sites summed out
        # (TraceEnum_ELBO), not drawn from their prior (Trace_ELBO would refine a looser bound)
        bound = pyro.infer.TraceEnum_ELBO if layout.enumerated else pyro.infer.Trace_ELBO
        elbo = bound(num_particles=num_particles, vectorize_particles=True,
                     max_plate_nesting=nesting)
        optimizer = torch.optim.Adam(refined.parameters(), lr=lr)
        # the step size decays to 1% of lr: the iterates settle at the optimum instead of
        # jittering around it with the Monte Carlo noise of the gradient
        decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.01 ** (1 / max(num_steps, 1)))
        with pyro.validation_enabled(False):
            for _ in range(num_steps):
                optimizer.zero_grad(set_to_none=True)
                elbo.differentiable_loss(model.model, refined, *args).backward()
                optimizer.step()
                decay.step()
    amortized, refined_program = _Program(model, model.guide), _Program(model, refined)
    elbo_q, elbo_q_se = _elbo(amortized, args, num_elbo_samples, layout)
    elbo_star, elbo_star_se = _elbo(refined_program, args, num_elbo_samples, layout)
    log_px, log_px_se = _iw(refined_program, args, num_samples, layout)
    return InferenceGap(log_px, log_px_se, elbo_q, elbo_q_se, elbo_star, elbo_star_se,
                        num_samples, num_elbo_samples, num_steps)
