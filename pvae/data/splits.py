"""A dataset's train and test splits, as the data contract of ``DESIGN.md`` fixes them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["Splits"]


@dataclass
class Splits:
    """A dataset's train and test splits, following the data contract. Not itself a
    ``torch.utils.data.Dataset``: train on its tensors, ``fit(model, splits.x_train,
    c=splits.y_train)``.

    :ivar torch.Tensor x_train: float32, shape ``(N_train, D)``, values in [0, 1]
        (or real-valued for ``synthetic-ppca``).
    :ivar torch.Tensor x_test: float32, shape ``(N_test, D)``.
    :ivar torch.Tensor y_train: int64, shape ``(N_train,)`` (all zeros where there are no labels).
    :ivar torch.Tensor y_test: int64, shape ``(N_test,)``.
    :ivar tuple image_shape: ``(H, W)`` for plotting, or ``None`` for non-image data.
    :ivar int num_classes: number of label classes.
    :ivar str name: registry name of the dataset.
    :ivar dict params: generating parameters for synthetic data (e.g. PPCA's ``W``, ``mu``,
        ``sigma``); empty for real data.
    :ivar str digest: for your own data (:mod:`pvae.data.own`), the SHA-256 of the arrays as
        read, before binarization: a run records it, and evaluation checks that it finds the
        same data again; ``None`` for the built-in datasets.
    """

    x_train: torch.Tensor
    x_test: torch.Tensor
    y_train: torch.Tensor
    y_test: torch.Tensor
    image_shape: tuple | None
    num_classes: int
    name: str
    binarized: str | None = None
    params: dict = field(default_factory=dict)
    digest: str | None = None

    @property
    def x_dim(self) -> int:
        """Data dimension ``D``."""
        return self.x_train.shape[-1]

