"""Training throughput: ``pvae.train.fit`` on the default VAE vs plain PyTorch, on a CPU or
a GPU.

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

On CUDA two more loops run: ``pvae captured`` (``fit(..., step="cuda_graph")``: the whole step,
Pyro program included, captured once as a CUDA graph and replayed) and ``plain captured`` (the
matched plain loop captured the same way), so the table shows pvae eager and captured against
plain PyTorch eager and captured. The graph capture happens inside each measured pvae epoch
(every epoch resumes ``fit`` from a checkpoint), so it is paid once per epoch.

    python benchmarks/bench_train.py [--device cpu|cuda] [--dataset fashion-mnist] [--num-epochs 3]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn
from torch.nn import functional as F

from pvae import data
from pvae.contract import resolve_device
from pvae.models import VAE
from pvae.train import fit


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


def _sync(x):
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def plain_epoch(model, opt, x, batch_size, generator, binarize=torch.bernoulli):
    _sync(x)
    t0, seen = time.perf_counter(), 0
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    for i in range(0, len(x), batch_size):
        xb = binarize(x[perm[i:i + batch_size]])
        loss = model.loss(xb)
        if not torch.isfinite(loss):
            raise FloatingPointError("plain PyTorch loss diverged")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(xb)
    _sync(x)
    return seen / (time.perf_counter() - t0)


class CapturedPlain:
    """The matched plain loop with its whole step (binarization, loss, backward, Adam) captured
    once as a CUDA graph, replayed for full batches; the last, smaller batch runs eagerly."""

    def __init__(self, model, x, batch_size):
        self.model, self.batch_size = model, batch_size
        self.opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-3, device=x.device),
                                    capturable=True)
        self.static = x[:batch_size].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._step(self.static)
        torch.cuda.current_stream().wait_stream(stream)
        self.opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            loss = model.loss(uniform_binarize(self.static))
            loss.backward()
            self.opt.step()

    def _step(self, xb):
        loss = self.model.loss(uniform_binarize(xb))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def epoch(self, x, generator):
        _sync(x)
        t0 = time.perf_counter()
        perm = torch.randperm(len(x), generator=generator).to(x.device)
        for i in range(0, len(x), self.batch_size):
            idx = perm[i:i + self.batch_size]
            if len(idx) == self.batch_size:
                self.static.copy_(x[idx])
                self.graph.replay()
            else:
                self._step(x[idx])
        _sync(x)
        return len(x) / (time.perf_counter() - t0)


def main(args):
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.num_threads or torch.get_num_threads())
    device = resolve_device(args.device)
    ds = data.load(args.dataset)
    x = (ds.x_train[: args.num_train] if args.num_train else ds.x_train).to(device)
    g = torch.Generator().manual_seed(args.seed)
    plain, matched = PlainVAE(x.shape[1]).to(device), PlainVAE(x.shape[1]).to(device)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    matched_opt = torch.optim.Adam(matched.parameters(), lr=1e-3, fused=True)

    def pvae_loop(cuda_graph, folder):
        vae = VAE(x.shape[1], 50, (400,)).to(device)

        def run(epoch):
            hist = fit(vae, x, num_epochs=epoch + 1, batch_size=256, binarize="dynamic", device=device,
                       progress=False, seed=args.seed, checkpoint_dir=folder, resume=True,
                       step="cuda_graph" if cuda_graph else "eager")
            return hist[-1]["images_per_s"]
        return run

    loops = {"pvae": pvae_loop(False, f"{args.tmp}/eager"),
             "plain": lambda epoch: plain_epoch(plain, plain_opt, x, 256, g),
             "matched": lambda epoch: plain_epoch(matched, matched_opt, x, 256, g,
                                                  uniform_binarize)}
    if device.type == "cuda":
        captured = CapturedPlain(PlainVAE(x.shape[1]).to(device), x, 256)
        loops["pvae captured"] = pvae_loop(True, f"{args.tmp}/captured")
        loops["plain captured"] = lambda epoch: captured.epoch(x, g)
    names = list(loops)
    rates = {name: [] for name in names}
    for epoch in range(args.num_epochs + 1):  # epoch 0 is warm-up for all
        k = epoch % len(names)
        rate = {name: loops[name](epoch) for name in names[k:] + names[:k]}  # rotate the order
        if epoch:
            for name in names:
                rates[name].append(rate[name])

    def median(v):
        return sorted(v)[len(v) // 2]

    def ratio(a, b):  # paired: the same round
        return median([p / q for p, q in zip(rates[a], rates[b])])

    labels = {"pvae": "pvae fit, eager (Trace_ELBO)", "plain": "plain PyTorch",
              "matched": "plain PyTorch, matched", "pvae captured": "pvae fit, CUDA graph",
              "plain captured": "plain PyTorch, CUDA graph"}
    print(f"device={device} threads={torch.get_num_threads()} N={len(x)} "
          f"epochs={args.num_epochs} (median images/s)")
    for name in names:
        print(f"{labels[name]:30s} {median(rates[name]):10.0f} images/s")
    print(f"ratio pvae / plain:            {ratio('pvae', 'plain'):8.3f}   (target >= 0.9 on CPU)")
    print(f"ratio pvae / plain matched:    {ratio('pvae', 'matched'):8.3f}   (the Pyro program's "
          "own cost)")
    if device.type == "cuda":
        print(f"ratio pvae captured / plain:   {ratio('pvae captured', 'plain'):8.3f}   "
              "(target >= 3)")
        print(f"ratio pvae captured / plain captured: "
              f"{ratio('pvae captured', 'plain captured'):8.3f}   (target >= 0.8)")


if __name__ == "__main__":
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--num-epochs", type=int, default=5)
    parser.add_argument("--num-train", type=int, default=0, help="0 = all")
    parser.add_argument("--num-threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        main(args)
