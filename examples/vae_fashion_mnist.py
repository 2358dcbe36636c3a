"""Train a VAE on Fashion-MNIST, evaluate its test ELBO and IW log-likelihood, draw figures.

Shows the whole pvae workflow in Python rather than through the ``pvae`` command line:
``pvae.data.load`` -> ``pvae.models.VAE`` -> ``pvae.train.fit`` ->
``elbo_terms`` / ``iw_log_likelihood`` -> ``pvae.plots``.

References: Kingma & Welling (2014), "Auto-Encoding Variational Bayes";
Burda, Grosse & Salakhutdinov (2015), "Importance Weighted Autoencoders".

    python examples/vae_fashion_mnist.py --num-epochs 10 --out runs/example
    python examples/vae_fashion_mnist.py --smoke   # tiny and offline (bundled digits)
"""

import argparse
from pathlib import Path

import torch

from pvae import data, plots
from pvae.contract import resolve_device
from pvae.inference import elbo_terms, iw_log_likelihood
from pvae.models import VAE
from pvae.train import fit


def main(args):
    torch.manual_seed(args.seed)
    dataset = "digits" if args.smoke else args.dataset
    ds = data.load(dataset, data_dir=args.data_dir, binarize="dynamic", seed=args.seed)
    x_train = ds.x_train[:500] if args.smoke else ds.x_train
    x_test = ds.x_test[:100] if args.smoke else ds.x_test
    model = VAE(ds.x_dim, args.latent_dim, args.hidden_dims)
    history = fit(model, x_train, val=x_test[:1000], num_epochs=args.num_epochs, binarize="dynamic",
                  device=resolve_device(args.device), seed=args.seed, progress=not args.smoke)
    terms = elbo_terms(model, x_test).summary()
    iw = iw_log_likelihood(model, x_test[: args.num_iw_test], num_samples=args.num_samples)
    print(f"test ELBO {terms['elbo']:.2f} ± {terms['elbo_stderr']:.2f} nats/image "
          f"(reconstruction {terms['reconstruction']:.2f}, KL {terms['kl']:.2f}, "
          f"{terms['active_units']} active units)")
    print(f"test IW log-likelihood (K={args.num_samples}) {iw.mean:.2f} ± {iw.stderr:.2f}")
    out = Path(args.out)
    plots.training_curve(history, out / "training_curve.png")
    plots.reconstructions(model, x_test[:10].to(model.device), ds.image_shape,
                          path=out / "reconstructions.png")
    plots.prior_samples(model, ds.image_shape, num_rows=4, path=out / "samples.png")
    print(f"figures in {out}/")
    return terms, iw


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=[400])
    parser.add_argument("--num-epochs", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=1000, help="K for the IW estimate")
    parser.add_argument("--num-iw-test", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/example_vae")
    parser.add_argument("--smoke", action="store_true", help="tiny offline run for the tests")
    main(parser.parse_args())
