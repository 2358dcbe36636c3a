"""Worker of ``tests/test_distributed.py``, launched as ``torchrun --nproc_per_node 2
tests/ddp_worker.py OUT`` (gloo, CPU): trains the default VAE data-parallel, once for two
epochs and once stopped after one epoch and resumed, evaluates the IW log-likelihood sharded
over the ranks, trains through ``pvae train`` (``CLI_TRAIN``), and writes what the test
compares to ``OUT/results.pt`` (rank 0).

The settings live here and are imported by the test, so that its one-process references use
the same ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pvae import data, parallel
from pvae.cli import main as cli
from pvae.inference import iw_log_likelihood
from pvae.models import VAE
from pvae.train import fit

#: ``pvae train`` as ``torchrun -m pvae.cli train`` runs it (the group already exists here).
CLI_TRAIN = ["train", "--dataset", "digits", "--num-train", "300", "--num-val", "50",
             "--latent-dim", "2", "--hidden-dims", "16", "--num-epochs", "1", "--batch-size",
             "64", "--no-progress"]
#: Processes the test launches.
WORLD = 2
#: 501 training images in batches of 48: ten full batches and a last one of 21, split 11/10.
NUM_TRAIN, NUM_VAL, NUM_IW = 501, 101, 45
FIT = dict(batch_size=48, lr=3e-3, seed=3, binarize="dynamic", progress=False)
IW = dict(num_samples=40, batch_size=8, seed=5)


def build_model(seed: int = 11) -> VAE:
    """The default VAE (Bernoulli likelihood, ReLU MLPs), small, in float64."""
    torch.manual_seed(seed)
    return VAE(x_dim=64, latent_dim=4, hidden_dims=(32,)).double()


def datasets():
    """Training intensities (binarized dynamically), binary validation and IW images."""
    ds = data.load("digits")
    binary = (ds.x_test >= 0.5).double()
    return ds.x_train[:NUM_TRAIN].double(), binary[:NUM_VAL], binary[-NUM_IW:]


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    x, x_val, x_iw = datasets()
    full = build_model()
    history = fit(full, x, x_val=x_val, num_epochs=2, checkpoint_dir=out / "full", **FIT)
    fit(build_model(), x, x_val=x_val, num_epochs=1, checkpoint_dir=out / "resumed", **FIT)
    resumed = build_model()  # a fresh process would rebuild the model like this
    resumed_history = fit(resumed, x, x_val=x_val, num_epochs=2, resume=True,
                          checkpoint_dir=out / "resumed", **FIT)
    iw = iw_log_likelihood(full, x_iw, **IW)
    apart = build_model(seed=100 + parallel.rank())  # ranks built differently: DDP aligns them
    fit(apart, x, num_epochs=1, **FIT)
    cli([*CLI_TRAIN, "--out", str(out / "cli")])
    results = {"params": full.state_dict(), "history": history.rows,
               "resumed_params": resumed.state_dict(), "resumed_history": resumed_history.rows,
               "iw": iw.per_datapoint, "iw_ess": iw.ess, "world_size": parallel.world_size(),
               "replicas": parallel.all_gather(full.state_dict()),
               "apart_replicas": parallel.all_gather(apart.state_dict())}
    if parallel.rank() == 0:
        torch.save(results, out / "results.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
