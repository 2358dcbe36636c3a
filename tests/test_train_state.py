"""TrainState, the one value a checkpoint holds, taken apart in one process: what it saves,
what a resume restores (every RNG, the optimizer, the scheduler, the history, the callbacks'
state), what it refuses, and the settings comparison behind the refusals."""

import random
import re

import numpy as np
import pytest
import torch
from torch import nn

from pvae.train import Callback, Scheduler, TrainState, seed_all, settings_diff
from pvae.train.checkpoint import CheckpointError


def test_settings_diff_compares_nested_settings_key_by_key():
    before = {"model": {"kind": "vae", "latent_dim": 2},
              "training": {"num_epochs": 3, "world_size": 1, "lr": 1e-3,
                           "loss": {"name": "iwae", "num_particles": 5}},
              "versions": {"format": 1, "pvae": "0.1"}}
    now = {"model": {"kind": "vae", "latent_dim": 2},
           "training": {"num_epochs": 9, "world_size": 2, "lr": 1e-3,
                        "loss": {"name": "iwae", "num_particles": 10}, "seed": 4},
           "versions": {"format": 1, "pvae": "0.2"}}
    # num_epochs may grow, world_size is checked on its own, versions are no setting; a key
    # missing on one side reads as None
    assert settings_diff(before, now) == {"training.loss.num_particles": (5, 10),
                                          "training.seed": (None, 4)}
    assert list(settings_diff({"b": 1, "a": 1}, {"b": 2, "a": 2})) == ["a", "b"]  # sorted
    assert settings_diff(before, before) == {}
    # what is ignored can be chosen; an empty dict is a value, not a level
    assert settings_diff(before, now, ignore=()) == {
        "training.loss.num_particles": (5, 10), "training.num_epochs": (3, 9),
        "training.seed": (None, 4), "training.world_size": (1, 2)}
    assert settings_diff({"a": {}}, {"a": {"b": 1}}) == {"a": ({}, None), "a.b": (None, 1)}
    assert settings_diff({"versionsx": 1}, {"versionsx": 2}) == {"versionsx": (1, 2)}
    assert settings_diff({"versions": "0.1"}, {"versions": "0.2"}) == {}


def test_seed_all_seeds_torch_python_and_numpy():
    def draws():
        return torch.rand(3).tolist(), random.random(), np.random.rand()

    seed_all(11)
    first = draws()
    seed_all(11)
    assert draws() == first
    seed_all(12)
    assert all(a != b for a, b in zip(draws(), first))


class Objective(nn.Module):
    """The smallest objective: a buffer that counts steps, saved in its state_dict."""

    def __init__(self):
        super().__init__()
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


class Counter(Callback):
    def __init__(self, start=0):
        self.count = start

    def state_dict(self):
        return {"count": self.count} if self.count else {}

    def load_state_dict(self, state):
        self.count = state["count"]


def make_state(settings=None, callbacks=(), seed=0, **distributed):
    """A state of a small linear model; ``distributed=`` is passed only where given (so that
    TrainState's own default is what the other tests get)."""
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scheduler = Scheduler(torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5), "epoch")
    generator = torch.Generator().manual_seed(seed)
    return TrainState(model, Objective(), optimizer, scheduler, generator,
                      {"training": {"lr": 0.1}} if settings is None else settings,
                      callbacks=callbacks, **distributed)


def train(state, epochs):
    """A few steps that use every part of the state: the shuffling generator, torch's, Python's
    and numpy's RNG, the optimizer's moments and the scheduler's learning rate."""
    for _ in range(epochs):
        state.epoch += 1
        order = torch.randperm(8, generator=state.generator)
        x = torch.randn(8, 3)[order] * (1 + random.random() + np.random.rand())
        loss = state.model(x).pow(2).mean()
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.scheduler.step_epoch(0.0)
        state.objective.steps += 1
        state.history.rows.append({"epoch": state.epoch, "train_elbo": -loss.item(),
                                   "lr": state.optimizer.param_groups[0]["lr"]})
        for cb in state.callbacks:
            cb.count += 1


def test_resume_restores_everything_a_continued_run_draws_from(tmp_path):
    """3 + 2 epochs through a checkpoint equal 5 epochs straight, bit for bit; leaving out any
    part of the state (optimizer moments, scheduler, any RNG) would change the numbers."""
    straight = make_state(callbacks=[Counter()])
    straight.num_epochs = 5
    seed_all(0)
    train(straight, 5)

    first = make_state(callbacks=[Counter()])
    first.num_epochs = 5
    seed_all(0)
    train(first, 3)
    first.save(tmp_path / "checkpoint.pt")
    seed_all(99)  # the resumed process starts from other RNG states
    resumed = make_state(callbacks=[Counter()], seed=1)
    resumed.num_epochs = 5
    assert resumed.resume(tmp_path / "checkpoint.pt")
    assert resumed.epoch == 3 and len(resumed.history) == 3 and resumed.callbacks[0].count == 3
    assert int(resumed.objective.steps) == 3
    train(resumed, 2)
    assert resumed.history.rows == straight.history.rows
    assert resumed.history.column("lr") == [0.1, 0.05, 0.05, 0.025, 0.025]
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)
    assert resumed.callbacks[0].count == 5
    assert torch.equal(resumed.generator.get_state(), straight.generator.get_state())


def test_state_dict_holds_what_a_checkpoint_records():
    state = make_state(callbacks=[Counter(), Counter(2), Counter(5)])
    state.num_epochs, state.epoch = 7, 2
    saved = state.state_dict()
    assert saved["epoch"] == 2 and saved["history"] == [] and saved["stop_reason"] is None
    assert saved["config"] == {"training": {"lr": 0.1, "num_epochs": 7}}
    assert state.settings == {"training": {"lr": 0.1}}  # config is a copy with num_epochs
    # callbacks of one class are told apart by their order; empty states are left out
    assert saved["callbacks"] == {"Counter.1": {"count": 2}, "Counter.2": {"count": 5}}
    assert set(saved) == {"model", "objective", "optimizer", "scheduler", "epoch", "rng",
                          "history", "stop_reason", "callbacks", "config"}
    assert saved["rng"]["generator"].equal(state.generator.get_state())
    assert saved["model"]["weight"].equal(state.model.weight)
    other = make_state(callbacks=[Counter(), Counter(), Counter()])
    other.load_state_dict(saved)
    assert [cb.count for cb in other.callbacks] == [0, 2, 5]


def test_stop_records_its_reason_in_the_history_and_the_checkpoint(tmp_path):
    state = make_state()
    assert not state.stopped
    state.stop("no reason yet")  # before any epoch: nothing to mark, the reason is kept
    assert state.stopped and state.history.stop_reason == "no reason yet"
    state = make_state()
    state.num_epochs = 4
    train(state, 3)
    state.stop(3)
    assert state.stopped and state.history.stop_reason == "3"
    assert state.history.column("stopped") == [None, None, "3"]
    state.save(tmp_path / "c.pt")
    resumed = make_state()
    resumed.num_epochs = 4
    resumed.resume(tmp_path / "c.pt")
    assert resumed.stopped and resumed.history.stop_reason == "3"


def test_set_training_switches_model_and_objective():
    state = make_state()
    state.set_training(False)
    assert not state.model.training and not state.objective.training
    state.set_training(True)
    assert state.model.training and state.objective.training


def test_resume_without_a_checkpoint_is_a_fresh_start(tmp_path):
    state = make_state()
    assert state.resume(tmp_path / "missing.pt") is False
    assert state.epoch == 0 and len(state.history) == 0


def test_resume_refuses_another_run(tmp_path):
    path = tmp_path / "checkpoint.pt"
    written = make_state({"training": {"lr": 0.1, "world_size": 2}})
    written.num_epochs = 3
    written.save(path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + r" was written by 2 "
                       r"process\(es\), this run has 1.*--nproc_per_node 2\)"):
        make_state({"training": {"lr": 0.1}}).resume(path)
    with pytest.raises(CheckpointError, match=r"another configuration.*'training.lr': "
                                              r"\(0.1, 0.2\)"):
        make_state({"training": {"lr": 0.2, "world_size": 2}}).resume(path)
    single = make_state()
    single.num_epochs = 3
    single.save(path)
    with pytest.raises(CheckpointError, match=r"by 1 process\(es\), this run has 2.*--nproc_per_"
                                              r"node 1, or without torchrun\)"):
        make_state({"training": {"lr": 0.1, "world_size": 2}}).resume(path)
    # more epochs may be asked of a resumed run
    longer = make_state()
    longer.num_epochs = 10
    assert longer.resume(path)
    old = single.state_dict()
    del old["objective"]
    with pytest.raises(CheckpointError, match="older pvae without the objective's state"):
        make_state().restore(old, path)


def test_a_distributed_state_saves_every_ranks_rng_and_resumes_on_its_own(tmp_path):
    """``distributed=True`` in a process group of one (gloo): the checkpoint holds every rank's
    RNG states (``rng_ranks``), rank 0 reads it, and each rank takes its own entry, not the
    shared ``rng``."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                             world_size=1)
    try:
        path = tmp_path / "checkpoint.pt"
        written = make_state()
        written.distributed = True
        written.num_epochs = 3
        seed_all(0)
        train(written, 2)
        saved = written.state_dict()
        assert len(saved["rng_ranks"]) == 1
        assert saved["rng_ranks"][0]["generator"].equal(saved["rng"]["generator"])
        written.save(path)
        assert not make_state().resume(tmp_path / "missing.pt")
        resumed = make_state(seed=5)
        resumed.distributed = True
        resumed.num_epochs = 3
        from pvae.train import state as state_module

        seen = []
        real = state_module.load_checkpoint
        state_module.load_checkpoint = (lambda p, map_location=None: seen.append(map_location)
                                        or real(p, map_location=map_location))
        try:
            assert resumed.resume(path, map_location={"cuda:0": "cpu"}) is True
        finally:
            state_module.load_checkpoint = real
        assert seen == ["cpu"]  # rank 0 reads to the CPU and sends it to the others
        assert resumed.epoch == 2 and resumed.history.rows == written.history.rows
        assert resumed.generator.get_state().equal(written.generator.get_state())
        missing = make_state()
        missing.distributed = True
        assert missing.resume(tmp_path / "missing.pt") is False
        # this rank's own states are used: a checkpoint whose shared entry differs
        other = make_state(seed=7)
        theirs = dict(saved, rng=other.state_dict()["rng"])
        again = make_state(seed=9)
        again.distributed = True
        again.num_epochs = 3
        again.restore(theirs, path)
        assert again.generator.get_state().equal(written.generator.get_state())
    finally:
        tdist.destroy_process_group()


def test_resume_maps_the_checkpoint_to_the_given_device(tmp_path, monkeypatch):
    from pvae.train import state as state_module

    seen = []
    real = state_module.load_checkpoint
    monkeypatch.setattr(state_module, "load_checkpoint",
                        lambda path, map_location=None: seen.append((path, map_location))
                        or real(path, map_location=map_location))
    written = make_state()
    written.save(tmp_path / "c.pt")
    make_state().resume(tmp_path / "c.pt", map_location={"cuda:0": "cpu"})
    assert seen == [(tmp_path / "c.pt", {"cuda:0": "cpu"})]


def test_a_checkpoint_without_callbacks_or_settings_loads():
    """Entries an older checkpoint may lack: without ``callbacks`` every callback keeps its
    own state; without ``config`` it reads as written with no settings."""
    written = make_state(settings={})
    written.num_epochs = 2
    train(written, 1)
    state = written.state_dict()
    del state["callbacks"], state["config"]
    resumed = make_state(settings={}, callbacks=[Counter(4)])
    resumed.restore(state, "c.pt")
    assert resumed.epoch == 1 and resumed.callbacks[0].count == 4


def test_a_fresh_state_has_run_nothing_and_written_nothing():
    state = make_state()
    # checkpoint None: a diverged run's message then says that none was written
    assert (state.epoch, state.num_epochs, state.checkpoint) == (0, 0, None)
    assert not state.distributed and not state.stopped and len(state.history) == 0
    assert state.config == {"training": {"lr": 0.1, "num_epochs": 0}}
    assert "rng_ranks" not in state.state_dict()
    # distributed=True is kept: without a process group all_gather is [this rank's states]
    shared = make_state(distributed=True)
    assert shared.distributed is True
    saved = shared.state_dict()
    assert len(saved["rng_ranks"]) == 1
    assert saved["rng_ranks"][0]["generator"].equal(saved["rng"]["generator"])


def test_a_model_that_is_no_module_has_no_state_of_its_own(tmp_path):
    """A Pyro program as a plain function (its parameters live in the objective's state):
    nothing is saved for it, loading and train()/eval() leave it alone."""
    weight = nn.Parameter(torch.zeros(2))

    def model(x):
        return x * weight

    def make():
        optimizer = torch.optim.SGD([weight], lr=0.1)
        scheduler = Scheduler(torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5), "epoch")
        return TrainState(model, Objective(), optimizer, scheduler, torch.Generator(), {})

    written = make()
    written.epoch = 1
    assert written.state_dict()["model"] == {}
    written.save(tmp_path / "c.pt")
    resumed = make()
    assert resumed.resume(tmp_path / "c.pt") and resumed.epoch == 1
    resumed.set_training(False)
    assert not resumed.objective.training


def test_only_rank_0_of_a_distributed_run_writes_the_checkpoint(tmp_path, monkeypatch):
    """``distributed``: rank 0 writes, the others do not; without it every process writes its
    own, whatever its rank in a process group."""
    from pvae import parallel

    monkeypatch.setattr(parallel, "rank", lambda: 1)
    make_state(distributed=True).save(tmp_path / "rank1.pt")
    assert not (tmp_path / "rank1.pt").exists()
    make_state().save(tmp_path / "single.pt")
    assert (tmp_path / "single.pt").is_file()
    monkeypatch.setattr(parallel, "rank", lambda: 0)
    make_state(distributed=True).save(tmp_path / "rank0.pt")
    assert (tmp_path / "rank0.pt").is_file()
