"""Write a new latent-variable model from scratch as a Pyro program and let pvae train and
evaluate it, with no pvae model class and no registration.

The model has a continuous latent z and a discrete binary "style" switch s per image,
decoded by a small network:

    z ~ N(0, I_2),  s ~ Bernoulli(0.5),  x | z, s ~ Bernoulli(f([z, s]))

with an amortized guide q(z | x) q(s | x). The switch is discrete, so Pyro's Trace_ELBO gives its guide
parameters a score-function (REINFORCE) gradient, while z is reparameterized. pvae's ``fit``, ``elbo_terms`` and
``iw_log_likelihood`` only rely on the model contract (sites inside ``pyro.plate("data")``).

    python examples/custom_model.py --num-epochs 20
    python examples/custom_model.py --smoke
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pvae import data
from pvae.contract import resolve_device
from pvae.inference import elbo_terms, iw_log_likelihood
from pvae.train import Adam, fit


class SwitchingVAE(nn.Module):
    """A user-written model: an nn.Module whose networks are registered with pyro.module."""

    def __init__(self, x_dim, latent_dim=2, hidden=64):
        super().__init__()
        self.latent_dim = latent_dim
        self.decoder = nn.Sequential(nn.Linear(latent_dim + 1, hidden), nn.ReLU(),
                                     nn.Linear(hidden, x_dim))
        self.encoder = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(),
                                     nn.Linear(hidden, 2 * latent_dim + 1))

    def model(self, x):
        pyro.module("switching_vae", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.latent_dim), 1.0)
                            .to_event(1))
            s = pyro.sample("s", dist.Bernoulli(x.new_full((x.shape[0],), 0.5)))
            logits = self.decoder(torch.cat([z, s.unsqueeze(-1)], -1))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("switching_vae", self)
        out = self.encoder(x)
        loc, raw_scale, s_logit = out[:, :self.latent_dim], out[:, self.latent_dim:-1], out[:, -1]
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw_scale) + 1e-4)
                        .to_event(1))
            pyro.sample("s", dist.Bernoulli(logits=s_logit))


def main(args):
    torch.manual_seed(args.seed)
    ds = data.load("digits", binarize="static", seed=args.seed)
    x_train = ds.x_train[:300] if args.smoke else ds.x_train
    model = SwitchingVAE(ds.x_dim)
    history = fit(model, x_train, val=ds.x_test, num_epochs=args.num_epochs, batch_size=64, optim=Adam(3e-3),
                  device=resolve_device(args.device), seed=args.seed, progress=not args.smoke)
    terms = elbo_terms(model, ds.x_test, num_samples=10)
    iw = iw_log_likelihood(model, ds.x_test, num_samples=args.num_samples)
    print(f"epochs {len(history)}: val ELBO {history[0]['val_elbo']:.2f} -> "
          f"{history[-1]['val_elbo']:.2f} nats/image")
    print(f"test ELBO {terms.elbo.mean():.2f}, IW log-likelihood (K={args.num_samples}) "
          f"{iw.mean:.2f} ± {iw.stderr:.2f}, KL {terms.kl.mean():.2f} "
          f"({'analytic' if terms.analytic_kl else 'Monte Carlo'})")
    return history, terms, iw


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-epochs", type=int, default=30)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny offline run for the tests")
    main(parser.parse_args())
