"""``pvae ppca``: probabilistic PCA by SVI against the closed-form maximum-likelihood fit and
the exact posterior. Writes an ordinary run folder (``pvae evaluate`` reads it) plus
``report.json`` and ``reference.pt`` (the closed-form fit: ``PPCA.from_config`` of its
``model_config``, then its ``model`` state)."""

from __future__ import annotations

import time

import torch

from pvae import data, plots
from pvae.contract import resolve_device
from pvae.inference import ReparamELBO, iw_log_likelihood
from pvae.models import PPCA, compare_posteriors, to_inference_data
from pvae.runs import (
    BEST_NAME,
    RunError,
    WriteConfig,
    load_data,
    new_model,
    prepare_run,
    run_record,
    write_json,
)
from pvae.stats import mean_stderr, principal_angles
from pvae.train import Adam, BestCheckpoint, ExponentialLR, HistoryCSV, fit, save_checkpoint

from .common import count, number, table

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("ppca", help="probabilistic PCA: SVI vs closed form vs exact posterior")
    p.add_argument("--dataset", default="digits", choices=sorted(data.DATASETS))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--download", action="store_true")
    p.add_argument("--latent-dim", type=count(1), default=10)
    p.add_argument("--guide", default="full", choices=["full", "diagonal"])
    p.add_argument("--num-epochs", type=count(0), default=30)
    p.add_argument("--batch-size", type=count(1), default=256)
    p.add_argument("--lr", type=number(0.0, strict=True), default=2e-2)
    p.add_argument("--final-lr-factor", type=number(0.0, strict=True), default=1e-3,
                   help="the learning rate decays exponentially to lr * this by the last epoch")
    p.add_argument("--num-particles", type=count(1), default=1)
    p.add_argument("--num-train", type=count(0), default=0)
    p.add_argument("--num-samples", type=count(0), default=1000,
                   help="K for the IW check (0 = skip)")
    p.add_argument("--iw-num-test", type=count(1), default=500)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=count(0), default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> None:
    config = {"dataset": args.dataset, "data_dir": args.data_dir, "download": args.download,
              "binarize": None, "seed": args.seed, "num_train": args.num_train, "model": "ppca"}
    ds = load_data(config)
    x_train = ds.x_train[: args.num_train] if args.num_train else ds.x_train
    x_test = ds.x_test
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    try:
        model = new_model(PPCA, dict(x_dim=ds.x_dim, latent_dim=args.latent_dim,
                                     guide=args.guide), device)
    except ValueError as e:
        raise RunError(str(e)) from e
    config.update(image_shape=list(ds.image_shape) if ds.image_shape else None,
                  model_config=model.config)
    out = prepare_run(args.out, resumable=False)

    t0 = time.perf_counter()
    decay = ExponentialLR(args.final_lr_factor ** (1 / max(args.num_epochs, 1)))
    history = fit(model, x_train, val=x_test[:1000], num_epochs=args.num_epochs,
                  batch_size=args.batch_size, optim=Adam(args.lr, schedule=decay),
                  loss=ReparamELBO(args.num_particles, analytic_kl=True), device=device,
                  seed=args.seed, checkpoint_dir=out, progress=not args.no_progress,
                  config=run_record(config),
                  callbacks=[WriteConfig(out), BestCheckpoint(out / BEST_NAME),
                             HistoryCSV(out / "history.csv")])
    svi_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = PPCA.closed_form(x_train.to(device), args.latent_dim, guide=args.guide)
    closed_form_seconds = time.perf_counter() - t0
    save_checkpoint(out / "reference.pt", {"model": reference.state_dict(),
                                           "model_config": reference.config})

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
        diff_mean, diff_stderr = mean_stderr(iw.per_datapoint.double() - exact)
        report.update({"iw_log_likelihood": iw.mean, "iw_log_likelihood_stderr": iw.stderr,
                       "iw_num_samples": args.num_samples, "iw_num_test": len(x_iw),
                       "exact_log_likelihood_same_points": exact.mean().item(),
                       "iw_minus_exact": diff_mean, "iw_minus_exact_stderr": diff_stderr})
    if "W" in ds.params:  # synthetic data: compare with the generating parameters
        report["true_sigma2"] = float(ds.params["sigma"]) ** 2
        report["max_angle_to_true_W_deg"] = principal_angles(model.W.cpu(),
                                                             ds.params["W"]).max().item()
    write_json(out / "report.json", report)

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
    print(table(rows))

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
