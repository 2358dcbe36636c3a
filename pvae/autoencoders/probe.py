"""Evaluation helpers for any model with ``encode`` / ``reconstruct``: codes of a dataset,
reconstruction error, code statistics and the linear probe. They work on the autoencoders
and on the VAEs alike (a VAE's code is its posterior mean, the ``loc`` of q(z | x))."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pvae.stats import mean_stderr
from pvae.validation import check_count, check_float

__all__ = ["code_statistics", "encode_all", "linear_probe", "reconstruction_error"]


@torch.no_grad()
def encode_all(model, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The codes of every row of ``x``, in batches, on the CPU: ``(N, code_dim)``. For a
    model whose ``encode`` returns ``(loc, scale)`` (the VAEs) the code is ``loc``, the
    posterior mean.

    :raises TypeError: ``model`` has no ``encode``.
    """
    if not callable(getattr(model, "encode", None)):
        raise TypeError(f"{type(model).__name__} has no encode(x) method")
    check_count("batch_size", batch_size)
    codes = []
    for xb in x.split(batch_size):
        z = model.encode(xb)
        codes.append((z[0] if isinstance(z, tuple) else z).detach().cpu())
    return torch.cat(codes)


@torch.no_grad()
def reconstruction_error(model, x: torch.Tensor, batch_size: int = 1000) -> dict:
    """Mean squared error per pixel, (1/D) Σ_d (x̂_d − x_d)², averaged over the rows of ``x``
    with its standard error, x̂ = ``model.reconstruct(x)`` (the first element where it
    returns a tuple, e.g. a masked autoencoder's filled-in image).

    :returns: ``{"mse": ..., "mse_stderr": ...}``.
    """
    check_count("batch_size", batch_size)
    errors = []
    for xb in x.split(batch_size):
        xhat = model.reconstruct(xb)
        xhat = xhat[0] if isinstance(xhat, tuple) else xhat
        errors.append((xhat.cpu().double() - xb.cpu().double()).pow(2).mean(-1))
    mse, stderr = mean_stderr(torch.cat(errors))
    return {"mse": mse, "mse_stderr": stderr}


def code_statistics(z: torch.Tensor, threshold: float = 1e-3) -> dict:
    """Statistics of codes ``z`` ``(N, code_dim)``: the fraction of code units with |z_k| <
    ``threshold`` per image (mean ± SE over images; what a sparsity penalty raises), units
    whose standard deviation over the data is below ``threshold`` (dead units), and the mean
    absolute code.

    :raises ValueError: ``z`` is not a 2-D tensor with at least one row.
    """
    threshold = check_float("threshold", threshold, minimum=0.0, strict=True)
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or len(z) == 0:
        raise ValueError(f"z must be codes of shape (N, code_dim), got "
                         f"{getattr(z, 'shape', type(z).__name__)}")
    z = z.double()
    near_zero, near_zero_se = mean_stderr((z.abs() < threshold).double().mean(-1))
    std = z.std(0) if len(z) > 1 else torch.zeros(z.shape[1], dtype=z.dtype)
    return {"code_dim": z.shape[1], "threshold": threshold,
            "near_zero_fraction": near_zero, "near_zero_fraction_stderr": near_zero_se,
            "dead_units": int((std < threshold).sum()),
            "mean_abs_code": float(z.abs().mean())}


def linear_probe(z_train: torch.Tensor, y_train: torch.Tensor, z_test: torch.Tensor,
                 y_test: torch.Tensor, *, max_iter: int = 1000, C: float = 1.0) -> dict:
    """Linear-probe accuracy: multinomial logistic regression (scikit-learn's
    ``LogisticRegression``, L2 strength 1/C, after standardizing each code unit) fitted on the
    training codes and labels, scored on the test codes; the standard error is the binomial
    one, sqrt(p (1 − p) / n_test).

    :param z_train: ``(N, code_dim)``; ``y_train``: ``(N,)`` int labels; likewise the test set.
    :returns: ``{"accuracy": ..., "accuracy_stderr": ..., "num_train": ..., "num_test": ...}``.
    :raises ValueError: mismatched lengths or code widths.
    """
    check_count("max_iter", max_iter)
    check_float("C", C, minimum=0.0, strict=True)
    for name, z, y in (("train", z_train, y_train), ("test", z_test, y_test)):
        if z.dim() != 2 or len(z) != len(y) or len(z) == 0:
            raise ValueError(f"{name} codes {tuple(z.shape)} and labels {tuple(y.shape)} must "
                             "be (N, code_dim) and (N,) with N >= 1")
    if z_train.shape[1] != z_test.shape[1]:
        raise ValueError(f"train and test codes differ in width: {z_train.shape[1]} vs "
                         f"{z_test.shape[1]}")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, C=C))
    clf.fit(_numpy(z_train), _numpy(y_train))
    correct = torch.from_numpy(clf.predict(_numpy(z_test)) == _numpy(y_test)).double()
    accuracy, stderr = mean_stderr(correct)
    if len(correct) > 1:  # the binomial SE, not the sample SE of 0/1 values (they differ by
        stderr = float(np.sqrt(accuracy * (1 - accuracy) / len(correct)))  # n/(n-1))
    return {"accuracy": accuracy, "accuracy_stderr": stderr, "num_train": len(z_train),
            "num_test": len(z_test)}


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
