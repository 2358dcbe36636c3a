"""VAE vs IWAE on dynamically binarized Fashion-MNIST, and the variance of gradient estimators.

Reproduces the comparison of Burda, Grosse & Salakhutdinov (2015), "Importance Weighted
Autoencoders", Table 1, with their 784-200-200-50 tanh network: the same model trained with
the ELBO (VAE, k = 1 and k = 5 particles) and with the IWAE bound (k = 5 and k = 50), each
for the same number of epochs, evaluated by the test IW log-likelihood with K = 5000. Then, at
the trained VAE's parameters and on one batch, the gradient variance of the reparameterization,
score-function (with and without baselines) and IWAE (standard and DReG, Tucker et al. 2019)
estimators, and the training throughput of each.

    python examples/iwae_vs_vae.py --num-epochs 10 --out runs/iwae_vs_vae
    python examples/iwae_vs_vae.py --smoke
"""

import argparse
import json
import time
from pathlib import Path

import torch

from pvae import data, plots
from pvae.contract import resolve_device
from pvae.inference import (
    IWAE,
    LOSSES,
    ReparamELBO,
    ScoreFunctionELBO,
    gradient_variance,
    iw_log_likelihood,
)
from pvae.models import VAE
from pvae.train import Adam, fit

CONFIGS = [  # (label, estimator, k)
    ("VAE k=1", "reparam", 1),
    ("VAE k=5", "reparam", 5),
    ("IWAE k=5", "iwae", 5),
    ("IWAE k=50", "iwae", 50),
]
VARIANCE = [  # (label, a fresh loss, gradient_variance options)
    ("reparam", lambda: ReparamELBO(), {}),
    ("score, no baseline", lambda: ScoreFunctionELBO(), {}),
    ("score, average baseline", lambda: ScoreFunctionELBO(baseline="average"), {}),
    ("score, neural baseline", lambda: ScoreFunctionELBO(baseline="neural"),
     {"warmup_steps": 300}),
    ("IWAE k=5, standard", lambda: IWAE(5), {}),
    ("IWAE k=5, DReG", lambda: IWAE(5, gradient="dreg"), {}),
]


def make_model(x_dim, smoke):
    hidden = (32,) if smoke else (200, 200)
    return VAE(x_dim, 8 if smoke else 50, hidden, activation="tanh")


def main(args):
    dataset = "digits" if args.smoke else args.dataset
    ds = data.load(dataset, data_dir=args.data_dir, binarize="dynamic", seed=args.seed)
    x_train = ds.x_train[:300] if args.smoke else ds.x_train
    x_test = ds.x_test[: args.num_test]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"dataset": dataset, "num_epochs": args.num_epochs, "iw_num_samples":
               args.num_samples, "iw_num_test": len(x_test), "models": {}, "variance": {}}
    trained = {}
    for label, estimator, k in CONFIGS:
        torch.manual_seed(args.seed)
        model = make_model(ds.x_dim, args.smoke)
        t0 = time.perf_counter()
        history = fit(model, x_train, num_epochs=args.num_epochs, batch_size=args.batch_size,
                      optim=Adam(args.lr), loss=LOSSES[estimator](num_particles=k), binarize="dynamic",
                      device=resolve_device(args.device), seed=args.seed, progress=not args.smoke)
        seconds = time.perf_counter() - t0
        iw = iw_log_likelihood(model, x_test, num_samples=args.num_samples)
        results["models"][label] = {
            "test_iw_log_likelihood": iw.mean, "stderr": iw.stderr,
            "final_train_objective": history[-1]["train_elbo"],
            "images_per_s": sum(history.column("images_per_s")) / len(history),
            "train_seconds": seconds,
            "per_datapoint": iw.per_datapoint.tolist()}
        trained[label] = model
        print(f"{label:10s} test IW log p(x) (K={args.num_samples}) {iw.mean:9.2f} ± "
              f"{iw.stderr:.2f}   {results['models'][label]['images_per_s']:8.0f} images/s",
              flush=True)

    # paired differences over the same test images
    def paired(a, b):
        da = torch.tensor(results["models"][a]["per_datapoint"])
        db = torch.tensor(results["models"][b]["per_datapoint"])
        d = da - db
        return d.mean().item(), d.std().item() / len(d) ** 0.5

    for a, b in (("IWAE k=5", "VAE k=5"), ("IWAE k=50", "VAE k=5"), ("VAE k=5", "VAE k=1")):
        m, se = paired(a, b)
        results[f"{a} minus {b}"] = {"mean": m, "stderr": se}
        print(f"{a} − {b}: {m:+.2f} ± {se:.2f} nats (paired over test images)")

    vae = trained["VAE k=1"]
    batch = torch.bernoulli(x_train[: args.variance_batch].to(vae.device),
                            generator=torch.Generator(vae.device).manual_seed(args.seed))
    print(f"\ngradient variance at the trained VAE, one batch of {len(batch)}, "
          f"{args.num_estimates} estimates (trace of the covariance of d(-loss/B)/dθ):")
    for label, loss, opts in VARIANCE:
        t0 = time.perf_counter()
        r = gradient_variance(vae, batch, loss=loss(), num_estimates=args.num_estimates,
                              seed=args.seed, **opts)
        est_seconds = (time.perf_counter() - t0) / args.num_estimates
        results["variance"][label] = {**r, "seconds_per_estimate": est_seconds}
    base = results["variance"]["reparam"]
    print(f"{'estimator':26s} {'encoder var':>12s} {'decoder var':>12s} {'enc var / reparam':>18s} "
          f"{'enc SNR':>8s}")
    for label, r in results["variance"].items():
        ratio = r["encoder"]["variance"] / base["encoder"]["variance"]
        r["encoder_variance_ratio_to_reparam"] = ratio
        print(f"{label:26s} {r['encoder']['variance']:12.4g} {r['decoder']['variance']:12.4g} "
              f"{ratio:18.1f} {r['encoder']['snr']:8.3f}")
    # throughput of the score-function estimator for the table
    torch.manual_seed(args.seed)
    h = fit(make_model(ds.x_dim, args.smoke), x_train, num_epochs=1, batch_size=args.batch_size,
            loss=ScoreFunctionELBO(baseline="average"), binarize="dynamic", device=resolve_device(args.device),
            progress=False)
    results["score_images_per_s"] = h[-1]["images_per_s"]
    print(f"score-function (average baseline) training: {h[-1]['images_per_s']:.0f} images/s")
    plots.gradient_variance(results["variance"], path=out / "gradient_variance.png")
    for r in results["models"].values():
        r.pop("per_datapoint")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'results.json'} and gradient_variance.png; "
          "IW log-likelihood test images: " + str(len(x_test)))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--num-epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-samples", type=int, default=5000, help="K for the test IW")
    parser.add_argument("--num-test", type=int, default=2000, help="test images for the IW")
    parser.add_argument("--variance-batch", type=int, default=128)
    parser.add_argument("--num-estimates", type=int, default=200)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/iwae_vs_vae")
    parser.add_argument("--smoke", action="store_true", help="tiny offline run for the tests")
    main(parser.parse_args())
