"""``fit``: training for any model meeting the model contract (or a deterministic autoencoder),
assembled from the engine's parts."""

from __future__ import annotations

import torch
from torch import nn

from pvae import parallel
from pvae.contract import placement
from pvae.train.callbacks import Checkpoint, ProgressBar
from pvae.train.checkpoint import checkpoint_folder
from pvae.train.data import TrainingData
from pvae.train.distributed import DistributedStep, check_batches, use_distributed, wrap
from pvae.train.history import History
from pvae.train.loop import run_epochs
from pvae.train.objective import bind_objective
from pvae.train.optim import Adam
from pvae.train.state import TrainState, seed_all
from pvae.train.steps import STEPS, CapturedStep, capture_blocker, log
from pvae.validation import check_choice, check_count

__all__ = ["fit"]


def fit(model, data, *data_args, loss=None, val=None, num_epochs: int, batch_size: int = 256,
        optim=None, binarize: str | None = None, device="auto", seed: int = 0,
        checkpoint_dir=None, resume: bool = False, callbacks=(), progress: bool = True,
        step: str = "auto", config: dict | None = None, **removed) -> History:
    """Train ``model`` on ``data`` by stochastic optimization of ``loss`` over mini-batches, as
    ``pyro.infer.SVI(model, guide, optim, loss)`` does, with checkpoints, validation and
    callbacks. The model is a Pyro model (README "Your own model") or a pvae autoencoder.

    :param data: tensor ``(N, ...)``, or a ``torch.utils.data.Dataset`` whose items are the
        programs' positional arguments (``x`` or ``(x, t, y, ...)``).
    :param data_args: further tensors aligned with ``data``, passed positionally to the
        programs as by ``SVI.step(*args)``: ``fit(model, x, y)`` trains ``model(x, y)``.
    :param loss: the objective, with its settings (:mod:`pvae.inference.objectives`):
        ``ReparamELBO(num_particles, analytic_kl, beta)``, ``ScoreFunctionELBO``, ``IWAE(K,
        gradient)``, ``VIMCO(K)``, any Pyro ELBO (``TraceEnum_ELBO(max_plate_nesting=1)``), an
        autoencoder's ``AutoencoderLoss``; ``None``: the model's default (the one-particle
        ELBO; an autoencoder's reconstruction loss).
    :param val: validation data: ``x_val``, a tuple ``(x_val, *args)`` like the training
        arguments, or a ``Dataset``; its value (the one-particle ELBO, or the loss) is in the
        history's ``val_<name>`` column after every epoch.
    :param int num_epochs: total number of epochs (a resumed run continues up to it).
    :param optim: ``None`` (``Adam()``, lr 1e-3) or an optimizer object
        (:class:`~pvae.train.optim.Adam` with a learning-rate schedule).
    :param binarize: ``None`` or ``"dynamic"``: every mini-batch is a fresh Bernoulli draw of
        the [0, 1] intensities (Burda et al. 2015); validation data must already be binary.
    :param device: ``"auto"`` (where the model's parameters are, else the data's), ``"cpu"``,
        ``"cuda"``...; data follow the model's dtype (``model.double()`` trains in float64).
    :param int seed: seeds torch, numpy, Python and the shuffling: same seed, same history.
    :param checkpoint_dir: write ``checkpoint.pt`` (the whole :class:`TrainState`) there
        atomically after every epoch, holding the folder's lock (one writer); a folder with a
        checkpoint is refused unless ``resume``, which continues from it. A second ``fit`` on
        the same model continues from its weights with a fresh optimizer, schedule and seeds.
    :param callbacks: :class:`~pvae.train.Callback` objects for the loop's epoch-level events
        (they may stop the run); the checkpoint and progress bar are the loop's own.
    :param bool progress: a tqdm bar over the epochs.
    :param str step: how steps run: ``"auto"`` (data-parallel under a ``torch.distributed``
        process group, as under ``torchrun``; else captured as a CUDA graph where the device is
        CUDA and the objective allows it, eager otherwise), ``"eager"``, ``"cuda_graph"``
        (:class:`~pvae.train.steps.CapturedStep`) or ``"distributed"``
        (:mod:`pvae.train.distributed`).
    :param dict config: further settings recorded in checkpoints beside fit's own (which sit
        under ``"training"``: loss, optimizer, batch size, seed, binarization, epochs) and
        compared on resume.
    :returns: :class:`History`, per epoch ``train_<name>`` and ``val_<name>`` (``elbo``: nats
        per datapoint, higher is better, the training objective's value: the beta-weighted
        ELBO, the IWAE bound...; ``loss`` for autoencoders), ``beta``, ``seconds``,
        ``images_per_s``.
    :raises TypeError: a model that meets no contract, a loss that does not fit it, data that
        are not a tensor or ``Dataset``, or a keyword that moved (the message names where to).
    :raises ValueError: bad settings or data (NaN, outside the likelihood's support), a
        checkpoint of another configuration or number of processes, or in ``checkpoint_dir``
        without ``resume`` (``CheckpointError``), ``step="cuda_graph"`` where the step cannot
        be captured.
    :raises pvae.files.FolderInUseError: another process writes ``checkpoint_dir``.
    :raises TrainingDivergedError: the loss became NaN or inf; the last good checkpoint stays.
    """
    _refuse_removed(removed)
    num_epochs, batch_size, seed = _check_settings(num_epochs, batch_size, seed, binarize,
                                                   resume, checkpoint_dir, step)
    optim = Adam() if optim is None else optim
    objective = bind_objective(model, loss)
    device, dtype = placement(model, device, data)
    ddp = use_distributed(step, device)
    rank, world = (parallel.rank(), parallel.world_size()) if ddp else (0, 1)
    if ddp and device.type == "cuda":  # one GPU per process
        device = parallel.local_device(torch.device("cuda"))
        torch.cuda.set_device(device)
    if isinstance(model, nn.Module):
        model.to(device)
    objective.to(device)
    c = data_args[0] if len(data_args) == 1 else (tuple(data_args) or None)
    placed = dict(model=model, batch_size=batch_size, device=device, dtype=dtype, rank=rank,
                  world_size=world)
    train_data = TrainingData(data, c, binarize=binarize, **placed)
    val_data = _validation_data(val, data, c, placed)
    if ddp:
        check_batches(train_data)
    settings = {"loss": objective.config, "optim": optim.config, "batch_size": batch_size,
                "seed": seed, "binarize": binarize, **({"world_size": world} if ddp else {})}
    capture = _capture(step, device, objective, ddp)
    seed_all(seed)
    generator = torch.Generator().manual_seed(seed)
    probe = train_data.probe(seed, whole=objective.needs_whole_batches(*train_data.sample(seed)))
    params = objective.trainable_parameters(*probe)
    objective.trusted = True  # the data were checked once above
    if capture:
        objective.capturable_(probe[0])
    if ddp:  # lazy parts exist now (the probe built them): wrap, then per-rank noise
        replica = wrap(model, objective, params, device)
        seed_all(seed + rank)
    optimizer, scheduler = optim.build(params, capturable=capture, num_epochs=num_epochs,
                                       steps_per_epoch=train_data.steps_per_epoch)
    state = TrainState(model, objective, optimizer, scheduler, generator,
                       _record(config, settings), distributed=ddp)
    run_step = (DistributedStep(state, train_data, replica) if ddp else
                CapturedStep(state, train_data, fallback=step == "auto") if capture else None)
    # one writer: the folder is locked, and refused if it holds a checkpoint unless resume
    with checkpoint_folder(checkpoint_dir, resume=resume, distributed=ddp) as path:
        state.checkpoint = path
        state.callbacks = [*callbacks, *([Checkpoint(path)] if path else []),
                           *([ProgressBar()] if progress and rank == 0 else [])]
        if resume:
            state.resume(path, map_location=device)
        return run_epochs(state, train_data, num_epochs, val_data=val_data, step=run_step)


def _validation_data(val, data, c, placed: dict) -> TrainingData | None:
    """``val`` as :class:`TrainingData`: ``x_val``, ``(x_val, *args)`` or a ``Dataset``; with
    training tensors, the same arguments as training (a ``Dataset``'s items carry them)."""
    if val is None:
        return None
    if isinstance(val, (tuple, list)):
        if not val:
            raise ValueError("val is an empty tuple; pass x_val or (x_val, *args)")
        x_val, c_val = val[0], (val[1] if len(val) == 2 else (tuple(val[1:]) or None))
    else:
        x_val, c_val = val, None
    if isinstance(data, torch.Tensor) and isinstance(x_val, torch.Tensor) \
            and (c is None) != (c_val is None):
        raise ValueError("the programs take the same arguments in training and validation: "
                         + ("pass val=(x_val, *args) with the validation set's further "
                            "arguments" if c_val is None else
                            "val has further arguments, the training data none"))
    return TrainingData(x_val, c_val, name="val", **placed)


def _capture(step: str, device: torch.device, objective, distributed: bool) -> bool:
    """Whether the training step is captured as a CUDA graph (see ``fit``'s ``step``)."""
    if step not in ("auto", "cuda_graph"):
        return False
    why = capture_blocker(device, objective)
    if why is None and distributed:
        why = "data-parallel training (DistributedDataParallel) runs its steps eagerly"
    if why is not None and step == "cuda_graph":
        raise ValueError(f"step='cuda_graph', but {why}; pass step='auto' or 'eager'")
    if why is not None and device.type == "cuda":
        log.warning("pvae: training eagerly, not as a CUDA graph: %s", why)
    return why is None


def _record(config: dict | None, settings: dict) -> dict:
    """What the checkpoint records: the caller's ``config`` and fit's own under
    ``"training"``."""
    config = dict(config or {})
    if "training" in config:
        raise ValueError("config must not have a 'training' key: fit records its own "
                         "settings there")
    return {**config, "training": settings}


def _check_settings(num_epochs, batch_size, seed, binarize, resume, checkpoint_dir,
                    step) -> tuple:
    """The settings checked and converted (numpy numbers welcome)."""
    check_choice("step", step, STEPS)
    if binarize not in (None, "dynamic"):
        raise ValueError(f"fit's binarize must be None or 'dynamic', got {binarize!r} (static "
                         "binarization is done once when loading: pvae.data.load(binarize=...))")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    return (check_count("num_epochs", num_epochs, 0), check_count("batch_size", batch_size),
            check_count("seed", seed, 0))


#: Keywords that left fit's signature, and where each went.
_MOVED = {
    "estimator": "the loss object: loss=ReparamELBO(...), ScoreFunctionELBO(...), IWAE(...)",
    "num_particles": "the loss: loss=ReparamELBO(num_particles=K) or IWAE(K)",
    "analytic_kl": "the loss: loss=ReparamELBO(analytic_kl=True)",
    "beta": "the loss: loss=ReparamELBO(beta=...) (or any pvae loss's beta=)",
    "baseline": "the loss: loss=ScoreFunctionELBO(baseline=...)",
    "gradient": "the loss: loss=IWAE(K, gradient='dreg')",
    "data_plate": "the loss: loss=IWAE(K, data_plate=...) or ReparamELBO(data_plate=...)",
    "objective": "loss= (an autoencoder's: loss=AutoencoderLoss(...); fit(ae, x) uses its "
                 "default)",
    "lr": "the optimizer: optim=Adam(lr=...)",
    "lr_decay": "the optimizer: optim=Adam(lr, schedule=ExponentialLR(gamma))",
    "x_val": "val=x_val (or val=(x_val, *args) with further arguments)",
    "c_val": "val=(x_val, c_val)",
    "c": "the positional arguments: fit(model, x, c) as SVI.step(x, c)",
    "cuda_graph": "step='cuda_graph' | 'eager' | 'auto'",
    "distributed": "step='distributed' | 'auto'",
}


def _refuse_removed(removed: dict) -> None:
    """One line naming where a keyword of the old ``fit`` went (README "Training")."""
    for key in removed:
        if key in _MOVED:
            raise TypeError(f"fit no longer takes {key}=: it moved to {_MOVED[key]} (README "
                            "'Training: losses, optimizers, callbacks')")
        raise TypeError(f"fit got an unexpected keyword argument {key!r}")
