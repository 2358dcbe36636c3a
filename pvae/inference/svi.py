"""Training by stochastic variational inference for any model meeting the model contract."""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pyro
import pyro.poutine as poutine
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pvae.data import bernoulli_sample, check_intensities
from pvae.inference.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from pvae.inference.estimators import (
    Constant,
    ReparamEstimator,
    make_estimator,
    make_schedule,
    scale_latents,
)
from pvae.models.base import checked_inputs

__all__ = ["History", "TrainingDivergedError", "fit", "resolve_device"]


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else -> ``torch.device(device)``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available; install a "
                         "CUDA build of torch (see the README) or use device='cpu'")
    return device


class History:
    """Per-epoch training record: a list of rows (dicts) with the columns

    ``epoch``, ``train_elbo`` and ``val_elbo`` (nats per datapoint, higher is better),
    ``seconds`` and ``images_per_s``.
    """

    def __init__(self, rows: list[dict] | None = None):
        self.rows = list(rows or [])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def __repr__(self):
        return f"History({len(self)} epochs, last={self.rows[-1] if self.rows else None})"

    def column(self, name: str) -> list:
        return [row.get(name) for row in self.rows]

    def to_csv(self, path: str | os.PathLike) -> None:
        if not self.rows:
            return
        path = Path(path)
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, path)


def _parameters(model, loss_fn, xb, cb) -> list[torch.Tensor]:
    """The model's ``nn.Module`` parameters plus any Pyro param-store parameters its programs
    touch (found with a param-only trace, as ``pyro.infer.SVI`` does), without duplicates."""
    params = {}
    if isinstance(model, nn.Module):
        params.update((id(p), p) for p in model.parameters() if p.requires_grad)
    with poutine.trace(param_only=True) as tr:
        loss_fn(xb, cb)
    for site in tr.trace.nodes.values():
        p = site["value"].unconstrained()
        params.setdefault(id(p), p)
    if not params:
        raise ValueError("the model and guide have no trainable parameters: register networks "
                         "with pyro.module(...) or make the model a torch.nn.Module")
    return list(params.values())


def _param_store_state(model, params) -> dict:
    """Param-store values that are not parameters of ``model`` itself (user models using
    ``pyro.param``), by name, unconstrained."""
    own = {id(p) for p in model.parameters()} if isinstance(model, nn.Module) else set()
    store = pyro.get_param_store()
    wanted = {id(p) for p in params} - own
    return {name: store._params[name].detach().clone() for name in store.keys()
            if id(store._params[name]) in wanted}


def _as_tensor_data(x, c, device, dtype):
    x = x.to(device=device, dtype=dtype)
    if c is not None:
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"c must be a tensor, got {type(c).__name__}")
        if len(c) != len(x):
            raise ValueError(f"c has {len(c)} rows but x has {len(x)}; they must match")
        c = c.to(device=device, dtype=dtype if c.is_floating_point() else c.dtype)
    return x, c


def _check_data(model, x, binarize) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(-1).nonzero()[:5].flatten().tolist()
        raise ValueError(f"x contains NaN or inf values (e.g. rows {bad}); drop or impute them "
                         "before training")
    if binarize == "dynamic":
        check_intensities(x, "binarize='dynamic'")
    elif hasattr(model, "likelihood") and hasattr(model.likelihood, "check"):
        model.likelihood.check(x)


def _batches(x, c, batch_size, generator, device) -> Iterator:
    if isinstance(x, Dataset):
        loader = DataLoader(x, batch_size=batch_size, shuffle=True, generator=generator,
                            pin_memory=device.type == "cuda")
        for batch in loader:
            if isinstance(batch, (list, tuple)):
                yield batch[0], (batch[1] if len(batch) > 1 else None)
            else:
                yield batch, None
        return
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    for i in range(0, len(x), batch_size):
        idx = perm[i:i + batch_size]
        yield x[idx], (None if c is None else c[idx])


def _make_adam(params, lr: float) -> torch.optim.Adam:
    """``torch.optim.Adam`` with its fused kernel (the whole update of a parameter in one
    kernel: on CPU about 7x faster than the default per-op loop, ~1.5 ms of a ~15 ms step of
    the default VAE) where this torch build has one for the parameters' devices (CPU from
    torch 2.4, CUDA), else the default implementation. Same algorithm and hyperparameters."""
    params = list(params)
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        supported = set(_get_fused_kernels_supported_devices())
    except ImportError:  # older torch: no way to ask, keep the default
        supported = set()
    fused = all(p.device.type in supported and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


@torch.no_grad()
def _mean_elbo(elbo_fn, x, c, batch_size=1000) -> float:
    """Mean of ``elbo_fn`` (per-datapoint ELBO of a batch) over ``x``, in batches."""
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        total += elbo_fn(xb, None if c is None else c[i:i + batch_size]).item() * len(xb)
    return total / len(x)


def fit(model, x_train, *, c=None, x_val=None, c_val=None, num_epochs: int,
        batch_size: int = 256, lr: float = 1e-3, lr_decay: float = 1.0,
        estimator: str = "reparam", analytic_kl: bool = False, num_particles: int = 1,
        beta=1.0, baseline: str | None = None, gradient: str = "standard",
        device="auto", seed: int = 0,
        binarize: str | None = None, checkpoint_dir=None, resume: bool = False,
        progress: bool = True, config: dict | None = None) -> History:
    r"""Train ``model`` by SVI: maximize the ELBO (or the IWAE bound) with Adam over
    mini-batches.

    Works for any object with ``model(x, c=None)`` and ``guide(x, c=None)`` Pyro programs
    (the model contract of ``DESIGN.md``), built-in or user-written. The loss is the
    estimator's surrogate divided by the batch size (see :mod:`pvae.inference.estimators`:
    Pyro's ``Trace_ELBO`` / ``TraceMeanField_ELBO``, ``TraceGraph_ELBO`` with score-function
    gradients, or the IWAE bound), differentiated by autograd and stepped by
    ``torch.optim.Adam``; parameters are the model's ``nn.Module`` parameters plus any Pyro
    param-store parameters its programs use (neural baselines included). Adam uses its fused
    kernel where torch has one for the parameters' device (CPU from torch 2.4, CUDA), and
    dynamic binarization compares uniforms with ``x`` (:func:`pvae.data.bernoulli_sample`):
    per-step costs outside the Pyro program that a default plain PyTorch loop pays in full.

    Pyro's validation runs on a first probe step; the loop itself runs with it off, since the
    whole dataset is checked once up front and NaN/inf losses stop training here.

    :param model: an object with ``model`` and ``guide`` methods (ideally an ``nn.Module``).
    :param x_train: tensor ``(N, D)``, or a ``torch.utils.data.Dataset`` yielding ``x`` or
        ``(x, c)`` (streamed through a ``DataLoader``).
    :param c: conditioning tensor ``(N,)`` or ``(N, c_dim)`` for conditional models.
    :param x_val: validation data ``(N_val, D)`` for the per-epoch validation ELBO.
    :param int num_epochs: total number of epochs (a resumed run continues up to it).
    :param float lr: Adam's learning rate.
    :param float lr_decay: multiply the learning rate by this after every epoch
        (``torch.optim.lr_scheduler.ExponentialLR``); 1 keeps it constant.
    :param str estimator: gradient estimator, see :data:`pvae.inference.ESTIMATORS`.
    :param bool analytic_kl: closed-form KL(q || p) where available.
    :param int num_particles: samples of z per datapoint and step (K for ``iwae``).
    :param beta: weight of the KL term (beta-VAE, Higgins et al. 2017): a float, or a schedule
        ``step -> beta`` (:class:`~pvae.inference.LinearWarmup`,
        :class:`~pvae.inference.Cyclical`), applied with :class:`scale_latents` to the latent
        sites of model and guide. It changes only the training objective; ``val_elbo`` is
        always the plain ELBO. The history records beta at the end of each epoch.
    :param baseline: ``None``, ``"average"`` or ``"neural"``, for ``estimator="score"``.
    :param str gradient: ``"standard"`` or ``"dreg"``, for ``estimator="iwae"``.
    :param device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``...; the model is moved
        there and data follow the model's dtype (``model.double()`` trains in float64).
    :param int seed: seeds Pyro, torch, numpy and the shuffling generator: the same seed and
        data give an identical history on CPU.
    :param binarize: ``None`` or ``"dynamic"``: re-sample binary pixels from the [0, 1]
        intensities of every mini-batch (Burda et al. 2015). ``x_val`` must already be binary.
    :param checkpoint_dir: if given, ``checkpoint.pt`` (model, optimizer, epoch, RNG states,
        history, ``config``) is written there atomically after every epoch.
    :param bool resume: continue from ``checkpoint_dir/checkpoint.pt`` if it exists.
    :param bool progress: show a tqdm bar with the running ELBO.
    :param dict config: extra configuration saved in checkpoints and checked on resume.
    :returns: :class:`History` with, per epoch, ``train_elbo`` (the training objective: the
        beta-weighted ELBO, or the K-sample IWAE bound for ``iwae``) and ``val_elbo`` in nats
        per datapoint, ``beta``, ``seconds`` and ``images_per_s``.
    :raises ValueError: bad arguments or data (NaN, outside the likelihood's support), or a
        checkpoint written with another configuration.
    :raises TrainingDivergedError: the loss became NaN or inf; the message names the epoch and
        step, and the last good checkpoint is left intact.
    """
    if not (hasattr(model, "model") and hasattr(model, "guide")):
        raise TypeError("fit needs an object with model(x, c=None) and guide(x, c=None) methods "
                        f"(the model contract), got {type(model).__name__}")
    if not (isinstance(num_epochs, int) and num_epochs >= 0):
        raise ValueError(f"Expected num_epochs >= 0, got {num_epochs!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"Expected batch_size >= 1, got {batch_size!r}")
    if binarize not in (None, "dynamic"):
        raise ValueError(f"fit's binarize must be None or 'dynamic', got {binarize!r} (static "
                         "binarization is done once when loading: pvae.data.load(binarize=...))")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    device = resolve_device(device)
    if isinstance(model, nn.Module):
        model.to(device)
        dtype = next(model.parameters()).dtype
    else:
        dtype = x_train.dtype if isinstance(x_train, torch.Tensor) else torch.get_default_dtype()

    if isinstance(x_train, torch.Tensor):
        x_train, c = _as_tensor_data(x_train, c, device, dtype)
        _check_data(model, x_train, binarize)
        num_train = len(x_train)
    elif isinstance(x_train, Dataset):
        num_train = len(x_train)
    else:
        raise TypeError(f"x_train must be a tensor or a torch Dataset, got {type(x_train)}")
    if x_val is not None:
        x_val, c_val = _as_tensor_data(x_val, c_val, device, dtype)
        _check_data(model, x_val, None)

    if not 0 < lr_decay <= 1:
        raise ValueError(f"Expected 0 < lr_decay <= 1, got {lr_decay!r}")
    fit_config = {"batch_size": batch_size, "lr": lr, "lr_decay": lr_decay, "estimator": estimator,
                  "analytic_kl": analytic_kl, "num_particles": num_particles, "seed": seed,
                  "binarize": binarize, "beta": beta if not callable(beta) else repr(beta),
                  "baseline": baseline, "gradient": gradient, **(config or {})}
    objective = make_estimator(estimator, num_particles=num_particles, analytic_kl=analytic_kl,
                               baseline=baseline, gradient=gradient)
    schedule = make_schedule(beta)
    kl_scale = scale_latents(schedule(0))
    if isinstance(schedule, Constant) and schedule.beta == 1.0:  # plain ELBO: no handler needed
        model_fn, guide_fn = model.model, model.guide
    else:
        model_fn, guide_fn = kl_scale(model.model), kl_scale(model.guide)
    val_objective = ReparamEstimator(1, analytic_kl)

    def loss_fn(xb, cb):
        """(objective, surrogate loss), both per datapoint."""
        args = (xb,) if cb is None else (xb, cb)
        value, surrogate = objective(model_fn, guide_fn, *args)
        return value / xb.shape[0], surrogate / xb.shape[0]

    def val_elbo_fn(xb, cb):
        args = (xb,) if cb is None else (xb, cb)
        return val_objective(model.model, model.guide, *args)[0] / xb.shape[0]

    pyro.set_rng_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    probe = next(_batches(x_train, c, min(batch_size, 8), torch.Generator().manual_seed(seed),
                          device))
    probe = _as_tensor_data(*probe, device, dtype)
    if binarize == "dynamic":
        probe = (bernoulli_sample(probe[0]), probe[1])
    params = _parameters(model, lambda xb, cb: loss_fn(xb, cb)[1], *probe)
    optimizer = _make_adam(params, lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=lr_decay)

    history, start_epoch = History(), 0
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, map_location=device)
        saved = {k: v for k, v in state.get("config", {}).items() if k != "num_epochs"}
        if saved != fit_config:
            diff = {k: (saved.get(k), fit_config.get(k))
                    for k in set(saved) | set(fit_config) if saved.get(k) != fit_config.get(k)}
            raise CheckpointError(f"{ckpt_path} was written with another configuration "
                                  f"(saved vs now: {diff}); use a new checkpoint_dir or the "
                                  "same settings")
        _load_model_state(model, state)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], generator)
        history = History(state["history"])
        start_epoch = state["epoch"]

    steps_per_epoch = math.ceil(num_train / batch_size)
    bar = tqdm(total=max(num_epochs - start_epoch, 0) * steps_per_epoch,
               disable=not progress, desc="fit", unit="batch", dynamic_ncols=True)
    for epoch in range(start_epoch, num_epochs):
        if isinstance(model, nn.Module):
            model.train()
        t0, losses, seen = time.perf_counter(), [], 0
        for step, (xb, cb) in enumerate(_batches(x_train, c, batch_size, generator, device)):
            if not isinstance(x_train, torch.Tensor):
                xb, cb = _as_tensor_data(xb, cb, device, dtype)
            if binarize == "dynamic":
                xb = bernoulli_sample(xb)
            kl_scale.beta = schedule(epoch * steps_per_epoch + step)
            with checked_inputs(), pyro.validation_enabled(False):
                value, loss = loss_fn(xb, cb)
            if not torch.isfinite(loss):
                bar.close()
                where = (f"{ckpt_path} (end of epoch {history[-1]['epoch']})"
                         if ckpt_path is not None and history else "none was written")
                raise TrainingDivergedError(
                    f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                    f"last good checkpoint: {where}. Lower the learning rate (lr={lr}) or check "
                    "the data and the likelihood's scale")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(value * len(xb))
            seen += len(xb)
            if progress:
                bar.update()
                if step % 25 == 0:
                    bar.set_postfix_str(f"epoch {epoch + 1} elbo {value.item():.2f}")
        seconds = time.perf_counter() - t0
        scheduler.step()
        total = torch.stack(losses).double().sum().item() if losses else float("nan")
        row = {"epoch": epoch + 1, "train_elbo": total / max(seen, 1), "beta": kl_scale.beta,
               "val_elbo": float("nan"), "seconds": seconds,
               "images_per_s": seen / seconds if seconds > 0 else float("nan")}
        if x_val is not None:
            if isinstance(model, nn.Module):
                model.eval()
            row["val_elbo"] = _mean_elbo(val_elbo_fn, x_val, c_val)
        history.rows.append(row)
        if ckpt_path is not None:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict() if isinstance(model, nn.Module) else {},
                "param_store": _param_store_state(model, params),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "rng": get_rng_state(generator),
                "history": history.rows,
                "config": {**fit_config, "num_epochs": num_epochs},
            })
    bar.close()
    if isinstance(model, nn.Module):
        model.eval()
    return history


def _load_model_state(model, state: dict) -> None:
    if isinstance(model, nn.Module):
        model.load_state_dict(state["model"])
    store = pyro.get_param_store()
    for name, value in state.get("param_store", {}).items():
        if name in store._params:
            with torch.no_grad():
                store._params[name].copy_(value)
