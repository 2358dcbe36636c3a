"""What every built-in model shares: a private Pyro name and input checks."""

from __future__ import annotations

import contextlib
import contextvars
import itertools

import pyro
import torch
from torch import nn

__all__ = ["LatentVariableModel", "checked_inputs"]

_instance_counter = itertools.count()
_CHECKED = contextvars.ContextVar("pvae_checked_inputs", default=False)


@contextlib.contextmanager
def checked_inputs():
    """Within this context built-in models skip their per-call data checks and
    ``pyro.module`` registration: :func:`pvae.inference.fit` enters it after it has checked the
    whole dataset once and collected the parameters, so that the training loop does not pay
    for them on every step."""
    token = _CHECKED.set(True)
    try:
        yield
    finally:
        _CHECKED.reset(token)


class LatentVariableModel(nn.Module):
    """Base class of the built-in models: a :class:`torch.nn.Module` with ``model`` and ``guide``.

    Parameters are registered with :func:`pyro.module` under a name unique to the instance
    (``"<ClassName>_<n>"``), so two models alive in one process never share parameters through
    Pyro's global param store, while Pyro's own ``SVI`` still finds them. Subclasses set
    ``x_dim`` and implement ``model(x, c=None)`` and ``guide(x, c=None)``.
    """

    x_dim: int

    def __init__(self):
        super().__init__()
        self._pyro_name = f"{type(self).__name__}_{next(_instance_counter)}"

    def _register(self) -> None:
        if not _CHECKED.get():
            pyro.module(self._pyro_name, self)

    def _inputs_trusted(self) -> bool:
        return _CHECKED.get() or bool(torch._C._get_tracing_state())

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

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
