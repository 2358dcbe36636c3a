"""Training data as the engine sees it: checked once, placed on the model's device, served in
shuffled mini-batches of positional arguments, dynamically binarized on the way."""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset, Subset

from pvae.contract import place_data, program_args
from pvae.data import Splits, batches, bernoulli_sample, check_intensities
from pvae.parallel import shard

__all__ = ["TrainingData"]


class TrainingData:
    """``x`` (and ``c``) for training, checked once up front.

    :param x: tensor ``(N, D)``, or a ``torch.utils.data.Dataset`` yielding ``x``, ``(x, c)``
        or ``(x, t, y, ...)`` (streamed through a ``DataLoader``; each batch is placed when it
        is drawn; the programs take ``(x, *rest)``).
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
    :raises TypeError: ``x`` is neither a tensor nor a ``Dataset`` (a :class:`pvae.data.Splits`
        gets a message saying which of its fields to pass), or ``c`` is not a tensor.
    :raises ValueError: empty data, ``c`` of another length than ``x``, NaN or inf values, or
        values outside the likelihood's support (or outside [0, 1] for dynamic binarization).
    """

    def __init__(self, x, c=None, *, model=None, batch_size: int, device: torch.device,
                 dtype: torch.dtype, binarize: str | None = None, name: str = "x_train",
                 rank: int = 0, world_size: int = 1):
        if isinstance(x, Splits):
            raise TypeError(f"{name} is a pvae.data.Splits (train and test sets); pass its "
                            f"tensors: fit(model, splits.x_train, c=splits.y_train) for a "
                            "conditional model, fit(model, splits.x_train) otherwise")
        if not isinstance(x, (torch.Tensor, Dataset)):
            raise TypeError(f"{name} must be a tensor or a torch Dataset, got {type(x)}")
        if len(x) == 0:
            raise ValueError(f"{name} is empty; pass at least one datapoint")
        self.device, self.dtype, self.binarize, self.model = device, dtype, binarize, model
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        if isinstance(x, torch.Tensor):
            x, c = place_data(x, c, device, dtype)
            _check(model, x, c, binarize)
        self.x, self.c = x, c

    def __len__(self) -> int:
        return len(self.x)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def global_batch_size(self, step: int) -> int:
        """Datapoints in step ``step``'s global mini-batch (all ranks together); the last
        batch of an epoch may be smaller."""
        i = step % self.steps_per_epoch
        return min(self.batch_size, len(self.x) - i * self.batch_size)

    def _placed(self, xb, cb) -> tuple:
        if not isinstance(self.x, torch.Tensor):  # streamed: each batch gets the checks here
            xb, cb = place_data(xb, cb, self.device, self.dtype)
            _check(self.model, xb, cb, self.binarize)
        return program_args(xb, cb)

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
        shuffle = self.steps_per_epoch > 1
        for xb, cb in batches(self.x, self.c, batch_size=self.batch_size, shuffle=shuffle,
                              generator=generator, pin_memory=self.device.type == "cuda"):
            if self.world_size > 1:  # this rank's slice of the global batch
                mine = shard(len(xb), self.rank, self.world_size)
                xb, cb = xb[mine], None if cb is None else cb[mine]
            yield self._placed(xb, cb)

    def in_order(self, batch_size: int):
        """Mini-batches in stored order (for evaluation), transformed: the model's arguments;
        with several processes, of this rank's contiguous share of the data."""
        x, c = self.x, self.c
        if self.world_size > 1:
            mine = shard(len(x), self.rank, self.world_size)
            if isinstance(x, torch.Tensor):
                x, c = x[mine], None if c is None else c[mine]
            else:
                x = Subset(x, range(mine.start, mine.stop))
        for xb, cb in batches(x, c, batch_size=batch_size):
            yield self.transform(self._placed(xb, cb))

    def probe(self, seed: int, size: int = 8) -> tuple:
        """The batch on which ``fit`` runs the objective once before training, with Pyro's
        validation on, to create lazily built parts (lazy modules, autoguides' parameters,
        neural baselines) and find the parameters. When one batch holds the whole data set,
        it is that batch, exactly as training sees it (stored order, this rank's slice), so
        that parameters shaped by the batch (per-datapoint guides) get their real shape;
        otherwise ``min(batch_size, size)`` datapoints drawn with their own generator (seeded
        with ``seed``), which leaves the shuffling stream alone. Guides with per-datapoint
        parameters trained on mini-batches index them by datapoint (Pyro's
        ``pyro.plate("data", N, subsample=idx)`` with ``idx`` a data argument), which any
        subset of rows satisfies."""
        if self.steps_per_epoch == 1:
            return self.transform(next(self.shuffled(None)))
        generator = torch.Generator().manual_seed(seed)
        xb, cb = next(batches(self.x, self.c, batch_size=min(self.batch_size, size),
                              shuffle=True, generator=generator))
        return self.transform(self._placed(xb, cb))


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
