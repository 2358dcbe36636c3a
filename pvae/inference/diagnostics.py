"""Diagnostics of training objectives: the variance of gradient estimators."""

from __future__ import annotations

import pyro
import torch
from torch import nn

from pvae.inference.handlers import data_units
from pvae.inference.objectives import ReparamELBO, ScoreFunctionELBO, as_loss

__all__ = ["gradient_variance"]


def gradient_variance(model, x: torch.Tensor, *, loss=None, num_estimates: int = 200,
                      warmup_steps: int = 0, c=None, seed: int = 0) -> dict:
    """Mean and variance of an estimator's gradient over independent estimates at fixed
    parameters, per parameter group (the first component of each parameter's name, e.g.
    ``encoder``, ``decoder``).

    Each estimate is the gradient of the surrogate loss per datapoint on the same batch ``x``
    (the datapoints of the data plate, :class:`~pvae.inference.handlers.data_units`).
    Neural baselines, which start untrained, can be fitted first for ``warmup_steps`` Adam
    steps on the baseline's own parameters (the model's parameters stay fixed).

    :param model: an ``nn.Module`` meeting the model contract.
    :param torch.Tensor x: one mini-batch ``(B, D)``.
    :param loss: the estimator, a loss object (:mod:`pvae.inference.objectives`; default the
        one-particle :class:`~pvae.inference.ReparamELBO`) or a Pyro ELBO; a fresh one, since
        its state (baselines) is trained here.
    :returns: ``{group: {"mean_sq": ..., "variance": ..., "snr": ..., "num_params": ...},
        "total": {...}}`` where ``variance`` is the summed per-coordinate variance (trace of the
        gradient covariance), ``mean_sq`` the squared norm of the mean gradient, and ``snr`` the
        mean over coordinates of |mean| / sd (Rainforth et al. 2018).
    """
    if not isinstance(model, nn.Module):
        raise TypeError("gradient_variance needs an nn.Module model (to name parameter groups)")
    est = ReparamELBO() if loss is None else as_loss(loss)
    args = (x,) if c is None else (x, c)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    pyro.set_rng_seed(seed)
    if warmup_steps and isinstance(est, ScoreFunctionELBO) and est.baseline == "neural":
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
        with data_units(batch_size=x.shape[0]) as units:  # per datapoint, as in training
            surrogate = est(model.model, model.guide, *args)[1]
        surrogate = surrogate / units.num_data
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
