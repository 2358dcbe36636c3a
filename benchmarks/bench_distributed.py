"""Data-parallel training throughput: 1 vs 2 processes (``torchrun``, DDP), pvae's ``fit`` and
a plain-PyTorch DDP loop side by side, on CPUs (gloo) or GPUs (NCCL).

Both train the default 784-400-50 VAE (ReLU, Bernoulli likelihood, Gaussian q(z|x), one-sample
ELBO, Adam lr 1e-3, dynamic binarization) on global mini-batches (256 by default,
``--batch-size``) split over the processes. pvae runs ``fit`` (which wraps model and
objective in ``DistributedDataParallel`` when the process group exists); the reference is
:class:`bench_train.PlainVAE` in DDP with a per-rank slice of the same shuffled batch, written
as the PyTorch DDP tutorial does. Each configuration is launched by ``torchrun`` in turn;
images/s count the images of all ranks per second of rank 0's epoch, the median over epochs
after a warm-up epoch.

On CPUs every process runs with ``--threads-per-process`` intra-op threads (1 by default), and
one more configuration runs one process with as many threads as the largest world uses cores:
data parallelism pays on CPUs only if it beats torch's own intra-op threading on the same
cores. On a single GPU, 1 vs 2 processes is not meaningful (two processes would share it):
run with ``--device cuda`` on a machine with several GPUs.

    python benchmarks/bench_distributed.py [--device cpu] [--dataset fashion-mnist]
        [--num-train 10000] [--num-epochs 3] [--batch-size 256] [--worlds 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def worker(args) -> None:
    """One rank of one configuration (started by ``torchrun``): both loops, results to JSON."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train import PlainVAE, uniform_binarize

    from pvae import data, parallel
    from pvae.contract import resolve_device
    from pvae.models import VAE
    from pvae.train import fit

    class PlainLoss(PlainVAE):
        def forward(self, x):  # DDP wraps forward: the loss is what it returns
            return self.loss(x)

    torch.set_num_threads(args.threads_per_process)
    device = parallel.local_device(resolve_device(args.device))
    parallel.init_from_env(device)
    rank, world = parallel.rank(), parallel.world_size()
    ds = data.load(args.dataset)
    x = (ds.x_train[: args.num_train] if args.num_train else ds.x_train).to(device)

    torch.manual_seed(args.seed)
    vae = VAE(x.shape[1], 50, (400,))
    history = fit(vae, x, num_epochs=args.num_epochs, batch_size=args.batch_size, binarize="dynamic",
                  device=device, seed=args.seed, progress=False, step="eager")
    pvae_rates = history.column("images_per_s")[1:]

    torch.manual_seed(args.seed)
    plain = DistributedDataParallel(PlainLoss(x.shape[1]).to(device),
                                     device_ids=[device] if device.type == "cuda" else None)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    torch.manual_seed(args.seed + rank)
    g = torch.Generator().manual_seed(args.seed)
    plain_rates = []
    for epoch in range(args.num_epochs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        perm = torch.randperm(len(x), generator=g).to(device)  # the same on every rank
        for i in range(0, len(x), args.batch_size):
            idx = perm[i:i + args.batch_size]
            idx = idx[parallel.shard(len(idx), rank, world)]  # this rank's slice
            loss = plain(uniform_binarize(x[idx]))  # through DDP's forward: its hooks fire
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if epoch:
            plain_rates.append(len(x) / (time.perf_counter() - t0))
    if rank == 0:
        Path(args.result).write_text(json.dumps({"pvae": pvae_rates, "plain": plain_rates}))
    dist.destroy_process_group()


def launch(args, world: int, threads: int) -> dict:
    """Run one configuration under ``torchrun``; rank 0's images/s per epoch."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world}", __file__, "--worker", "--result", str(result),
               "--threads-per-process", str(threads), "--dataset", args.dataset,
               "--num-train", str(args.num_train), "--num-epochs", str(args.num_epochs),
               "--batch-size", str(args.batch_size),
               "--device", args.device, "--seed", str(args.seed)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        return json.loads(result.read_text())


def main(args) -> None:
    def median(v):
        return sorted(v)[len(v) // 2]

    configs = [(w, args.threads_per_process) for w in args.worlds]
    most = max(args.worlds) * args.threads_per_process
    if args.device == "cpu" and (1, most) not in configs:
        configs.append((1, most))  # intra-op threads on the same cores, for comparison
    rows = {}
    for world, threads in configs:
        r = launch(args, world, threads)
        rows[(world, threads)] = (median(r["pvae"]), median(r["plain"]))
        print(f"  done: {world} process(es) x {threads} thread(s)", file=sys.stderr)
    print(f"device={args.device} dataset={args.dataset} N={args.num_train or 'all'} "
          f"epochs={args.num_epochs} (median images/s after a warm-up epoch, global batch "
          f"{args.batch_size})")
    print(f"{'processes x threads':22s} {'pvae fit':>10s} {'plain DDP':>10s} {'pvae/plain':>11s}")
    for (world, threads), (p, q) in rows.items():
        print(f"{f'{world} x {threads}':22s} {p:10.0f} {q:10.0f} {p / q:11.3f}")
    base = rows[(1, args.threads_per_process)]
    for (world, threads), (p, q) in rows.items():
        if (world, threads) != (1, args.threads_per_process):
            print(f"speed-up {world} x {threads} over 1 x {args.threads_per_process}: "
                  f"pvae {p / base[0]:.2f}, plain {q / base[1]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--num-train", type=int, default=10000, help="0 = all")
    parser.add_argument("--num-epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256, help="global mini-batch")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads-per-process", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per process)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
    else:
        main(args)
