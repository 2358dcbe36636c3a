"""IW log-likelihood: ``pvae.inference.iw_log_likelihood`` vs a hand-vectorized plain-PyTorch
IWAE evaluator of the same network, side by side in one run.

The VAE (784-400-50, Bernoulli) is trained for ``--num-epochs`` on Fashion-MNIST (or loaded
from ``--run``); both evaluators then estimate log p(x) on the first ``--num-test`` test
images with K = ``--num-samples``, using the same datapoint batch and particle chunk sizes.
Prints both times and their ratio (target: pvae with its default sizes <= 1.15x plain with
the best sizes of the sweep), both estimates with standard errors, and the peak memory of
pvae's evaluator for two chunk sizes (each measured in a fresh child process: peak RSS on CPU,
``max_memory_allocated`` on CUDA).

``--sweep`` times pvae over a grid of datapoint batch and particle chunk sizes and compares
the default (``pvae.inference.sizes``) with the best of the grid.

    python benchmarks/bench_iwll.py [--device cpu|cuda] [--num-test 1000] [--num-samples 1000]
    python benchmarks/bench_iwll.py --sweep [--device cuda] [--num-test 10000 --num-samples 5000]
"""

from __future__ import annotations

import argparse
import math
import resource
import subprocess
import sys
import time

import torch
from torch.nn import functional as F

from pvae import data
from pvae.inference import iw_log_likelihood
from pvae.inference.sizes import default_sizes
from pvae.models import VAE
from pvae.runs import load_run
from pvae.train import fit, resolve_device


@torch.no_grad()
def plain_iw(vae: VAE, x, num_samples, batch_size, chunk_size):
    """Hand-vectorized IWAE bound (Burda et al. 2015, eq. 8) with the VAE's own networks."""
    out = []
    log2pi = math.log(2 * math.pi)
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        loc, scale = vae.encoder(xb)
        lse = torch.full((len(xb),), -math.inf, dtype=torch.float64, device=x.device)
        for start in range(0, num_samples, chunk_size):
            k = min(chunk_size, num_samples - start)
            eps = torch.randn(k, *loc.shape, device=x.device, dtype=x.dtype)
            z = loc + scale * eps
            log_q = (-0.5 * eps**2 - scale.log() - 0.5 * log2pi).sum(-1)
            log_p = (-0.5 * z**2 - 0.5 * log2pi).sum(-1)
            logits = vae.decoder(z)
            log_lik = -F.binary_cross_entropy_with_logits(
                logits, xb.expand_as(logits), reduction="none").sum(-1)
            lse = torch.logaddexp(lse, torch.logsumexp((log_lik + log_p - log_q).double(), 0))
        out.append(lse - math.log(num_samples))
    return torch.cat(out)


def _model_and_data(args):
    device = resolve_device(args.device)
    ds = data.load("fashion-mnist", binarize="dynamic", seed=0)
    if args.run:
        vae, _, _ = load_run(args.run, device)
    else:
        torch.manual_seed(0)
        vae = VAE(784, 50, (400,))
        fit(vae, ds.x_train, num_epochs=args.num_epochs, binarize="dynamic", device=device,
            progress=False)
    return vae.eval(), ds.x_test[: args.num_test].to(device)


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_memory(args):
    """Peak memory added by one IW evaluation (MiB): on Linux the peak RSS is reset first
    (``echo 5 > /proc/self/clear_refs``) so that loading the data does not count."""
    vae, x = _model_and_data(args)
    if x.is_cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
    except OSError:  # not Linux: fall back to the lifetime peak
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    iw_log_likelihood(vae, x, num_samples=args.num_samples, batch_size=args.batch_size,
                      chunk_size=args.chunk_size)
    if x.is_cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        try:
            peak = (_status_kib("VmHWM") - before) / 1024
        except OSError:
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"PEAK_MB {peak:.1f}")


def _timed(fn, repeats):
    best = math.inf
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def sweep(args):
    """pvae's IW evaluation over a grid of (batch, chunk) against its default sizes."""
    vae, x = _model_and_data(args)
    iw_log_likelihood(vae, x[:10], num_samples=20)  # warm-up
    default = default_sizes(len(x), args.num_samples, x.device, x.shape[-1])
    grid = sorted({(b, max(1, r // b)) for b in args.sweep_batches for r in args.sweep_rows
                   if b <= len(x)} | {default})
    times = {}
    for b, k in grid:
        times[(b, k)] = _timed(lambda b=b, k=k: iw_log_likelihood(
            vae, x, num_samples=args.num_samples, batch_size=b, chunk_size=k), args.repeats)
        print(f"batch {b:5d} chunk {k:6d} rows/pass {b * k:8d}: {times[(b, k)]:7.2f} s"
              f"{'   <- default' if (b, k) == default else ''}", flush=True)
    t_default = _timed(lambda: iw_log_likelihood(vae, x, num_samples=args.num_samples),
                       args.repeats)
    best = min(times, key=times.get)
    t_plain = _timed(lambda: plain_iw(vae, x, args.num_samples, *best), args.repeats)
    print(f"N={len(x)} K={args.num_samples} device={x.device} threads={torch.get_num_threads()}")
    print(f"default sizes {default}: {t_default:.2f} s; best {best}: {times[best]:.2f} s; "
          f"default / best = {t_default / times[best]:.3f} (target <= 1.1)")
    print(f"plain PyTorch at the best sizes: {t_plain:.2f} s; pvae default / plain = "
          f"{t_default / t_plain:.3f} (target <= 1.15)")


def main(args):
    vae, x = _model_and_data(args)
    args.batch_size, args.chunk_size = default_sizes(len(x), args.num_samples, x.device,
                                                     x.shape[-1], batch_size=args.batch_size,
                                                     chunk_size=args.chunk_size)
    kwargs = dict(num_samples=args.num_samples, batch_size=args.batch_size,
                  chunk_size=args.chunk_size)
    # warm-up both on a few images
    iw_log_likelihood(vae, x[:10], num_samples=20)
    plain_iw(vae, x[:10], 20, 10, 20)
    t_pvae, t_plain = [], []
    for _ in range(args.repeats):
        torch.manual_seed(1)
        t0 = time.perf_counter()
        res = iw_log_likelihood(vae, x, **kwargs)
        t_pvae.append(time.perf_counter() - t0)
        torch.manual_seed(2)
        t0 = time.perf_counter()
        ref = plain_iw(vae, x, args.num_samples, args.batch_size, args.chunk_size)
        t_plain.append(time.perf_counter() - t0)
    ref_mean, ref_se = ref.mean().item(), ref.std().item() / math.sqrt(len(ref))
    diff = res.per_datapoint.double() - ref
    diff_se = diff.std().item() / math.sqrt(len(diff))
    tp, tr = min(t_pvae), min(t_plain)
    print(f"N={len(x)} K={args.num_samples} batch={args.batch_size} chunk={args.chunk_size} "
          f"device={x.device} threads={torch.get_num_threads()} (best of {args.repeats})")
    print(f"pvae iw_log_likelihood: {tp:8.2f} s   estimate {res.mean:.3f} ± {res.stderr:.3f} nats")
    print(f"plain PyTorch IWAE:     {tr:8.2f} s   estimate {ref_mean:.3f} ± {ref_se:.3f} nats")
    print(f"ratio pvae / plain:     {tp / tr:8.3f}   (target <= 1.2)")
    print(f"difference of estimates {diff.mean().item():+.4f} ± {diff_se:.4f} nats "
          f"({'agree' if abs(diff.mean().item()) < 3 * diff_se + 1e-9 else 'DISAGREE'} "
          "within 3 standard errors of the paired difference)")
    for chunk in args.memory_chunks:
        cmd = [sys.executable, __file__, "--measure-memory", "--chunk-size", str(chunk),
               "--num-test", str(args.num_test), "--num-samples", str(args.num_samples),
               "--batch-size", str(args.batch_size), "--device", args.device,
               "--num-epochs", "0"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        peak = next(line.split()[1] for line in out.splitlines() if line.startswith("PEAK_MB"))
        print(f"peak memory of the IW evaluation, chunk_size={chunk:5d}: {float(peak):8.1f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="evaluate a trained run folder instead")
    parser.add_argument("--num-epochs", type=int, default=2)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="datapoints per pass (default: pvae's for the device)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="particles per pass (default: pvae's for the device)")
    parser.add_argument("--sweep", action="store_true",
                        help="time a grid of batch and chunk sizes against the defaults")
    parser.add_argument("--sweep-batches", type=int, nargs="+", default=[50, 100, 250, 500])
    parser.add_argument("--sweep-rows", type=int, nargs="+",
                        default=[1250, 2500, 5000, 10000, 25000])
    parser.add_argument("--memory-chunks", type=int, nargs="*", default=[10, 200])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--measure-memory", action="store_true")
    args = parser.parse_args()
    if args.measure_memory:
        measure_memory(args)
    elif args.sweep:
        sweep(args)
    else:
        main(args)
