"""Structured-prediction splits of images (Sohn et al. 2015): the observed part ``c`` and the
part ``x`` to predict, from a fixed pixel mask."""

from __future__ import annotations

import torch

from pvae.data.binarize import bernoulli_sample, check_intensities

__all__ = ["CONDITIONS", "ConditionSplit", "condition_mask", "split_condition", "training_pairs"]

#: Structured-prediction splits of an image: the observed part c and the part x to predict.
CONDITIONS = ("top-half", "quadrant")


def condition_mask(image_shape, condition: str) -> torch.Tensor:
    """Boolean mask ``(H * W,)`` of the pixels that are observed (the conditioning ``c``) for
    structured output prediction (Sohn et al. 2015): ``"top-half"`` (predict the bottom half)
    or ``"quadrant"`` (the top-left quadrant is observed; predict the other three, as in Pyro's
    CVAE example).

    :raises ValueError: unknown condition or non-image data.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; choose one of {CONDITIONS}")
    if not image_shape or len(image_shape) != 2:
        raise ValueError(f"condition {condition!r} needs image data with (H, W), got "
                         f"image_shape={image_shape}")
    h, w = image_shape
    m = torch.zeros(h, w, dtype=torch.bool)
    if condition == "top-half":
        m[: h // 2] = True
    else:
        m[: h // 2, : w // 2] = True
    return m.flatten()


class ConditionSplit(torch.utils.data.Dataset):
    """Structured-prediction pairs ``(x_missing, x_observed)`` of images, for a CVAE
    p(x_m | z, c = x_o): item ``i`` is ``(x[i][~mask], x[i][mask])``.

    :param torch.Tensor x: ``(N, D)`` images with intensities in [0, 1].
    :param torch.Tensor mask: ``(D,)`` bool, True where observed (see :func:`condition_mask`).
    :param binarize: ``"dynamic"``: both parts are binarized afresh at every access, from the
        same Bernoulli draw of the whole image (dynamic binarization of the pair); ``None``:
        ``x`` as given.
    :raises ValueError: shapes disagree, ``binarize`` unknown, intensities outside [0, 1] with
        ``binarize="dynamic"``.
    """

    def __init__(self, x: torch.Tensor, mask: torch.Tensor, binarize: str | None = "dynamic"):
        if x.dim() != 2 or mask.shape != (x.shape[1],) or mask.dtype != torch.bool:
            raise ValueError(f"x must be (N, D) and mask a bool (D,) tensor, got {tuple(x.shape)} "
                             f"and {tuple(mask.shape)} {mask.dtype}")
        if binarize not in (None, "dynamic"):
            raise ValueError(f"binarize must be None or 'dynamic', got {binarize!r}")
        if binarize == "dynamic":
            check_intensities(x, "binarize='dynamic'")
        self.x, self.mask, self.binarize = x, mask, binarize

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, indices):
        """A whole mini-batch at once (``DataLoader`` calls this when it exists): one
        Bernoulli draw for the batch instead of one per image."""
        xb = self.x[indices]
        if self.binarize == "dynamic":
            xb = bernoulli_sample(xb)
        return list(zip(xb[:, ~self.mask], xb[:, self.mask]))

    def __getitem__(self, i):
        return self.__getitems__([i])[0]



def split_condition(condition: str | None, x: torch.Tensor, y: torch.Tensor | None = None,
                    image_shape=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``(x, c)`` pair that a model with this conditioning trains on.

    :param condition: ``None`` or ``"none"`` (unconditional: ``c = None``), ``"label"``
        (``c = y``, the class labels ``(N,)``), or one of :data:`CONDITIONS` (``c`` = the
        observed pixels ``(N, |mask|)``, ``x`` keeps the pixels to predict ``(N, D - |mask|)``).
    :param torch.Tensor x: ``(N, D)`` images.
    :raises ValueError: unknown condition, or an image split of non-image data.
    """
    condition = condition or "none"
    if condition == "none":
        return x, None
    if condition == "label":
        return x, y
    mask = condition_mask(image_shape, condition)
    return x[:, ~mask], x[:, mask]


def training_pairs(condition: str | None, x: torch.Tensor, y: torch.Tensor | None = None,
                   image_shape=None, binarize: str | None = None):
    """What ``fit`` trains a model with this conditioning on: ``(x, c, binarize)`` for
    ``fit(model, x, c=c, binarize=binarize)``.

    With dynamic binarization of an image split, ``x`` is a :class:`ConditionSplit` (observed
    and missing pixels cut from one fresh Bernoulli draw of each image; ``fit``'s own dynamic
    binarization would binarize the missing part only) and ``binarize`` is ``None``; otherwise
    as :func:`split_condition`, with ``binarize`` ``"dynamic"`` or ``None``.
    """
    if binarize == "dynamic" and condition in CONDITIONS:
        return ConditionSplit(x, condition_mask(image_shape, condition), "dynamic"), None, None
    x, c = split_condition(condition, x, y, image_shape)
    return x, c, "dynamic" if binarize == "dynamic" else None
