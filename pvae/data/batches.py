"""One mini-batch iterator for training and evaluation: tensors or a ``torch.utils.data.Dataset``."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from pvae.contract import DataArgs

__all__ = ["batches"]


def batches(x, c=None, *, batch_size: int, shuffle: bool = False,
            generator: torch.Generator | None = None, pin_memory: bool = False) -> Iterator:
    """Mini-batches ``(x_batch, c_batch)`` (``c_batch`` is ``None`` without ``c``).

    :param x: a tensor ``(N, ...)``, or a ``torch.utils.data.Dataset`` whose items are ``x``,
        ``(x, c)`` or ``(x, t, y, ...)`` (then ``c`` must be ``None``; with more than two
        fields ``c_batch`` is a :class:`pvae.contract.DataArgs` of the fields after x, sliced
        like one tensor), streamed through a ``DataLoader``.
    :param c: optional tensor ``(N, ...)`` aligned with a tensor ``x``.
    :param int batch_size: datapoints per batch; the last batch may be smaller.
    :param bool shuffle: a fresh random order (drawn from ``generator``) instead of the stored
        one; in stored order tensor batches are views, not copies.
    :param bool pin_memory: pin a ``DataLoader``'s batches (for a later copy to a GPU).
    """
    if isinstance(x, Dataset):
        loader = DataLoader(x, batch_size=batch_size, shuffle=shuffle, generator=generator,
                            pin_memory=pin_memory)
        for batch in loader:
            if isinstance(batch, (list, tuple)):
                rest = batch[1:]
                yield batch[0], (rest[0] if len(rest) == 1 else DataArgs(rest) if rest else None)
            else:
                yield batch, None
        return
    if not shuffle:
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], None if c is None else c[i:i + batch_size]
        return
    perm = torch.randperm(len(x), generator=generator,
                          device=generator.device if generator is not None else None).to(x.device)
    for i in range(0, len(x), batch_size):
        idx = perm[i:i + batch_size]
        yield x[idx], (None if c is None else c[idx])
