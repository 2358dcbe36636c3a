"""Data-parallel training and sharded IW evaluation on ``torch.distributed`` (gloo, CPU, two
processes launched by ``torchrun``), against one-process references.

The two-process run is launched once for this module (``tests/ddp_worker.py``); the references
run here. The one-process reference of training takes the same global mini-batches (one
shuffle, same generator) and, for each, the two slices that the ranks get, each with the
random stream its rank draws from (torch seeded with ``seed + rank`` after the probe batch),
accumulating the gradients of slice sum / global batch size before one Adam step: what the
module docstring of :mod:`pvae.train.distributed` says DDP computes. Runs are in float64, so
that the only differences left are the order of floating-point reductions (DDP's all-reduce
of the gradients, the all-reduced sums of the history), about 1e-16 relative per operation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

from pvae import parallel
from pvae.inference import ReparamELBO, SVIObjective, iw_log_likelihood
from pvae.train import (
    CHECKPOINT_NAME,
    CheckpointError,
    TrainingData,
    fit,
    load_checkpoint,
    make_adam,
    seed_all,
)
from pvae.train.distributed import Replica, check_batches, check_module_parameters

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker as worker  # noqa: E402  (the worker's settings: one place for both sides)


@pytest.fixture(autouse=True)
def _cpu():
    """The two-process runs are CPU runs under gloo whatever the suite's device (the torchrun
    workers never see PVAE_TEST_DEVICE): the in-process references are built on the CPU too."""
    torch.set_default_device(None)
    yield


#: Float64 after 2 epochs of Adam (22 steps): reduction-order differences (~1e-16 per
#: operation; 6e-17 at most in the parameters when this was written) grow through Adam's
#: normalization, but stay orders of magnitude below this.
ATOL = 1e-12


def launch(out: Path, mode: str = "main") -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT MODE``, each rank's
    stdout and stderr written to ``OUT/logs`` (read by :func:`rank_logs` when a run fails)."""
    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={worker.WORLD}", "--log-dir", str(out / "logs" / mode),
         "--redirects", "3", str(Path(__file__).parent / "ddp_worker.py"), str(out), mode],
        env=env, capture_output=True, text=True, timeout=300)


def rank_logs(out: Path, mode: str) -> str:
    """The end of each rank's own stdout and stderr (torchrun's summary names only signals)."""
    parts = [f"--- {p.relative_to(out)}\n{p.read_text(errors='replace')[-3000:]}"
             for p in sorted((out / "logs" / mode).rglob("*.log")) if p.stat().st_size]
    return "\n".join(parts)


def launch_ok(out: Path, mode: str = "main") -> None:
    """:func:`launch` and assert that every rank exited 0, showing the ranks' logs if not."""
    proc = launch(out, mode)
    assert proc.returncode == 0, f"{proc.stderr[-2000:]}\n{rank_logs(out, mode)}"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp")
    launch_ok(out)
    return {**torch.load(out / "results.pt", weights_only=False), "out": out}


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory) -> dict:
    """A two-process run killed (SIGKILL on rank 1) in its second epoch, then resumed by a new
    ``torchrun`` launch from what was on disk."""
    out = tmp_path_factory.mktemp("ddp_killed")
    killed = launch(out, "kill")
    on_disk = load_checkpoint(out / "killed" / CHECKPOINT_NAME)
    launch_ok(out, "resume")
    return {"killed": killed, "on_disk": on_disk,
            **torch.load(out / "resumed.pt", weights_only=False)}


def one_process_reference(num_epochs: int) -> tuple:
    """Train as the ranks do, in one process: parameters and per-epoch (train, val) ELBOs."""
    x, x_val, _ = worker.datasets()
    model = worker.build_model()
    W, seed, bs = worker.WORLD, worker.FIT["seed"], worker.FIT["batch_size"]
    data = TrainingData(x, model=model, batch_size=bs, device=torch.device("cpu"),
                        dtype=torch.float64, binarize="dynamic")
    objective = SVIObjective(model, ReparamELBO())
    seed_all(seed)  # as fit: the probe batch (the same on every rank) builds and finds params
    generator = torch.Generator().manual_seed(seed)
    params = objective.trainable_parameters(*data.probe(seed))
    objective.trusted = True
    optimizer = make_adam(params, worker.FIT["optim"].lr)
    val_objective = SVIObjective(model, ReparamELBO(1))
    streams = []
    for r in range(W):
        torch.manual_seed(seed + r)
        streams.append(torch.get_rng_state())
    rows = []
    for _ in range(num_epochs):
        total = 0.0
        for batch in data.shuffled(generator):
            optimizer.zero_grad()
            for r in range(W):
                part = batch[0][parallel.shard(len(batch[0]), r, W)]
                torch.set_rng_state(streams[r])
                value, loss = objective(data.transform((part,))[0])
                (loss * len(part) / len(batch[0])).backward()
                streams[r] = torch.get_rng_state()
                total += value.item() * len(part)
            optimizer.step()
        val = 0.0
        with torch.no_grad():
            for r in range(W):
                torch.set_rng_state(streams[r])
                part = x_val[parallel.shard(len(x_val), r, W)]
                val += val_objective(part)[0].item() * len(part)
                streams[r] = torch.get_rng_state()
        rows.append((total / len(x), val / len(x_val)))
    return model.state_dict(), rows


@pytest.fixture(scope="module")
def reference():
    pyro.clear_param_store()
    return one_process_reference(2)


def _assert_same_params(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=ATOL, msg=k)


def test_two_processes_train_as_one_on_the_same_global_batches(two_processes, reference):
    params, rows = reference
    _assert_same_params(two_processes["params"], params)
    history = two_processes["history"]
    assert [r["epoch"] for r in history] == [1, 2]
    for row, (train, val) in zip(history, rows):
        assert row["train_elbo"] == pytest.approx(train, rel=1e-12, abs=0)
        assert row["val_elbo"] == pytest.approx(val, rel=1e-12, abs=0)
    # and it learned: the ELBO rose over the two epochs
    assert history[1]["train_elbo"] > history[0]["train_elbo"]


def test_the_reference_tells_runs_apart(two_processes):
    """Not vacuous: a plain one-process fit (same batches, other draws) lands far from it."""
    x, _, _ = worker.datasets()
    alone = worker.build_model()
    fit(alone, x, num_epochs=2, **worker.FIT)
    params = two_processes["params"]
    assert max((alone.state_dict()[k] - params[k]).abs().max().item() for k in params) > 1e-3


def test_replicas_stay_identical_even_when_built_differently(two_processes):
    for key in ("replicas", "apart_replicas"):
        first, second = two_processes[key]
        for name in first:  # bitwise: every rank applied the same averaged gradient
            assert torch.equal(first[name], second[name]), (key, name)
    # (without DDP's broadcast of rank 0's parameters, the replicas built with different
    # seeds would keep their different starting points: equal steps do not remove them)


def test_stopped_and_resumed_two_process_run_equals_uninterrupted(two_processes):
    _assert_same_params(two_processes["resumed_params"], two_processes["params"])
    for a, b in zip(two_processes["resumed_history"], two_processes["history"], strict=True):
        assert (a["train_elbo"], a["val_elbo"]) == (b["train_elbo"], b["val_elbo"])


def test_killed_two_process_run_resumes_to_the_uninterrupted_one(two_processes,
                                                                  killed_and_resumed):
    killed = killed_and_resumed["killed"]
    assert killed.returncode != 0  # torchrun reports the dead rank and stops the other
    assert "SIGKILL" in killed.stderr or "exitcode: -9" in killed.stderr, killed.stderr[-2000:]
    on_disk = killed_and_resumed["on_disk"]  # the last good checkpoint: the first epoch's
    assert on_disk["epoch"] == 1 and len(on_disk["history"]) == 1
    assert on_disk["config"]["training"]["world_size"] == worker.WORLD
    _assert_same_params(killed_and_resumed["params"], two_processes["params"])
    for a, b in zip(killed_and_resumed["history"], two_processes["history"], strict=True):
        assert (a["train_elbo"], a["val_elbo"]) == (b["train_elbo"], b["val_elbo"])


def test_score_function_baseline_is_global_so_a_resume_equals_the_uninterrupted_run(
        two_processes):
    """The decaying-average baseline follows the global mini-batch's ELBO, so it is the same
    on both ranks and rank 0's checkpoint restores rank 1 too (with per-rank averages, rank 1
    would resume with rank 0's and its gradients would differ from the uninterrupted run)."""
    full, resumed = two_processes["score_params"], two_processes["score_resumed_params"]
    _assert_same_params(resumed, full)
    start = worker.build_model().state_dict()  # and the score-function run did train
    assert max((full[k] - start[k]).abs().max().item() for k in full) > 1e-3


def test_two_process_autoencoder_equals_one_process_fit(two_processes):
    """An autoencoder's loss draws no noise, so the two-process run must equal a plain
    one-process ``fit`` on the same global batches (reduction order aside)."""
    x, _, _ = worker.datasets()
    ae = worker.build_autoencoder()
    history = worker.fit_autoencoder(ae, x)
    _assert_same_params(two_processes["ae_params"], ae.state_dict())
    for a, b in zip(two_processes["ae_history"], history.rows, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-12, abs=0)
    assert history.rows[1]["train_loss"] < history.rows[0]["train_loss"]


def test_sharded_iw_equals_one_process_per_datapoint(two_processes):
    model = worker.build_model()
    model.load_state_dict(two_processes["params"])
    _, _, x_iw = worker.datasets()
    one = iw_log_likelihood(model, x_iw, **worker.IW)
    sharded = two_processes["iw"]
    assert sharded.shape == (worker.NUM_IW,)
    # the same draws per batch, whichever process computed it: equal up to matmul rounding
    torch.testing.assert_close(sharded, one.per_datapoint, rtol=1e-12, atol=0)
    torch.testing.assert_close(two_processes["iw_ess"], one.ess, rtol=1e-10, atol=0)
    # a different seed gives different draws: the equality above is not vacuous
    other = iw_log_likelihood(model, x_iw, **{**worker.IW, "seed": worker.IW["seed"] + 1})
    assert not torch.allclose(other.per_datapoint, one.per_datapoint, rtol=1e-6, atol=0)


def test_seeded_iw_leaves_the_global_rng_alone():
    model = worker.build_model()
    _, _, x_iw = worker.datasets()
    torch.manual_seed(0)
    iw_log_likelihood(model, x_iw[:4], num_samples=3, seed=1)
    after = torch.rand(())
    torch.manual_seed(0)
    assert torch.rand(()) == after


def test_resume_with_another_number_of_processes_is_refused(two_processes, tmp_path):
    x, _, _ = worker.datasets()
    with pytest.raises(CheckpointError, match="written by 2 process.*this run has 1"):
        fit(worker.build_model(), x, num_epochs=3, resume=True,
            checkpoint_dir=two_processes["out"] / "full", **worker.FIT)


def test_cli_rank_0_writes_the_run_and_a_one_process_resume_is_refused(two_processes, capsys):
    from pvae.cli import main

    run = two_processes["out"] / "cli"
    config = json.loads((run / "config.json").read_text())
    assert config["training"]["world_size"] == 2
    assert len((run / "history.csv").read_text().splitlines()) == 2  # header + 1 epoch
    assert (run / "figures" / "training_curve.png").is_file()
    with pytest.raises(SystemExit) as exit_:
        main([*worker.CLI_TRAIN[:-4], "2", *worker.CLI_TRAIN[-3:], "--out", str(run),
              "--resume"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "written by 2 process(es), this run has 1" in err


def test_param_store_parameters_are_refused_with_the_fix():
    class UserModel:  # a user program whose guide trains pyro.param values
        def model(self, x):
            with pyro.plate("data", len(x)):
                z = pyro.sample("z", pyro.distributions.Normal(0., 1.))
                pyro.sample("x", pyro.distributions.Normal(z, 1.).to_event(0), obs=x[:, 0])

        def guide(self, x):
            loc = pyro.param("loc", torch.zeros(()))
            with pyro.plate("data", len(x)):
                pyro.sample("z", pyro.distributions.Normal(loc, 1.))

    user = UserModel()
    objective = SVIObjective(user, ReparamELBO())
    params = objective.trainable_parameters(torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"param-store parameters \['loc'\].*nn.Parameter"):
        check_module_parameters(user, objective, params)


def test_networks_of_a_plain_model_object_are_collected_for_ddp():
    class PlainObjectModel:  # not an nn.Module: its network is registered with pyro.module
        def __init__(self):
            self.net = torch.nn.Linear(1, 1)

        def model(self, x):
            with pyro.plate("data", len(x)):
                z = pyro.sample("z", pyro.distributions.Normal(0., 1.))
                pyro.sample("x", pyro.distributions.Normal(z, 1.), obs=x[:, 0])

        def guide(self, x):
            pyro.module("plain_object_net", self.net)
            with pyro.plate("data", len(x)):
                pyro.sample("z", pyro.distributions.Normal(self.net(x)[:, 0], 1.))

    user = PlainObjectModel()
    objective = SVIObjective(user, ReparamELBO())
    params = objective.trainable_parameters(torch.zeros(3, 1))
    check_module_parameters(user, objective, params)  # no refusal: they are module parameters
    replica = Replica(user, objective)
    assert {id(p) for p in replica.parameters()} == {id(p) for p in params}


def test_distributed_without_a_process_group_is_refused_clearly(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    x, _, x_iw = worker.datasets()
    with pytest.raises(ValueError, match="step='distributed'.* need a torch.distributed process"):
        fit(worker.build_model(), x[:8], num_epochs=1, step="distributed", **worker.FIT)
    with pytest.raises(ValueError, match="distributed=True needs a torch.distributed process"):
        iw_log_likelihood(worker.build_model(), x_iw[:2], num_samples=2, distributed=True)
    with pytest.raises(ValueError, match="unknown step 'yes'"):
        fit(worker.build_model(), x[:8], num_epochs=1, step="yes", **worker.FIT)


def test_batches_smaller_than_the_world_are_refused():
    with pytest.raises(ValueError, match="last batch of 1"):
        check_batches(TrainingData(torch.zeros(9, 2), batch_size=4, device=torch.device("cpu"),
                                   dtype=torch.float32, rank=0, world_size=2))


def test_a_dataset_of_tuples_is_sliced_by_rows_for_each_rank():
    """Items (x, t, y): each rank's slice of a global batch keeps the fields aligned."""
    from torch.utils.data import TensorDataset

    x, t, y = torch.arange(10.).reshape(5, 2), torch.arange(5.), 10 + torch.arange(5.)
    parts = []
    for rank in range(2):
        data = TrainingData(TensorDataset(x, t, y), batch_size=5, device=torch.device("cpu"),
                            dtype=torch.float32, rank=rank, world_size=2)
        (xb, tb, yb), = list(data.shuffled(torch.Generator().manual_seed(0)))
        assert len(xb) == len(tb) == len(yb) and torch.equal(yb - 10, tb)
        assert torch.equal(xb[:, 0] / 2, tb)
        parts.append(tb)
    assert sorted(torch.cat(parts).tolist()) == t.tolist()  # the ranks share the batch


def test_shards_partition_in_order():
    for n in (0, 1, 5, 41):
        parts = [parallel.shard(n, r, 3) for r in range(3)]
        assert [i for s in parts for i in range(n)[s]] == list(range(n))
        sizes = [len(range(n)[s]) for s in parts]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert parallel.all_reduce_sum(1.5, 2.0, -0.25) == (1.5, 2.0, -0.25)  # no group: identity
