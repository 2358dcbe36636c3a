"""Training throughput: ``pvae.inference.fit`` on the default VAE vs plain PyTorch.

All loops train the same 784-400-50 network (ReLU, Bernoulli likelihood, Gaussian q(z|x)) with
the same single-sample Monte Carlo ELBO, Adam(lr=1e-3), batch 256, the same tensor
mini-batching and dynamic binarization, in turns within one process (rotating which goes
first) so that machine noise hits all; each ratio is the median over rounds of adjacent epochs.
pvae's model stays a Pyro program differentiated through Pyro's ``Trace_ELBO``.

Two plain PyTorch references:

- ``plain``: as such a loop is usually written, ``torch.bernoulli`` for the binarization and
  ``torch.optim.Adam`` with its defaults (the reference of the target, pvae >= 0.9x);
- ``plain, matched``: with pvae's per-step choices outside the model (binarization by
  comparing uniforms, Adam's fused kernel), so that the ratio is the cost of the Pyro program
  alone.

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


def uniform_binarize(p):
    """pvae.data.bernoulli_sample written out in plain torch, for the matched reference."""
    u = torch.rand_like(p)
    return torch.lt(u, p, out=u)


def plain_epoch(model, opt, x, batch_size, generator, binarize=torch.bernoulli):
    t0, seen = time.perf_counter(), 0
    perm = torch.randperm(len(x), generator=generator)
    for i in range(0, len(x), batch_size):
        xb = binarize(x[perm[i:i + batch_size]])
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
    plain, matched = PlainVAE(x.shape[1]), PlainVAE(x.shape[1])
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    matched_opt = torch.optim.Adam(matched.parameters(), lr=1e-3, fused=True)
    g = torch.Generator().manual_seed(args.seed)

    def run_pvae(epoch):
        hist = fit(vae, x, num_epochs=epoch + 1, batch_size=256, binarize="dynamic",
                   device="cpu", progress=False, seed=args.seed, checkpoint_dir=args.tmp,
                   resume=True)
        return hist[-1]["images_per_s"]

    loops = {"pvae": run_pvae,
             "plain": lambda epoch: plain_epoch(plain, plain_opt, x, 256, g),
             "matched": lambda epoch: plain_epoch(matched, matched_opt, x, 256, g,
                                                  uniform_binarize)}
    names = list(loops)
    rates = {name: [] for name in names}
    for epoch in range(args.num_epochs + 1):  # epoch 0 is warm-up for all
        order = names[epoch % 3:] + names[:epoch % 3]  # rotate so drift favours none
        rate = {name: loops[name](epoch) for name in order}
        if epoch:
            for name in names:
                rates[name].append(rate[name])

    def median(v):
        return sorted(v)[len(v) // 2]

    ratio = [a / b for a, b in zip(rates["pvae"], rates["plain"])]  # same round, paired
    ratio_matched = [a / b for a, b in zip(rates["pvae"], rates["matched"])]
    print(f"threads={torch.get_num_threads()} N={len(x)} epochs={args.num_epochs} (median)")
    print(f"pvae fit (Pyro Trace_ELBO): {median(rates['pvae']):10.0f} images/s")
    print(f"plain PyTorch:              {median(rates['plain']):10.0f} images/s")
    print(f"plain PyTorch, matched:     {median(rates['matched']):10.0f} images/s")
    print("per-epoch ratios vs plain:  " + " ".join(f"{r:.3f}" for r in ratio))
    print(f"ratio pvae / plain:         {median(ratio):10.3f}   (median of the rounds; "
          "target >= 0.9)")
    print(f"ratio pvae / plain matched: {median(ratio_matched):10.3f}   (the Pyro program's "
          "own cost)")


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
