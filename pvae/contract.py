"""The model contract (README, "Your own model") in code: the checks and conventions that models,
inference and the training engine share, in one place.

- :func:`check_model`: an object with ``model`` and ``guide`` Pyro programs.
- :func:`trusted_inputs` / :func:`inputs_trusted`: a training loop that has checked the whole
  dataset once tells built-in models to skip their per-call checks.
- :func:`resolve_device`, :func:`placement`, :func:`to_placement`: where a model and its data
  live, the same rule for training and evaluation.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn

__all__ = ["DataArgs", "check_model", "fixed_parameters", "inputs_trusted", "place_args",
           "place_data", "prepare_data", "program_args", "placement", "resolve_device",
           "to_placement", "trusted_inputs"]

_TRUSTED = contextvars.ContextVar("pvae_trusted_inputs", default=False)


def check_model(model, who: str) -> None:
    """Raise a :class:`TypeError` naming ``who`` unless ``model`` has ``model`` and ``guide``
    methods (the model contract)."""
    if not (callable(getattr(model, "model", None)) and callable(getattr(model, "guide", None))):
        raise TypeError(f"{who} needs an object with model(x, c=None) and guide(x, c=None) "
                        f"methods (the model contract), got {type(model).__name__}")


@contextlib.contextmanager
def trusted_inputs():
    """Within this context built-in models skip their per-call data checks and ``pyro.module``
    registration: a training loop enters it after it has checked the whole dataset once and
    collected the parameters, so that the steps do not pay for them."""
    token = _TRUSTED.set(True)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def inputs_trusted() -> bool:
    """True inside :func:`trusted_inputs` or while ``torch.jit`` traces."""
    return _TRUSTED.get() or torch.jit.is_tracing()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else -> ``torch.device(device)``.

    :raises ValueError: CUDA was asked for but this torch build or machine has none.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available; install a "
                         "CUDA build of torch (see the README) or use device='cpu'")
    return device


def _first_tensor(model):
    if isinstance(model, nn.Module):
        for t in (*model.parameters(), *model.buffers()):
            if t.is_floating_point():
                return t
    return None


def placement(model, device="auto", like: torch.Tensor | None = None
              ) -> tuple[torch.device, torch.dtype]:
    """Where a model runs and in which floating-point dtype its data must be.

    ``device="auto"`` means where the model's tensors are (its first floating-point parameter
    or buffer; for a model without any, the device of ``like``, the data); any other value is
    resolved by :func:`resolve_device`. The dtype is the model's (``model.double()`` works in
    float64), else that of ``like``, else torch's default.
    """
    first = _first_tensor(model)
    if device == "auto":
        device = first.device if first is not None else (
            like.device if isinstance(like, torch.Tensor) else torch.device("cpu"))
    else:
        device = resolve_device(device)
    if first is not None:
        dtype = first.dtype
    elif isinstance(like, torch.Tensor) and like.is_floating_point():
        dtype = like.dtype
    else:
        dtype = torch.get_default_dtype()
    return device, dtype


def to_placement(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``t`` on ``device``; floating-point tensors also in ``dtype`` (labels stay integers)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


class DataArgs:
    """Several per-datapoint tensors that follow ``x`` among a program's arguments (``c`` given
    as a tuple: ``model(x, t, y)``), sliced and indexed together like one tensor, so that
    batching, sharding and evaluation passes treat them as they treat a single ``c``.

    :param tensors: tensors of equal length.
    """

    def __init__(self, tensors):
        self.tensors = tuple(tensors)

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index) -> DataArgs:
        return DataArgs(t[index] for t in self.tensors)

    def __repr__(self) -> str:
        return f"DataArgs({', '.join(str(tuple(t.shape)) for t in self.tensors)})"


def place_data(x: torch.Tensor, c, device: torch.device, dtype: torch.dtype):
    """``(x, c)`` placed with :func:`to_placement`, ``c`` (optional) checked to be a tensor,
    or a tuple or list of tensors (returned as :class:`DataArgs`), with one row per row of
    ``x``.

    :raises TypeError: ``c`` is not a tensor or a sequence of tensors.
    :raises ValueError: ``c`` (one of its tensors) and ``x`` differ in length.
    """
    x = to_placement(x, device, dtype)
    if c is None:
        return x, None
    if isinstance(c, DataArgs):
        c = c.tensors
    if isinstance(c, (tuple, list)):
        if not c:
            raise ValueError("c is an empty sequence; pass c=None for programs of x alone")
        return x, DataArgs(place_data(x, t, device, dtype)[1] for t in c)
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"c must be a tensor or a tuple of tensors, got {type(c).__name__}")
    if len(c) != len(x):
        raise ValueError(f"c has {len(c)} rows but x has {len(x)}; they must match")
    return x, to_placement(c, device, dtype)


@contextlib.contextmanager
def fixed_parameters(model):
    """The model's ``nn.Module`` parameters as constants (``requires_grad`` off, eval mode:
    no dropout, batch-norm statistics fixed), restored on exit."""
    if not isinstance(model, nn.Module):
        yield
        return
    frozen = [p for p in model.parameters() if p.requires_grad]
    training = [m for m in model.modules() if m.training]
    for p in frozen:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for m in training:
            m.train(True)


def place_args(item, device: torch.device, dtype: torch.dtype) -> tuple:
    """A ``DataLoader``'s item as the programs' positional arguments, placed: a tuple or list
    is the arguments (a lone tensor one argument); tensors go to ``device`` (floating ones in
    ``dtype``, as :func:`to_placement`), ``PackedSequence`` and other objects with ``.to`` to
    ``device`` (floating data in ``dtype``), tuples, lists and dicts of them element by
    element; anything else as it is.
    """
    args = tuple(item) if isinstance(item, (tuple, list)) and not hasattr(item, "_fields") \
        else (item,)
    return tuple(_placed(a, device, dtype) for a in args)


def _placed(value, device: torch.device, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return to_placement(value, device, dtype)
    if isinstance(value, nn.utils.rnn.PackedSequence):
        data = value.data
        return value.to(device=device, dtype=dtype if data.is_floating_point() else data.dtype)
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_placed(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _placed(v, device, dtype) for k, v in value.items()}
    if callable(getattr(value, "to", None)):
        return value.to(device)
    return value


def program_args(x: torch.Tensor, c=None) -> tuple:
    """The positional arguments of a model's programs: ``(x,)``, ``(x, c)``, or ``(x, *c)``
    for several tensors (:class:`DataArgs`)."""
    if c is None:
        return (x,)
    return (x, *c.tensors) if isinstance(c, DataArgs) else (x, c)


def prepare_data(model, x, c=None, device="auto", who: str = "evaluation",
                 eval_mode: bool = True):
    """Check a model and the datapoints an evaluation runs on, put the model in eval mode
    (unless ``eval_mode`` is false: the caller restores the mode itself) and return ``(x, c)``
    placed where the model is (see :func:`placement`).

    :raises TypeError: ``model`` does not meet the contract, or ``x`` is not a tensor.
    :raises ValueError: ``x`` is empty, not finite, or not ``(N, x_dim)`` for a model that has
        an ``x_dim``; ``c`` of another length.
    """
    check_model(model, who)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have shape (N, ...) with N >= 1, got {tuple(x.shape)}")
    x_dim = getattr(model, "x_dim", None)
    if x_dim is not None and (x.dim() != 2 or x.shape[-1] != x_dim):
        raise ValueError(f"x must have shape (N, {x_dim}) for this model, got {tuple(x.shape)}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf values (it must be finite); drop or impute them "
                         "first")
    if eval_mode and isinstance(model, nn.Module):
        model.eval()
    return place_data(x, c, *placement(model, device, x))
