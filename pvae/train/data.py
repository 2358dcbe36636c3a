"""Training data as the engine sees it: checked once, placed on the model's device, served in
shuffled mini-batches of positional arguments, dynamically binarized on the way; or the user's
own ``DataLoader``, whose items are the positional arguments."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from pvae.contract import DataArgs, place_args, place_data, program_args
from pvae.data import Splits, batches, bernoulli_sample, check_intensities
from pvae.parallel import shard

__all__ = ["TrainingData"]


class TrainingData:
    """``x`` (and ``c``) for training, checked once up front.

    :param x: tensor ``(N, D)``, a ``torch.utils.data.Dataset`` yielding ``x``, ``(x, c)``
        or ``(x, t, y, ...)`` (streamed through a ``DataLoader``; each batch is placed when it
        is drawn; the programs take ``(x, *rest)``), or a ``torch.utils.data.DataLoader``
        whose items (with the user's own ``collate_fn``: padded sequences, a
        ``PackedSequence``, masks, lengths...) are the programs' positional arguments, as
        Pyro's ``SVI.step(*args)`` takes them; its order, batch size and shuffling are its
        own (``batch_size`` is ignored), and a batch's datapoints are those of the data plate
        in the model's trace.
    :param c: conditioning tensor ``(N,)`` or ``(N, c_dim)`` aligned with a tensor ``x``, or
        a tuple of such tensors: the programs then take ``(x, *c)``.
    :param model: the model, whose ``likelihood.check(x)`` (where it has one) refuses data
        outside the likelihood's support.
    :param binarize: ``None`` or ``"dynamic"``: every batch is a fresh Bernoulli draw of the
        [0, 1] intensities ``x``.
    :param int rank: this process's rank in data-parallel training (0 in one process).
    :param int world_size: the number of processes; with more than one, each shuffled global
        mini-batch (the same on every rank: one shuffle drawn from a generator seeded alike on
        every rank) is split into ``world_size`` contiguous slices and this rank gets slice
        ``rank`` (:func:`pvae.parallel.shard`), so that the ranks' slices together are the batch
        one process would draw; evaluation (:meth:`in_order`) covers the rank's contiguous
        share of the data.
    :raises TypeError: ``x`` is neither a tensor, a ``Dataset`` nor a ``DataLoader`` (a
        :class:`pvae.data.Splits` gets a message saying which of its fields to pass), or ``c``
        is not a tensor.
    :raises ValueError: empty data, ``c`` of another length than ``x`` or beside a
        ``DataLoader``, a ``DataLoader`` with several processes, NaN or inf values, or values
        outside the likelihood's support (or outside [0, 1] for dynamic binarization).
    """

    def __init__(self, x, c=None, *, model=None, batch_size: int, device: torch.device,
                 dtype: torch.dtype, binarize: str | None = None, name: str = "x_train",
                 rank: int = 0, world_size: int = 1):
        if isinstance(x, Splits):
            raise TypeError(f"{name} is a pvae.data.Splits (train and test sets); pass its "
                            f"tensors: fit(model, splits.x_train, c=splits.y_train) for a "
                            "conditional model, fit(model, splits.x_train) otherwise")
        if not isinstance(x, (torch.Tensor, Dataset, DataLoader)):
            raise TypeError(f"{name} must be a tensor, a torch Dataset or a DataLoader, got "
                            f"{type(x)}")
        if isinstance(x, DataLoader):
            if c is not None:
                raise ValueError(f"{name} is a DataLoader, whose items are the programs' "
                                 "positional arguments: put c in them and pass c=None")
            if world_size > 1:
                raise ValueError(f"{name} is a DataLoader: data-parallel training splits pvae's "
                                 "own batches; pass the tensors or a Dataset")
        if len(x) == 0:
            raise ValueError(f"{name} is empty; pass at least one datapoint")
        self.device, self.dtype, self.binarize, self.model = device, dtype, binarize, model
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        if isinstance(x, torch.Tensor):
            x, c = place_data(x, c, device, dtype)
            x, c = _constants(x, c)
            _check(model, x, c, binarize)
        self.x, self.c = x, c

    def __len__(self) -> int:
        """Datapoints (a ``DataLoader``'s: its dataset's items)."""
        return len(self.x.dataset) if isinstance(self.x, DataLoader) else len(self.x)

    @property
    def steps_per_epoch(self) -> int:
        if isinstance(self.x, DataLoader):
            return len(self.x)
        return math.ceil(len(self.x) / self.batch_size)

    def global_batch_size(self, step: int) -> int:
        """Datapoints in step ``step``'s global mini-batch (all ranks together); the last
        batch of an epoch may be smaller."""
        i = step % self.steps_per_epoch
        return min(self.batch_size, len(self.x) - i * self.batch_size)

    def _placed(self, xb, cb) -> tuple:
        if not isinstance(self.x, torch.Tensor):  # streamed: each batch gets the checks here
            xb, cb = _constants(*place_data(xb, cb, self.device, self.dtype))
            _check(self.model, xb, cb, self.binarize)
        return program_args(xb, cb)

    def _items(self):
        """A ``DataLoader``'s items, placed and checked: the programs' arguments."""
        for item in self.x:
            args = place_args(item, self.device, self.dtype)
            _check_args(args, self.binarize)
            yield args

    def transform(self, batch: tuple) -> tuple:
        """A placed batch as the model's positional arguments: with dynamic binarization a
        fresh Bernoulli draw of ``x`` (a device operation, part of a captured step)."""
        if self.binarize != "dynamic":
            return batch
        return (bernoulli_sample(batch[0]), *batch[1:])

    def shuffled(self, generator: torch.Generator):
        """One epoch of placed mini-batches ``(x,)``, ``(x, c)`` or ``(x, *c)`` in an order drawn from
        ``generator``; pass each through :meth:`transform` before the model. When one batch
        holds the whole data set (``batch_size >= N``) it comes in stored order, every epoch,
        without drawing from ``generator``: the gradient of a full batch does not depend on the
        order, and guides with per-datapoint parameters (Pyro's ``AutoNormal`` on a plate of the
        batch's size, ``pyro.param`` of shape ``(N, ...)``) stay aligned with their
        datapoints."""
        if isinstance(self.x, DataLoader):
            yield from self._items()
            return
        shuffle = self.steps_per_epoch > 1
        for xb, cb in batches(self.x, self.c, batch_size=self.batch_size, shuffle=shuffle,
                              generator=generator, pin_memory=self.device.type == "cuda"):
            if self.world_size > 1:  # this rank's slice of the global batch
                mine = shard(len(xb), self.rank, self.world_size)
                xb, cb = xb[mine], None if cb is None else cb[mine]
            yield self._placed(xb, cb)

    def in_order(self, batch_size: int):
        """Mini-batches in stored order (for evaluation), transformed: the model's arguments;
        with several processes, of this rank's contiguous share of the data (a ``DataLoader``:
        its items, in its order)."""
        if isinstance(self.x, DataLoader):
            for args in self._items():
                yield self.transform(args)
            return
        x, c = self.x, self.c
        if self.world_size > 1:
            mine = shard(len(x), self.rank, self.world_size)
            if isinstance(x, torch.Tensor):
                x, c = x[mine], None if c is None else c[mine]
            else:
                x = Subset(x, range(mine.start, mine.stop))
        for xb, cb in batches(x, c, batch_size=batch_size):
            yield self.transform(self._placed(xb, cb))

    def sample(self, seed: int) -> tuple:
        """A whole mini-batch as the programs take it (a ``DataLoader``: its first item), drawn
        with its own generator seeded with ``seed`` and transformed with torch's RNG forked, so
        that neither the shuffling stream nor the global one moves: what the objective looks
        at to choose the probe's size (``Objective.needs_whole_batches``)."""
        if isinstance(self.x, DataLoader):
            return next(self._items())
        generator = torch.Generator().manual_seed(seed)
        xb, cb = next(batches(self.x, self.c, batch_size=self.batch_size, shuffle=True,
                              generator=generator))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self.transform(self._placed(xb, cb))

    def probe(self, seed: int, size: int = 8, whole: bool = False) -> tuple:
        """The batch on which ``fit`` runs the objective once before training, with Pyro's
        validation on, to create lazily built parts (lazy modules, autoguides' parameters,
        neural baselines) and find the parameters: always a batch the programs take.

        - A ``DataLoader``: its first item.
        - One batch holding the whole data set (``batch_size >= N``): that batch, exactly as
          training sees it (stored order, this rank's slice), so that parameters shaped by the
          batch (per-datapoint guides) get their real shape.
        - Mini-batches: ``min(batch_size, size)`` datapoints drawn with their own generator
          (seeded with ``seed``), which leaves the shuffling stream alone; with ``whole`` (the
          objective's answer for programs that draw a subsample of a plate themselves,
          ``subsample_size``: they take no batch smaller than it) a whole mini-batch. Guides
          with per-datapoint parameters trained on mini-batches index them by datapoint
          (Pyro's ``pyro.plate("data", N, subsample=idx)`` with ``idx`` a data argument), which
          any subset of rows satisfies.
        """
        if isinstance(self.x, DataLoader):
            return self.transform(next(self._items()))
        if self.steps_per_epoch == 1:
            return self.transform(next(self.shuffled(None)))
        rows = self.batch_size if whole else min(self.batch_size, size)
        generator = torch.Generator().manual_seed(seed)
        xb, cb = next(batches(self.x, self.c, batch_size=rows, shuffle=True,
                              generator=generator))
        return self.transform(self._placed(xb, cb))


def _constants(x, c):
    """The data as constants of the objective: detached, so that data which require grad (a
    view of someone's computation) never accumulate gradients from training."""
    if isinstance(c, DataArgs):
        c = DataArgs(t.detach() for t in c.tensors)
    elif isinstance(c, torch.Tensor):
        c = c.detach()
    return x.detach(), c


def _check(model, x, c, binarize) -> None:
    """The whole dataset, once: finite; intensities in [0, 1] for dynamic binarization, else
    the model's own ``check_data(x, c)`` where it has one (built-in models)."""
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(-1).nonzero()[:5].flatten().tolist()
        raise ValueError(f"x contains NaN or inf values (e.g. rows {bad}); drop or impute them "
                         "before training")
    if binarize == "dynamic":
        check_intensities(x, "binarize='dynamic'")  # the model sees binary draws of x
    if callable(getattr(model, "check_data", None)):
        model.check_data(None if binarize == "dynamic" else x, c)


def _check_args(args: tuple, binarize) -> None:
    """A ``DataLoader``'s item: its floating-point tensors finite; with dynamic binarization
    the first one intensities in [0, 1]."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and not torch.isfinite(a).all():
            raise ValueError(f"argument {i} of a DataLoader's batch contains NaN or inf values; "
                             "drop or impute them before training")
    if binarize == "dynamic":
        if not isinstance(args[0], torch.Tensor):
            raise ValueError("binarize='dynamic' draws the first argument of every batch "
                             "afresh; the DataLoader's first field must be the intensities")
        check_intensities(args[0], "binarize='dynamic'")
