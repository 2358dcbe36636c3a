"""What ``pvae train`` and ``pvae evaluate`` do for the deterministic autoencoders
(``--model ae | linear-ae | mae``): their arguments, the model and its loss, the
evaluation (reconstruction error, code statistics, linear probe)."""

from __future__ import annotations

from pathlib import Path

import torch

from pvae import plots
from pvae.autoencoders import (
    AUTOENCODERS,
    CODE_ACTIVATIONS,
    CORRUPTIONS,
    LOSSES,
    SPARSITY,
    AutoencoderLoss,
    MaskedAutoencoder,
    code_statistics,
    encode_all,
    linear_probe,
    reconstruction_error,
)
from pvae.contract import resolve_device
from pvae.runs import RunError, new_model, write_json
from pvae.stats import mean_stderr

from .common import count, number, table

__all__ = ["add_evaluate_arguments", "add_train_arguments", "evaluate", "is_autoencoder",
           "model_and_loss"]


def is_autoencoder(name: str) -> bool:
    return name in AUTOENCODERS


def add_train_arguments(model, objective) -> None:
    """The autoencoders' options of ``pvae train``, in its ``model`` and ``objective`` groups
    (``--latent-dim`` is the code size). Their defaults are filled in by
    :func:`pvae.cli.train.check_flags`, which refuses them for the VAEs."""
    model.add_argument("--loss", default=None, choices=list(LOSSES),
                       help="ae, linear-ae: the reconstruction loss summed over pixels (mse)")
    model.add_argument("--code-activation", default=None, choices=sorted(CODE_ACTIVATIONS),
                       help="ae: activation of the code layer (identity; relu for L1, sigmoid "
                       "for KL sparsity)")
    model.add_argument("--patch-size", type=count(1), default=None, help="mae: patch side, 7")
    model.add_argument("--mask-ratio", type=number(0.0, strict=True), default=None,
                       help="mae: fraction of patches masked, 0.75")
    g = objective
    g.add_argument("--sparsity", default=None, choices=["none", *SPARSITY],
                   help="autoencoders: a sparsity penalty on the codes")
    g.add_argument("--sparsity-weight", type=number(0.0), default=None,
                   help="autoencoders: λ of --sparsity, 1e-3")
    g.add_argument("--target-activation", type=number(0.0, strict=True), default=None,
                   help="autoencoders: ρ of --sparsity kl, in (0, 1), 0.05")
    g.add_argument("--corruption", default=None, choices=["none", *CORRUPTIONS],
                   help="autoencoders (denoising): gaussian noise or masking of the inputs")
    g.add_argument("--noise-scale", type=number(0.0), default=None,
                   help="autoencoders: σ of --corruption gaussian, 0.3")
    g.add_argument("--mask-fraction", type=number(0.0), default=None,
                   help="autoencoders: ν of --corruption mask, in [0, 1), 0.3")
    g.add_argument("--contractive", type=number(0.0), default=None,
                   help="autoencoders: λ of the contractive penalty ‖J_f(x)‖²_F (0 = off)")


def model_and_loss(args, ds):
    """The autoencoder ``--model`` names for this dataset, and its loss.

    :raises RunError: options that do not fit the model (e.g. penalties for the masked AE).
    """
    none = lambda v: None if v == "none" else v  # noqa: E731
    try:
        if args.model == "mae":
            if not ds.image_shape:
                raise ValueError(f"--model mae needs images; {args.dataset} has none")
            if len(ds.image_shape) != 2:
                raise ValueError(f"--model mae needs one-channel images; {args.dataset}'s are "
                                 f"{tuple(ds.image_shape)}")
            kwargs = dict(image_shape=ds.image_shape, patch_size=args.patch_size,
                          embed_dim=args.latent_dim, mask_ratio=args.mask_ratio)
        elif args.model == "linear-ae":
            kwargs = dict(x_dim=ds.x_dim, code_dim=args.latent_dim, loss=args.loss)
        else:
            kwargs = dict(x_dim=ds.x_dim, code_dim=args.latent_dim,
                          hidden_dims=args.hidden_dims or [400],
                          activation=args.activation or "relu",
                          code_activation=args.code_activation, loss=args.loss)
        # its size checked on the meta device against the memory available
        model = new_model(AUTOENCODERS[args.model], kwargs, resolve_device(args.device))
        loss = AutoencoderLoss(
            sparsity=none(args.sparsity), sparsity_weight=args.sparsity_weight,
            target_activation=args.target_activation, corruption=none(args.corruption),
            noise_scale=args.noise_scale, mask_fraction=args.mask_fraction,
            contractive=args.contractive)
        loss.bind(model)  # refuses options that do not fit the model, before the run folder
    except ValueError as e:
        raise RunError(str(e)) from e
    return model, loss


def add_evaluate_arguments(e) -> None:
    g = e.add_argument_group("autoencoders")
    g.add_argument("--probe-num-train", type=count(1), default=10000,
                   help="training images whose codes fit the linear probe")
    g.add_argument("--sparse-threshold", type=number(0.0, strict=True), default=1e-3,
                   help="a code unit counts as zero below this magnitude")


def evaluate(args, run_dir: Path, model, config: dict, state: dict, ds, metrics_path: Path,
             figures_dir: Path) -> None:
    """``pvae evaluate`` on an autoencoder run: test reconstruction MSE per pixel (the masked
    AE's: on the masked patches), code statistics and the linear probe; the metrics file and
    the figures of reconstructions and of the codes' embedding."""
    n = args.num_test or len(ds.x_test)
    x_test, y_test = ds.x_test[:n], ds.y_test[:n]
    torch.manual_seed(config["seed"])
    metrics = {"run": str(run_dir), "checkpoint": args.checkpoint, "dataset": config["dataset"],
               "num_test": len(x_test), "epochs": state["epoch"],
               "units": "squared error per pixel"}
    if isinstance(model, MaskedAutoencoder):
        with torch.no_grad():
            losses = torch.cat([model.masked_loss(xb.to(model.device, model.dtype))[0].cpu()
                                for xb in x_test.split(1000)])
        mse, se = mean_stderr(losses.double() / (model.num_masked * model.patch_dim))
        metrics.update({"masked_patch_mse": mse, "masked_patch_mse_stderr": se,
                        "mask_ratio": model.mask_ratio})
        rows = [(f"masked-patch MSE per pixel ({model.mask_ratio:.0%} masked)",
                 f"{mse:.5f} ± {se:.5f}")]
    else:
        rec = reconstruction_error(model, x_test)
        metrics.update({"reconstruction_mse": rec["mse"], "reconstruction_mse_stderr":
                        rec["mse_stderr"]})
        rows = [("reconstruction MSE per pixel", f"{rec['mse']:.5f} ± {rec['mse_stderr']:.5f}")]
    z_test = encode_all(model, x_test)
    stats = code_statistics(z_test, args.sparse_threshold)
    m = min(args.probe_num_train, len(ds.x_train))
    probe = linear_probe(encode_all(model, ds.x_train[:m]), ds.y_train[:m], z_test, y_test)
    metrics.update({"code": stats, "linear_probe": probe})
    rows += [("test images", len(x_test)),
             (f"code units below {stats['threshold']:g} per image",
              f"{stats['near_zero_fraction']:.3f} ± {stats['near_zero_fraction_stderr']:.3f} "
              f"of {stats['code_dim']}"),
             ("dead code units", stats["dead_units"]),
             (f"linear probe accuracy (fitted on {m} codes)",
              f"{probe['accuracy']:.4f} ± {probe['accuracy_stderr']:.4f}")]
    print(f"{config['model']} on {config['dataset']} after {state['epoch']} epochs:")
    print(table(rows))
    write_json(metrics_path, metrics)
    image_shape = tuple(config["image_shape"]) if config.get("image_shape") else None
    plots.latent_embedding(z_test, y_test if ds.num_classes > 1 else None,
                           tsne_points=args.tsne_points, seed=config["seed"],
                           path=figures_dir / "latent_embedding.png")
    if image_shape:
        x_show = x_test[:10]
        if isinstance(model, MaskedAutoencoder):
            recon, mask = model.reconstruct(x_show)
            plots.image_grid([x_show, model.masked_input(x_show, mask), recon], image_shape,
                             row_labels=["input", "masked", "reconstruction"],
                             path=figures_dir / "reconstructions.png")
        else:
            plots.image_grid([x_show, model.reconstruct(x_show)], image_shape,
                             row_labels=["input", "reconstruction"],
                             path=figures_dir / "reconstructions.png")
    print(f"wrote {metrics_path} and {figures_dir}/")
