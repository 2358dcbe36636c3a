"""Plain sample statistics, apart from inference (as Pyro's ``pyro.ops.stats``): Monte Carlo
summaries with one convention for every estimate pvae reports, importance-sampling ESS and
principal angles between subspaces.

Every reported mean comes with its standard error ``sd / sqrt(n)`` (sample standard deviation,
``n - 1`` in the denominator); with fewer than two values there is no estimate of the error and
the standard error is NaN, never 0.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ess", "logmeanexp", "mean_stderr", "principal_angles"]


def mean_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean of ``values`` ``(n,)``, computed in float64.

    :returns: ``(mean, stderr)`` as Python floats; ``stderr`` is NaN when ``n < 2``.
    :raises ValueError: ``values`` is empty.
    """
    v = torch.as_tensor(values).detach().double().flatten()
    if v.numel() == 0:
        raise ValueError("mean_stderr needs at least one value, got an empty tensor")
    stderr = v.std().item() / math.sqrt(v.numel()) if v.numel() > 1 else float("nan")
    return v.mean().item(), stderr


def logmeanexp(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``log(mean(exp(t), dim))``, computed stably with ``torch.logsumexp``."""
    return torch.logsumexp(t, dim) - math.log(t.shape[dim])


def ess(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Effective sample size ``(sum w)^2 / sum w^2`` of importance weights given as logs, along
    ``dim``: between 1 and the number of weights (Kong 1992; Owen, Monte Carlo theory, §9.3)."""
    return torch.exp(2 * torch.logsumexp(log_weights, dim) - torch.logsumexp(2 * log_weights, dim))


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, ascending) between span(A) and span(B), ``(D, q)`` each
    (Björck & Golub 1973): the arc-cosines of the singular values of Q_A^T Q_B."""
    qa, _ = torch.linalg.qr(A.double())
    qb, _ = torch.linalg.qr(B.double())
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cos))  # singular values descend: the angles ascend
