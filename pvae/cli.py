"""The ``pvae`` command line: ``pvae train``, ``pvae evaluate``, ``pvae ppca``.

A run lives in one folder (``DESIGN.md``, "Runs on disk"): ``config.json``, ``checkpoint.pt``,
``history.csv``, ``figures/``, and after evaluation ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pvae import data, plots
from pvae.inference import (
    CheckpointError,
    History,
    elbo_terms,
    fit,
    iw_log_likelihood,
    load_checkpoint,
    resolve_device,
)
from pvae.inference.estimators import BASELINES, ESTIMATORS, GRADIENTS, make_schedule
from pvae.models import LIKELIHOODS, MODELS
from pvae.nn import ACTIVATIONS

__all__ = ["build_model", "load_run", "main"]

#: config keys that define the model's architecture (must match between config and checkpoint)
MODEL_KEYS = ("model", "x_dim", "latent_dim", "hidden_dims", "likelihood", "likelihood_scale",
              "activation", "condition", "prior", "num_classes", "c_dim")


def build_model(config: dict):
    """Rebuild a model from a run's ``config.json`` dictionary.

    :raises ValueError: unknown model name.
    """
    name = config["model"]
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    kwargs = dict(hidden_dims=tuple(config["hidden_dims"]), likelihood=config["likelihood"],
                  likelihood_scale=config["likelihood_scale"], activation=config["activation"])
    condition = config.get("condition") or "none"
    if name == "cvae":
        if condition == "none":
            raise ValueError("--model cvae needs --condition label, top-half or quadrant")
        kwargs.update(num_classes=config.get("num_classes"), c_dim=config.get("c_dim"),
                      prior=config.get("prior", "standard"))
    elif condition != "none":
        raise ValueError(f"--condition {condition} needs --model cvae")
    return MODELS[name](config["x_dim"], config["latent_dim"], **kwargs)


def conditioning(config: dict, x: torch.Tensor, y: torch.Tensor):
    """Split a dataset split for the run's ``--condition``: ``(x, c)`` with ``c = None``
    (unconditional), the labels ``y`` (``label``), or the observed pixels (``top-half``,
    ``quadrant``: x keeps the pixels to predict)."""
    condition = config.get("condition") or "none"
    if condition == "none":
        return x, None
    if condition == "label":
        return x, y
    mask = data.condition_mask(tuple(config["image_shape"]), condition)
    return x[:, ~mask], x[:, mask]


def load_run(run_dir, device="auto"):
    """Load a trained run: ``(model, config, checkpoint_state)``.

    :raises FileNotFoundError: no ``config.json`` or ``checkpoint.pt`` in ``run_dir``.
    :raises CheckpointError: the checkpoint is corrupt or was written for another config.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: is {run_dir} a folder written by "
                                "`pvae train --out ...`?")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e})") from e
    device = resolve_device(device)
    state = load_checkpoint(run_dir / "checkpoint.pt", map_location=device)
    saved = state.get("config", {})
    mismatch = {k: (saved.get(k), config.get(k)) for k in MODEL_KEYS if saved.get(k) != config.get(k)}
    if mismatch:
        raise CheckpointError(f"{run_dir / 'checkpoint.pt'} was written for another config than "
                              f"{config_path} (checkpoint vs config: {mismatch}); retrain or "
                              "restore the matching config.json")
    model = build_model(config).to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint does not fit the model in {config_path}: {e}") from e
    model.eval()
    return model, config, state


def _load_data(config):
    try:
        return data.load(config["dataset"], data_dir=config.get("data_dir"),
                         binarize=config.get("binarize"), seed=config["seed"],
                         download=config.get("download", False))
    except data.DataNotFoundError as e:
        sys.exit(f"pvae: {e}")


def cmd_train(args) -> None:
    binarize = None if args.binarize == "none" else args.binarize
    config = {
        "dataset": args.dataset, "data_dir": args.data_dir, "download": args.download,
        "binarize": binarize, "model": args.model, "latent_dim": args.latent_dim,
        "hidden_dims": args.hidden_dims, "likelihood": args.likelihood,
        "likelihood_scale": args.likelihood_scale, "activation": args.activation,
        "num_epochs": args.num_epochs, "batch_size": args.batch_size, "lr": args.lr,
        "estimator": args.estimator, "num_particles": args.num_particles,
        "analytic_kl": args.analytic_kl, "beta": args.beta,
        "kl_warmup_steps": args.kl_warmup_steps, "kl_cycle_steps": args.kl_cycle_steps,
        "baseline": None if args.baseline == "none" else args.baseline,
        "gradient": args.gradient, "seed": args.seed, "num_train": args.num_train,
        "num_val": args.num_val, "condition": args.condition, "prior": args.prior,
        "num_classes": None, "c_dim": None,
    }
    ds = _load_data(config)
    config["image_shape"] = list(ds.image_shape) if ds.image_shape else None
    config["x_dim"] = ds.x_dim
    if args.condition == "label":
        config["num_classes"] = ds.num_classes
    elif args.condition in data.CONDITIONS:
        mask = data.condition_mask(ds.image_shape, args.condition)
        config["x_dim"], config["c_dim"] = int((~mask).sum()), int(mask.sum())
    out = Path(args.out)
    config_path = out / "config.json"
    if config_path.is_file() and not args.resume:
        sys.exit(f"pvae: {out} already holds a run; pass --resume to continue it or choose "
                 "another --out")
    out.mkdir(parents=True, exist_ok=True)
    if args.resume and config_path.is_file():
        old = json.loads(config_path.read_text())
        diff = {k: (old.get(k), config.get(k)) for k in config
                if k != "num_epochs" and old.get(k) != config.get(k)}
        if diff:
            sys.exit(f"pvae: --resume with other settings than {config_path}: {diff}")
    config_path.write_text(json.dumps(config, indent=2))

    torch.manual_seed(args.seed)
    try:
        model = build_model(config)
    except ValueError as e:
        sys.exit(f"pvae: {e}")
    n = args.num_train or len(ds.x_train)
    if binarize == "dynamic" and config["condition"] in data.CONDITIONS:
        # binarize each image afresh, then split it: observed and missing pixels come from
        # the same draw (fit's own dynamic binarization would binarize x only)
        mask = data.condition_mask(ds.image_shape, config["condition"])
        x_train, c_train = data.ConditionSplit(ds.x_train[:n], mask, "dynamic"), None
        fit_binarize = None
    else:
        x_train, c_train = conditioning(config, ds.x_train[:n], ds.y_train[:n])
        fit_binarize = "dynamic" if binarize == "dynamic" else None
    x_val, c_val = conditioning(config, ds.x_test[: args.num_val], ds.y_test[: args.num_val])
    if not args.num_val:
        x_val = c_val = None
    model_config = {k: config[k] for k in MODEL_KEYS}
    history = fit(model, x_train, c=c_train, x_val=x_val, c_val=c_val,
                  num_epochs=args.num_epochs,
                  batch_size=args.batch_size, lr=args.lr, estimator=args.estimator,
                  num_particles=args.num_particles, analytic_kl=args.analytic_kl,
                  beta=make_schedule(args.beta, args.kl_warmup_steps, args.kl_cycle_steps),
                  baseline=config["baseline"], gradient=args.gradient, device=args.device,
                  seed=args.seed, binarize=fit_binarize,
                  checkpoint_dir=out, resume=args.resume, progress=not args.no_progress,
                  config=model_config)
    history.to_csv(out / "history.csv")
    plots.training_curve(history, out / "figures" / "training_curve.png")
    last = history[-1] if len(history) else {}
    print(f"trained {args.model} on {args.dataset}: {len(history)} epochs, "
          f"train ELBO {last.get('train_elbo', float('nan')):.2f}, "
          f"val ELBO {last.get('val_elbo', float('nan')):.2f} nats/image, "
          f"{last.get('images_per_s', float('nan')):.0f} images/s -> {out}")


def _table(rows) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def cmd_evaluate(args) -> None:
    run = Path(args.run)
    try:
        model, config, state = load_run(run, args.device)
    except (FileNotFoundError, CheckpointError) as e:
        sys.exit(f"pvae: {e}")
    ds = _load_data(config)
    n = args.num_test or len(ds.x_test)
    x_test, c_test = conditioning(config, ds.x_test[:n], ds.y_test[:n])
    terms = elbo_terms(model, x_test, c=c_test, num_samples=args.num_elbo_samples)
    summary = terms.summary()
    metrics = {"run": str(run), "dataset": config["dataset"], "num_test": len(x_test),
               "epochs": state["epoch"], "units": "nats per image",
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
        elbo_same = terms.elbo[: len(x_iw)]
        gap = (iw.per_datapoint.double() - elbo_same.double())
        metrics.update({
            "iw_log_likelihood": iw.mean, "iw_log_likelihood_stderr": iw.stderr,
            "iw_num_samples": args.num_samples, "iw_num_test": len(x_iw),
            "iw_median_ess": iw.ess.median().item(),
            "iw_minus_elbo": gap.mean().item(),
            "iw_minus_elbo_stderr": gap.std().item() / max(len(gap), 2) ** 0.5,
        })
        rows += [(f"IW log p(x{'' if c_test is None else ' | c'}), K={args.num_samples} "
                  f"({len(x_iw)} images)",
                  f"{iw.mean:.2f} ± {iw.stderr:.2f}"),
                 ("IW − ELBO gap (same images)",
                  f"{metrics['iw_minus_elbo']:.2f} ± {metrics['iw_minus_elbo_stderr']:.2f}"),
                 ("median ESS", f"{metrics['iw_median_ess']:.1f} of {args.num_samples}")]
    print(f"{config['model']} on {config['dataset']} after {state['epoch']} epochs "
          "(nats per image):")
    print(_table(rows))
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))

    figures = run / "figures"
    image_shape = tuple(config["image_shape"]) if config.get("image_shape") else None
    condition = config.get("condition") or "none"
    g = torch.Generator(device=model.device).manual_seed(config["seed"])
    if image_shape and condition in data.CONDITIONS:
        _structured_figures(model, config, x_test[:10], c_test[:10], image_shape, figures)
    elif image_shape and condition == "label":
        _class_figures(model, config, x_test[:10], c_test[:10], image_shape, figures, g)
    elif image_shape:
        x_show = x_test[:10].to(model.device, model.dtype)
        plots.image_grid([x_show, model.reconstruct(x_show)], image_shape,
                         row_labels=["input", "reconstruction"],
                         path=figures / "reconstructions.png")
        samples = model.sample(80, generator=g)
        plots.image_grid(list(samples.reshape(8, 10, -1)), image_shape,
                         path=figures / "samples.png", title="samples from the prior (E[x|z])")
        if config["latent_dim"] == 2:
            plots.latent_manifold(model.decode, image_shape, path=figures / "latent_manifold.png",
                                  device=model.device, dtype=model.dtype)
    if metrics["kl_per_dim"] is not None:
        plots.kl_per_dim(metrics["kl_per_dim"], path=figures / "kl_per_dim.png")
    history_path = run / "history.csv"
    if history_path.is_file() and not (figures / "training_curve.png").is_file():
        plots.training_curve(History(state["history"]), figures / "training_curve.png")
    print(f"wrote {run / 'metrics.json'} and {figures}/")


def cmd_ppca(args) -> None:
    import time

    from pvae.inference import compare_posteriors, principal_angles, to_inference_data
    from pvae.models import PPCA

    config = {"dataset": args.dataset, "data_dir": args.data_dir, "download": args.download,
              "binarize": None, "seed": args.seed}
    ds = _load_data(config)
    x_train = ds.x_train[: args.num_train] if args.num_train else ds.x_train
    x_test = ds.x_test
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)

    model = PPCA(ds.x_dim, args.latent_dim, args.guide)
    t0 = time.perf_counter()
    history = fit(model, x_train, x_val=x_test[:1000], num_epochs=args.num_epochs,
                  batch_size=args.batch_size, lr=args.lr,
                  lr_decay=args.final_lr_factor ** (1 / max(args.num_epochs, 1)),
                  analytic_kl=True, num_particles=args.num_particles, device=device,
                  seed=args.seed, progress=not args.no_progress,
                  config={"model": "ppca", "latent_dim": args.latent_dim, "guide": args.guide})
    svi_seconds = time.perf_counter() - t0
    history.to_csv(out / "history.csv")
    t0 = time.perf_counter()
    reference = PPCA.closed_form(x_train.to(device), args.latent_dim, guide=args.guide)
    closed_form_seconds = time.perf_counter() - t0
    torch.save({"svi": model.state_dict(), "closed_form": reference.state_dict()},
                out / "models.pt")

    x_eval = x_test.to(device)
    comparison = compare_posteriors(model, x_eval, reference=reference)
    report = {"dataset": args.dataset, "latent_dim": args.latent_dim, "guide": args.guide,
              "num_epochs": args.num_epochs, "num_train": len(x_train), "num_test": len(x_eval),
              "units": "nats per datapoint (test set)", "svi_seconds": svi_seconds,
              "closed_form_seconds": closed_form_seconds, **comparison.summary()}
    report["train_log_likelihood"] = model.log_marginal(x_train.to(device)).mean().item()
    report["reference_train_log_likelihood"] = \
        reference.log_marginal(x_train.to(device)).mean().item()
    if args.num_samples > 0:
        x_iw = x_eval[: args.iw_num_test]
        iw = iw_log_likelihood(model, x_iw, num_samples=args.num_samples)
        exact = model.log_marginal(x_iw).double()
        diff = iw.per_datapoint.double() - exact
        report.update({"iw_log_likelihood": iw.mean, "iw_log_likelihood_stderr": iw.stderr,
                       "iw_num_samples": args.num_samples, "iw_num_test": len(x_iw),
                       "exact_log_likelihood_same_points": exact.mean().item(),
                       "iw_minus_exact": diff.mean().item(),
                       "iw_minus_exact_stderr": diff.std().item() / max(len(diff), 2) ** 0.5})
    if "W" in ds.params:  # synthetic data: compare with the generating parameters
        report["true_sigma2"] = float(ds.params["sigma"]) ** 2
        report["max_angle_to_true_W_deg"] = principal_angles(model.W.cpu(),
                                                             ds.params["W"]).max().item()
    (out / "report.json").write_text(json.dumps(report, indent=2))

    rows = [("test log-likelihood, SVI (exact)", f"{report['log_likelihood']:.3f}"),
            ("test log-likelihood, closed form", f"{report['reference_log_likelihood']:.3f}"),
            ("train log-likelihood, SVI / closed form",
             f"{report['train_log_likelihood']:.3f} / {report['reference_train_log_likelihood']:.3f}"),
            (f"KL(q || p_exact), {args.guide} guide",
             f"{report['kl_q_p']:.4f} ± {report['kl_q_p_stderr']:.4f}"),
            ("mean-field KL floor", f"{report['mean_field_kl_floor']:.4f}"),
            ("KL(p_exact || q)", f"{report['kl_p_q']:.4f}"),
            ("posterior mean error", f"{report['mean_error']:.4f}"),
            ("log|Σq| − log|Σp|", f"{report['logdet_ratio']:.4f}"),
            ("largest principal angle to W_ml", f"{report['max_principal_angle_deg']:.3f}°"),
            ("σ², SVI / closed form", f"{report['sigma2']:.6f} / {report['reference_sigma2']:.6f}"),
            ("wall time, SVI / closed form",
             f"{svi_seconds:.1f} s / {closed_form_seconds:.2f} s")]
    if args.num_samples > 0:
        rows.append((f"IW log p(x), K={args.num_samples} − exact",
                     f"{report['iw_minus_exact']:.4f} ± {report['iw_minus_exact_stderr']:.4f}"))
    if "true_sigma2" in report:
        rows.append(("largest angle to true W; true σ²",
                     f"{report['max_angle_to_true_W_deg']:.3f}°; {report['true_sigma2']:.4f}"))
    print(f"PPCA on {args.dataset}, q={args.latent_dim} (nats per datapoint):")
    print(_table(rows))

    figures = out / "figures"
    shown = x_eval[:5]
    q, p = model.guide_distribution(shown), model.exact_posterior(shown)
    q_cov = q.covariance_matrix if args.guide == "full" else torch.diag_embed(q.variance)
    plots.posterior_ellipses(q.mean.detach().cpu(), q_cov.detach().cpu(), p.mean.detach().cpu(),
                             p.covariance_matrix.detach().cpu(), path=figures / "posterior_ellipses.png")
    idata = to_inference_data(model, x_eval[:3], num_draws=1000, seed=args.seed)
    plots.posterior_forest(idata, path=figures / "posterior_forest.png")
    plots.training_curve(history, figures / "training_curve.png")
    print(f"wrote {out / 'report.json'} and {figures}/")


def _class_figures(model, config, x, y, image_shape, figures, g):
    """Reconstructions, and the two class grids: rows = one z (style) with the class varied
    along the columns; rows = one class with z varied along the columns."""
    x, y = x.to(model.device, model.dtype), y.to(model.device)
    plots.image_grid([x, model.reconstruct(x, y)], image_shape,
                     row_labels=["input", "reconstruction"], path=figures / "reconstructions.png")
    k = config["num_classes"]
    z = torch.randn(6, model.latent_dim, generator=g, device=model.device, dtype=model.dtype)
    classes = torch.arange(k, device=model.device)
    rows = [model.sample(k, c=classes, z=z[i].expand(k, -1)) for i in range(len(z))]
    plots.image_grid(rows, image_shape, row_labels=[f"z #{i}" for i in range(len(z))],
                     path=figures / "style_fixed_class_varied.png",
                     title="each row: one z, classes 0..9 (standard-prior z)")
    rows = [model.sample(10, c=torch.tensor(i, device=model.device), generator=g)
            for i in range(k)]
    plots.image_grid(rows, image_shape, row_labels=[f"class {i}" for i in range(k)],
                     path=figures / "class_fixed_style_varied.png",
                     title="each row: one class, z ~ p(z | c)")


def _structured_figures(model, config, x, c, image_shape, figures):
    """Inputs (observed part, missing part grey), predictions E[x | z, c] for z from the
    prior p(z | c), a posterior-mean imputation, and the ground truth."""
    from pvae.inference import impute

    mask = data.condition_mask(image_shape, config["condition"]).to(model.device)
    x, c = x.to(model.device, model.dtype), c.to(model.device, model.dtype)

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
                     path=figures / "structured_prediction.png")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pvae", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on a dataset and write a run folder")
    t.add_argument("--dataset", default="fashion-mnist", choices=sorted(data.DATASETS))
    t.add_argument("--data-dir", default=None, help="folder with the IDX files")
    t.add_argument("--download", action="store_true",
                   help="download the dataset's official files if they are found nowhere")
    t.add_argument("--binarize", default="dynamic", choices=["none", "static", "dynamic"])
    t.add_argument("--model", default="vae", choices=sorted(MODELS))
    t.add_argument("--latent-dim", type=int, default=50)
    t.add_argument("--hidden-dims", type=int, nargs="+", default=[400])
    t.add_argument("--likelihood", default="bernoulli", choices=sorted(LIKELIHOODS))
    t.add_argument("--condition", default="none", choices=["none", "label", *data.CONDITIONS],
                   help="cvae: condition on the class label or on part of the image")
    t.add_argument("--prior", default="standard", choices=["standard", "learned"],
                   help="cvae: N(0, I) or a learned p(z | c)")
    t.add_argument("--likelihood-scale", default="learned",
                   help="'learned' or a fixed float (gaussian/laplace)")
    t.add_argument("--activation", default="relu", choices=sorted(ACTIVATIONS))
    t.add_argument("--num-epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--estimator", default="reparam", choices=sorted(ESTIMATORS))
    t.add_argument("--num-particles", type=int, default=1)
    t.add_argument("--analytic-kl", action="store_true")
    t.add_argument("--beta", type=float, default=1.0, help="KL weight (beta-VAE)")
    t.add_argument("--kl-warmup-steps", type=int, default=0,
                   help="anneal beta linearly from 0 over this many steps")
    t.add_argument("--kl-cycle-steps", type=int, default=0,
                   help="cyclical annealing of beta with this period (steps)")
    t.add_argument("--baseline", default="none", choices=["none", *[b for b in BASELINES if b]],
                   help="score-function baseline (--estimator score)")
    t.add_argument("--gradient", default="standard", choices=list(GRADIENTS),
                   help="IWAE gradient: standard or dreg (--estimator iwae)")
    t.add_argument("--num-train", type=int, default=0, help="use the first N images (0 = all)")
    t.add_argument("--num-val", type=int, default=1000,
                   help="validation ELBO on the first N test images each epoch (0 = none)")
    t.add_argument("--device", default="auto")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a trained run: metrics.json and figures")
    e.add_argument("run", help="run folder written by pvae train")
    e.add_argument("--num-samples", type=int, default=5000,
                   help="K for the IW log-likelihood (0 = skip it)")
    e.add_argument("--iw-num-test", type=int, default=1000,
                   help="test images for the IW estimate (0 = all)")
    e.add_argument("--num-test", type=int, default=0, help="test images for the ELBO (0 = all)")
    e.add_argument("--num-elbo-samples", type=int, default=1)
    e.add_argument("--device", default="auto")
    e.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("ppca", help="probabilistic PCA: SVI vs closed form vs exact posterior")
    p.add_argument("--dataset", default="digits", choices=sorted(data.DATASETS))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--download", action="store_true")
    p.add_argument("--latent-dim", type=int, default=10)
    p.add_argument("--guide", default="full", choices=["full", "diagonal"])
    p.add_argument("--num-epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--final-lr-factor", type=float, default=1e-3,
                   help="the learning rate decays exponentially to lr * this by the last epoch")
    p.add_argument("--num-particles", type=int, default=1)
    p.add_argument("--num-train", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1000, help="K for the IW check (0 = skip)")
    p.add_argument("--iw-num-test", type=int, default=500)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_ppca)
    return parser


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if getattr(args, "likelihood_scale", "learned") != "learned":
        try:
            args.likelihood_scale = float(args.likelihood_scale)
        except ValueError:
            sys.exit(f"pvae: --likelihood-scale must be 'learned' or a number, got "
                     f"{args.likelihood_scale!r}")
    args.func(args)


if __name__ == "__main__":
    main()
