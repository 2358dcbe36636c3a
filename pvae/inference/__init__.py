"""Inference for any model meeting the model contract (README, "Your own model"): shared trace code,
objectives (ELBO, score function, IWAE) with beta schedules, evaluation (IW log-likelihood,
ELBO terms), the inference gap, NUTS reference posteriors, posterior comparison, imputation,
latent-space interpolation and traversals, and diagnostics.

The training engine is :mod:`pvae.train`; :func:`fit` and the names that moved there with it
(``History``, checkpoints, ``resolve_device``) are also reachable from here, resolved when first
used so that this layer never imports the one above it.
"""

import importlib

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
from pvae.inference.latent import INTERPOLATIONS, interpolate, latent_path, traverse
from pvae.inference.mcmc import (
    PosteriorSamples,
    SampleComparison,
    compare_samples,
    energy_distance,
    guide_samples,
    nuts_posterior,
)
from pvae.inference.objectives import (
    CAPTURABLE,
    ESTIMATORS,
    GRADIENTS,
    IWAEEstimator,
    LossEstimator,
    ReparamEstimator,
    ScoreEstimator,
    SVIObjective,
    make_estimator,
)
from pvae.inference.posterior import (
    PosteriorComparison,
    compare_posteriors,
    principal_angles,
    to_inference_data,
)
from pvae.inference.schedules import Constant, Cyclical, LinearWarmup, make_schedule

#: Names defined in :mod:`pvae.train`, kept reachable as ``pvae.inference.<name>``.
_FROM_TRAIN = ("CheckpointError", "History", "TrainingDivergedError", "fit", "load_checkpoint",
               "resolve_device", "save_checkpoint")


def __getattr__(name):
    if name in _FROM_TRAIN:
        return getattr(importlib.import_module("pvae.train"), name)
    raise AttributeError(f"module 'pvae.inference' has no attribute {name!r}")


__all__ = [
    "BASELINES",
    "AutoAmortizedNormal",
    "CAPTURABLE",
    "ESTIMATORS",
    "GRADIENTS",
    "INTERPOLATIONS",
    "CheckpointError",
    "Constant",
    "Cyclical",
    "ElboTerms",
    "History",
    "IWAEEstimator",
    "IWResult",
    "Imputation",
    "InferenceGap",
    "LinearWarmup",
    "LossEstimator",
    "PosteriorComparison",
    "PosteriorSamples",
    "RefinedGuide",
    "ReparamEstimator",
    "SVIObjective",
    "SampleComparison",
    "ScoreEstimator",
    "TrainingDivergedError",
    "compare_posteriors",
    "compare_samples",
    "elbo_terms",
    "energy_distance",
    "fit",
    "gradient_variance",
    "guide_samples",
    "impute",
    "interpolate",
    "inference_gap",
    "iw_log_likelihood",
    "latent_path",
    "load_checkpoint",
    "log_weights",
    "make_estimator",
    "make_schedule",
    "nuts_posterior",
    "observed_scale",
    "principal_angles",
    "resolve_device",
    "save_checkpoint",
    "scale_latents",
    "score_function",
    "to_inference_data",
    "traverse",
]
