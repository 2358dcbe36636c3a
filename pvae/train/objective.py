"""What the training loop asks of an objective, declared once (:class:`Objective`), and how
``fit`` gets one from a model and a loss (:func:`bind_objective`).

As in Pyro's ``SVI(model, guide, optim, loss)``, the caller builds the loss, with its settings,
and the loop never re-lists them: a loss is anything with ``bind(model) -> Objective`` (pvae's
SVI losses, :class:`pvae.inference.ReparamELBO`, :class:`~pvae.inference.IWAE`, ...; an
autoencoder's :class:`pvae.autoencoders.AutoencoderLoss`), or a Pyro ELBO, which is wrapped in
:class:`pvae.inference.PyroLoss`. A model that is not a Pyro program brings its default loss
(``model.default_loss()``: the deterministic autoencoders); a Pyro program's default is the
one-particle reparameterized ELBO.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from pvae.inference import ReparamELBO, as_loss

__all__ = ["HasDefaultLoss", "Loss", "Objective", "bind_objective"]


@runtime_checkable
class Objective(Protocol):
    """A training objective as the loop uses it: an ``nn.Module`` (``state_dict``,
    ``load_state_dict``, ``train``/``eval``, ``to``, ``parameters``) with

    - ``value_name``: the history's columns ``train_<name>``, ``val_<name>`` (``"elbo"``: nats
      per datapoint, higher is better; ``"loss"``: lower is better);
    - ``config``: its settings as a JSON-ready dict, recorded in checkpoints and compared on
      resume;
    - ``trusted``: set by the loop once the whole dataset is checked (per-call checks off);
    - ``objective(*batch) -> (value, loss)``: per datapoint, ``value`` detached, ``loss`` the
      surrogate to differentiate; ``num_data``, the datapoints the last call stood for (the
      epoch's mean weights each step by them);
    - ``set_step(step)`` before each optimizer step (schedules such as beta), ``metrics()`` the
      settings of the current step worth a history column, ``settled()`` whether the objective
      no longer changes with the step (beta warmed up; early stopping waits for it);
    - ``trainable_parameters(*batch)``: runs once on a probe batch (building lazy parts) and
      returns every tensor to optimize; ``needs_whole_batches(*batch)``: whether that probe
      must be a whole mini-batch (programs that draw their own subsample);
    - ``validation()``: the objective whose value is reported on validation data (evaluated in
      ``eval()`` mode, without gradient);
    - ``capture_blocker()``: why the step cannot be captured as a CUDA graph, or ``None``, and
      ``capturable_(like)``, called before capture;
    - ``data_parallel_()``: called when training runs data-parallel (statistics of the global
      batch).
    """

    value_name: str
    trusted: bool
    num_data: int

    @property
    def config(self) -> dict: ...

    def __call__(self, *batch) -> tuple[torch.Tensor, torch.Tensor]: ...

    def set_step(self, step: int) -> None: ...

    def metrics(self) -> dict: ...

    def settled(self) -> bool: ...

    def trainable_parameters(self, *batch) -> list[torch.Tensor]: ...

    def needs_whole_batches(self, *batch) -> bool: ...

    def validation(self) -> Objective: ...

    def capture_blocker(self) -> str | None: ...

    def capturable_(self, like: torch.Tensor) -> Objective: ...

    def data_parallel_(self) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict): ...

    def train(self, mode: bool = True): ...


@runtime_checkable
class Loss(Protocol):
    """A loss object: its settings, and the objective it makes of a model."""

    def bind(self, model) -> Objective: ...


@runtime_checkable
class HasDefaultLoss(Protocol):
    """A model that is not a Pyro program and brings its own loss (an autoencoder)."""

    def default_loss(self) -> Loss: ...


_CONTRACTS = ("fit trains a Pyro model (the model contract: model(*data) and guide(*data) methods; "
              "README 'Your own model') or a pvae autoencoder (README 'Deterministic "
              "autoencoders')")


def bind_objective(model, loss=None) -> Objective:
    """The objective that trains ``model`` with ``loss``: ``loss.bind(model)``; with ``loss``
    ``None`` the model's own default (:class:`HasDefaultLoss`) or, for a Pyro program, the
    one-particle :class:`~pvae.inference.ReparamELBO`; a Pyro ELBO or callable is wrapped in
    :class:`~pvae.inference.PyroLoss`.

    :raises TypeError: a model that meets neither contract (the message names both), a loss
        that is neither a loss object, a Pyro ELBO nor a callable, or a loss that does not fit
        the model (e.g. an SVI loss for an autoencoder).
    """
    if loss is None:
        if isinstance(model, HasDefaultLoss):
            loss = model.default_loss()
        elif callable(getattr(model, "model", None)) and callable(getattr(model, "guide", None)):
            loss = ReparamELBO()
        else:
            raise TypeError(f"{_CONTRACTS}; got {type(model).__name__}")
    if not isinstance(loss, Loss):
        loss = as_loss(loss)
    try:
        objective = loss.bind(model)
    except TypeError as e:
        raise TypeError(f"{e}. {_CONTRACTS}, each with its losses") from None
    if not isinstance(objective, Objective):
        raise TypeError(f"{type(loss).__name__}.bind returned a {type(objective).__name__}, "
                        "which lacks the Objective protocol (pvae.train.Objective)")
    return objective
