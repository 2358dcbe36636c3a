"""Deterministic autoencoders on Fashion-MNIST, side by side with PCA and the VAE.

Measures, on grayscale Fashion-MNIST (intensities in [0, 1]):

1. linear autoencoder = PCA (Bourlard & Kamp 1988; Baldi & Hornik 1989): at code sizes 10 and
   50, the largest principal angle between the linear AE's decoder columns and scikit-learn's
   top principal subspace, and the ratio of their reconstruction MSEs (training set);
2. at code size 32 and equal epochs: test MSE per pixel and linear-probe accuracy (logistic
   regression on the codes) for PCA, linear AE, deep AE, sparse AEs (L1, KL), denoising AEs
   (Gaussian noise, masking), contractive AE, masked AE (He et al. 2021) and the VAE's
   posterior mean;
3. denoising: test MSE against the clean image as a function of the corruption level, for the
   denoising AEs and the plain deep AE;
4. sparsity: the fraction of code units below 1e-3 per image with and without the penalty;
5. the masked AE's masked-patch MSE at 75% masking, and a figure of input / masked input /
   reconstruction.

Every model is trained by ``pvae.train.fit``; autoencoders through
``pvae.autoencoders.AutoencoderLoss``. Results are printed as they come and written to
``--out``/results.json.

    python examples/autoencoders_fashion_mnist.py --num-epochs 3 --out runs/autoencoders
    python examples/autoencoders_fashion_mnist.py --smoke   # tiny and offline (digits)
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA

from pvae import data, plots
from pvae.autoencoders import (
    AutoencoderLoss,
    DeepAutoencoder,
    LinearAutoencoder,
    MaskedAutoencoder,
    code_statistics,
    encode_all,
    linear_probe,
    reconstruction_error,
)
from pvae.contract import resolve_device
from pvae.models import VAE
from pvae.stats import mean_stderr
from pvae.train import Adam, ExponentialLR, fit


def _say(results, out, *lines):
    for line in lines:
        print(line, flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))


def _pca_mse(pca, x):
    xr = pca.inverse_transform(pca.transform(x))
    return ((xr - x) ** 2).mean(-1)


def linear_vs_pca(args, ds, out, results, device):
    x = ds.x_train[: args.num_train or None]
    xn = x.numpy().astype(np.float64)
    for k in args.pca_codes:
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        ae = LinearAutoencoder(ds.x_dim, k)
        fit(ae, x, loss=AutoencoderLoss(), num_epochs=args.linear_epochs, batch_size=128,
            optim=Adam(args.linear_lr, schedule=ExponentialLR(args.linear_decay)), device=device,
            seed=args.seed, progress=False)
        pca = PCA(k).fit(xn)
        angles = np.degrees(subspace_angles(ae.decoder.weight.detach().cpu().double().numpy(),
                                            pca.components_.T))
        mse_ae = reconstruction_error(ae, x)["mse"]
        mse_pca = float(_pca_mse(pca, xn).mean())
        row = {"code_dim": k, "epochs": args.linear_epochs, "max_angle_deg": float(angles.max()),
               "median_angle_deg": float(np.median(angles)), "mse_ae": mse_ae,
               "mse_pca": mse_pca, "mse_ratio": mse_ae / mse_pca,
               "seconds": time.perf_counter() - t0}
        results["linear_vs_pca"].append(row)
        _say(results, out, f"[linear AE vs PCA] k={k}: largest principal angle "
             f"{row['max_angle_deg']:.3f}° (median {row['median_angle_deg']:.3f}°), train MSE "
             f"AE/PCA = {row['mse_ratio']:.5f} ({mse_ae:.5f} vs {mse_pca:.5f}), "
             f"{args.linear_epochs} epochs, {row['seconds']:.0f} s")


def table(args, ds, out, results, device):
    k, epochs = args.code_dim, args.num_epochs
    x_train = ds.x_train[: args.num_train or None]
    x_test = ds.x_test[: args.num_test or None]
    pn = args.probe_num_train
    ae_kw = dict(x_dim=ds.x_dim, code_dim=k, hidden_dims=args.hidden_dims)
    specs = [  # name, model factory, objective settings
        ("deep AE", lambda: DeepAutoencoder(**ae_kw), {}),
        ("deep AE, ReLU code", lambda: DeepAutoencoder(**ae_kw, code_activation="relu"), {}),
        ("sparse L1 (ReLU code)", lambda: DeepAutoencoder(**ae_kw, code_activation="relu"),
         {"sparsity": "l1", "sparsity_weight": args.l1_weight}),
        ("deep AE, sigmoid code", lambda: DeepAutoencoder(**ae_kw, code_activation="sigmoid"),
         {}),
        ("sparse KL (sigmoid code)",
         lambda: DeepAutoencoder(**ae_kw, code_activation="sigmoid"),
         {"sparsity": "kl", "sparsity_weight": args.kl_weight,
          "target_activation": args.target_activation}),
        ("denoising, Gaussian", lambda: DeepAutoencoder(**ae_kw),
         {"corruption": "gaussian", "noise_scale": args.noise_scale}),
        ("denoising, mask", lambda: DeepAutoencoder(**ae_kw),
         {"corruption": "mask", "mask_fraction": args.mask_fraction}),
        ("linear AE", lambda: LinearAutoencoder(ds.x_dim, k), {}),
        ("masked AE", lambda: MaskedAutoencoder(ds.image_shape, 7, embed_dim=k), {}),
        ("VAE", None, {}),
        ("contractive", lambda: DeepAutoencoder(**ae_kw), {"contractive": args.contractive}),
    ]
    z_pca_t0 = time.perf_counter()
    pca = PCA(k).fit(x_train.numpy())
    mse = mean_stderr(torch.from_numpy(_pca_mse(pca, x_test.numpy())).double())
    probe = linear_probe(torch.from_numpy(pca.transform(x_train[:pn].numpy())), ds.y_train[:pn],
                         torch.from_numpy(pca.transform(x_test.numpy())), ds.y_test)
    _row(results, out, "PCA", mse, probe, None, time.perf_counter() - z_pca_t0)
    models = {}
    for name, make, settings in specs:
        if args.only and name not in args.only:
            continue
        if name == "VAE":
            vae_row(args, ds, out, results, device, x_train, x_test)
            continue
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        model = make()
        fit(model, x_train, loss=AutoencoderLoss(**settings), num_epochs=epochs,
            batch_size=args.batch_size, optim=Adam(args.lr), device=device, seed=args.seed,
            progress=False)
        model.eval()
        seconds = time.perf_counter() - t0
        models[name] = model
        z_test = encode_all(model, x_test)
        probe = linear_probe(encode_all(model, x_train[:pn]), ds.y_train[:pn], z_test, ds.y_test)
        stats = code_statistics(z_test)
        if isinstance(model, MaskedAutoencoder):
            torch.manual_seed(args.seed)
            with torch.no_grad():
                losses = torch.cat([model.masked_loss(xb.to(model.device))[0].cpu()
                                    for xb in x_test.split(1000)])
            per_pixel = losses.double() / (model.num_masked * model.patch_dim)
            mse = mean_stderr(per_pixel)
            results["mae"] = {"mask_ratio": model.mask_ratio, "masked_patch_mse": mse[0],
                              "masked_patch_mse_stderr": mse[1]}
            torch.manual_seed(args.seed + 1)
            xs = x_test[:10]
            recon, mask = model.reconstruct(xs)
            plots.image_grid([xs, model.masked_input(xs, mask), recon], ds.image_shape,
                             row_labels=["input", f"masked ({model.mask_ratio:.0%})", "reconstruction"],
                             path=out / "figures" / "mae_reconstructions.png")
            name = f"masked AE (MSE on the masked patches, {model.mask_ratio:.0%} masked)"
        else:
            mse = tuple(reconstruction_error(model, x_test).values())
        _row(results, out, name, mse, probe, stats, seconds)
        if name == "denoising, mask":
            denoising_curve(args, ds, out, results, models)
    return models


def vae_row(args, ds, out, results, device, x_train, x_test):
    """The VAE's posterior mean q(z | x)'s loc as the code; Bernoulli likelihood on dynamically
    binarized training images; MSE of E[x | z = loc] against the grayscale test images."""
    k, epochs, pn = args.code_dim, args.num_epochs, args.probe_num_train
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    vae = VAE(ds.x_dim, k, args.hidden_dims)
    fit(vae, x_train, num_epochs=epochs, batch_size=args.batch_size, optim=Adam(args.lr), binarize="dynamic",
        device=device, seed=args.seed, progress=False)
    vae.eval()
    seconds = time.perf_counter() - t0
    probe = linear_probe(encode_all(vae, x_train[:pn]), ds.y_train[:pn],
                         encode_all(vae, x_test), ds.y_test)
    _row(results, out, "VAE posterior mean (Bernoulli, dynamic binarization)",
         tuple(reconstruction_error(vae, x_test).values()), probe, None, seconds)


def _row(results, out, name, mse, probe, stats, seconds):
    results["table"].append({"model": name, "test_mse": mse[0], "test_mse_stderr": mse[1],
                             "probe_accuracy": probe["accuracy"],
                             "probe_accuracy_stderr": probe["accuracy_stderr"],
                             "near_zero_fraction": None if stats is None
                             else stats["near_zero_fraction"], "seconds": seconds})
    extra = "" if stats is None else f", codes < 1e-3: {stats['near_zero_fraction']:.3f}"
    _say(results, out, f"[code 32] {name}: test MSE {mse[0]:.5f} ± {mse[1]:.5f}, probe "
         f"{probe['accuracy']:.4f} ± {probe['accuracy_stderr']:.4f}{extra}, {seconds:.0f} s")


@torch.no_grad()
def denoising_curve(args, ds, out, results, models):
    x_test = ds.x_test[: args.num_test or None]
    for kind, levels, name in (("gaussian", args.noise_levels, "denoising, Gaussian"),
                               ("mask", args.mask_levels, "denoising, mask")):
        if name not in models or "deep AE" not in models:
            continue
        for level in levels:
            g = torch.Generator().manual_seed(args.seed)
            if kind == "gaussian":
                noisy = x_test + level * torch.randn(x_test.shape, generator=g)
            else:
                noisy = x_test * (torch.rand(x_test.shape, generator=g) >= level).float()
            row = {"corruption": kind, "level": level}
            for label, model in (("deep AE", models["deep AE"]), (name, models[name])):
                err = torch.cat([(model.reconstruct(nb).cpu() - xb).pow(2).mean(-1)
                                 for nb, xb in zip(noisy.split(1000), x_test.split(1000))])
                row[label] = mean_stderr(err.double())
            results["denoising"].append(row)
            _say(results, out, f"[denoising] {kind} {level:g}: deep AE {row['deep AE'][0]:.5f} "
                 f"± {row['deep AE'][1]:.5f}, {name} {row[name][0]:.5f} ± {row[name][1]:.5f}")


def main(args):
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.pca_codes, args.code_dim, args.hidden_dims = [5], 8, [32]
        args.linear_epochs, args.probe_num_train = min(args.linear_epochs, 20), 500
    ds = data.load("digits" if args.smoke else "fashion-mnist", data_dir=args.data_dir,
                   seed=args.seed)
    if args.smoke:  # the MAE needs 28x28 images: pad the 8x8 digits to 28x28
        pad = torch.nn.functional.pad
        for split in ("x_train", "x_test"):
            images = getattr(ds, split).reshape(-1, 8, 8)
            setattr(ds, split, pad(images, (10, 10, 10, 10)).reshape(-1, 784))
        ds.image_shape = (28, 28)
    device = resolve_device(args.device)
    results = {"settings": vars(args) | {"out": str(out)}, "linear_vs_pca": [], "table": [],
               "denoising": []}
    if not args.skip_linear:
        linear_vs_pca(args, ds, out, results, device)
    if not args.skip_table:
        table(args, ds, out, results, device)
    _say(results, out, f"results in {out / 'results.json'}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny and offline: digits, few epochs")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--num-epochs", type=int, default=3, help="epochs of every code-32 model")
    p.add_argument("--num-train", type=int, default=0, help="first N training images (0 = all)")
    p.add_argument("--num-test", type=int, default=0, help="first N test images (0 = all)")
    p.add_argument("--probe-num-train", type=int, default=10000,
                   help="training codes the linear probe is fitted on")
    p.add_argument("--code-dim", type=int, default=32)
    p.add_argument("--hidden-dims", type=int, nargs="+", default=[256])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pca-codes", type=int, nargs="+", default=[10, 50])
    p.add_argument("--linear-epochs", type=int, default=30)
    p.add_argument("--linear-lr", type=float, default=1e-2)
    p.add_argument("--linear-decay", type=float, default=0.9)
    p.add_argument("--skip-linear", action="store_true")
    p.add_argument("--skip-table", action="store_true")
    p.add_argument("--l1-weight", type=float, default=0.05)
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--target-activation", type=float, default=0.05)
    p.add_argument("--noise-scale", type=float, default=0.3)
    p.add_argument("--mask-fraction", type=float, default=0.3)
    p.add_argument("--contractive", type=float, default=0.1)
    p.add_argument("--noise-levels", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5])
    p.add_argument("--mask-levels", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5])
    p.add_argument("--only", nargs="*", default=None, help="train only these table rows")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/autoencoders")
    main(p.parse_args())
