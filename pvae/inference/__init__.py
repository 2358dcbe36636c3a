"""Training and evaluation for any model meeting the model contract of ``DESIGN.md``."""

from pvae.inference.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pvae.inference.estimators import (
    ESTIMATORS,
    Constant,
    Cyclical,
    LinearWarmup,
    gradient_variance,
    make_estimator,
    make_schedule,
    scale_latents,
    score_function,
)
from pvae.inference.evaluate import (
    ElboTerms,
    IWResult,
    elbo_terms,
    iw_log_likelihood,
    log_weights,
)
from pvae.inference.impute import Imputation, impute
from pvae.inference.posterior import (
    PosteriorComparison,
    compare_posteriors,
    principal_angles,
    to_inference_data,
)
from pvae.inference.svi import History, TrainingDivergedError, fit, resolve_device

__all__ = [
    "ESTIMATORS",
    "CheckpointError",
    "ElboTerms",
    "History",
    "Imputation",
    "impute",
    "IWResult",
    "PosteriorComparison",
    "TrainingDivergedError",
    "compare_posteriors",
    "principal_angles",
    "to_inference_data",
    "elbo_terms",
    "gradient_variance",
    "fit",
    "iw_log_likelihood",
    "load_checkpoint",
    "log_weights",
    "make_estimator",
    "make_schedule",
    "scale_latents",
    "score_function",
    "Constant",
    "Cyclical",
    "LinearWarmup",
    "resolve_device",
    "save_checkpoint",
]
