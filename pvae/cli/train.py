"""``pvae train``: train a model on a dataset and write a run folder."""

from __future__ import annotations

import inspect

import torch

from pvae import data, parallel, plots
from pvae.contract import resolve_device
from pvae.inference import BASELINES, GRADIENTS, LOSSES, make_schedule
from pvae.models import LIKELIHOODS, NETWORKS
from pvae.nn import ACTIVATIONS, COVARIANCES
from pvae.runs import REGISTRY, RunError, WriteConfig, load_data, new_model, prepare_run
from pvae.train import Adam, fit

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
    t.add_argument("--estimator", default="reparam", choices=sorted(LOSSES),
                   help="the loss of a VAE (pvae.inference.LOSSES): reparam (ReparamELBO), "
                   "score (ScoreFunctionELBO), iwae (IWAE), vimco (VIMCO)")
    t.add_argument("--num-particles", type=count(1), default=None,
                   help="samples per datapoint and step (K; default: the estimator's own, "
                   "1 for reparam and score, 5 for iwae and vimco)")
    t.add_argument("--analytic-kl", action="store_true", help="closed-form KL (--estimator "
                   "reparam)")
    t.add_argument("--beta", type=number(0.0), default=1.0, help="KL weight (beta-VAE)")
    t.add_argument("--kl-warmup-steps", type=count(0), default=0,
                   help="anneal beta linearly from 0 over this many steps")
    t.add_argument("--kl-cycle-steps", type=count(0), default=0,
                   help="cyclical annealing of beta with this period (steps)")
    t.add_argument("--baseline", default=None, choices=["none", *[b for b in BASELINES if b]],
                   help="score-function baseline (--estimator score)")
    t.add_argument("--gradient", default=None, choices=list(GRADIENTS),
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


def svi_loss(args):
    """The VAEs' loss object from ``--estimator`` and its options; an option that the chosen
    estimator does not take is refused.

    :raises RunError: e.g. ``--gradient`` without ``--estimator iwae``.
    """
    cls = LOSSES[args.estimator]
    given = {"num_particles": args.num_particles,
             "analytic_kl": args.analytic_kl or None,
             "baseline": None if args.baseline is None else
             (None if args.baseline == "none" else args.baseline),
             "gradient": args.gradient}
    takes = inspect.signature(cls).parameters
    flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731
    for key in ("num_particles", "analytic_kl", "gradient"):
        if given[key] is not None and key not in takes:
            raise RunError(f"{flag(key)} does not apply to --estimator {args.estimator}")
    if args.baseline not in (None, "none") and "baseline" not in takes:
        raise RunError(f"--baseline does not apply to --estimator {args.estimator}")
    options = {k: v for k, v in given.items() if v is not None and k in takes}
    beta = make_schedule(args.beta, args.kl_warmup_steps, args.kl_cycle_steps)
    try:
        return cls(**options, beta=beta)
    except ValueError as e:
        raise RunError(str(e)) from e


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
    run folder, ``fit``."""
    is_ae = autoencoders.is_autoencoder(args.model)
    if args.binarize is None:
        args.binarize = "none" if is_ae else "dynamic"
    binarize = None if args.binarize == "none" else args.binarize
    if is_ae and args.condition != "none":
        raise RunError(f"--condition {args.condition} needs --model cvae; autoencoders are not "
                       "conditional")
    config = {"dataset": args.dataset, "data_dir": args.data_dir, "download": args.download,
              "binarize": binarize, "seed": args.seed, "num_train": args.num_train,
              "num_val": args.num_val, "condition": args.condition}
    ds = load_data(config)
    config["image_shape"] = list(ds.image_shape) if ds.image_shape else None
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
    config.update(model=args.model, model_config=model.config)
    out = parallel.main_only(prepare_run, args.out, resume=args.resume)

    n = args.num_train or len(ds.x_train)
    x_train, c_train, fit_binarize = data.training_pairs(
        args.condition, ds.x_train[:n], ds.y_train[:n], ds.image_shape, binarize)
    x_val, c_val = data.split_condition(args.condition, ds.x_test[: args.num_val],
                                        ds.y_test[: args.num_val], ds.image_shape)
    step = {"auto": "auto", "on": "cuda_graph", "off": "eager"}[args.cuda_graph]
    try:
        history = fit(model, x_train, *([] if c_train is None else [c_train]), loss=loss,
                      val=None if not args.num_val else
                      (x_val if c_val is None else (x_val, c_val)),
                      num_epochs=args.num_epochs, batch_size=args.batch_size,
                      optim=Adam(args.lr), binarize=fit_binarize,
                      device=resolve_device(args.device), seed=args.seed, checkpoint_dir=out,
                      resume=args.resume, progress=not args.no_progress,
                      step="distributed" if parallel.is_distributed() else step,
                      config=config, callbacks=[WriteConfig(out)])
    except ValueError as e:  # fit's checks of its arguments and data
        raise RunError(str(e)) from e
    _report(args, out, history)


def _report(args, out, history) -> None:
    """Rank 0 writes ``history.csv`` and the training curve and prints the last epoch's
    training and validation values (the ELBO in nats per image, or an autoencoder's loss)."""
    if parallel.rank() != 0:
        return
    history.to_csv(out / "history.csv")
    plots.training_curve(history, out / "figures" / "training_curve.png")
    last = history[-1] if len(history) else {}
    column, label, unit, digits = (("elbo", "ELBO", "nats/image", 2) if "train_elbo" in last
                                   else ("loss", "loss", "per image", 3))
    nan = float("nan")
    print(f"trained {args.model} on {args.dataset}: {len(history)} epochs, "
          f"train {label} {last.get(f'train_{column}', nan):.{digits}f}, "
          f"val {label} {last.get(f'val_{column}', nan):.{digits}f} {unit}, "
          f"{last.get('images_per_s', nan):.0f} images/s -> {out}")
