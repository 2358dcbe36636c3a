"""The ``torch.distributed`` process group as pvae sees it: rank, world size, shards of the data,
sums and ordered gathers over ranks, work done by rank 0 alone.

Without an initialized process group (one process, the default) the world has size 1 and every
function here is the identity, so the single-process code paths do not change. The group is
the one that ``torchrun`` (or ``torch.distributed.init_process_group``) sets up; pvae never
launches processes itself. Backends: NCCL for CUDA tensors, gloo for CPU tensors.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

__all__ = ["all_gather", "all_reduce_sum", "backend_for", "broadcast", "gather_in_order",
           "init_from_env", "is_distributed", "launched_by_torchrun", "local_device", "main_only",
           "process_group", "rank", "shard", "world_size"]


def is_distributed() -> bool:
    """Whether a process group is initialized (``torch.distributed``)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the group, 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (its ``RANK``, ``WORLD_SIZE`` and
    ``MASTER_ADDR`` environment variables are set)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def backend_for(device: torch.device) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def local_device(device: torch.device) -> torch.device:
    """The device of this process: ``cuda`` without an index becomes ``cuda:LOCAL_RANK`` (one
    GPU per process, as ``torchrun --nproc_per_node`` numbers them); other devices are kept."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def init_from_env(device: torch.device) -> None:
    """Initialize the default process group from ``torchrun``'s environment variables (NCCL
    on CUDA, gloo on CPU), unless one is initialized already.

    :raises ValueError: not started by ``torchrun`` and no group initialized.
    """
    if is_distributed():
        return
    if not launched_by_torchrun():
        raise ValueError("distributed runs (fit's step='distributed', evaluation's "
                         "distributed=True) need a torch.distributed process group: launch with "
                         "`torchrun --nproc_per_node N ...`, or call "
                         "torch.distributed.init_process_group(...) first")
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device))


@contextlib.contextmanager
def process_group(device: torch.device):
    """A context under ``torchrun``: the process group initialized from the environment (see
    :func:`init_from_env`) and destroyed on exit, unless it existed before (then it is left as
    it was). On a normal exit the ranks meet at a barrier first, so that no rank closes its
    connections while another still reads from them (gloo aborts such a reader)."""
    owned = not is_distributed()
    init_from_env(device)
    finished = False
    try:
        yield
        finished = True
    finally:
        if owned:
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def shard(n: int, rank_: int | None = None, size: int | None = None) -> slice:
    """The contiguous share of ``n`` items that rank ``rank_`` of ``size`` gets: the split of
    ``torch.tensor_split`` (the first ``n % size`` ranks get one item more; some shares are
    empty when ``n < size``)."""
    rank_ = rank() if rank_ is None else rank_
    size = world_size() if size is None else size
    base, extra = divmod(n, size)
    start = rank_ * base + min(rank_, extra)
    return slice(start, start + base + (rank_ < extra))


def all_reduce_sum(*values: float) -> tuple[float, ...]:
    """Python numbers summed over ranks (in float64); unchanged in one process."""
    if not is_distributed():
        return values
    device = _comm_device()
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return tuple(t.tolist())


def gather_in_order(parts: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    """Every rank's ``{index: tensor}`` merged and sorted by index (tensors come back on the
    CPU): how per-datapoint results computed on shards are put back in order. In one process,
    the values of ``parts`` sorted by index."""
    if not is_distributed():
        return [parts[i] for i in sorted(parts)]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, {i: t.cpu() for i, t in parts.items()})
    merged = {i: t for part in gathered for i, t in part.items()}
    return [merged[i] for i in sorted(merged)]


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (any picklable object); ``obj`` in one process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj) -> list:
    """Every rank's ``obj``, in rank order; ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def main_only(fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only and return its result on every rank; an exception raised
    there is raised on every rank (so that no rank waits for one that failed)."""
    if not is_distributed():
        return fn(*args, **kwargs)
    result = None
    if rank() == 0:
        try:
            result = (fn(*args, **kwargs), None)
        except Exception as e:  # re-raised below on every rank
            result = (None, e)
    result, error = broadcast(result)
    if error is not None:
        raise error
    return result


def _comm_device() -> torch.device:
    """Where tensors for collectives live: the current CUDA device with NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
