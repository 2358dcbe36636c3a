"""``fit``: training by stochastic variational inference for any model meeting the model
contract, assembled from the engine's parts."""

from __future__ import annotations

import torch
from torch import nn

from pvae import parallel
from pvae.contract import check_model, placement
from pvae.inference import (
    CAPTURABLE,
    LossEstimator,
    ReparamEstimator,
    SVIObjective,
    make_estimator,
)
from pvae.train.checkpoint import checkpoint_folder
from pvae.train.data import TrainingData
from pvae.train.distributed import DistributedStep, check_batches, use_distributed, wrap
from pvae.train.history import History
from pvae.train.loop import run_epochs
from pvae.train.optim import make_adam
from pvae.train.state import TrainState, seed_all
from pvae.train.steps import CapturedStep, capture_blocker, log
from pvae.validation import check_count, check_float

__all__ = ["fit"]


def fit(model, x_train, *data_args, c=None, x_val=None, c_val=None, num_epochs: int,
        batch_size: int = 256, lr: float = 1e-3, lr_decay: float = 1.0,
        estimator: str = "reparam", analytic_kl: bool = False, num_particles: int = 1,
        beta=1.0, baseline: str | None = None, gradient: str = "standard",
        device="auto", seed: int = 0,
        binarize: str | None = None, checkpoint_dir=None, resume: bool = False,
        progress: bool = True, config: dict | None = None, cuda_graph="auto",
        distributed="auto", objective=None, loss=None, data_plate: str | None = None
        ) -> History:
    r"""Train ``model`` by SVI: maximize the ELBO (or the IWAE bound) with Adam over
    mini-batches.

    Works for any object with ``model(x, c=None)`` and ``guide(x, c=None)`` Pyro programs
    (the model contract, README "Your own model"), built-in or user-written. The loss is the
    estimator's surrogate divided by the batch size (see :mod:`pvae.inference.objectives`:
    Pyro's ``Trace_ELBO`` / ``TraceMeanField_ELBO``, ``TraceGraph_ELBO`` with score-function
    gradients, or the IWAE bound), differentiated by autograd and stepped by
    ``torch.optim.Adam``; parameters are the model's ``nn.Module`` parameters plus any Pyro
    param-store parameters its programs use, and the objective's own (neural baselines). Adam uses its fused
    kernel where torch has one for the parameters' device (CPU from torch 2.4, CUDA), and
    dynamic binarization compares uniforms with ``x`` (:func:`pvae.data.bernoulli_sample`):
    per-step costs outside the Pyro program that a default plain PyTorch loop pays in full.

    Before the first step the objective runs once, with Pyro's validation on, on a probe batch
    (:meth:`~pvae.train.data.TrainingData.probe`): it creates lazily built parts (lazy modules,
    Pyro autoguides' parameters, neural baselines) and finds the parameters to train. With
    full batches (``batch_size >= N``) the probe is the batch that training sees, in stored
    order, so guides with per-datapoint parameters (Pyro's ``AutoNormal`` or
    ``AutoDiagonalNormal`` as guide, ``pyro.param`` of shape ``(N, ...)``) train as under
    Pyro's ``SVI``; with mini-batches it is ``min(batch_size, 8)`` datapoints, and such guides
    index their parameters by datapoint through plate subsampling
    (``pyro.plate("data", N, subsample=idx)``, ``idx`` passed as ``c``). The loop runs with
    validation off, since the whole dataset is checked once up front and NaN/inf losses stop
    training here.

    ``fit`` assembles the parts: :class:`~pvae.train.data.TrainingData` (checks, placement,
    batches), :class:`~pvae.inference.SVIObjective` (estimator, beta, parameters),
    :class:`~pvae.train.state.TrainState` (everything a checkpoint holds) and
    :func:`~pvae.train.loop.run_epochs` (the loop).

    :param model: an object with ``model`` and ``guide`` methods (ideally an ``nn.Module``).
    :param x_train: tensor ``(N, D)``, or a ``torch.utils.data.Dataset`` yielding ``x``,
        ``(x, c)`` or ``(x, t, y, ...)`` (streamed through a ``DataLoader``). A
        :class:`pvae.data.Splits` is refused with a message naming the tensors to pass.
    :param data_args: further tensors aligned with ``x_train``, positionally, as with Pyro's
        ``SVI.step(*args)``: ``fit(model, x, t, y)`` trains ``model(x, t, y)`` (the same as
        ``c=(t, y)``); each mini-batch slices them alike.
    :param c: conditioning tensor ``(N,)`` or ``(N, c_dim)`` for conditional models, or any
        tensor aligned with ``x_train`` that the programs take as their second argument (e.g.
        ``torch.arange(N)``, the indices that ``pyro.plate("data", N, subsample=idx)`` needs
        for per-datapoint parameters), or a tuple of such tensors (``model(x, *c)``).
    :param c_val: the validation set's ``c``, of the same form (needed with ``x_val`` when
        ``c`` or further data are given).
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
    :param device: ``"auto"`` (where the model's parameters are; for a model without
        ``nn.Module`` parameters, where ``x_train`` is), ``"cpu"``, ``"cuda"``...; the model is
        moved there and data follow the model's dtype (``model.double()`` trains in float64).
    :param int seed: seeds Pyro, torch, numpy and the shuffling generator: the same seed and
        data give an identical history on CPU.
    :param binarize: ``None`` or ``"dynamic"``: re-sample binary pixels from the [0, 1]
        intensities of every mini-batch (Burda et al. 2015). ``x_val`` must already be binary.
    :param checkpoint_dir: if given, ``checkpoint.pt`` (the :class:`TrainState`: model,
        objective state such as score-function baselines, optimizer, epoch, RNG states, history,
        ``config``) is written there atomically after every epoch. The folder is created if
        missing and locked for the whole run (one writer: a second process gets
        :class:`pvae.files.FolderInUseError`); one that holds a checkpoint already is refused
        unless ``resume``.
    :param bool resume: continue from ``checkpoint_dir/checkpoint.pt`` if it exists.
    :param bool progress: show a tqdm bar with the running ELBO.
    :param dict config: extra configuration saved in checkpoints and checked on resume.
    :param cuda_graph: ``"auto"`` (default), ``True`` or ``False``: capture the whole training
        step (binarization, the model and guide as Pyro programs, backward, Adam) once as a CUDA
        graph and replay it for every full batch (:class:`~pvae.train.steps.CapturedStep`); the
        objective is then computed from pvae's traces without host synchronization (same value
        and gradient as Pyro's ELBO), and a non-finite loss is detected every 100 steps and at
        epoch ends. ``"auto"`` captures on CUDA when the estimator allows it (``reparam``,
        ``iwae``) and otherwise trains eagerly, saying why in one logged line on CUDA.
    :param distributed: ``"auto"`` (default: data-parallel when a ``torch.distributed``
        process group is initialized, as under ``torchrun``), ``True`` (initialize the group
        from ``torchrun``'s environment if needed) or ``False`` (train in this process alone).
        Data-parallel training (:mod:`pvae.train.distributed`) wraps the model and objective in
        ``DistributedDataParallel``; each global mini-batch of ``batch_size`` datapoints is
        split over the processes, and the loss is scaled so that the averaged gradient is that
        of the global batch's ELBO; each process draws its noise from ``seed + rank``. History
        rows are all-reduced (the same on every rank), checkpoints are written by rank 0, and
        a run resumes only with the same number of processes. On CUDA each process uses
        ``cuda:LOCAL_RANK``; CUDA-graph capture is not combined with it. The model's
        trainable tensors must be ``nn.Module`` parameters (``pyro.param`` values are refused).
    :param objective: ``None`` (SVI on ``model``'s programs, built from the estimator settings
        above), or any ``nn.Module`` that maps a batch to ``(value, loss)`` per datapoint, with
        ``set_step(step)``, ``metrics()`` and ``trainable_parameters(*batch)`` — e.g.
        :class:`pvae.autoencoders.AutoencoderObjective`, which trains a deterministic
        autoencoder (not a Pyro program) with the same loop, checkpoints and history. Its
        ``config`` (where it has one) joins the checkpoint's settings; its ``value_name``
        names the history's columns; the estimator settings must keep their defaults; it is
        also the validation objective (in ``eval()`` mode); the step runs eagerly.
    :param loss: ``None`` (the estimator settings above), or any Pyro ELBO object
        (``pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)`` for enumerated discrete latents,
        ``TraceCausalEffect_ELBO``, ``Trace_ELBO(num_particles=...)``...) or a callable
        ``loss(model, guide, *args) -> loss`` (a 0-dim tensor to minimize, nats summed over the
        batch), trained in place of the built-in estimators
        (:class:`~pvae.inference.LossEstimator`); the estimator settings must then keep their
        defaults, ``beta`` still applies, the step runs eagerly, and the validation value is
        the same loss, negated.
    :param data_plate: the name of the model's data plate, where the IWAE objective (or the
        captured ELBO) cannot tell which of several plates of the batch's size it is (by
        default found: the plate around the observed sites with the batch's size).
    :returns: :class:`History` with, per epoch, ``train_elbo`` (the training objective: the
        beta-weighted ELBO, the K-sample IWAE bound for ``iwae``, or minus ``loss``) and
        ``val_elbo`` in nats per datapoint, ``beta``, ``seconds`` and ``images_per_s``. Per
        datapoint and unscaled: each step's value (minus the surrogate loss's estimate, summed
        over the batch with the model's scales) is divided by the batch size and by the scale
        of the model's observed sites (``N / batch`` for ``pyro.plate("data", N,
        subsample=...)``, ``s`` for ``poutine.scale(scale=s)``), and the epoch's value is the
        batch-size-weighted mean of its steps'; the loss that is differentiated is divided
        alike (:class:`~pvae.inference.SVIObjective`).
    :raises TypeError: ``model`` does not meet the model contract, ``x_train`` is not a
        tensor or ``Dataset``, or ``loss`` is neither a Pyro ELBO with ``differentiable_loss``
        nor a callable.
    :raises ValueError: bad arguments or data (NaN, outside the likelihood's support), both
        ``objective`` and ``loss``, estimator settings beside ``loss`` or ``objective``, a
        checkpoint written with another configuration or number of processes (or any
        checkpoint in ``checkpoint_dir`` without ``resume``: a :class:`CheckpointError`), or
        ``cuda_graph=True`` where the step cannot be captured (not on CUDA, score-function
        estimator, data-parallel training); with several processes, a mini-batch with fewer
        datapoints than processes or param-store parameters; ``distributed=True`` outside
        ``torchrun`` without a process group.
    :raises TrainingDivergedError: the loss became NaN or inf; the message names the epoch and
        step, and the last good checkpoint is left intact.
    :raises pvae.files.WriteError: a checkpoint cannot be written (full disk, read-only file
        system, its folder deleted or moved meanwhile: :class:`pvae.files.FolderLostError`);
        the message names the last good checkpoint's epoch.
    """
    if data_args:
        if c is not None:
            raise ValueError("fit takes the data after x_train either positionally "
                             "(fit(model, x, t, y)) or as c, not both")
        c = data_args[0] if len(data_args) == 1 else tuple(data_args)
    if objective is None:
        check_model(model, "fit")
        if loss is not None:
            _check_unused("a loss", "the default SVI estimator; a Pyro ELBO takes num_particles "
                          "itself", estimator, analytic_kl,
                          num_particles, 1.0, baseline, gradient)
    else:
        if loss is not None:
            raise ValueError("fit takes an objective or a loss, not both: an objective already "
                             "defines what is minimized")
        _check_objective(objective, estimator, analytic_kl, num_particles, beta, baseline,
                         gradient, cuda_graph)
    num_epochs, batch_size, lr, lr_decay, seed = _check_settings(
        num_epochs, batch_size, lr, lr_decay, beta, seed, binarize, resume, checkpoint_dir)
    device, dtype = placement(model, device, x_train)
    ddp = use_distributed(distributed, device)
    rank, world = (parallel.rank(), parallel.world_size()) if ddp else (0, 1)
    if ddp and device.type == "cuda":  # one GPU per process
        device = parallel.local_device(torch.device("cuda"))
        torch.cuda.set_device(device)
    if isinstance(model, nn.Module):
        model.to(device)
    data = TrainingData(x_train, c, model=model, batch_size=batch_size, device=device,
                        dtype=dtype, binarize=binarize, rank=rank, world_size=world)
    if (isinstance(x_train, torch.Tensor) and isinstance(x_val, torch.Tensor)
            and (c is None) != (c_val is None)):  # (a Dataset's items may carry c)
        raise ValueError("the programs take the same arguments in training and validation: "
                         + ("pass c_val for x_val, of the form of c" if c_val is None else
                            "c_val was given without c for the training data"))
    val_data = None if x_val is None else TrainingData(
        x_val, c_val, model=model, batch_size=batch_size, device=device, dtype=dtype,
        name="x_val", rank=rank, world_size=world)
    if ddp:
        check_batches(data)
    settings = {"batch_size": batch_size, "lr": lr, "lr_decay": lr_decay, "seed": seed,
                "binarize": binarize}
    if objective is None and loss is not None:
        estimated = LossEstimator(loss)
        capture = _capture(cuda_graph, device, f"loss={estimated.name}", ddp)
        settings.update({"loss": _loss_config(loss, estimated.name),
                         "beta": beta if not callable(beta) else repr(beta)})
        objective = SVIObjective(model, estimated, beta)
        val_objective = SVIObjective(model, estimated)
    elif objective is None:
        capture = _capture(cuda_graph, device, estimator, ddp)
        objective, val_objective = _svi_objectives(
            model, settings, estimator=estimator, num_particles=num_particles,
            analytic_kl=analytic_kl, baseline=baseline, gradient=gradient, beta=beta,
            capture=capture, data_plate=data_plate)
    else:
        settings["objective"] = {"name": type(objective).__name__,
                                 **getattr(objective, "config", {})}
        capture, val_objective = False, objective
        objective.to(device)
    settings.update(config or {})
    if ddp:
        settings["world_size"] = world
    seed_all(seed)
    generator = torch.Generator().manual_seed(seed)
    probe = data.probe(seed)
    params = objective.trainable_parameters(*probe)
    objective.trusted = True  # the data were checked once above
    if capture:
        objective.capturable_(probe[0])
    step = None
    if ddp:  # lazy parts exist now (the probe built them): wrap, then per-rank noise
        replica = wrap(model, objective, params, device)
        seed_all(seed + rank)
    state = TrainState(model, objective, make_adam(params, lr, capturable=capture), lr_decay,
                       generator, settings, distributed=ddp)
    if ddp:
        step = DistributedStep(state, data, replica)
    elif capture:
        step = CapturedStep(state, data, fallback=cuda_graph == "auto")
    # issue 28: the folder is locked (one writer), and refused if it holds another run's
    # checkpoint unless resume, for as long as the run writes it
    with checkpoint_folder(checkpoint_dir, resume=resume, distributed=ddp) as checkpoint:
        if resume:
            state.resume(checkpoint, map_location=device)
        return run_epochs(state, data, num_epochs, checkpoint=checkpoint,
                          progress=progress and rank == 0, val_objective=val_objective,
                          val_data=val_data, step=step)


def _svi_objectives(model, settings: dict, *, estimator, num_particles, analytic_kl, baseline,
                    gradient, beta, capture, data_plate):
    """The SVI training objective and the validation one (the ELBO, one particle); records
    their settings in ``settings``."""
    settings.update({"estimator": estimator, "analytic_kl": analytic_kl,
                     "num_particles": num_particles,
                     "beta": beta if not callable(beta) else repr(beta),
                     "baseline": baseline, "gradient": gradient})
    if data_plate is not None:
        settings["data_plate"] = data_plate
    objective = SVIObjective(model, make_estimator(
        estimator, num_particles=num_particles, analytic_kl=analytic_kl, baseline=baseline,
        gradient=gradient, capturable=capture, data_plate=data_plate), beta)
    return objective, SVIObjective(model, ReparamEstimator(1, analytic_kl))


def _loss_config(loss, name: str) -> dict:
    """What identifies a given loss in the checkpoint's settings: its ``name`` and, for Pyro's
    ELBOs, their numeric options."""
    config = {"name": name}
    for key in ("num_particles", "max_plate_nesting", "max_iarange_nesting",
                "vectorize_particles", "strict_enumeration_warning"):
        value = getattr(loss, key, None)
        if isinstance(value, (bool, int, float)) and not (isinstance(value, float)
                                                          and value != value):
            config[key] = value
    return config


def _capture(cuda_graph, device: torch.device, estimator: str, distributed: bool) -> bool:
    """Whether the training step is captured as a CUDA graph (see ``fit``'s ``cuda_graph``)."""
    if cuda_graph not in ("auto", True, False):
        raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
    if cuda_graph is False:
        return False
    why = capture_blocker(device, estimator, CAPTURABLE)
    if why is None and distributed:
        why = "data-parallel training (DistributedDataParallel) runs its steps eagerly"
    if why is not None and cuda_graph is True:
        raise ValueError(f"cuda_graph=True, but {why}; pass cuda_graph='auto' or False")
    if why is not None and device.type == "cuda":
        log.warning("pvae: training eagerly, not as a CUDA graph: %s", why)
    return why is None


def _check_objective(objective, estimator, analytic_kl, num_particles, beta, baseline, gradient,
                     cuda_graph) -> None:
    """A given objective: an ``nn.Module`` with the engine's methods, and no SVI settings that
    it would ignore."""
    needed = ("set_step", "metrics", "trainable_parameters")
    if not isinstance(objective, nn.Module) or not all(
            callable(getattr(objective, m, None)) for m in needed):
        raise TypeError(f"fit's objective must be an nn.Module mapping a batch to (value, loss) "
                        f"with {', '.join(needed)} (e.g. pvae.autoencoders.AutoencoderObjective), "
                        f"got {type(objective).__name__}")
    _check_unused("an objective", "the default SVI objective", estimator, analytic_kl,
                  num_particles, beta, baseline, gradient)
    if cuda_graph is True:
        raise ValueError("cuda_graph=True is for the SVI objective; a given objective trains "
                         "eagerly: pass cuda_graph='auto' or False")


def _check_unused(given_what: str, configures: str, estimator, analytic_kl, num_particles,
                  beta, baseline, gradient) -> None:
    """Refuse estimator settings that a given objective or loss would ignore."""
    given = {"estimator": (estimator, "reparam"), "analytic_kl": (analytic_kl, False),
             "num_particles": (num_particles, 1), "beta": (beta, 1.0),
             "baseline": (baseline, None), "gradient": (gradient, "standard")}
    ignored = [k for k, (value, default) in given.items() if value != default]
    if ignored:
        raise ValueError(f"fit was given {given_what}, which ignores {ignored}: drop them (they "
                         f"configure {configures})")


def _check_settings(num_epochs, batch_size, lr, lr_decay, beta, seed, binarize, resume,
                    checkpoint_dir) -> tuple:
    """The numeric settings checked and converted (numpy numbers welcome)."""
    settings = (check_count("num_epochs", num_epochs, 0), check_count("batch_size", batch_size),
                check_float("lr", lr, minimum=0.0, strict=True),
                check_float("lr_decay", lr_decay, minimum=0.0, maximum=1.0, strict=True),
                check_count("seed", seed, 0))
    if not callable(beta):
        check_float("beta", beta, minimum=0.0)
    if binarize not in (None, "dynamic"):
        raise ValueError(f"fit's binarize must be None or 'dynamic', got {binarize!r} (static "
                         "binarization is done once when loading: pvae.data.load(binarize=...))")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    return settings
