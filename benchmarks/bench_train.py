"""Training throughput: ``pvae.inference.fit`` on the default VAE vs plain PyTorch.

Both train the same 784-400-50 network (ReLU, Bernoulli likelihood, Gaussian q(z|x)) with the
same single-sample Monte Carlo ELBO, Adam(lr=1e-3), batch 256, the same tensor mini-batching
and dynamic binarization, alternating epochs in one process (and which goes first) so that
machine noise hits both; the ratio is the median over the pairs of adjacent epochs.
pvae's model stays a Pyro program differentiated through Pyro's ``Trace_ELBO``.

    python benchmarks/bench_train.py [--dataset fashion-mnist] [--num-epochs 3]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn
from torch.nn import functional as F

from pvae import data
from pvae.inference import fit
from pvae.models import VAE


class PlainVAE(nn.Module):
    """The same network and single-sample ELBO written directly in PyTorch."""

    def __init__(self, x_dim=784, hidden=400, latent_dim=50):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 2 * latent_dim))
        self.dec = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, x_dim))

    def loss(self, x):
        loc, raw = self.enc(x).chunk(2, -1)
        scale = F.softplus(raw) + 1e-5
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        log_q = (-0.5 * eps**2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_p = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_lik = -F.binary_cross_entropy_with_logits(self.dec(z), x, reduction="none").sum(-1)
        return -(log_lik + log_p - log_q).mean()


def plain_epoch(model, opt, x, batch_size, generator):
    t0, seen = time.perf_counter(), 0
    perm = torch.randperm(len(x), generator=generator)
    for i in range(0, len(x), batch_size):
        xb = torch.bernoulli(x[perm[i:i + batch_size]])
        loss = model.loss(xb)
        if not torch.isfinite(loss):
            raise FloatingPointError("plain PyTorch loss diverged")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(xb)
    return seen / (time.perf_counter() - t0)


def main(args):
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.num_threads or torch.get_num_threads())
    ds = data.load(args.dataset)
    x = ds.x_train[: args.num_train] if args.num_train else ds.x_train
    vae = VAE(x.shape[1], 50, (400,))
    plain = PlainVAE(x.shape[1])
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(args.seed)
    pvae_rates, plain_rates = [], []
    for epoch in range(args.num_epochs + 1):  # epoch 0 is warm-up for both
        if epoch % 2:  # alternate which goes first, so that drift does not favour either
            rate_plain = plain_epoch(plain, plain_opt, x, 256, g)
        hist = fit(vae, x, num_epochs=epoch + 1, batch_size=256, binarize="dynamic",
                   device="cpu", progress=False, seed=args.seed, checkpoint_dir=args.tmp,
                   resume=True)
        if not epoch % 2:
            rate_plain = plain_epoch(plain, plain_opt, x, 256, g)
        if epoch:
            pvae_rates.append(hist[-1]["images_per_s"])
            plain_rates.append(rate_plain)

    def median(v):
        return sorted(v)[len(v) // 2]

    ratios = [a / b for a, b in zip(pvae_rates, plain_rates)]  # adjacent epochs, paired
    print(f"threads={torch.get_num_threads()} N={len(x)} epochs={args.num_epochs} (median)")
    print(f"pvae fit (Pyro Trace_ELBO): {median(pvae_rates):10.0f} images/s")
    print(f"plain PyTorch:              {median(plain_rates):10.0f} images/s")
    print("per-epoch ratios:           " + " ".join(f"{r:.3f}" for r in ratios))
    print(f"ratio pvae / plain:         {median(ratios):10.3f}   (median of the paired epochs; "
          "target >= 0.9)")


if __name__ == "__main__":
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--num-epochs", type=int, default=5)
    parser.add_argument("--num-train", type=int, default=0, help="0 = all")
    parser.add_argument("--num-threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        main(args)
