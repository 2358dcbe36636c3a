"""``pvae train``: train a model on a dataset (a built-in one or your own) and write a run
folder. The flags come in groups (data, model, objective, optimization, run), a flag that does
not apply to the chosen model, estimator or schedule is refused naming what it belongs to,
and ``--config FILE`` reads them from a file (:mod:`pvae.cli.configs`)."""

from __future__ import annotations

import argparse
import inspect
import os

import torch

from pvae import data, parallel, plots
from pvae.contract import resolve_device
from pvae.inference import BASELINES, GRADIENTS, LOSSES, make_schedule
from pvae.loggers import LOGGERS
from pvae.models import LIKELIHOODS, NETWORKS
from pvae.nn import ACTIVATIONS, COVARIANCES
from pvae.runs import (
    BEST_NAME,
    REGISTRY,
    RunError,
    WriteConfig,
    load_data,
    new_model,
    prepare_run,
    run_record,
    stop_reason,
)
from pvae.train import SCHEDULES, Adam, AdamW, BestCheckpoint, EarlyStopping, HistoryCSV, fit

from . import autoencoders
from .common import count, likelihood_scale, number

__all__ = ["MODEL_FLAGS", "OPTIMIZERS", "SCHEDULE_FLAGS", "TRAINABLE", "add_parser",
           "make_optim", "model_arguments", "run", "svi_loss"]

#: The models ``pvae train`` builds (``pvae ppca`` trains PPCA): VAEs and the deterministic
#: autoencoders (:data:`pvae.autoencoders.AUTOENCODERS`).
TRAINABLE = ("vae", "cvae", "hvae", "ae", "linear-ae", "mae")
VAES, AUTOENCODERS = ("vae", "cvae", "hvae"), ("ae", "linear-ae", "mae")

#: Flags that apply to some models only: ``dest -> (models, default)``. A flag given for
#: another model is refused, naming the models it belongs to; one not given takes the default
#: (``None``: the model's own, e.g. hidden widths 400, or 100 50 for hvae).
MODEL_FLAGS = {
    "latent_dim": (("vae", "cvae", "ae", "linear-ae", "mae"), 50),
    "latent_dims": (("hvae",), [100, 50]),
    "hidden_dims": (("vae", "cvae", "hvae", "ae"), None),
    "activation": (("vae", "cvae", "hvae", "ae"), None),
    "network": (("vae", "cvae"), "mlp"),
    "guide": (("vae", "cvae"), "diagonal"),
    "prior": (("cvae",), "standard"),
    "likelihood": (VAES, "bernoulli"),
    "likelihood_scale": (VAES, "learned"),
    "estimator": (VAES, "reparam"),
    "num_particles": (VAES, None),
    "analytic_kl": (VAES, None),
    "beta": (VAES, 1.0),
    "kl_warmup_steps": (VAES, 0),
    "kl_cycle_steps": (VAES, 0),
    "baseline": (VAES, None),
    "gradient": (VAES, None),
    "loss": (("ae", "linear-ae"), "mse"),
    "code_activation": (("ae",), "identity"),
    "sparsity": (AUTOENCODERS, "none"),
    "sparsity_weight": (AUTOENCODERS, 1e-3),
    "target_activation": (AUTOENCODERS, 0.05),
    "corruption": (AUTOENCODERS, "none"),
    "noise_scale": (AUTOENCODERS, 0.3),
    "mask_fraction": (AUTOENCODERS, 0.3),
    "contractive": (AUTOENCODERS, 0.0),
    "patch_size": (("mae",), 7),
    "mask_ratio": (("mae",), 0.75),
}
#: ``--optimizer`` names.
OPTIMIZERS = {"adam": Adam, "adamw": AdamW}
#: The schedules' options as flags: ``dest -> the schedule arguments it sets`` (the first that
#: the chosen ``--lr-schedule`` takes).
SCHEDULE_FLAGS = {"lr_decay": ("gamma", "factor"), "lr_step_size": ("step_size",),
                  "warmup_steps": ("warmup_steps",), "min_lr": ("min_lr",),
                  "plateau_patience": ("patience",)}
#: The data flags that name a dataset of your own: ``dest -> dataset``.
OWN_DATA = {"data_file": "data-file", "image_folder": "image-folder"}


def add_parser(sub) -> None:
    t = sub.add_parser(
        "train", help="train a model on a dataset and write a run folder",
        description="Train a model and write a run folder (config.json, checkpoint.pt, best.pt, "
        "history.csv, figures/). A flag that does not apply to the chosen --model, --estimator "
        "or --lr-schedule is refused; --config FILE reads flags from a JSON or YAML file (or a "
        "run's config.json), and flags given here override it.")
    d = t.add_argument_group("data")
    d.add_argument("--dataset", default=None, choices=sorted(data.DATASETS),
                   help="a built-in dataset (default fashion-mnist); --data-file and "
                   "--image-folder choose your own")
    d.add_argument("--data-dir", default=None, help="folder with the IDX files")
    d.add_argument("--download", action=argparse.BooleanOptionalAction, default=False,
                   help="download the dataset's official files if they are found nowhere")
    d.add_argument("--data-file", default=None, metavar="PATH",
                   help="your own data: .npy (x), .npz or .pt (x and optional y, or x_train and "
                   "x_test); uint8 pixels are divided by 255")
    d.add_argument("--image-folder", default=None, metavar="DIR",
                   help="your own images: DIR/*.png|jpg, or DIR/CLASS/*.png for labels "
                   "(Pillow: pip install 'pvae-ppl[images]')")
    d.add_argument("--image-size", type=count(1), nargs="+", default=None, metavar="N",
                   help="--image-folder: resize every image to H W (or one side N)")
    d.add_argument("--test-fraction", type=number(0.0, strict=True), default=None,
                   help="your own data without a given split: the seeded test share "
                   "(default 0.2)")
    d.add_argument("--binarize", default=None, choices=["none", "static", "dynamic"],
                   help="default: dynamic for the VAEs, none for the autoencoders")
    d.add_argument("--num-train", type=count(0), default=0,
                   help="use the first N training images (0 = all)")
    d.add_argument("--num-val", type=count(0), default=1000,
                   help="validation value on the first N test images each epoch (0 = none; "
                   "with validation data best.pt keeps the best epoch)")
    d.add_argument("--condition", default="none", choices=["none", "label", *data.CONDITIONS],
                   help="cvae: condition on the class label or on part of the image")

    m = t.add_argument_group("model")
    m.add_argument("--model", default="vae", choices=TRAINABLE)
    m.add_argument("--latent-dim", type=count(1), default=None,
                   help="latent size, 50 (the code size of an autoencoder; not hvae)")
    m.add_argument("--latent-dims", type=count(1), nargs="+", default=None,
                   help="hvae: widths of z1, z2, ... (Burda et al. 2015: 100 50)")
    m.add_argument("--hidden-dims", type=count(1), nargs="+", default=None,
                   help="hidden widths (default 400; hvae: one per stochastic layer, 100 50; not "
                   "linear-ae, mae)")
    m.add_argument("--network", default=None, choices=NETWORKS,
                   help="vae, cvae (--condition label): fully connected (mlp, the default) or "
                   "convolutional encoder and decoder")
    m.add_argument("--guide", default=None, choices=COVARIANCES,
                   help="vae, cvae: diagonal (default) or full covariance of q(z | x)")
    m.add_argument("--likelihood", default=None, choices=sorted(LIKELIHOODS),
                   help="the VAEs' p(x | z) (default bernoulli)")
    m.add_argument("--likelihood-scale", default=None, type=likelihood_scale,
                   help="'learned' (per pixel, the default), 'decoder' (a decoder output per "
                   "pixel and image) or a fixed float (gaussian/laplace)")
    m.add_argument("--prior", default=None, choices=["standard", "learned"],
                   help="cvae: N(0, I) (default) or a learned p(z | c)")
    m.add_argument("--activation", default=None, choices=sorted(ACTIVATIONS),
                   help="hidden activation (default: relu; hvae: tanh)")
    o = t.add_argument_group("objective", "the VAEs' loss (--estimator and its options; "
                             "pvae.inference.LOSSES) or the autoencoders' penalties")
    o.add_argument("--estimator", default=None, choices=sorted(LOSSES),
                   help="reparam (ReparamELBO, the default), score (ScoreFunctionELBO), iwae "
                   "(IWAE), vimco (VIMCO)")
    o.add_argument("--num-particles", type=count(1), default=None,
                   help="samples per datapoint and step (K; default: the estimator's own, "
                   "1 for reparam and score, 5 for iwae and vimco)")
    o.add_argument("--analytic-kl", action=argparse.BooleanOptionalAction, default=None,
                   help="closed-form KL (--estimator reparam)")
    o.add_argument("--beta", type=number(0.0), default=None, help="KL weight (beta-VAE), 1")
    o.add_argument("--kl-warmup-steps", type=count(0), default=None,
                   help="anneal beta linearly from 0 over this many steps")
    o.add_argument("--kl-cycle-steps", type=count(0), default=None,
                   help="cyclical annealing of beta with this period (steps)")
    o.add_argument("--baseline", default=None, choices=["none", *[b for b in BASELINES if b]],
                   help="score-function baseline (--estimator score)")
    o.add_argument("--gradient", default=None, choices=list(GRADIENTS),
                   help="IWAE gradient: standard or dreg (--estimator iwae)")
    autoencoders.add_train_arguments(m, o)

    p = t.add_argument_group("optimization")
    p.add_argument("--num-epochs", type=count(0), default=10)
    p.add_argument("--batch-size", type=count(1), default=256)
    p.add_argument("--optimizer", default="adam", choices=sorted(OPTIMIZERS),
                   help="Adam or AdamW (decoupled weight decay)")
    p.add_argument("--lr", type=number(0.0, strict=True), default=1e-3,
                   help="the (initial) learning rate")
    p.add_argument("--lr-schedule", default=None, choices=list(SCHEDULES),
                   help="constant (the default), exponential (--lr-decay per epoch), step "
                   "(--lr-decay every --lr-step-size epochs), cosine (to --min-lr, after "
                   "--warmup-steps of linear warm-up), plateau (--lr-decay after "
                   "--plateau-patience epochs without a better validation value)")
    p.add_argument("--lr-decay", type=number(0.0, strict=True), default=None, metavar="FACTOR",
                   help="exponential, step (default 0.1), plateau (default 0.5): the factor")
    p.add_argument("--lr-step-size", type=count(1), default=None, metavar="EPOCHS",
                   help="step: epochs between decays")
    p.add_argument("--warmup-steps", type=count(0), default=None,
                   help="cosine: optimizer steps of linear warm-up (default 0)")
    p.add_argument("--min-lr", type=number(0.0), default=None,
                   help="cosine: the final learning rate; plateau: the lowest (default 0)")
    p.add_argument("--plateau-patience", type=count(0), default=None, metavar="EPOCHS",
                   help="plateau: epochs without improvement before a decay (default 2)")
    p.add_argument("--clip-norm", type=number(0.0, strict=True), default=None,
                   help="clip the global gradient norm to this before every step")
    p.add_argument("--weight-decay", type=number(0.0), default=None,
                   help="L2 penalty (adam, default 0) or decoupled decay (adamw, default 0.01)")
    p.add_argument("--early-stopping", type=count(1), default=None, metavar="PATIENCE",
                   help="stop when the validation value (ELBO, or an autoencoder's loss) has not "
                   "improved for PATIENCE epochs (paused while beta warms up)")
    p.add_argument("--min-delta", type=number(0.0), default=None, metavar="NATS",
                   help="--early-stopping: the smallest improvement that counts (default 0)")

    r = t.add_argument_group("run")
    r.add_argument("--out", default=None, help="run folder, e.g. runs/NAME (required)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out")
    r.add_argument("--config", default=None, metavar="FILE",
                   help="read flags from a JSON or YAML file, or a run's config.json (to re-run "
                   "it); flags given on the command line override the file")
    r.add_argument("--seed", type=count(0), default=0)
    r.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda...")
    r.add_argument("--cuda-graph", default="auto", choices=["auto", "on", "off"],
                   help="capture the training step as a CUDA graph (auto: on CUDA when the "
                   "estimator allows it)")
    r.add_argument("--logger", action="append", default=None, choices=sorted(LOGGERS),
                   help="also log to TensorBoard (RUN/tensorboard) or MLflow (RUN/mlruns); "
                   "repeat for both")
    r.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------
# flags -> data, model, loss, optimizer


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _models(models) -> str:
    if tuple(models) == VAES:
        return "the VAEs (--model vae, cvae, hvae)"
    if tuple(models) == AUTOENCODERS:
        return "the autoencoders (--model ae, linear-ae, mae)"
    return f"--model {', '.join(models)}"


def check_flags(args) -> None:
    """Fill in the defaults of the model-specific flags (:data:`MODEL_FLAGS`) and refuse one
    that was given for a model it does not apply to, and the data and run flags that do not
    fit together.

    :raises RunError: naming the flag and the models (or datasets) it belongs to.
    """
    if args.out is None:
        raise RunError("--out is required: the run folder, e.g. --out runs/NAME")
    for dest, (models, default) in MODEL_FLAGS.items():
        value = getattr(args, dest)
        if value is None:
            setattr(args, dest, default)
        elif args.model not in models:
            raise RunError(f"{_flag(dest)} applies to {_models(models)}, not --model "
                           f"{args.model}")
    if args.min_delta is not None and args.early_stopping is None:
        raise RunError("--min-delta applies to --early-stopping PATIENCE")
    _choose_dataset(args)


def _choose_dataset(args) -> None:
    """``args.dataset`` from ``--dataset``, ``--data-file`` or ``--image-folder``, and the
    options of the chosen dataset (others refused)."""
    own = [dest for dest in OWN_DATA if getattr(args, dest) is not None]
    if len(own) > 1:
        raise RunError("--data-file and --image-folder: choose one")
    if own:
        implied = OWN_DATA[own[0]]
        if args.dataset not in (None, implied):
            raise RunError(f"--dataset {args.dataset} and {_flag(own[0])}: choose one (your own "
                           "data replace the built-in dataset)")
        args.dataset = implied
    elif args.dataset in OWN_DATA.values():
        dest = next(k for k, v in OWN_DATA.items() if v == args.dataset)
        raise RunError(f"--dataset {args.dataset} needs {_flag(dest)}")
    args.dataset = args.dataset or "fashion-mnist"
    takes = data.dataset_options(args.dataset)
    for dest in ("image_size", "test_fraction"):
        if getattr(args, dest) is not None and dest not in takes:
            owners = [f"{_flag(k)}" for k, v in OWN_DATA.items() if dest in
                      data.dataset_options(v)]
            raise RunError(f"{_flag(dest)} applies to {' and '.join(owners)}, not --dataset "
                           f"{args.dataset}")
    if args.image_size is not None and len(args.image_size) > 2:
        raise RunError(f"--image-size takes H W or one side N, got {len(args.image_size)} "
                       "numbers")


def source(args) -> str:
    """The data in words: a built-in dataset's name, or the path of your own."""
    own = next((getattr(args, dest) for dest in OWN_DATA if getattr(args, dest)), None)
    return args.dataset if own is None else str(own)


def data_config(args, binarize) -> dict:
    """The data settings that ``config.json`` records (paths of your own data made
    absolute)."""
    config = {"dataset": args.dataset, "data_dir": args.data_dir, "download": args.download,
              "binarize": binarize, "seed": args.seed, "num_train": args.num_train,
              "num_val": args.num_val, "condition": args.condition}
    for dest in data.dataset_options(args.dataset):
        value = getattr(args, dest)
        config[dest] = os.path.abspath(value) if dest in OWN_DATA and value else value
    return config


def model_arguments(args, ds: data.Splits) -> dict:
    """The constructor arguments of ``--model`` (a VAE) for this dataset and ``--condition``.

    :raises RunError: a conditional model without a condition, or the other way round.
    """
    kwargs = dict(x_dim=ds.x_dim, likelihood=args.likelihood,
                  likelihood_scale=args.likelihood_scale)
    if args.activation:
        kwargs["activation"] = args.activation
    if args.model != "cvae" and args.condition != "none":
        raise RunError(f"--condition {args.condition} needs --model cvae")
    if args.model == "hvae":
        return {**kwargs, "latent_dims": args.latent_dims,
                "hidden_dims": args.hidden_dims or [100, 50]}
    kwargs.update(latent_dim=args.latent_dim, hidden_dims=args.hidden_dims or [400],
                  guide=args.guide)
    if args.network == "conv":
        if not ds.image_shape:
            raise RunError(f"--network conv needs images; {args.dataset} has no image_shape")
        if len(ds.image_shape) != 2:
            raise RunError(f"--network conv needs one-channel images; {args.dataset}'s are "
                           f"{tuple(ds.image_shape)}: use --network mlp")
        if args.condition not in ("none", "label"):
            raise RunError(f"--network conv needs whole images as x; with --condition "
                           f"{args.condition} x is part of an image: use --network mlp")
        kwargs.update(network="conv", image_shape=list(ds.image_shape))
    if args.model == "vae":
        return kwargs
    if args.condition == "none":
        raise RunError("--model cvae needs --condition label, top-half or quadrant")
    if args.condition == "label":
        kwargs["num_classes"] = ds.num_classes
    else:
        mask = data.condition_mask(ds.image_shape, args.condition)
        kwargs["x_dim"], kwargs["c_dim"] = int((~mask).sum()), int(mask.sum())
    return {**kwargs, "prior": args.prior}


def svi_loss(args):
    """The VAEs' loss object from ``--estimator`` and its options; an option that the chosen
    estimator does not take is refused.

    :raises RunError: e.g. ``--gradient`` without ``--estimator iwae``.
    """
    cls = LOSSES[args.estimator]
    given = {"num_particles": args.num_particles,
             "analytic_kl": args.analytic_kl,
             "baseline": None if args.baseline in (None, "none") else args.baseline,
             "gradient": args.gradient}
    takes = inspect.signature(cls).parameters
    for key in given:  # (--baseline none: no baseline, which every estimator has)
        if given[key] is not None and key not in takes:
            owners = [name for name, loss in sorted(LOSSES.items())
                      if key in inspect.signature(loss).parameters]
            raise RunError(f"{_flag(key)} applies to --estimator {', '.join(owners)}, not "
                           f"{args.estimator}")
    options = {k: v for k, v in given.items() if v is not None and k in takes}
    try:
        beta = make_schedule(args.beta, args.kl_warmup_steps, args.kl_cycle_steps)
        return cls(**options, beta=beta)
    except ValueError as e:
        raise RunError(str(e)) from e


def make_optim(args):
    """The optimizer from ``--optimizer``, ``--lr``, ``--lr-schedule`` and its options,
    ``--clip-norm`` and ``--weight-decay``; a schedule option that the chosen schedule does not
    take is refused.

    :raises RunError: e.g. ``--warmup-steps`` with ``--lr-schedule step``.
    """
    name, schedule = args.lr_schedule, None
    options = {}
    for dest, params in SCHEDULE_FLAGS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        owners = [k for k, cls in SCHEDULES.items()
                  if set(params) & set(inspect.signature(cls).parameters)]
        param = next((p for p in params if name and p in inspect.signature(SCHEDULES[name])
                      .parameters), None)
        if param is None:
            raise RunError(f"{_flag(dest)} applies to --lr-schedule {', '.join(owners)}"
                           + (f", not {name}" if name else " (the learning rate is constant "
                              "without --lr-schedule)"))
        options[param] = value
    if name not in (None, "constant"):  # (a constant learning rate needs no schedule)
        try:
            schedule = SCHEDULES[name](**options)
        except TypeError:
            missing = [p for p, v in inspect.signature(SCHEDULES[name]).parameters.items()
                       if v.default is inspect.Parameter.empty and p not in options]
            flags = [_flag(d) for d, ps in SCHEDULE_FLAGS.items() if set(ps) & set(missing)]
            raise RunError(f"--lr-schedule {name} needs {' and '.join(flags)}") from None
        except ValueError as e:  # named by the flag that set it
            text = str(e)
            for dest, params in SCHEDULE_FLAGS.items():
                for param in params:
                    if param in options and text.startswith(param + " "):
                        text = f"{_flag(dest)} (its {param}){text[len(param):]}"
            raise RunError(f"--lr-schedule {name}: {text}") from e
    kwargs = {"clip_norm": args.clip_norm}
    if args.weight_decay is not None:
        kwargs["weight_decay"] = args.weight_decay
    return OPTIMIZERS[args.optimizer](args.lr, schedule=schedule, **kwargs)


# ---------------------------------------------------------------------------------------------
# the run


def run(args) -> None:
    """``pvae train``; under ``torchrun`` (``torchrun --nproc_per_node N -m pvae.cli train
    ...``) every process joins the process group and trains its share of each mini-batch
    (:func:`pvae.train.fit`'s ``step``), and rank 0 alone writes the run folder."""
    if not parallel.launched_by_torchrun():
        return _run(args)
    with parallel.process_group(resolve_device(args.device)):
        _run(args)


def _run(args) -> None:
    """One body for every model family: the data, the model from the registry, its loss, the
    run folder, ``fit`` with the run's callbacks."""
    check_flags(args)
    is_ae = autoencoders.is_autoencoder(args.model)
    if args.binarize is None:
        args.binarize = "none" if is_ae else "dynamic"
    binarize = None if args.binarize == "none" else args.binarize
    if is_ae and args.condition != "none":
        raise RunError(f"--condition {args.condition} needs --model cvae; autoencoders are not "
                       "conditional")
    config = data_config(args, binarize)
    try:
        ds = load_data(config)
    except (TypeError, ValueError) as e:
        if isinstance(e, (data.IDXError, data.DataFileError)):
            raise
        hint = ("; or train with --binarize none and a likelihood for continuous data"
                if binarize and "intensities" in str(e) else "")
        raise RunError(f"{source(args)}: {e}{hint}") from e
    config["image_shape"] = list(ds.image_shape) if ds.image_shape else None
    if ds.digest is not None:
        config["data_sha256"] = ds.digest
    torch.manual_seed(args.seed)
    if is_ae:
        model, loss = autoencoders.model_and_loss(args, ds)
    else:
        try:  # its size checked on the meta device against the memory available
            model = new_model(REGISTRY[args.model], model_arguments(args, ds),
                              resolve_device(args.device))
        except ValueError as e:  # the model's own checks of its arguments
            raise RunError(str(e)) from e
        loss = svi_loss(args)
    optim = make_optim(args)
    config.update(model=args.model, model_config=model.config,
                  early_stopping=None if args.early_stopping is None else
                  {"patience": args.early_stopping, "min_delta": args.min_delta or 0.0})
    out = parallel.main_only(prepare_run, args.out, resume=args.resume)
    finished = parallel.main_only(stop_reason, out) if args.resume else None

    n = args.num_train or len(ds.x_train)
    try:
        x_train, c_train, fit_binarize = data.training_pairs(
            args.condition, ds.x_train[:n], ds.y_train[:n], ds.image_shape, binarize)
        x_val, c_val = data.split_condition(args.condition, ds.x_test[: args.num_val],
                                            ds.y_test[: args.num_val], ds.image_shape)
    except ValueError as e:
        raise RunError(f"--condition {args.condition}: {e}") from e
    step = {"auto": "auto", "on": "cuda_graph", "off": "eager"}[args.cuda_graph]
    callbacks, best = _callbacks(args, out)
    try:
        history = fit(model, x_train, *([] if c_train is None else [c_train]), loss=loss,
                      val=None if not args.num_val else
                      (x_val if c_val is None else (x_val, c_val)),
                      num_epochs=args.num_epochs, batch_size=args.batch_size, optim=optim,
                      binarize=fit_binarize, device=resolve_device(args.device), seed=args.seed,
                      checkpoint_dir=out, resume=args.resume,
                      progress=not args.no_progress and not finished,
                      step="distributed" if parallel.is_distributed() else step,
                      config=run_record(config), callbacks=callbacks)
    except ImportError as e:  # a logger's package (tensorboard, mlflow) is missing
        raise RunError(str(e)) from e
    except ValueError as e:  # fit's checks of its arguments and data
        raise RunError(str(e)) from e
    if not finished:  # (a finished run said so in one line and trained nothing)
        _report(args, out, history, best)


def _callbacks(args, out) -> tuple[list, BestCheckpoint | None]:
    """The run's callbacks, in order: config.json, the best checkpoint (with validation
    data), early stopping, history.csv (after early stopping, so the row that stopped holds
    the reason), the loggers. The loop's own checkpoint and progress bar follow."""
    best = BestCheckpoint(out / BEST_NAME) if args.num_val else None
    stopping = (EarlyStopping(args.early_stopping, args.min_delta or 0.0)
                if args.early_stopping is not None else None)
    loggers = [LOGGERS[name](out) for name in dict.fromkeys(args.logger or [])]
    callbacks = [WriteConfig(out), *[cb for cb in (best, stopping) if cb is not None],
                 HistoryCSV(out / "history.csv"), *loggers]
    return callbacks, best


def _report(args, out, history, best) -> None:
    """Rank 0 draws the training curve and prints the last epoch's training and validation
    values (the ELBO in nats per image, or an autoencoder's loss), and the best epoch's."""
    if parallel.rank() != 0:
        return
    if len(history):
        plots.training_curve(history, out / "figures" / "training_curve.png")
    last = history[-1] if len(history) else {}
    column, label, unit, digits = (("elbo", "ELBO", "nats/image", 2) if "train_elbo" in last
                                   else ("loss", "loss", "per image", 3))
    nan = float("nan")
    stopped = " (stopped early)" if history.stop_reason else ""
    kept = ""
    if best is not None and best.best_epoch is not None:
        value = best.best if column == "elbo" else -best.best
        kept = f"; best val {label} {value:.{digits}f} at epoch {best.best_epoch} ({BEST_NAME})"
    val = last.get(f"val_{column}", nan)
    val = f", val {label} {val:.{digits}f}" if val == val else ""
    print(f"trained {args.model} on {source(args)}: {len(history)} epochs{stopped}, "
          f"train {label} {last.get(f'train_{column}', nan):.{digits}f}{val} {unit}, "
          f"{last.get('images_per_s', nan):.0f} images/s{kept} -> {out}")
