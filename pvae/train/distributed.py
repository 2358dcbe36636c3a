r"""Data-parallel training with ``torch.nn.parallel.DistributedDataParallel`` (DDP) over the
``torch.distributed`` process group that ``torchrun`` sets up (NCCL on GPUs, gloo on CPUs).

How a step runs on ``W`` processes (:class:`DistributedStep`):

- Every rank draws the same shuffled global mini-batch ``B`` of ``b`` datapoints (one shuffling
  generator seeded alike everywhere, advanced every epoch: ``DistributedSampler`` with
  ``set_epoch`` in effect) and keeps its contiguous slice ``B_r``
  (:class:`~pvae.train.data.TrainingData` with ``rank`` and ``world_size``): the ranks' slices
  together are exactly the batch one process would draw.
- Each rank runs the objective on its slice with its own sampling noise (torch's RNGs seeded
  with ``seed + rank`` after the identical initialization), through :class:`Replica`, the model
  and its objective in one ``nn.Module`` whose ``forward`` returns the loss, so that DDP's
  hooks average the gradients during ``backward``.
- **Loss scaling.** The objective returns the surrogate per datapoint of the slice,
  :math:`\ell_r = \frac{1}{|B_r|}\sum_{n \in B_r} f_n`, where :math:`f_n` is datapoint
  ``n``'s term (under the model contract the data plate has the mini-batch's size, so no
  subsampling scale enters it). The step differentiates :math:`L_r = \ell_r \, W |B_r| / b`,
  i.e. the slice's sum divided by the global batch size ``b`` (as if the plate had the global
  batch's size), times ``W``; DDP averages over ranks, so every rank applies

  .. math:: \frac{1}{W} \sum_r \nabla L_r = \frac{1}{b} \sum_{n \in B} \nabla f_n,

  the gradient of the global mini-batch ELBO per datapoint, also when the slices differ in size
  (the last batch of an epoch). Adam then takes the same step everywhere, so the replicas stay
  identical.
- The training ELBO of an epoch and the validation ELBO (each rank evaluates its share) are
  sums all-reduced over ranks; the divergence rule is checked on the all-reduced loss, so that
  every rank stops together.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pvae import parallel
from pvae.train.data import TrainingData
from pvae.train.state import TrainState
from pvae.train.steps import EagerStep, _diverged, _healthy

__all__ = ["DistributedStep", "Replica", "check_batches", "check_module_parameters", "model_modules",
           "use_distributed", "wrap"]


def model_modules(model) -> nn.Module | None:
    """The model as an ``nn.Module``: itself, or for a plain object the modules among
    its attributes (networks it registers with ``pyro.module``) collected in a
    ``ModuleDict``; ``None`` when it holds none."""
    if isinstance(model, nn.Module):
        return model
    found = {k: v for k, v in vars(model).items() if isinstance(v, nn.Module)}
    return nn.ModuleDict(found) if found else None


class Replica(nn.Module):
    """The model and its objective as one module, what DDP wraps: the objective
    (:class:`~pvae.inference.SVIObjective`) keeps the model outside its ``state_dict``, so
    here the model (:func:`model_modules`) is a registered submodule beside it and DDP sees
    every parameter of both. ``forward(*batch)`` returns the objective's ``(value, loss)`` per
    datapoint."""

    def __init__(self, model, objective: nn.Module):
        super().__init__()
        modules = model_modules(model)
        if modules is not None:
            self.model = modules
        self.objective = objective

    def forward(self, *batch):
        return self.objective(*batch)


def check_module_parameters(model, objective, params: list[torch.Tensor]) -> None:
    """Refuse trainable tensors that are not ``nn.Module`` parameters of the model (or of the
    networks a plain model object holds) or of the objective (``pyro.param`` values of a user
    model): DDP averages the gradients of module
    parameters only, so such tensors would drift apart between processes.

    :raises ValueError: naming the parameters and the fix.
    """
    own = {id(p) for p in objective.parameters()}
    modules = model_modules(model)
    if modules is not None:
        own |= {id(p) for p in modules.parameters()}
    foreign = [p for p in params if id(p) not in own]
    if foreign:
        names = [f"{len(foreign)} tensor(s)"]
        if callable(getattr(objective, "param_store_names", None)):
            names = objective.param_store_names() or names
        raise ValueError(
            f"distributed training needs every trainable tensor to be a parameter of an "
            f"nn.Module (DistributedDataParallel averages their gradients), but the model's "
            f"programs train Pyro param-store parameters {names}; make them parameters of the "
            "model (a torch.nn.Module or pyro.nn.PyroModule holding them, e.g. "
            "self.loc = nn.Parameter(...)) or train in one process")


def check_batches(data: TrainingData) -> None:
    """Every global mini-batch must give each process at least one datapoint (an empty slice
    would leave that process without a backward pass, on which DDP waits).

    :raises ValueError: the batch size, or the last batch of an epoch, is smaller than the
        number of processes; the message says what to change.
    """
    n, size, world = len(data), data.batch_size, data.world_size
    last = n % size or size
    if min(size, last) < world:
        raise ValueError(
            f"with {world} processes every mini-batch needs at least {world} datapoints (one "
            f"slice per process), but batch_size={size} over {n} datapoints leaves a last batch "
            f"of {last}; choose batch_size (or the number of training datapoints) so that both "
            "are at least the number of processes")


def wrap(model, objective: nn.Module, params: list[torch.Tensor],
         device: torch.device) -> DistributedDataParallel:
    """:class:`Replica` wrapped in DDP. DDP broadcasts rank 0's parameters and buffers when it
    is built, so every rank starts from the same initialization. The objective is told
    (``data_parallel_()``) to keep its statistics (the score-function ELBO's average baseline)
    over the global batch.

    :raises ValueError: see :func:`check_module_parameters`.
    """
    check_module_parameters(model, objective, params)
    objective.data_parallel_()
    replica = Replica(model, objective)
    return DistributedDataParallel(replica, device_ids=[device] if device.type == "cuda" else None)


class DistributedStep(EagerStep):
    """One data-parallel step: this rank's slice through the DDP-wrapped :class:`Replica`, the
    loss scaled as the module docstring derives, ``backward`` (DDP all-reduces the gradients)
    and the optimizer step."""

    def __init__(self, state: TrainState, data: TrainingData, replica: DistributedDataParallel):
        super().__init__(state, data)
        self.replica = replica

    def __call__(self, batch: tuple, global_step: int) -> tuple[torch.Tensor, int]:
        state, data = self.state, self.data
        state.objective.set_step(global_step)
        value, loss = self.replica(*data.transform(batch))
        loss = loss * (data.world_size * len(batch[0]) / data.global_batch_size(global_step))
        mean_loss = loss.detach().clone()  # sum over ranks / W: the global batch's loss
        torch.distributed.all_reduce(mean_loss)
        mean_loss /= data.world_size
        if not _healthy(mean_loss):
            raise _diverged(state, str(mean_loss.item()), global_step, data.steps_per_epoch)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.scheduler.step_batch()
        return value, state.objective.num_data


def use_distributed(step: str, device: torch.device) -> bool:
    """Whether ``fit`` trains data-parallel (its ``step``): ``"auto"`` when a process group is
    initialized, ``"distributed"`` always (initializing the group from ``torchrun``'s
    environment if needed), never otherwise.

    :raises ValueError: ``"distributed"`` outside ``torchrun`` without a process group.
    """
    if step == "distributed":
        parallel.init_from_env(torch.device(device.type))  # cuda -> cuda:LOCAL_RANK
        return True
    return step == "auto" and parallel.is_distributed()
