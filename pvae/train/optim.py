"""The optimizer of the training engine, as settings objects that ``fit`` builds for the
parameters it finds (``fit(model, x, optim=AdamW(1e-3, schedule=CosineLR(warmup_steps=500),
clip_norm=10.0))``, as Pyro's ``SVI(..., optim=pyro.optim.Adam({"lr": 1e-2}))``), and the
learning-rate schedules, each torch's own scheduler (``torch.optim.lr_scheduler``) stepped after
every optimizer step or every epoch.

A schedule and the optimizer's state are part of the checkpoint, so a stopped and resumed run
equals the uninterrupted one. Under a step captured as a CUDA graph the learning rate is a
device tensor that the scheduler updates in place between replays (and gradient clipping runs
inside the graph: an optimizer pre-step hook).
"""

from __future__ import annotations

import functools

import torch

from pvae.config import RecordsConfig
from pvae.validation import check_count, check_float

__all__ = ["SCHEDULES", "Adam", "AdamW", "ConstantLR", "CosineLR", "ExponentialLR",
           "ReduceLROnPlateau", "Scheduler", "StepLR", "make_adam", "make_optimizer"]


class LRSchedule(RecordsConfig):
    """Base of the schedules: ``interval`` says when the scheduler steps (``"step"``: after
    every optimizer step; ``"epoch"``: after every epoch, with the epoch's history row)."""

    interval = "epoch"

    @property
    def config(self) -> dict:
        return {"name": type(self).__name__, **super().config}

    def build(self, optimizer, steps_per_epoch: int, num_epochs: int):
        """torch's scheduler for ``optimizer``."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in super().config.items())})"


class ConstantLR(LRSchedule):
    """The learning rate stays as it is."""

    def __init__(self):
        pass  # (recorded as an empty config)

    def build(self, optimizer, steps_per_epoch, num_epochs):
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=1.0)


class ExponentialLR(LRSchedule):
    """Multiply the learning rate by ``gamma`` after every epoch.

    :param float gamma: in (0, 1]; 1 keeps the learning rate constant.
    """

    def __init__(self, gamma: float):
        self.gamma = check_float("gamma", gamma, minimum=0.0, maximum=1.0, strict=True)

    def build(self, optimizer, steps_per_epoch, num_epochs):
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=self.gamma)


class StepLR(LRSchedule):
    """Multiply the learning rate by ``gamma`` every ``step_size`` epochs.

    :param int step_size: epochs between decays, >= 1.
    :param float gamma: in (0, 1].
    """

    def __init__(self, step_size: int, gamma: float = 0.1):
        self.step_size = check_count("step_size", step_size)
        self.gamma = check_float("gamma", gamma, minimum=0.0, maximum=1.0, strict=True)

    def build(self, optimizer, steps_per_epoch, num_epochs):
        return torch.optim.lr_scheduler.StepLR(optimizer, self.step_size, self.gamma)


class CosineLR(LRSchedule):
    """A linear warm-up from ``warmup_start`` x lr to lr over ``warmup_steps`` optimizer steps,
    then a cosine decay to ``min_lr`` at the last step of ``num_epochs`` (Loshchilov & Hutter
    2017, SGDR, without restarts), stepped after every optimizer step: torch's ``LinearLR`` then
    ``CosineAnnealingLR`` in a ``SequentialLR``. The cosine's length is set when the run starts:
    a resumed run keeps the one its checkpoint holds, also with more epochs.

    :param int warmup_steps: steps of the warm-up (0: none).
    :param float min_lr: the learning rate at the end.
    :param float warmup_start: the warm-up's first factor, in (0, 1].
    """

    interval = "step"

    def __init__(self, warmup_steps: int = 0, min_lr: float = 0.0, warmup_start: float = 0.01):
        self.warmup_steps = check_count("warmup_steps", warmup_steps, 0)
        self.min_lr = check_float("min_lr", min_lr, minimum=0.0)
        self.warmup_start = check_float("warmup_start", warmup_start, minimum=0.0, maximum=1.0,
                                        strict=True)

    def build(self, optimizer, steps_per_epoch, num_epochs):
        total = max(steps_per_epoch * num_epochs, 1)
        warmup = min(self.warmup_steps, total - 1)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(total - warmup, 1), eta_min=self.min_lr)
        if warmup == 0:
            return cosine
        linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=self.warmup_start,
                                                   total_iters=warmup)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], [warmup])


class ReduceLROnPlateau(LRSchedule):
    """Multiply the learning rate by ``factor`` when the monitored value (the validation ELBO,
    or loss for an autoencoder; the training value without validation data) has not improved
    by more than ``min_delta`` for ``patience`` epochs (torch's ``ReduceLROnPlateau``).

    :param float factor: in (0, 1).
    :param int patience: epochs without improvement before a reduction.
    :param float min_delta: the smallest improvement that counts (nats, or loss units).
    :param float min_lr: the learning rate is not reduced below this.
    """

    def __init__(self, factor: float = 0.5, patience: int = 2, min_delta: float = 0.0,
                 min_lr: float = 0.0):
        self.factor = check_float("factor", factor, minimum=0.0, maximum=1.0, strict=True)
        if self.factor >= 1.0:
            raise ValueError(f"factor must lie in (0, 1), got {factor!r}")
        self.patience = check_count("patience", patience, 0)
        self.min_delta = check_float("min_delta", min_delta, minimum=0.0)
        self.min_lr = check_float("min_lr", min_lr, minimum=0.0)

    def build(self, optimizer, steps_per_epoch, num_epochs):
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=self.factor, patience=self.patience,
            threshold=self.min_delta, threshold_mode="abs", min_lr=self.min_lr)


#: Schedules by name (``pvae train --lr-schedule NAME``).
SCHEDULES = {"constant": ConstantLR, "exponential": ExponentialLR, "step": StepLR,
             "cosine": CosineLR, "plateau": ReduceLROnPlateau}


class Scheduler:
    """torch's scheduler as the loop steps it: :meth:`step_batch` after every optimizer step,
    :meth:`step_epoch` after every epoch with the monitored value (higher is better);
    ``state_dict`` / ``load_state_dict`` for checkpoints."""

    def __init__(self, scheduler, interval: str):
        self.scheduler, self.interval = scheduler, interval

    def step_batch(self) -> None:
        if self.interval == "step":
            self.scheduler.step()

    def step_epoch(self, monitored: float) -> None:
        if self.interval != "epoch":
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(monitored)
        else:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


class Adam(RecordsConfig):
    """Adam (Kingma & Ba 2015), ``torch.optim.Adam``, fused where torch has a kernel for the
    parameters' devices and dtypes (:func:`make_optimizer`), with a learning-rate schedule and
    optional gradient clipping.

    :param float lr: the (initial) learning rate, > 0.
    :param schedule: ``None`` (constant) or a schedule (:data:`SCHEDULES`: ``ExponentialLR``,
        ``StepLR``, ``CosineLR`` with warm-up, ``ReduceLROnPlateau``).
    :param clip_norm: ``None`` or the largest global gradient norm (``clip_grad_norm_``
        before every step).
    :param float weight_decay: L2 penalty (Adam) or decoupled weight decay (:class:`AdamW`).
    :raises ValueError: a learning rate, norm or decay that is not a positive finite number.
    :raises TypeError: a schedule that is not a schedule object.
    """

    torch_class = torch.optim.Adam

    def __init__(self, lr: float = 1e-3, schedule=None, clip_norm: float | None = None,
                 weight_decay: float = 0.0):
        self.lr = check_float("lr", lr, minimum=0.0, strict=True)
        if schedule is not None and not isinstance(schedule, LRSchedule):
            raise TypeError(f"schedule must be one of pvae.train's schedules "
                            f"({', '.join(c.__name__ for c in SCHEDULES.values())}), got "
                            f"{type(schedule).__name__}")
        self.schedule = schedule
        self.clip_norm = None if clip_norm is None else check_float(
            "clip_norm", clip_norm, minimum=0.0, strict=True)
        self.weight_decay = check_float("weight_decay", weight_decay, minimum=0.0)

    @property
    def config(self) -> dict:
        """``{"name": "Adam", "lr": ..., "schedule": {...} or None, ...}`` for checkpoints."""
        schedule = None if self.schedule is None else self.schedule.config
        return {"name": type(self).__name__, "lr": self.lr, "schedule": schedule,
                "clip_norm": self.clip_norm, "weight_decay": self.weight_decay}

    def build(self, params, capturable: bool = False, steps_per_epoch: int = 1,
              num_epochs: int = 1) -> tuple[torch.optim.Optimizer, Scheduler]:
        """``(optimizer, scheduler)`` for ``params``; the scheduler always exists (constant
        without a schedule), so that every run saves and restores one.

        :param bool capturable: for a step captured as a CUDA graph (see :func:`make_optimizer`).
        """
        params = list(params)
        optimizer = make_optimizer(self.torch_class, params, self.lr, capturable,
                                   weight_decay=self.weight_decay)
        if self.clip_norm is not None:
            clip = self.clip_norm

            def clip_gradients(opt, args, kwargs):
                torch.nn.utils.clip_grad_norm_(params, clip)

            optimizer.register_step_pre_hook(clip_gradients)
        schedule = self.schedule if self.schedule is not None else ConstantLR()
        return optimizer, Scheduler(schedule.build(optimizer, steps_per_epoch, num_epochs),
                                    schedule.interval)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in super().config.items())})"


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay,
    ``torch.optim.AdamW``. Takes :class:`Adam`'s arguments; ``weight_decay`` defaults to
    0.01."""

    torch_class = torch.optim.AdamW

    def __init__(self, lr: float = 1e-3, schedule=None, clip_norm: float | None = None,
                 weight_decay: float = 0.01):
        super().__init__(lr, schedule, clip_norm, weight_decay)


def make_optimizer(cls, params, lr: float, capturable: bool = False, **options):
    """``cls`` (``torch.optim.Adam`` or ``AdamW``) with its fused kernel (the whole update of a
    parameter in one kernel: on CPU about 7x faster than the default per-op loop, ~1.5 ms of a
    ~15 ms step of the default VAE) where this torch build has one for the parameters' devices
    and dtypes (CPU from torch 2.4, CUDA), else the default implementation. Same algorithm and
    hyperparameters either way. Whether the kernel exists is asked of torch through its public
    API: one fused step on a one-element tensor of each device and dtype.

    :param bool capturable: for a step captured as a CUDA graph: the step counts stay on the
        device and the learning rate is a device tensor, which ``torch.optim.lr_scheduler``
        updates in place.
    """
    params = list(params)
    options = {"lr": lr, **options}
    if capturable:
        options.update(capturable=True, lr=torch.tensor(lr, device=params[0].device))
    fused = all(_has_fused(cls, device, dtype) for device, dtype in {(p.device, p.dtype)
                                                                     for p in params})
    return cls(params, **options, fused=fused or None)


def make_adam(params, lr: float, capturable: bool = False) -> torch.optim.Adam:
    """``torch.optim.Adam`` through :func:`make_optimizer`."""
    return make_optimizer(torch.optim.Adam, params, lr, capturable)


@functools.cache
def _has_fused(cls, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``cls(fused=True)`` can step a tensor of this device and dtype (torch checks at
    the first step, not at construction)."""
    probe = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
    probe.grad = torch.zeros_like(probe)
    try:
        cls([probe], fused=True).step()
    except RuntimeError:
        return False
    return True
