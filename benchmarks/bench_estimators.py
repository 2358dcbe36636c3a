"""Training throughput of each gradient estimator: ``fit(..., loss=...)`` vs plain PyTorch.

For every estimator (the ELBO with k particles, the IWAE bound with k particles, standard and
DReG gradients, the score-function estimator with a decaying-average baseline) the default VAE
(784-400-50, batch 256, dynamic binarization) trains one epoch with ``fit`` and one with a plain
PyTorch implementation of the same objective and gradient estimator, alternately in one
process, after a warm-up epoch of each; images/s of both and their ratio are printed.
DReG has no plain counterpart here: its row compares it with plain PyTorch's standard IWAE
gradient, so its ratio includes DReG's extra cost. The plain loops make fit's per-step choices
outside the model (binarization by comparing uniforms, Adam's fused kernel; see
``bench_train.py``), so each ratio is the cost of the estimator's Pyro machinery alone.

    python benchmarks/bench_estimators.py [--num-train 10240]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from bench_train import PlainVAE, uniform_binarize
from torch.nn import functional as F

from pvae import data
from pvae.inference import IWAE, ReparamELBO, ScoreFunctionELBO
from pvae.models import VAE
from pvae.train import fit

CONFIGS = [  # (label, a fresh loss for fit, plain objective, k)
    ("reparam k=1", lambda: ReparamELBO(), "elbo", 1),
    ("reparam k=5", lambda: ReparamELBO(5), "elbo", 5),
    ("iwae k=5", lambda: IWAE(5), "iwae", 5),
    ("iwae k=5 dreg", lambda: IWAE(5, gradient="dreg"), "iwae", 5),
    ("iwae k=50", lambda: IWAE(50), "iwae", 50),
    ("score + avg baseline", lambda: ScoreFunctionELBO(baseline="average"), "score", 1),
]


def plain_loss(model, x, objective, k, state):
    """Negative objective per datapoint (mean over the batch) for the plain PyTorch VAE."""
    loc, raw = model.enc(x).chunk(2, -1)
    scale = F.softplus(raw) + 1e-5
    eps = torch.randn((k, *loc.shape))
    z = loc + scale * eps
    if objective == "score":
        z = z.detach()
    log_q = (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    log_p = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
    logits = model.dec(z)
    log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits),
                                                  reduction="none").sum(-1)
    log_w = log_lik + log_p - log_q  # (k, B)
    if objective == "iwae":
        return -(torch.logsumexp(log_w, 0) - math.log(k)).mean()
    if objective == "score":  # REINFORCE with a decaying-average baseline
        elbo = log_w.detach()
        b = state.get("baseline", elbo.mean().item())
        state["baseline"] = 0.9 * b + 0.1 * elbo.mean().item()
        return -(log_w + (elbo - b) * log_q).mean()
    return -log_w.mean()


def plain_epoch(model, opt, x, objective, k, generator, state):
    t0 = time.perf_counter()
    perm = torch.randperm(len(x), generator=generator)
    for i in range(0, len(x), 256):
        loss = plain_loss(model, uniform_binarize(x[perm[i:i + 256]]), objective, k, state)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return len(x) / (time.perf_counter() - t0)


def main(args):
    torch.manual_seed(args.seed)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    ds = data.load(args.dataset)
    x = ds.x_train[: args.num_train]
    print(f"threads={torch.get_num_threads()} N={len(x)} batch=256, 784-400-50; "
          "images/s of the second of two epochs")
    print(f"{'estimator':22s} {'pvae':>10s} {'plain':>10s} {'ratio':>7s}")
    rows = {}
    for label, loss, objective, k in CONFIGS:
        vae, plain = VAE(x.shape[1], 50, (400,)), PlainVAE(x.shape[1])
        opt, g, state = (torch.optim.Adam(plain.parameters(), lr=1e-3, fused=True),
                         torch.Generator(), {})
        plain_epoch(plain, opt, x, objective, k, g, state)  # warm-up
        hist = fit(vae, x, num_epochs=2, batch_size=256, binarize="dynamic", device="cpu",
                   progress=False, seed=args.seed, loss=loss())
        rate_plain = plain_epoch(plain, opt, x, objective, k, g, state)
        rate = hist[-1]["images_per_s"]
        rows[label] = (rate, rate_plain)
        print(f"{label:22s} {rate:10.0f} {rate_plain:10.0f} {rate / rate_plain:7.2f}", flush=True)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--num-train", type=int, default=10240)
    parser.add_argument("--num-threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    main(parser.parse_args())
