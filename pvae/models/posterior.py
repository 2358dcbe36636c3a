"""Approximate vs exact posteriors, for models that know their exact posterior, and
conversion of posterior draws to ArviZ ``InferenceData``. Beside the models, not in
:mod:`pvae.inference`, because it needs more than the model contract.

These functions need more than the model contract: a model with an **exact posterior**, i.e.
``exact_posterior(x)`` and ``guide_distribution(x)`` (distributions with batch shape ``(N,)``
and event shape ``(latent_dim,)``), ``log_marginal(x)`` ``(N,)``, ``mean_field_kl_floor()``,
and, for the model-level comparison, the loading matrix ``W`` ``(D, latent_dim)`` and noise
variance ``sigma2``. :class:`pvae.models.PPCA` is such a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributions import MultivariateNormal

from pvae.contract import placement, prepare_data, to_placement
from pvae.distributions import closed_form_kl
from pvae.stats import mean_stderr, principal_angles

__all__ = ["PosteriorComparison", "compare_posteriors", "to_inference_data"]


@dataclass
class PosteriorComparison:
    """q(z | x) against the exact p(z | x), per datapoint (tensors ``(N,)``, nats).

    :ivar kl_q_p: KL(q || p_exact), the gap between log p(x) and the ELBO.
    :ivar kl_p_q: KL(p_exact || q).
    :ivar mean_error: Euclidean distance between the posterior means.
    :ivar logdet_ratio: log|Sigma_q| - log|Sigma_exact| (negative: q is too narrow).
    :ivar float mean_field_floor: the smallest KL(q || p) a diagonal q can reach (nats).
    :ivar dict model: whole-model comparison with a reference fit (``None`` without one):
        exact log-likelihood per datapoint of both, principal angles between span(W) and
        span(W_ref) (degrees), and sigma^2 of both.
    """

    kl_q_p: torch.Tensor
    kl_p_q: torch.Tensor
    mean_error: torch.Tensor
    logdet_ratio: torch.Tensor
    mean_field_floor: float
    guide: str
    model: dict | None = None

    def summary(self) -> dict:
        """Means and standard errors over datapoints, plus the model-level comparison."""
        out = {"guide": self.guide, "mean_field_kl_floor": self.mean_field_floor}
        for name in ("kl_q_p", "kl_p_q", "mean_error", "logdet_ratio"):
            out[name], out[f"{name}_stderr"] = mean_stderr(getattr(self, name))
        if self.model is not None:
            out.update(self.model)
        return out


def _check_exact(model, who: str) -> None:
    for attr in ("exact_posterior", "guide_distribution"):
        if not callable(getattr(model, attr, None)):
            raise TypeError(f"{who} needs a model with an exact posterior ({attr}(x), e.g. "
                            f"pvae.models.PPCA); {type(model).__name__} has none")


@torch.no_grad()
def compare_posteriors(model, x: torch.Tensor, reference=None) -> PosteriorComparison:
    """Compare a PPCA's amortized guide q(z | x) with its exact posterior p(z | x), and the
    model with a reference fit (e.g. ``PPCA.closed_form``) on the same data.

    :param model: a :class:`pvae.models.PPCA` (or any object with ``exact_posterior(x)``,
        ``guide_distribution(x)``, ``log_marginal(x)``, ``W``, ``sigma2``).
    :param torch.Tensor x: ``(N, D)``.
    :param reference: optional model to compare against (same interface).
    :returns: :class:`PosteriorComparison`.
    :raises TypeError: the model has no exact posterior.
    """
    _check_exact(model, "compare_posteriors")
    if reference is not None:
        _check_exact(reference, "compare_posteriors' reference")
    x, _ = prepare_data(model, x, None, "auto", "compare_posteriors")
    p = model.exact_posterior(x)
    q = model.guide_distribution(x)
    kl_q_p, kl_p_q = closed_form_kl(q, p), closed_form_kl(p, q)
    mean_error = (q.mean - p.mean).norm(dim=-1)
    cov_q = q.covariance_matrix if isinstance(q, MultivariateNormal) else torch.diag_embed(q.variance)
    logdet_ratio = (torch.logdet(cov_q) - torch.logdet(p.covariance_matrix)).expand(len(x))
    summary = None
    if reference is not None:
        ll = model.log_marginal(x).double()
        ll_ref = reference.log_marginal(to_placement(x, *placement(reference, "auto", x))).double()
        angles = principal_angles(model.W, reference.W)
        summary = {
            "log_likelihood": ll.mean().item(),
            "reference_log_likelihood": ll_ref.mean().item(),
            "log_likelihood_gap": (ll_ref - ll).mean().item(),
            "max_principal_angle_deg": angles.max().item(),
            "principal_angles_deg": [round(a, 4) for a in angles.tolist()],
            "sigma2": model.sigma2.item(),
            "reference_sigma2": reference.sigma2.item(),
        }
    return PosteriorComparison(kl_q_p, kl_p_q, mean_error, logdet_ratio,
                               model.mean_field_kl_floor().item(),
                               getattr(model, "guide_type", "?"), summary)


@torch.no_grad()
def to_inference_data(model, x: torch.Tensor, *, num_draws: int = 1000, seed: int = 0):
    """Posterior draws of z for each row of ``x`` from q(z | x) and from the exact p(z | x),
    as two ArviZ ``InferenceData`` objects (one chain each, variable ``"z"`` with dims
    ``("datapoint", "latent")``), so that ``az.summary`` and ``az.plot_forest([guide, exact],
    model_names=["guide", "exact"])`` compare them.

    :param torch.Tensor x: ``(n, D)``, a few datapoints.
    :returns: ``{"guide": InferenceData, "exact": InferenceData}``.
    """
    import arviz as az  # optional at import time: ArviZ is slow to import

    _check_exact(model, "to_inference_data")
    x = to_placement(x, *placement(model, "auto", x))
    torch.manual_seed(seed)
    out = {}
    for name, d in (("guide", model.guide_distribution(x)), ("exact", model.exact_posterior(x))):
        draws = d.sample((num_draws,)).cpu().numpy()  # (draws, n, q)
        out[name] = az.from_dict(
            posterior={"z": draws[None]},
            coords={"datapoint": list(range(len(x))), "latent": list(range(draws.shape[-1]))},
            dims={"z": ["datapoint", "latent"]},
        )
    return out
