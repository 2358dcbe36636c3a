"""``pvae train``: train a model on a dataset and write a run folder."""

from __future__ import annotations

import torch

from pvae import data, parallel, plots
from pvae.contract import resolve_device
from pvae.inference import BASELINES, ESTIMATORS, GRADIENTS, make_schedule
from pvae.models import LIKELIHOODS, MODELS, NETWORKS
from pvae.nn import ACTIVATIONS, COVARIANCES
from pvae.runs import RunError, load_data, new_model, prepare_run
from pvae.train import fit

from . import autoencoders
from .common import count, likelihood_scale, number

__all__ = ["add_parser", "run"]

#: The models ``pvae train`` builds (``pvae ppca`` trains PPCA): VAEs and the deterministic
#: autoencoders (:data:`pvae.autoencoders.AUTOENCODERS`).
TRAINABLE = ("vae", "cvae", "hvae", "ae", "linear-ae", "mae")


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model on a dataset and write a run folder")
    t.add_argument("--dataset", default="fashion-mnist", choices=sorted(data.DATASETS))
    t.add_argument("--data-dir", default=None, help="folder with the IDX files")
    t.add_argument("--download", action="store_true",
                   help="download the dataset's official files if they are found nowhere")
    t.add_argument("--binarize", default=None, choices=["none", "static", "dynamic"],
                   help="default: dynamic for the VAEs, none for the autoencoders")
    t.add_argument("--model", default="vae", choices=TRAINABLE)
    t.add_argument("--latent-dim", type=count(1), default=50,
                   help="latent size (the code size of an autoencoder)")
    t.add_argument("--latent-dims", type=count(1), nargs="+", default=[100, 50],
                   help="hvae: widths of z1, z2, ... (Burda et al. 2015: 100 50)")
    t.add_argument("--hidden-dims", type=count(1), nargs="+", default=None,
                   help="hidden widths (default 400; hvae: one per stochastic layer, 100 50)")
    t.add_argument("--network", default="mlp", choices=NETWORKS,
                   help="vae, cvae (--condition label): fully connected or convolutional "
                   "encoder and decoder")
    t.add_argument("--guide", default="diagonal", choices=COVARIANCES,
                   help="vae, cvae: diagonal or full covariance of q(z | x)")
    t.add_argument("--likelihood", default="bernoulli", choices=sorted(LIKELIHOODS))
    t.add_argument("--condition", default="none", choices=["none", "label", *data.CONDITIONS],
                   help="cvae: condition on the class label or on part of the image")
    t.add_argument("--prior", default="standard", choices=["standard", "learned"],
                   help="cvae: N(0, I) or a learned p(z | c)")
    t.add_argument("--likelihood-scale", default="learned", type=likelihood_scale,
                   help="'learned' (per pixel), 'decoder' (a decoder output per pixel and "
                        "image) or a fixed float (gaussian/laplace)")
    t.add_argument("--activation", default=None, choices=sorted(ACTIVATIONS),
                   help="hidden activation (default: relu; hvae: tanh)")
    t.add_argument("--num-epochs", type=count(0), default=10)
    t.add_argument("--batch-size", type=count(1), default=256)
    t.add_argument("--lr", type=number(0.0, strict=True), default=1e-3)
    t.add_argument("--estimator", default="reparam", choices=sorted(ESTIMATORS))
    t.add_argument("--num-particles", type=count(1), default=1)
    t.add_argument("--analytic-kl", action="store_true")
    t.add_argument("--beta", type=number(0.0), default=1.0, help="KL weight (beta-VAE)")
    t.add_argument("--kl-warmup-steps", type=count(0), default=0,
                   help="anneal beta linearly from 0 over this many steps")
    t.add_argument("--kl-cycle-steps", type=count(0), default=0,
                   help="cyclical annealing of beta with this period (steps)")
    t.add_argument("--baseline", default="none", choices=["none", *[b for b in BASELINES if b]],
                   help="score-function baseline (--estimator score)")
    t.add_argument("--gradient", default="standard", choices=list(GRADIENTS),
                   help="IWAE gradient: standard or dreg (--estimator iwae)")
    t.add_argument("--num-train", type=count(0), default=0,
                   help="use the first N images (0 = all)")
    t.add_argument("--num-val", type=count(0), default=1000,
                   help="validation ELBO on the first N test images each epoch (0 = none)")
    t.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda...")
    t.add_argument("--cuda-graph", default="auto", choices=["auto", "on", "off"],
                   help="capture the training step as a CUDA graph (auto: on CUDA when the "
                   "estimator allows it)")
    t.add_argument("--seed", type=count(0), default=0)
    t.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--no-progress", action="store_true")
    autoencoders.add_train_arguments(t)
    t.set_defaults(func=run)


def model_arguments(args, ds: data.Splits) -> dict:
    """The constructor arguments of ``--model`` for this dataset and ``--condition``.

    :raises RunError: a conditional model without a condition, or the other way round.
    """
    kwargs = dict(x_dim=ds.x_dim, likelihood=args.likelihood,
                  likelihood_scale=args.likelihood_scale)
    if args.activation:
        kwargs["activation"] = args.activation
    if args.model != "cvae" and args.condition != "none":
        raise RunError(f"--condition {args.condition} needs --model cvae")
    if args.model == "hvae" and args.network != "mlp":
        raise RunError(f"--network {args.network} applies to --model vae and cvae")
    if args.model == "hvae":
        if args.guide != "diagonal":
            raise RunError("--guide full applies to --model vae and cvae")
        return {**kwargs, "latent_dims": args.latent_dims,
                "hidden_dims": args.hidden_dims or [100, 50]}
    kwargs.update(latent_dim=args.latent_dim, hidden_dims=args.hidden_dims or [400],
                  guide=args.guide)
    if args.network == "conv":
        if not ds.image_shape:
            raise RunError(f"--network conv needs images; {args.dataset} has no image_shape")
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


def run(args) -> None:
    """``pvae train``; under ``torchrun`` (``torchrun --nproc_per_node N -m pvae.cli train
    ...``) every process joins the process group and trains its share of each mini-batch
    (:func:`pvae.train.fit`'s ``distributed``), and rank 0 alone writes the run folder."""
    if not parallel.launched_by_torchrun():
        return _run(args)
    with parallel.process_group(resolve_device(args.device)):
        _run(args)


def _run(args) -> None:
    if args.binarize is None:
        args.binarize = "none" if autoencoders.is_autoencoder(args.model) else "dynamic"
    if autoencoders.is_autoencoder(args.model):
        return run_autoencoder(args)
    binarize = None if args.binarize == "none" else args.binarize
    config = {
        "dataset": args.dataset, "data_dir": args.data_dir, "download": args.download,
        "binarize": binarize, "model": args.model, "num_epochs": args.num_epochs,
        "batch_size": args.batch_size, "lr": args.lr,
        "estimator": args.estimator, "num_particles": args.num_particles,
        "analytic_kl": args.analytic_kl, "beta": args.beta,
        "kl_warmup_steps": args.kl_warmup_steps, "kl_cycle_steps": args.kl_cycle_steps,
        "baseline": None if args.baseline == "none" else args.baseline,
        "gradient": args.gradient, "seed": args.seed, "num_train": args.num_train,
        "num_val": args.num_val, "condition": args.condition,
    }  # + image_shape and model_config (the model's recorded constructor arguments)
    ds = load_data(config)
    config["image_shape"] = list(ds.image_shape) if ds.image_shape else None
    kwargs = model_arguments(args, ds)
    torch.manual_seed(args.seed)
    try:
        # issue 28: its size is checked on the meta device against the memory available
        model = new_model(MODELS[args.model], kwargs, resolve_device(args.device))
    except ValueError as e:  # the model's own checks of its arguments
        raise RunError(str(e)) from e
    config["model_config"] = model.config
    if parallel.is_distributed():
        config["world_size"] = parallel.world_size()
    out = parallel.main_only(prepare_run, args.out, config, resume=args.resume)

    n = args.num_train or len(ds.x_train)
    x_train, c_train, fit_binarize = data.training_pairs(
        args.condition, ds.x_train[:n], ds.y_train[:n], ds.image_shape, binarize)
    x_val, c_val = data.split_condition(args.condition, ds.x_test[: args.num_val],
                                        ds.y_test[: args.num_val], ds.image_shape)
    if not args.num_val:
        x_val = c_val = None
    try:
        history = fit(model, x_train, c=c_train, x_val=x_val, c_val=c_val,
                      num_epochs=args.num_epochs, batch_size=args.batch_size, lr=args.lr,
                      estimator=args.estimator, num_particles=args.num_particles,
                      analytic_kl=args.analytic_kl,
                      beta=make_schedule(args.beta, args.kl_warmup_steps, args.kl_cycle_steps),
                      baseline=config["baseline"], gradient=args.gradient,
                      device=resolve_device(args.device), seed=args.seed, binarize=fit_binarize,
                      checkpoint_dir=out, resume=args.resume, progress=not args.no_progress,
                      config=config,
                      cuda_graph={"auto": "auto", "on": True, "off": False}[args.cuda_graph])
    except ValueError as e:  # fit's checks of its arguments and data
        raise RunError(str(e)) from e
    _report(args, out, history, "elbo", "ELBO", "nats/image", 2)


def _report(args, out, history, column: str, label: str, unit: str, digits: int) -> None:
    """Rank 0 writes ``history.csv`` and the training curve and prints the last epoch's
    ``train_<column>`` and ``val_<column>``."""
    if parallel.rank() != 0:
        return
    history.to_csv(out / "history.csv")
    plots.training_curve(history, out / "figures" / "training_curve.png")
    last = history[-1] if len(history) else {}
    nan = float("nan")
    print(f"trained {args.model} on {args.dataset}: {len(history)} epochs, "
          f"train {label} {last.get(f'train_{column}', nan):.{digits}f}, "
          f"val {label} {last.get(f'val_{column}', nan):.{digits}f} {unit}, "
          f"{last.get('images_per_s', nan):.0f} images/s -> {out}")


def run_autoencoder(args) -> None:
    """``pvae train --model ae | linear-ae | mae``: the same engine (``fit``) with the
    autoencoder's objective."""
    binarize = None if args.binarize == "none" else args.binarize
    if args.condition != "none":
        raise RunError(f"--condition {args.condition} needs --model cvae; autoencoders are not "
                       "conditional")
    config = {
        "dataset": args.dataset, "data_dir": args.data_dir, "download": args.download,
        "binarize": binarize, "model": args.model, "num_epochs": args.num_epochs,
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "num_train": args.num_train, "num_val": args.num_val, "condition": "none",
    }
    ds = load_data(config)
    config["image_shape"] = list(ds.image_shape) if ds.image_shape else None
    torch.manual_seed(args.seed)
    model, objective = autoencoders.model_and_objective(args, ds)
    config["model_config"] = model.config
    config["objective"] = objective.config
    out = prepare_run(args.out, config, resume=args.resume)
    n = args.num_train or len(ds.x_train)
    x_val = ds.x_test[: args.num_val] if args.num_val else None
    try:
        history = fit(model, ds.x_train[:n], x_val=x_val, num_epochs=args.num_epochs,
                      batch_size=args.batch_size, lr=args.lr, device=resolve_device(args.device),
                      seed=args.seed, binarize=binarize if binarize == "dynamic" else None,
                      checkpoint_dir=out, resume=args.resume, progress=not args.no_progress,
                      config=config, objective=objective,
                      cuda_graph=False if args.cuda_graph == "off" else "auto")
    except ValueError as e:
        raise RunError(str(e)) from e
    _report(args, out, history, "loss", "loss", "per image", 3)
