"""The model zoo on Fashion-MNIST with one training budget: MLP vs convolutional VAE,
diagonal vs full-covariance guide, one vs two stochastic layers (each trained as VAE and as
IWAE k=5), and a Gaussian decoder with a learned per-pixel scale vs one whose scale is a
decoder output — test IW log-likelihoods with paired differences and standard errors, the
posterior-collapse diagnostics of each model (test KL, Burda et al.'s active units, the latent
dimensions carrying more than 0.05 nats of KL), and the training throughput of each model
relative to the MLP VAE.

Binary models train on dynamically binarized images (test set binarized once, Burda et al.
2015); the Gaussian decoders on grayscale images dequantized with uniform noise,
y = (x * 255 + u) / 256 (Theis, van den Oord & Bethge 2016), reported in nats and in bits per
dimension of the 256-level data, -(log p(y) - D log 256) / (D log 2). The MLP networks are
Burda et al.'s one-layer model (784-200-200-50, tanh); the two-layer model is theirs too
(Table 1: 82.90 vs 84.78 nats on MNIST with IWAE k=50).

    python examples/model_zoo.py --num-epochs 10 --num-samples 5000 --num-test 2000 --out runs/zoo
    python examples/model_zoo.py --smoke
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from pvae import data, plots
from pvae.contract import resolve_device
from pvae.inference import LOSSES, elbo_terms, iw_log_likelihood
from pvae.models import VAE, HierarchicalVAE
from pvae.stats import mean_stderr
from pvae.train import Adam, fit

MLP = dict(hidden_dims=(200, 200), activation="tanh")


def zoo(x_dim, image_shape, smoke):
    """``label -> (build, estimator, num_particles, data kind)``."""
    latent = 4 if smoke else 50
    mlp = dict(hidden_dims=(32,), activation="tanh") if smoke else MLP
    hvae = dict(latent_dims=(8, 4), hidden_dims=(32, 16)) if smoke else {}
    conv = dict(hidden_dims=(32 if smoke else 200,), network="conv", image_shape=image_shape,
                channels=(8, 16) if smoke else (32, 64))
    return {
        "MLP VAE": (lambda: VAE(x_dim, latent, **mlp), "reparam", 1, "binary"),
        "full-covariance VAE": (lambda: VAE(x_dim, latent, guide="full", **mlp), "reparam", 1,
                                "binary"),
        "two-layer VAE": (lambda: HierarchicalVAE(x_dim, **hvae), "reparam", 1, "binary"),
        "Gaussian, per-pixel scale": (lambda: VAE(x_dim, latent, likelihood="gaussian", **mlp),
                                      "reparam", 1, "gray"),
        "Gaussian, decoder scale": (lambda: VAE(x_dim, latent, likelihood="gaussian",
                                                likelihood_scale="decoder", **mlp),
                                    "reparam", 1, "gray"),
        "MLP IWAE k=5": (lambda: VAE(x_dim, latent, **mlp), "iwae", 5, "binary"),
        "two-layer IWAE k=5": (lambda: HierarchicalVAE(x_dim, **hvae), "iwae", 5, "binary"),
        "conv VAE": (lambda: VAE(x_dim, latent, **conv), "reparam", 1, "binary"),
    }


#: (label, a, b, what): paired differences a - b over the same test images
COMPARISONS = [
    ("conv VAE - MLP VAE: IW log p(x)", "conv VAE", "MLP VAE", "iw"),
    ("full - diagonal guide: IW - ELBO gap", "full-covariance VAE", "MLP VAE", "gap"),
    ("full - diagonal guide: IW log p(x)", "full-covariance VAE", "MLP VAE", "iw"),
    ("two-layer - one-layer, VAE objective: IW log p(x)", "two-layer VAE", "MLP VAE", "iw"),
    ("two-layer - one-layer, IWAE k=5: IW log p(x)", "two-layer IWAE k=5", "MLP IWAE k=5", "iw"),
    ("decoder - per-pixel scale (Gaussian): IW log p(y)", "Gaussian, decoder scale",
     "Gaussian, per-pixel scale", "iw"),
]


def summarize(out: Path, results: dict) -> dict:
    """``results`` with every model finished in ``out/models`` and the paired comparisons
    among them, written to ``out/results.json``."""
    per_datapoint = {}
    for path in sorted((out / "models").glob("*.json")):
        r = json.loads(path.read_text())
        per_datapoint[r["label"]] = {"iw": torch.tensor(r.pop("iw_per_datapoint")),
                                     "gap": torch.tensor(r.pop("gap_per_datapoint"))}
        results["models"][r.pop("label")] = r
    if "MLP VAE" in results["models"]:
        base = results["models"]["MLP VAE"]["images_per_s"]
        for v in results["models"].values():
            v["images_per_s_relative_to_mlp_vae"] = v["images_per_s"] / base
    for name, a, b, what in COMPARISONS:
        if a in per_datapoint and b in per_datapoint:
            m, se = mean_stderr(per_datapoint[a][what] - per_datapoint[b][what])
            results["comparisons"][name] = {"mean": m, "stderr": se}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def dequantize(x, seed):
    g = torch.Generator().manual_seed(seed)
    return (x * 255 + torch.rand(x.shape, generator=g)) / 256


def main(args):
    torch.set_num_threads(args.num_threads)
    dataset = "digits" if args.smoke else args.dataset
    gray = data.load(dataset, data_dir=args.data_dir, seed=args.seed)
    binary = data.load(dataset, data_dir=args.data_dir, binarize="dynamic", seed=args.seed)
    n_train = args.num_train or len(gray.x_train)
    sets = {"binary": (binary.x_train[:n_train], binary.x_test[: args.num_test], "dynamic"),
            "gray": (dequantize(gray.x_train[:n_train], args.seed),
                     dequantize(gray.x_test[: args.num_test], args.seed + 1), None)}
    out = Path(args.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    models = zoo(binary.x_dim, binary.image_shape, args.smoke)
    chosen = args.models or list(models)
    results = {"dataset": dataset, "num_train": n_train, "num_epochs": args.num_epochs,
               "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
               "iw_num_samples": args.num_samples, "num_test": len(sets["binary"][1]),
               "elbo_num_samples": args.elbo_samples, "num_threads": args.num_threads,
               "units": "nats per image (bits/dim where stated)", "models": {},
               "comparisons": {}}
    (out / "models").mkdir(exist_ok=True)
    for label in chosen:
        build, estimator, k, kind = models[label]
        x_train, x_test, binarize = sets[kind]
        torch.manual_seed(args.seed)
        model = build()
        t0 = time.perf_counter()
        history = fit(model, x_train, num_epochs=args.num_epochs, batch_size=args.batch_size,
                      optim=Adam(args.lr), loss=LOSSES[estimator](num_particles=k), binarize=binarize,
                      device=device, seed=args.seed, progress=False)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        iw = iw_log_likelihood(model, x_test, num_samples=args.num_samples)
        terms = elbo_terms(model, x_test, num_samples=args.elbo_samples)
        eval_s = time.perf_counter() - t0
        gap = iw.per_datapoint.double().cpu() - terms.elbo.double().cpu()
        gap_mean, gap_se = mean_stderr(gap)
        summary = terms.summary()
        r = {"estimator": estimator, "num_particles": k, "data": kind,
             "model_config": model.config,
             "test_iw_log_likelihood": iw.mean, "iw_stderr": iw.stderr,
             "test_elbo": summary["elbo"], "elbo_stderr": summary["elbo_stderr"],
             "iw_minus_elbo": gap_mean, "iw_minus_elbo_stderr": gap_se,
             "kl": summary["kl"], "active_units": summary["active_units"],
             "latent_dim": summary["latent_dim"],
             # posterior collapse: dims whose mean KL exceeds 0.05 nats (None for the full
             # guide, whose KL does not split by dimension)
             "dims_with_kl_above_0.05": (sum(v > 0.05 for v in summary["kl_per_dim"])
                                         if "kl_per_dim" in summary else None),
             "images_per_s": sum(history.column("images_per_s")) / len(history),
             "train_seconds": train_s, "eval_seconds": eval_s,
             "iw_per_datapoint": iw.per_datapoint.double().cpu().tolist(),
             "gap_per_datapoint": gap.tolist()}
        if kind == "gray":
            D = x_test.shape[1]
            r["test_bits_per_dim"] = -(iw.mean - D * math.log(256)) / (D * math.log(2))
            r["bits_per_dim_stderr"] = iw.stderr / (D * math.log(2))
        slug = label.lower().replace(" ", "_").replace(",", "").replace("=", "")
        # one file per model: several processes (--models) may fill one --out folder
        (out / "models" / f"{slug}.json").write_text(json.dumps({"label": label, **r}))
        print(f"{label:28s} IW {iw.mean:9.2f} ± {iw.stderr:.2f}  ELBO {r['test_elbo']:9.2f}  "
              f"IW-ELBO {gap_mean:6.2f} ± {gap_se:.2f}  KL {r['kl']:6.2f}  "
              f"active units {r['active_units']}/{r['latent_dim']}  "
              f"{r['images_per_s']:7.0f} images/s  "
              f"(train {train_s:.0f} s, eval {eval_s:.0f} s)", flush=True)
        shape = binary.image_shape
        plots.prior_samples(model, shape, generator=torch.Generator(model.device).manual_seed(0),
                            path=out / "figures" / f"{slug}_samples.png")
        plots.reconstructions(model, x_test[:10].to(model.device), shape,
                              path=out / "figures" / f"{slug}_reconstructions.png")
        summarize(out, results)
    for name, c in results["comparisons"].items():
        print(f"{name}: {c['mean']:+.2f} ± {c['stderr']:.2f} nats (paired)")
    print(f"wrote {out / 'results.json'} and {out / 'figures'}/")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--num-train", type=int, default=0, help="training images (0 = all)")
    parser.add_argument("--num-epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-samples", type=int, default=5000, help="K for the test IW")
    parser.add_argument("--num-test", type=int, default=2000, help="test images")
    parser.add_argument("--elbo-samples", type=int, default=10, help="particles of the test ELBO")
    parser.add_argument("--models", nargs="+", default=None,
                        help="labels to run (default: all, in the order of the table)")
    parser.add_argument("--num-threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/model_zoo")
    parser.add_argument("--smoke", action="store_true", help="tiny offline run for the tests")
    main(parser.parse_args())
