"""``pvae evaluate``: metrics and figures of a trained run."""

from __future__ import annotations

from pathlib import Path

import torch

from pvae import data, parallel, plots
from pvae.contract import resolve_device
from pvae.files import WriteError
from pvae.inference import elbo_terms, impute, inference_gap, iw_log_likelihood
from pvae.inference.mcmc import compare_samples, guide_samples, nuts_posterior
from pvae.runs import CHECKPOINTS, load_data, load_run, write_json
from pvae.stats import mean_stderr
from pvae.train import CheckpointError, History

from . import autoencoders
from .common import count, table

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    e = sub.add_parser("evaluate", help="evaluate a trained run: metrics.json and figures")
    e.add_argument("run", help="run folder written by pvae train or pvae ppca")
    e.add_argument("--checkpoint", default="last", choices=sorted(CHECKPOINTS),
                   help="last (checkpoint.pt: metrics.json, figures/) or best (best.pt, the "
                   "best validation epoch's: metrics_best.json, figures_best/)")
    e.add_argument("--num-samples", type=count(0), default=5000,
                   help="K for the IW log-likelihood (0 = skip it)")
    e.add_argument("--iw-num-test", type=count(0), default=1000,
                   help="test images for the IW estimate (0 = all)")
    e.add_argument("--num-test", type=count(0), default=0,
                   help="test images for the ELBO (0 = all)")
    e.add_argument("--num-elbo-samples", type=count(1), default=1)
    e.add_argument("--inference-gap", type=count(0), default=0, metavar="N",
                   help="split the IW - ELBO gap of the first N test images into approximation "
                   "and amortization gaps (Cremer et al. 2018; log p(x) with K = --num-samples; "
                   "0 = skip)")
    e.add_argument("--nuts", type=count(0), default=0, metavar="N",
                   help="draw the exact posterior of the first N test images by NUTS (4 chains) "
                   "and compare the guide with it: R-hat, ESS, variance ratios, energy distance "
                   "(slow: minutes per image on a CPU; 0 = skip)")
    e.add_argument("--nuts-samples", type=count(1), default=500, metavar="S",
                   help="NUTS draws kept per chain, after as many warmup steps")
    e.add_argument("--tsne-points", type=count(0), default=2000, metavar="N",
                   help="the latent embedding figure's t-SNE panel embeds the first N test "
                   "images' codes (0 = PCA alone)")
    e.add_argument("--device", default="auto")
    autoencoders.add_evaluate_arguments(e)
    e.set_defaults(func=run)


def run(args) -> None:
    """``pvae evaluate``; under ``torchrun`` (``torchrun --nproc_per_node N -m pvae.cli evaluate
    RUN``) the IW log-likelihood, the slow part, is sharded over the processes (each batch of
    images seeded from one seed that rank 0 draws, see
    :func:`pvae.inference.iw_log_likelihood`); every rank computes the ELBO terms, and rank 0
    alone the rest, and prints and writes metrics and figures."""
    if not parallel.launched_by_torchrun():
        return _run(args)
    device = parallel.local_device(resolve_device(args.device))
    args.device = str(device)
    with parallel.process_group(device):
        _run(args)


def outputs(run_dir: Path, checkpoint: str) -> tuple[Path, Path]:
    """Where ``pvae evaluate --checkpoint`` writes: ``(metrics file, figures folder)``,
    ``metrics.json`` and ``figures/`` for the last checkpoint, ``metrics_best.json`` and
    ``figures_best/`` for the best."""
    suffix = "" if checkpoint == "last" else f"_{checkpoint}"
    return run_dir / f"metrics{suffix}.json", run_dir / f"figures{suffix}"


def _run(args) -> None:
    """Everything is computed first; then the metrics file is written, then the figures, so a
    figure that cannot be written (full disk, ``figures`` a file...) never loses the metrics.
    The run folder is data, not instructions: nothing is downloaded, ``data_dir`` and your own
    data's paths are used only if they exist, and data whose digest differs from the recorded
    one are refused (:func:`pvae.runs.load_data` with ``received``)."""
    run_dir = Path(args.run)
    model, config, state = load_run(run_dir, args.device, checkpoint=args.checkpoint)
    metrics_path, figures_dir = outputs(run_dir, args.checkpoint)
    ds = load_data(config, received=True)
    recorded = config.get("image_shape")
    if recorded is not None and list(recorded) != list(ds.image_shape or []):
        raise CheckpointError(f"{run_dir / 'config.json'} says image_shape {recorded}, but "
                              f"{config['dataset']}'s images are {ds.image_shape}")
    if autoencoders.is_autoencoder(config["model"]):
        return autoencoders.evaluate(args, run_dir, model, config, state, ds,
                                     metrics_path, figures_dir)
    n = args.num_test or len(ds.x_test)
    condition = config.get("condition") or "none"
    try:
        x_test, c_test = data.split_condition(condition, ds.x_test[:n], ds.y_test[:n],
                                              ds.image_shape)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{run_dir / 'config.json'}: condition {condition!r} cannot be "
                              f"used ({e})") from e
    terms = elbo_terms(model, x_test, c=c_test, num_samples=args.num_elbo_samples)
    summary = terms.summary()
    metrics = {"run": str(run_dir), "checkpoint": args.checkpoint, "dataset": config["dataset"],
               "num_test": len(x_test), "epochs": state["epoch"], "units": "nats per image",
               "test_elbo": summary["elbo"], "test_elbo_stderr": summary["elbo_stderr"],
               "reconstruction": summary["reconstruction"],
               "reconstruction_stderr": summary["reconstruction_stderr"],
               "kl": summary["kl"], "kl_stderr": summary["kl_stderr"],
               "analytic_kl": summary["analytic_kl"],
               "active_units": summary["active_units"], "latent_dim": summary["latent_dim"],
               "kl_per_dim": summary.get("kl_per_dim")}
    rows = [("test images", len(x_test)),
            ("ELBO", f"{metrics['test_elbo']:.2f} ± {metrics['test_elbo_stderr']:.2f}"),
            ("reconstruction E_q[log p(x|z)]",
             f"{metrics['reconstruction']:.2f} ± {metrics['reconstruction_stderr']:.2f}"),
            ("KL(q(z|x) || p(z))" if c_test is None else "KL(q(z|x,c) || p(z|c))",
             f"{metrics['kl']:.2f} ± {metrics['kl_stderr']:.2f}"),
            ("active units", f"{metrics['active_units']} of {metrics['latent_dim']}")]
    if args.num_samples > 0:
        m = args.iw_num_test or len(x_test)
        x_iw, c_iw = x_test[:m], (None if c_test is None else c_test[:m])
        iw = iw_log_likelihood(model, x_iw, c=c_iw, num_samples=args.num_samples, progress=True)
        gap = iw.per_datapoint.double() - terms.elbo[: len(x_iw)].double()
        gap_mean, gap_stderr = mean_stderr(gap)
        metrics.update({
            "iw_log_likelihood": iw.mean, "iw_log_likelihood_stderr": iw.stderr,
            "iw_num_samples": args.num_samples, "iw_num_test": len(x_iw),
            "iw_median_ess": iw.ess.median().item(),
            "iw_minus_elbo": gap_mean, "iw_minus_elbo_stderr": gap_stderr,
        })
        rows += [(f"IW log p(x{'' if c_test is None else ' | c'}), K={args.num_samples} "
                  f"({len(x_iw)} images)",
                  f"{iw.mean:.2f} ± {iw.stderr:.2f}"),
                 ("IW − ELBO gap (same images)",
                  f"{metrics['iw_minus_elbo']:.2f} ± {metrics['iw_minus_elbo_stderr']:.2f}"),
                 ("median ESS", f"{metrics['iw_median_ess']:.1f} of {args.num_samples}")]
    if parallel.rank() != 0:
        return
    drawn = []  # figures, drawn once metrics.json is written
    if args.inference_gap:
        n_gap = min(args.inference_gap, len(x_test))
        gap = inference_gap(model, x_test[:n_gap], c=None if c_test is None else c_test[:n_gap],
                            num_samples=args.num_samples or 5000)
        metrics["inference_gap"] = gap.summary()
        g = metrics["inference_gap"]
        rows += [(f"inference gap ({n_gap} images)",
                  f"{g['total_gap']:.2f} ± {g['total_gap_stderr']:.2f}"),
                 ("  approximation: log p(x) − ELBO(q*)",
                  f"{g['approximation_gap']:.2f} ± {g['approximation_gap_stderr']:.2f}"),
                 ("  amortization: ELBO(q*) − ELBO(q)",
                  f"{g['amortization_gap']:.2f} ± {g['amortization_gap_stderr']:.2f}")]
        drawn.append(lambda: plots.inference_gap(gap, path=figures_dir / "inference_gap.png"))
    if args.nuts:
        rows += _nuts_check(model, x_test, c_test, args, metrics, figures_dir, drawn)
    which = "" if args.checkpoint == "last" else f", {CHECKPOINTS[args.checkpoint]}"
    print(f"{config['model']} on {config['dataset']} after {state['epoch']} epochs{which} "
          "(nats per image):")
    print(table(rows))
    write_json(metrics_path, metrics)
    labels = ds.y_test[:n] if ds.num_classes > 1 else None
    drawn.append(lambda: figures(model, config, state, x_test, c_test, metrics["kl_per_dim"],
                                 figures_dir, labels=labels, tsne_points=args.tsne_points))
    try:
        for draw in drawn:
            draw()
    except WriteError as e:
        raise WriteError(f"{e}; {metrics_path} is written, the figures are incomplete", e.errno,
                         e.filename) from e
    print(f"wrote {metrics_path} and {figures_dir}/")


def _nuts_check(model, x_test, c_test, args, metrics: dict, folder: Path, drawn: list) -> list:
    """NUTS reference posteriors of the first ``args.nuts`` test images against the guide:
    fills ``metrics["nuts"]``, adds the pair plot to ``drawn``, returns the table rows."""
    n = min(args.nuts, len(x_test))
    x, c = x_test[:n], None if c_test is None else c_test[:n]
    nuts = nuts_posterior(model, x, c, num_samples=args.nuts_samples,
                          warmup_steps=args.nuts_samples, num_chains=4, progress=True)
    guide = guide_samples(model, x, c, num_samples=2000)
    cmp = compare_samples(nuts, guide)
    conv = nuts.convergence()
    metrics["nuts"] = {**conv, **cmp.summary(), "seconds": nuts.seconds,
                       "per_datapoint": cmp.per_datapoint(),
                       "variance_ratio_per_dim": cmp.variance_ratio.tolist()}
    s = metrics["nuts"]
    # the pair plot: the two coordinates of the first site, image 0, where the guide's width
    # is most off (the first site's coordinates come first in the comparison)
    name, width = cmp.sites[0]
    if width >= 2:
        log_ratio = cmp.variance_ratio[0, :width].log().abs()
        worst = tuple(log_ratio.argsort(descending=True)[:2].tolist())
        drawn.append(lambda: plots.posterior_pairs(nuts, guide, dims=worst, site=name,
                                                   path=folder / "posterior_pairs.png"))
    return [(f"NUTS vs guide ({n} images, 4 chains x {args.nuts_samples})",
             f"max R-hat {conv['max_r_hat']:.3f}, min bulk ESS {conv['min_ess_bulk']:.0f}, "
             f"{conv['divergences']} divergences"),
            ("  guide mean error (posterior sd)",
             f"{s['mean_abs_error_sd']:.2f} mean, {s['max_abs_error_sd']:.2f} max"),
            ("  variance ratio guide / NUTS",
             f"{s['variance_ratio']:.2f} mean (log ratio {s['log_variance_ratio']:.2f})"),
            ("  energy distance (standardized)",
             f"{s['energy_distance']:.3f} ± {s['energy_distance_stderr']:.3f}")]


def figures(model, config, state, x_test, c_test, kl_per_dim, folder: Path, *, labels=None,
            tsne_points: int = 2000) -> None:
    """The figures of ``pvae evaluate``, as fit the model's conditioning; the latent embedding
    of every model (the test images' posterior means, coloured by ``labels``)."""
    image_shape = tuple(config["image_shape"]) if config.get("image_shape") else None
    condition = config.get("condition") or "none"
    g = torch.Generator(device=model.device).manual_seed(config["seed"])
    x_show = x_test[:10].to(model.device, model.dtype)
    if image_shape and condition in data.CONDITIONS:
        _structured_figure(model, condition, x_show, c_test[:10], image_shape, folder)
    elif image_shape and condition == "label":
        c_show = c_test[:10].to(model.device)
        plots.reconstructions(model, x_show, image_shape, c=c_show,
                              path=folder / "reconstructions.png")
        plots.class_grids(model, image_shape, generator=g,
                          paths=(folder / "style_fixed_class_varied.png",
                                 folder / "class_fixed_style_varied.png"))
    elif image_shape:
        plots.reconstructions(model, x_show, image_shape, path=folder / "reconstructions.png")
        plots.prior_samples(model, image_shape, generator=g, path=folder / "samples.png")
        latent_walks(model, x_show, kl_per_dim, image_shape, folder)
        if model.latent_dim == 2 and len(image_shape) == 2:
            plots.latent_manifold(model.decode, image_shape, path=folder / "latent_manifold.png",
                                  device=model.device, dtype=model.dtype)
    if kl_per_dim is not None:
        plots.kl_per_dim(kl_per_dim, path=folder / "kl_per_dim.png")
    plots.latent_embedding(posterior_means(model, x_test, c_test), labels,
                           tsne_points=tsne_points, seed=config["seed"],
                           path=folder / "latent_embedding.png")
    if (folder.parent / "history.csv").is_file() and not (folder / "training_curve.png").is_file():
        plots.training_curve(History(state["history"]), folder / "training_curve.png")


@torch.no_grad()
def posterior_means(model, x, c=None, batch_size: int = 1000) -> torch.Tensor:
    """E_q[z | x, c] of every row of ``x``, on the CPU: ``(N, latent_dim)`` (the first
    stochastic layer's for a hierarchical VAE)."""
    return torch.cat([model.encode(xb, None if c is None else c[i:i + batch_size])[0].cpu()
                      for i, xb in zip(range(0, len(x), batch_size), x.split(batch_size))])


def latent_walks(model, x, kl_per_dim, image_shape, folder: Path) -> None:
    """Interpolations between test images 0-2 and 3-5, and traversals around image 0 of the
    (up to) 8 latent dimensions with the largest KL (the first 8 without a per-dimension KL)."""
    if len(x) >= 2:
        half = min(3, len(x) // 2)
        plots.interpolations(model, x[:half], x[half:2 * half], image_shape,
                             path=folder / "interpolations.png")
    latent_dim = model.encode(x[:1])[0].shape[-1]
    if kl_per_dim is not None:
        dims = sorted(range(latent_dim), key=lambda j: -kl_per_dim[j])[:8]
    else:
        dims = list(range(min(8, latent_dim)))
    plots.traversals(model, x[0], image_shape, dims=dims, path=folder / "traversals.png")


def _structured_figure(model, condition, x, c, image_shape, folder: Path) -> None:
    """Inputs (observed part, missing part grey), predictions E[x | z, c] for z from the
    prior p(z | c), a posterior-mean imputation, and the ground truth."""
    mask = data.condition_mask(image_shape, condition).to(model.device)
    c = c.to(model.device, model.dtype)

    def assemble(part):
        full = torch.full((len(c), mask.numel()), 0.5, device=model.device, dtype=model.dtype)
        full[:, mask] = c
        if part is not None:
            full[:, ~mask] = part
        return full

    prior_draws = [model.sample(len(c), c=c) for _ in range(2)]
    imputed = impute(model, torch.zeros_like(x), torch.zeros_like(x, dtype=torch.bool), c=c,
                     num_samples=200).mean
    plots.image_grid([assemble(None), *[assemble(p) for p in prior_draws], assemble(imputed),
                      assemble(x)], image_shape,
                     row_labels=["input", "p(z|c) draw", "p(z|c) draw", "E[x | c]", "truth"],
                     path=folder / "structured_prediction.png")
