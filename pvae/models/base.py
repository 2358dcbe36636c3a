"""What every built-in model shares: a private Pyro name, its recorded configuration, input
checks."""

from __future__ import annotations

import itertools

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pvae.config import RecordsConfig
from pvae.contract import inputs_trusted, to_placement
from pvae.distributions import ReparamNormal

__all__ = ["LatentVariableModel", "gaussian_guide", "marginal_scale"]

_instance_counter = itertools.count()


class LatentVariableModel(RecordsConfig, nn.Module):
    """Base class of the built-in models: a :class:`torch.nn.Module` with ``model`` and ``guide``.

    Parameters are registered with :func:`pyro.module` under a name unique to the instance
    (``"<ClassName>_<n>"``), so two models alive in one process never share parameters through
    Pyro's global param store, while Pyro's own ``SVI`` still finds them. Subclasses set
    ``x_dim`` and implement ``model(x, c=None)`` and ``guide(x, c=None)``.

    Every subclass records the arguments of its constructor (defaults filled in) as
    :attr:`config`, a JSON-serializable dict, and :meth:`from_config` rebuilds an identical
    architecture from it: run folders store ``config`` instead of re-listing architecture keys.
    """

    x_dim: int

    def __init__(self):
        super().__init__()
        self._pyro_name = f"{type(self).__name__}_{next(_instance_counter)}"

    def check_data(self, x: torch.Tensor | None, c=None) -> None:
        """Check a whole dataset once (a training loop then trusts its batches): ``x`` inside
        the likelihood's support (finite for models without a ``likelihood``); ``x=None``
        skips that (data binarized on the fly).

        :raises ValueError: what is wrong and how to fix it.
        """
        if x is None:
            return
        likelihood = getattr(self, "likelihood", None)
        if likelihood is not None:
            likelihood.check(x)
        elif not torch.isfinite(x).all():
            raise ValueError("x contains NaN or inf values; drop or impute them first")

    def _register(self) -> None:
        if not inputs_trusted():
            pyro.module(self._pyro_name, self)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _place(self, t):
        """A tensor argument of a convenience method (``encode``, ``decode``...) on the
        model's device, floating point in its dtype; anything else unchanged (and checked by
        the caller)."""
        return to_placement(t, self.device, self.dtype) if isinstance(t, torch.Tensor) else t

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        """Shape, dtype and device checks shared by every built-in model."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (batch, {self.x_dim}), "
                            f"got {type(x).__name__}")
        if x.dim() != 2 or x.shape[-1] != self.x_dim:
            raise ValueError(f"x must have shape (batch, {self.x_dim}) (images flattened), got "
                             f"{tuple(x.shape)}; a model built for x_dim={self.x_dim} cannot "
                             "take data of another width")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}; use x.float()")
        return x


def gaussian_guide(loc: torch.Tensor, scale: torch.Tensor):
    """The guide distribution of a :class:`pvae.nn.GaussianEncoder`'s output: a diagonal
    Gaussian ``Normal(loc, scale).to_event(1)`` for ``scale`` ``(..., d)``, or
    ``MultivariateNormal(loc, scale_tril=scale)`` for a Cholesky factor ``(..., d, d)``."""
    if scale.dim() == loc.dim() + 1:
        return dist.MultivariateNormal(loc, scale_tril=scale)
    return ReparamNormal(loc, scale).to_event(1)


def marginal_scale(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Marginal standard deviations ``(..., d)`` of a :class:`pvae.nn.GaussianEncoder`'s
    output: ``scale`` itself (diagonal) or the row norms of the Cholesky factor (full)."""
    return scale.square().sum(-1).sqrt() if scale.dim() == loc.dim() + 1 else scale
