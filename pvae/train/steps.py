"""How one optimizer step runs: eagerly, or captured once as a CUDA graph and replayed.

A step takes a placed mini-batch (``TrainingData.shuffled``), transforms it (dynamic
binarization), evaluates the objective, differentiates the loss and steps the optimizer; it
returns the objective's value per datapoint as a device tensor and the number of datapoints it
stands for (the objective's ``num_data``: those of the data plate, not the batch's length). The loop calls
:meth:`check` at the end of every epoch; a captured step checks for a non-finite loss only
then and every ``check_every`` steps, through a flag kept on the device, so that no step waits
for the host.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pvae.train.data import TrainingData
from pvae.train.state import TrainState

__all__ = ["DIVERGED_LOSS", "STEPS", "CUDAGraph", "CapturedStep", "EagerStep",
           "TrainingDivergedError", "capture_blocker"]

log = logging.getLogger("pvae")

#: How ``fit`` runs its steps (its ``step`` argument).
STEPS = ("auto", "eager", "cuda_graph", "distributed")

#: The divergence rule: training stops when a step's loss per datapoint is NaN, infinite, or
#: larger in magnitude than this many nats. No model of data that a float32 tensor holds has an
#: honest loss near it (784 pixels under a Gaussian with scale 1e-6 cost ~1e4 nats), while a run
#: that blows up (a Gaussian VAE at lr 10 reached an ELBO of -1.6e24) passes it long before the
#: numbers overflow.
DIVERGED_LOSS = 1e10


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite, or exceeded :data:`DIVERGED_LOSS`."""


def _healthy(loss: torch.Tensor) -> torch.Tensor:
    """Whether a loss obeys the divergence rule (a device tensor: no host synchronization)."""
    return loss.abs() < DIVERGED_LOSS


def _diverged(state: TrainState, loss_text: str, global_step: int, steps_per_epoch: int):
    epoch, step = divmod(global_step, steps_per_epoch)
    history = state.history
    where = (f"{state.checkpoint} (end of epoch {history[-1]['epoch']})"
             if state.checkpoint is not None and len(history) else "none was written")
    lr = float(state.optimizer.param_groups[0]["lr"])
    return TrainingDivergedError(
        f"the loss became {loss_text} at epoch {epoch + 1}, step {step + 1}; last good "
        f"checkpoint: {where}. Lower the learning rate (lr={lr:g}) or check the data and the "
        "likelihood's scale")


class EagerStep:
    """The step run eagerly; a non-finite loss stops training before the optimizer steps."""

    def __init__(self, state: TrainState, data: TrainingData):
        self.state, self.data = state, data

    def __call__(self, batch: tuple, global_step: int) -> tuple[torch.Tensor, int]:
        state = self.state
        state.objective.set_step(global_step)
        value, loss = state.objective(*self.data.transform(batch))
        if not _healthy(loss):
            raise _diverged(state, str(loss.item()), global_step, self.data.steps_per_epoch)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.scheduler.step_batch()
        return value, state.objective.num_data

    def check(self) -> None:
        """Nothing is pending: every step was checked."""


class CUDAGraph:
    """``torch.cuda.CUDAGraph`` behind the two calls :class:`CapturedStep` makes."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn) -> None:
        """Record ``fn``'s kernels (nothing runs now)."""
        with torch.cuda.graph(self.graph):
            fn()

    def replay(self) -> None:
        self.graph.replay()


@dataclass
class _Captured:
    graph: object
    inputs: list  # static input buffers, one per batch tensor
    value: torch.Tensor  # static output: the objective's value per datapoint
    finite: torch.Tensor  # static output: whether the loss was finite
    num_data: int  # datapoints the captured batch stands for


class CapturedStep:
    """The whole step (binarization, the objective as a Pyro program, backward, Adam) captured
    once for the full batch shape and replayed for every batch of that shape; the first
    ``warmup`` steps and batches of another shape (the last, smaller one) run eagerly.

    Needs an objective without host synchronization (one whose ``capture_blocker()`` is
    ``None``, after ``capturable_(like)``; built-in models take their constants from their
    inputs), an optimizer built with
    ``capturable=True`` and a learning rate held in a tensor (schedules update it in place),
    and beta schedules on device tensors (``SVIObjective.capturable_``).

    A non-finite loss is recorded on the device (the first bad step) and raised as
    :class:`TrainingDivergedError` by :meth:`check`, every ``check_every`` steps and at the end
    of each epoch, naming that epoch and step; the optimizer has kept stepping meanwhile, so
    the model in memory is not usable, but the last checkpoint on disk is.

    :param bool fallback: if capturing fails (a model that synchronizes with the host), log
        why in one line and run the rest eagerly, instead of raising.
    :param graph_factory: makes the graph object (``capture(fn)``, ``replay()``);
        :class:`CUDAGraph` by default.
    """

    def __init__(self, state: TrainState, data: TrainingData, *, warmup: int = 3,
                 check_every: int = 100, fallback: bool = False, graph_factory=None):
        if warmup < 1:
            raise ValueError(f"Expected warmup >= 1 eager steps (they create the optimizer's "
                             f"state outside the graph), got {warmup!r}")
        self.state, self.data, self.fallback = state, data, fallback
        self.eager = EagerStep(state, data)
        self.warmup, self.check_every = warmup, check_every
        self.graph_factory = CUDAGraph if graph_factory is None else graph_factory
        self.failed = False  # capture failed: eager from then on
        self.captured: _Captured | None = None
        self.shape = None
        self.first_bad = None  # device tensor: global step of the first non-finite loss, or -1
        self.since_check = 0

    def _side_stream(self):
        device = self.data.device
        if device.type != "cuda":
            return None
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        return stream

    def _eager(self, batch, global_step):
        try:
            return self._eager_on_side_stream(batch, global_step)
        except TrainingDivergedError:
            self.check()  # an earlier replayed step may have diverged first: name that one
            raise

    def _eager_on_side_stream(self, batch, global_step):
        stream = self._side_stream()
        if stream is None:
            return self.eager(batch, global_step)
        with torch.cuda.stream(stream):
            value = self.eager(batch, global_step)
        torch.cuda.current_stream(self.data.device).wait_stream(stream)
        return value

    def _capture(self, batch) -> _Captured:
        state = self.state
        inputs = [b.clone() for b in batch]
        value = torch.zeros((), device=self.data.device, dtype=self.data.dtype)
        finite = torch.ones((), device=self.data.device, dtype=torch.bool)

        def step():
            v, loss = state.objective(*self.data.transform(tuple(inputs)))
            loss.backward()
            state.optimizer.step()
            value.copy_(v)
            finite.copy_(_healthy(loss))

        state.optimizer.zero_grad(set_to_none=True)  # backward allocates grads in the graph
        graph = self.graph_factory()
        graph.capture(step)
        return _Captured(graph, inputs, value, finite, state.objective.num_data)

    def __call__(self, batch: tuple, global_step: int) -> tuple[torch.Tensor, int]:
        shape = tuple(b.shape for b in batch)
        if self.shape is None:
            self.shape = shape  # the full batch shape: the one captured
        if shape != self.shape or self.failed:  # the last, smaller batch
            return self._eager(batch, global_step)
        if self.warmup > 0:
            self.warmup -= 1
            return self._eager(batch, global_step)
        self.state.objective.set_step(global_step)  # in place on device tensors
        if self.captured is None:
            try:
                self.captured = self._capture(batch)
            except RuntimeError as e:
                if not self.fallback:
                    raise
                log.warning("pvae: training eagerly, the step could not be captured as a CUDA "
                            "graph (%s)", str(e).splitlines()[0])
                self.failed = True
                return self._eager(batch, global_step)
            self.first_bad = torch.full((), -1, device=self.data.device, dtype=torch.long)
        for buffer, b in zip(self.captured.inputs, batch):
            buffer.copy_(b)
        self.captured.graph.replay()
        self.state.scheduler.step_batch()  # a learning rate on the device, updated in place
        bad_here = torch.full_like(self.first_bad, global_step)
        self.first_bad = torch.where((self.first_bad < 0) & ~self.captured.finite, bad_here,
                                     self.first_bad)
        self.since_check += 1
        if self.since_check >= self.check_every:
            self.check()
        return self.captured.value.clone(), self.captured.num_data

    def check(self) -> None:
        """Raise :class:`TrainingDivergedError` if a replayed step had a non-finite loss."""
        self.since_check = 0
        if self.first_bad is None:
            return
        bad = int(self.first_bad.item())
        if bad >= 0:
            raise _diverged(self.state, f"NaN, inf or over {DIVERGED_LOSS:g} nats", bad,
                            self.data.steps_per_epoch)


def capture_blocker(device: torch.device, objective) -> str | None:
    """Why the training step cannot be captured here, or ``None`` if it can: the device, then
    the objective's own answer (its ``capture_blocker()``)."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, the model is on {device.type}"
    return objective.capture_blocker()
