"""Inference for any model meeting the model contract (README, "Your own model"), grouped by
role (``ARCHITECTURE.md``):

- **trace core** (:mod:`~pvae.inference.traces`, :mod:`~pvae.inference.handlers`): the guide
  traced and the model replayed with vectorized particles, the data plate found, every site
  reduced per datapoint; effect handlers (beta, score function, observed scale, masks);
- **training objectives** (:mod:`~pvae.inference.objectives`, :mod:`~pvae.inference.schedules`):
  loss objects built by the caller and passed to :func:`pvae.train.fit` (``ReparamELBO``,
  ``ScoreFunctionELBO``, ``IWAE``, ``VIMCO``, any Pyro ELBO through ``PyroLoss``) and beta
  schedules;
- **guides** (:mod:`~pvae.inference.autoguide`): ``AutoAmortizedNormal``;
- **estimates** (:mod:`~pvae.inference.evaluate`, :mod:`~pvae.inference.gap`,
  :mod:`~pvae.inference.impute`, :mod:`~pvae.inference.diagnostics`): IW log-likelihood, ELBO
  terms, the inference gap, imputation, gradient variance;
- **reference posteriors** (:mod:`~pvae.inference.mcmc`): NUTS on p(z | x_n) and comparisons
  with the guide's draws.

This layer never imports :mod:`pvae.train` (an import-linter contract): ``fit`` and the
training engine are imported from there.
"""

from pvae.inference.autoguide import AutoAmortizedNormal
from pvae.inference.diagnostics import gradient_variance
from pvae.inference.evaluate import (
    ElboTerms,
    IWResult,
    elbo_terms,
    iw_log_likelihood,
    log_weights,
)
from pvae.inference.gap import InferenceGap, RefinedGuide, inference_gap
from pvae.inference.handlers import BASELINES, observed_scale, scale_latents, score_function
from pvae.inference.impute import Imputation, impute
from pvae.inference.mcmc import (
    PosteriorSamples,
    SampleComparison,
    compare_samples,
    energy_distance,
    guide_samples,
    nuts_posterior,
)
from pvae.inference.objectives import (
    GRADIENTS,
    IWAE,
    LOSSES,
    VIMCO,
    PyroLoss,
    ReparamELBO,
    ScoreFunctionELBO,
    SVILoss,
    SVIObjective,
    as_loss,
)
from pvae.inference.schedules import Constant, Cyclical, LinearWarmup, make_schedule, settled

__all__ = [
    # trace core
    "BASELINES",
    "observed_scale",
    "scale_latents",
    "score_function",
    # training objectives
    "GRADIENTS",
    "IWAE",
    "LOSSES",
    "VIMCO",
    "Constant",
    "Cyclical",
    "LinearWarmup",
    "PyroLoss",
    "ReparamELBO",
    "SVILoss",
    "SVIObjective",
    "ScoreFunctionELBO",
    "as_loss",
    "make_schedule",
    "settled",
    # guides
    "AutoAmortizedNormal",
    # estimates
    "ElboTerms",
    "IWResult",
    "Imputation",
    "InferenceGap",
    "RefinedGuide",
    "elbo_terms",
    "gradient_variance",
    "impute",
    "inference_gap",
    "iw_log_likelihood",
    "log_weights",
    # reference posteriors
    "PosteriorSamples",
    "SampleComparison",
    "compare_samples",
    "energy_distance",
    "guide_samples",
    "nuts_posterior",
]
