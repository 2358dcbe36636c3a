"""ELBO gradient estimators by name: the objects that ``fit`` differentiates."""

from __future__ import annotations

from collections.abc import Callable

from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

__all__ = ["ESTIMATORS", "make_elbo"]


def _reparam(num_particles: int = 1, analytic_kl: bool = False) -> ELBO:
    """``Trace_ELBO`` (``TraceMeanField_ELBO`` with ``analytic_kl``): the L-sample ELBO
    (Bishop & Bishop, Deep Learning, eq. 19.16) with reparameterized gradients where the
    guide's distributions have ``rsample``; particles are vectorized."""
    cls = TraceMeanField_ELBO if analytic_kl else Trace_ELBO
    return cls(num_particles=num_particles, vectorize_particles=num_particles > 1)


#: Registry of gradient estimators (``--estimator`` on the command line).
ESTIMATORS: dict[str, Callable[..., ELBO]] = {"reparam": _reparam}


def make_elbo(estimator: str = "reparam", *, num_particles: int = 1, analytic_kl: bool = False
              ) -> ELBO:
    """Build the Pyro ELBO object for ``estimator``.

    :param str estimator: a key of :data:`ESTIMATORS`.
    :param int num_particles: Monte Carlo samples per datapoint and step (>= 1).
    :param bool analytic_kl: use the closed-form KL(q || p) where Pyro knows it.
    :raises ValueError: unknown estimator or ``num_particles < 1``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {sorted(ESTIMATORS)}")
    if not (isinstance(num_particles, int) and num_particles >= 1):
        raise ValueError(f"Expected num_particles >= 1, got {num_particles!r}")
    return ESTIMATORS[estimator](num_particles=num_particles, analytic_kl=analytic_kl)
