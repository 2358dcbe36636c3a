"""Worker of ``tests/test_distributed.py``, launched as ``torchrun --nproc_per_node 2
tests/ddp_worker.py OUT [MODE]`` (gloo, CPU).

- ``main`` (default): trains the default VAE data-parallel, once for two epochs and once
  stopped after one epoch and resumed (also with the score-function estimator and its
  average baseline), trains a deterministic autoencoder, evaluates the IW log-likelihood
  sharded over the ranks, trains through ``pvae train`` (``CLI_TRAIN``), and writes what the
  test compares to ``OUT/results.pt`` (rank 0).
- ``kill``: trains for two epochs with checkpoints in ``OUT/killed``; once the first epoch's
  checkpoint exists, rank 1 sends itself SIGKILL in the middle of the second epoch (``torchrun``
  then stops rank 0 and fails).
- ``resume``: resumes ``OUT/killed`` to two epochs and writes ``OUT/resumed.pt``.

The settings live here and are imported by the test, so that its one-process references use
the same ones.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pvae import data, parallel
from pvae.autoencoders import AutoencoderLoss, DeepAutoencoder
from pvae.cli import main as cli
from pvae.inference import ScoreFunctionELBO, iw_log_likelihood
from pvae.models import VAE
from pvae.train import CHECKPOINT_NAME, Adam, fit

#: ``pvae train`` as ``torchrun -m pvae.cli train`` runs it (the group already exists here).
CLI_TRAIN = ["train", "--dataset", "digits", "--num-train", "300", "--num-val", "50",
             "--latent-dim", "2", "--hidden-dims", "16", "--num-epochs", "1", "--batch-size",
             "64", "--no-progress"]
#: Processes the test launches.
WORLD = 2
#: 501 training images in batches of 48: ten full batches and a last one of 21, split 11/10.
NUM_TRAIN, NUM_VAL, NUM_IW = 501, 101, 45
FIT = dict(batch_size=48, optim=Adam(3e-3), seed=3, binarize="dynamic", progress=False)
IW = dict(num_samples=40, batch_size=8, seed=5)
#: The score-function ELBO with its decaying-average baseline (a fresh loss for every fit).
SCORE = lambda: ScoreFunctionELBO(baseline="average")  # noqa: E731
#: Training steps of the second epoch that rank 1 takes before it is killed (of 11).
KILL_AFTER_STEPS = 4


def build_model(seed: int = 11) -> VAE:
    """The default VAE (Bernoulli likelihood, ReLU MLPs), small, in float64."""
    torch.manual_seed(seed)
    return VAE(x_dim=64, latent_dim=4, hidden_dims=(32,)).double()


def build_autoencoder() -> DeepAutoencoder:
    """A deep autoencoder (no corruption, no sparsity: nothing random in its loss), float64."""
    torch.manual_seed(12)
    return DeepAutoencoder(x_dim=64, code_dim=4, hidden_dims=(32,)).double()


def fit_autoencoder(ae: DeepAutoencoder, x: torch.Tensor):
    """Two epochs of the autoencoder's training (data-parallel under a process group)."""
    return fit(ae, x, loss=AutoencoderLoss(), num_epochs=2, **{**FIT, "binarize": None})


def datasets():
    """Training intensities (binarized dynamically), binary validation and IW images."""
    ds = data.load("digits")
    binary = (ds.x_test >= 0.5).double()
    return ds.x_train[:NUM_TRAIN].double(), binary[:NUM_VAL], binary[-NUM_IW:]


def main(out: Path) -> None:
    x, x_val, x_iw = datasets()
    full = build_model()
    history = fit(full, x, val=x_val, num_epochs=2, checkpoint_dir=out / "full", **FIT)
    fit(build_model(), x, val=x_val, num_epochs=1, checkpoint_dir=out / "resumed", **FIT)
    resumed = build_model()  # a fresh process would rebuild the model like this
    resumed_history = fit(resumed, x, val=x_val, num_epochs=2, resume=True, checkpoint_dir=out / "resumed",
                          **FIT)
    score = {}
    for name, epochs, resume in (("full", 2, False), ("resumed", 1, False),
                                 ("resumed", 2, True)):
        score[name] = build_model()
        fit(score[name], x, num_epochs=epochs, resume=resume,
            checkpoint_dir=out / f"score_{name}", loss=SCORE(), **FIT)
    ae = build_autoencoder()
    ae_history = fit_autoencoder(ae, x)
    iw = iw_log_likelihood(full, x_iw, **IW)
    apart = build_model(seed=100 + parallel.rank())  # ranks built differently: DDP aligns them
    fit(apart, x, num_epochs=1, **FIT)
    cli([*CLI_TRAIN, "--out", str(out / "cli")])
    results = {"params": full.state_dict(), "history": history.rows,
               "resumed_params": resumed.state_dict(), "resumed_history": resumed_history.rows,
               "score_params": score["full"].state_dict(),
               "score_resumed_params": score["resumed"].state_dict(),
               "ae_params": ae.state_dict(), "ae_history": ae_history.rows,
               "iw": iw.per_datapoint, "iw_ess": iw.ess, "world_size": parallel.world_size(),
               "replicas": parallel.all_gather(full.state_dict()),
               "apart_replicas": parallel.all_gather(apart.state_dict())}
    if parallel.rank() == 0:
        torch.save(results, out / "results.pt")


def killed(out: Path) -> None:
    """Train to two epochs; rank 1 dies by SIGKILL during the second (never returns there)."""
    x, x_val, _ = datasets()
    model = build_model()
    checkpoint = out / "killed" / CHECKPOINT_NAME
    if parallel.rank() == 1:
        program, steps = model.model, 0

        def model_then_kill(*args, **kwargs):  # the model's program, one call per step
            nonlocal steps
            steps += checkpoint.exists()  # the first epoch is done and saved
            if steps > KILL_AFTER_STEPS:
                os.kill(os.getpid(), signal.SIGKILL)
            return program(*args, **kwargs)

        model.model = model_then_kill
    fit(model, x, val=x_val, num_epochs=2, checkpoint_dir=checkpoint.parent, **FIT)


def resume_killed(out: Path) -> None:
    x, x_val, _ = datasets()
    model = build_model()
    history = fit(model, x, val=x_val, num_epochs=2, resume=True, checkpoint_dir=out / "killed", **FIT)
    if parallel.rank() == 0:
        torch.save({"params": model.state_dict(), "history": history.rows}, out / "resumed.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mode = sys.argv[2] if len(sys.argv) > 2 else "main"
    {"main": main, "kill": killed, "resume": resume_killed}[mode](Path(sys.argv[1]))
    # No rank tears its connections down while another may still read from them (gloo aborts a
    # process whose peer closes a connection under it): all arrive here first.
    dist.barrier()
    dist.destroy_process_group()
    # Then leave without the interpreter's teardown: a rank whose work is done and written
    # sometimes died there with "terminate called without an active exception" (SIGABRT: a
    # C++ thread of the distributed runtime destroyed while joinable at exit; 1 launch in ~10
    # on 2 busy cores), which torchrun reports as a failed run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
