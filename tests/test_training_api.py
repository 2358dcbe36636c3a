"""The training API as Pyro users write it (issue 27): the loss is fit's argument (pvae's loss
objects, any Pyro ELBO, an autoencoder's default), the Objective protocol, callbacks on the
loop's epoch-level events, keywords that moved, and fit's size."""

import ast
import inspect
import json
import math
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO

import pvae.inference
from pvae.autoencoders import AutoencoderLoss, DeepAutoencoder
from pvae.inference import IWAE, LOSSES, VIMCO, PyroLoss, ReparamELBO, ScoreFunctionELBO
from pvae.inference.schedules import LinearWarmup
from pvae.models import VAE
from pvae.train import Adam, Callback, Objective, bind_objective, fit, load_checkpoint
from pvae.train.fit import _MOVED

from conftest import rng


def binary(n=96, d=12, seed=0):
    return torch.bernoulli(torch.full((n, d), 0.3), generator=rng(seed))


def test_losses_are_fits_argument():
    """IWAE, a Pyro ELBO and the default all train the same VAE; the history records the loss
    object's settings in the checkpoint as its config."""
    from pvae import data

    ds = data.load("digits", binarize="static")
    for loss in (IWAE(5), Trace_ELBO(), None):
        torch.manual_seed(0)
        history = fit(VAE(64, 4, (32,)), ds.x_train[:512], val=ds.x_test[:200], loss=loss,
                      num_epochs=4, batch_size=64, progress=False)
        val = history.column("val_elbo")
        assert val[-1] > val[0] + 1.0, (loss, val)


def test_the_loss_config_is_recorded_as_it_is(tmp_path):
    fit(VAE(12, 2, (8,)), binary(), loss=IWAE(3, gradient="dreg"), num_epochs=1,
        checkpoint_dir=tmp_path, progress=False)
    config = load_checkpoint(tmp_path / "checkpoint.pt")["config"]
    assert config["training"]["loss"] == IWAE(3, gradient="dreg").config == {
        "name": "iwae", "num_particles": 3, "gradient": "dreg", "beta": 1.0, "data_plate": None}
    assert config["training"]["optim"] == {"name": "Adam", "lr": 1e-3, "schedule": None,
                                           "clip_norm": None, "weight_decay": 0.0}


def test_every_loss_is_registered_by_its_name():
    assert LOSSES == {"reparam": ReparamELBO, "score": ScoreFunctionELBO, "iwae": IWAE,
                      "vimco": VIMCO}


def test_objectives_meet_the_declared_protocol_and_say_what_they_allow():
    """The loop asks the objective, never matches estimator names: capture and data-parallel
    eligibility come from the objective."""
    vae = VAE(12, 2, (8,))
    for loss, capturable in ((ReparamELBO(), True), (IWAE(3), True), (VIMCO(3), True),
                             (ScoreFunctionELBO(), False), (Trace_ELBO(), False)):
        objective = bind_objective(vae, loss)
        assert isinstance(objective, Objective)
        assert (objective.capture_blocker() is None) == capturable, loss
    ae = bind_objective(DeepAutoencoder(12, 2, (8,)))
    assert isinstance(ae, Objective) and ae.value_name == "loss"
    assert isinstance(ae.capture_blocker(), str)


@pytest.mark.parametrize("keyword", sorted(_MOVED))
def test_a_keyword_that_moved_names_its_replacement(keyword):
    with pytest.raises(TypeError, match=rf"fit no longer takes {keyword}=: it moved to "):
        fit(VAE(12, 2, (8,)), binary(), num_epochs=1, **{keyword: 1})


def test_unknown_keyword_is_a_plain_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_epoch'"):
        fit(VAE(12, 2, (8,)), binary(), num_epochs=1, num_epoch=1)


def test_the_model_is_passed_once_and_a_model_of_no_contract_names_both():
    x = torch.rand(64, 12)
    ae = DeepAutoencoder(12, 2, (8,))
    history = fit(ae, x, val=x[:16], num_epochs=3, batch_size=32, progress=False)
    assert history.column("train_loss")[-1] < history.column("train_loss")[0]
    with pytest.raises(TypeError, match="Pyro model.*pvae autoencoder"):
        fit(object(), x, num_epochs=1)
    with pytest.raises(TypeError, match="trains a pvae autoencoder, got VAE"):
        fit(VAE(12, 2, (8,)), x, loss=AutoencoderLoss(), num_epochs=1)


class Recorder(Callback):
    """Records the events it sees; stops the run after ``stop_after`` epochs."""

    def __init__(self, stop_after=None):
        self.events, self.stop_after = [], stop_after

    def on_fit_start(self, state):
        self.events.append(("start", state.epoch))

    def on_epoch_end(self, state, row):
        self.events.append(("epoch", row["epoch"], "val_elbo" in row))
        assert state.history[-1] is row
        if self.stop_after is not None and row["epoch"] == self.stop_after:
            state.stop(f"stopped after epoch {self.stop_after}")

    def on_fit_end(self, state):
        self.events.append(("end", state.epoch))


def test_a_callback_that_stops_after_epoch_2_stops_the_run_there(tmp_path):
    recorder = Recorder(stop_after=2)
    history = fit(VAE(12, 2, (8,)), binary(), val=binary(32, seed=1), num_epochs=5,
                  batch_size=32, callbacks=[recorder], checkpoint_dir=tmp_path, progress=False)
    assert len(history) == 2 and history.stop_reason == "stopped after epoch 2"
    assert recorder.events == [("start", 0), ("epoch", 1, True), ("epoch", 2, True),
                               ("end", 2)]
    saved = load_checkpoint(tmp_path / "checkpoint.pt")  # written after the callbacks
    assert saved["epoch"] == 2 and saved["stop_reason"] == "stopped after epoch 2"
    # resumed, a stopped run is finished: no epoch runs, start and end fire once
    again = Recorder()
    resumed = fit(VAE(12, 2, (8,)), binary(), val=binary(32, seed=1), num_epochs=5,
                  batch_size=32, callbacks=[again], checkpoint_dir=tmp_path, resume=True,
                  progress=False)
    assert len(resumed) == 2 and again.events == [("start", 2), ("end", 2)]


class Counter(Callback):
    """A callback with state of its own: the sum of the epochs' numbers seen."""

    def __init__(self):
        self.total = 0

    def on_epoch_end(self, state, row):
        self.total += row["epoch"]

    def state_dict(self):
        return {"total": self.total}

    def load_state_dict(self, state):
        self.total = state["total"]


def test_a_resumed_run_fires_its_events_once_per_remaining_epoch(tmp_path):
    """2 epochs, then resumed to 5: the second fit's callbacks see the start at epoch 2, epochs
    3, 4, 5 once each, and the end; a callback's own state comes back from the checkpoint; the
    history equals an uninterrupted run's."""
    def run(num_epochs, callbacks, resume=False, folder=tmp_path):
        torch.manual_seed(0)
        return fit(VAE(12, 2, (8,)), binary(), num_epochs=num_epochs, batch_size=32,
                   callbacks=callbacks, checkpoint_dir=folder, resume=resume, progress=False)

    first = Counter()
    run(2, [first])
    assert first.total == 1 + 2
    recorder, counter = Recorder(), Counter()
    resumed = run(5, [recorder, counter], resume=True)
    assert recorder.events == [("start", 2), ("epoch", 3, True), ("epoch", 4, True),
                               ("epoch", 5, True), ("end", 5)]
    assert counter.total == 1 + 2 + 3 + 4 + 5
    full = run(5, [], folder=tmp_path / "full")
    assert resumed.column("train_elbo") == full.column("train_elbo")


def test_on_fit_end_fires_when_training_fails():
    class Fails(Callback):
        def on_epoch_end(self, state, row):
            raise RuntimeError("a logger crashed")

    recorder = Recorder()
    with pytest.raises(RuntimeError, match="a logger crashed"):
        fit(VAE(12, 2, (8,)), binary(), num_epochs=3, callbacks=[recorder, Fails()],
            progress=False)
    assert recorder.events[-1] == ("end", 1)


def test_a_reused_loss_forgets_the_layout_of_the_programs_it_traced():
    """A loss object keeps what it learned (baselines) like a model its weights, but the plate
    layout it found on one model is found again on the next: here a model with a second plate
    (nesting 2) after one without (nesting 1)."""
    class Nested:
        def model(self, x):
            with pyro.plate("data", x.shape[0], dim=-2):
                with pyro.plate("features", x.shape[1], dim=-1):
                    z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
                    pyro.sample("x", dist.Normal(z, 1.0), obs=x)

        def guide(self, x):
            loc = pyro.param("nested_loc", torch.zeros(()))
            with pyro.plate("data", x.shape[0], dim=-2):
                with pyro.plate("features", x.shape[1], dim=-1):
                    pyro.sample("z", dist.Normal(loc.expand(x.shape), 1.0))

    loss = IWAE(4)
    x = torch.randn(32, 3, generator=rng(0))
    fit(VAE(3, 2, (4,), likelihood="gaussian"), x, loss=loss, num_epochs=1, progress=False)
    history = fit(Nested(), x, loss=loss, num_epochs=2, batch_size=32, progress=False)
    assert len(history) == 2 and loss._layout[0] == 2


def test_inference_no_longer_reaches_up_to_train():
    """The one import circle is gone: fit lives in pvae.train (import-linter keeps it so)."""
    assert not hasattr(pvae.inference, "fit") and not hasattr(pvae.inference, "History")


def test_fit_stays_small():
    """The limits issue 27 set: at most 16 parameters, a body of at most 60 lines and a
    docstring of at most 60 (details live on the objects they describe)."""
    tree = ast.parse(inspect.getsource(fit)).body[0]
    named = [p for p in inspect.signature(fit).parameters.values()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert len(named) <= 16
    assert len(ast.get_docstring(tree, clean=False).splitlines()) <= 60
    body = tree.body[1:]
    assert body[-1].end_lineno - body[0].lineno + 1 <= 60


def test_pvae_train_keeps_one_settings_record(tmp_path, capsys):
    """config.json is the checkpoint's own record (the data and model settings beside fit's
    under "training"), for VAEs and autoencoders through the one `pvae train` body; a flag the
    chosen loss does not take is refused."""
    from pvae.cli import main

    for model, extra in (("vae", ["--estimator", "vimco", "--num-particles", "3"]),
                         ("ae", ["--sparsity", "l1"])):
        out = tmp_path / model
        main(["train", "--dataset", "digits", "--model", model, "--latent-dim", "2",
              "--hidden-dims", "8", "--num-epochs", "1", "--num-train", "200", "--num-val", "50",
              "--no-progress", "--out", str(out), *extra])
        config = json.loads((out / "config.json").read_text())
        assert config == load_checkpoint(out / "checkpoint.pt")["config"]
        assert config["model"] == model and config["training"]["num_epochs"] == 1
    assert config["training"]["loss"]["sparsity"] == "l1"
    with pytest.raises(SystemExit) as refused:
        main(["train", "--dataset", "digits", "--estimator", "reparam", "--gradient", "dreg",
              "--num-epochs", "1", "--out", str(tmp_path / "refused")])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.count("\n") == 1, err
    assert "pvae: --gradient applies to --estimator iwae, not reparam" in err, err
    assert not (tmp_path / "refused").exists()


class LinearGaussian:
    """z ~ N(0, 1), x | z ~ N(w z, I) in 3 dims; guide N(a . x, s^2) with fixed pyro.params."""

    w = torch.tensor([1.0, -0.5, 0.8], dtype=torch.float64)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * self.w, 1.0).to_event(1), obs=x)

    def guide(self, x):
        a = pyro.param("lg_a", torch.tensor([0.3, -0.2, 0.4], dtype=torch.float64))
        log_s = pyro.param("lg_log_s", torch.tensor(-0.4, dtype=torch.float64))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ a, log_s.exp()))


class MaskedLinearGaussian(LinearGaussian):
    """LinearGaussian whose datapoints with x[0] <= 0 are missing: ``poutine.mask`` around the
    observed site alone (their z keeps its prior and guide)."""

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            with poutine.mask(mask=x[:, 0] > 0):
                pyro.sample("x", dist.Normal(z.unsqueeze(-1) * self.w, 1.0).to_event(1), obs=x)


def test_the_history_has_the_training_reconstruction_and_kl():
    """The history's training reconstruction E_q[log p(x | z)] and KL(q || p(z)), the
    parameters held fixed, against their closed forms within 4 standard errors (each from the
    closed-form variance of one draw's term under q). With ReparamELBO (4 particles) both come
    from the steps' draws; with IWAE, whose value is another bound, the KL comes from the
    particles themselves. For q = N(m, s^2), m = a.x, and r = x - w m:

        E_q[log p(x | z)] = -3/2 log(2 pi) - (|r|^2 + |w|^2 s^2) / 2,  variance s^2 (w.r)^2 +
        s^4 |w|^4 / 2;  KL = -log s + (s^2 + m^2) / 2 - 1/2,  variance m^2 s^2 + (s^2 - 1)^2 / 2.

    (Their difference is the ELBO by construction: checking that alone cannot fail.) Where the
    model masks the observed site of some datapoints (``poutine.mask``), their reconstruction
    terms count 0, as in the ELBO the step trains, and the KL is unchanged."""
    x = torch.randn(512, 3, generator=rng(0), dtype=torch.float64)
    w = LinearGaussian.w
    m, s = (x @ torch.tensor([0.3, -0.2, 0.4], dtype=torch.float64)), math.exp(-0.4)
    r = x - m.unsqueeze(-1) * w
    recon_n = -1.5 * math.log(2 * math.pi) - (r.square().sum(-1) + w @ w * s**2) / 2
    recon_var_n = s**2 * (r @ w) ** 2 + s**4 * (w @ w) ** 2 / 2
    observed = (x[:, 0] > 0).double()  # MaskedLinearGaussian's mask
    kl = (-math.log(s) + (s ** 2 + m ** 2) / 2 - 0.5).mean().item()
    kl_var = (m ** 2 * s ** 2 + (s ** 2 - 1) ** 2 / 2).mean().item()
    both = ("train_reconstruction", "train_kl")
    for program, loss, terms in ((LinearGaussian(), ReparamELBO(num_particles=4), both),
                                 (LinearGaussian(), IWAE(5), ("train_kl",)),
                                 (MaskedLinearGaussian(), ReparamELBO(num_particles=4), both)):
        mask = observed if isinstance(program, MaskedLinearGaussian) else torch.ones_like(m)
        recon, recon_var = (mask * recon_n).mean().item(), (mask * recon_var_n).mean().item()
        K = loss.num_particles
        history = fit(program, x, loss=loss, num_epochs=3, batch_size=128, optim=Adam(1e-12),
                      progress=False)
        for row in history.rows:  # per epoch: every datapoint, K particles
            for name in terms:
                exact, var = (recon, recon_var) if name == "train_reconstruction" else (kl, kl_var)
                se = math.sqrt(var / (len(x) * K))
                assert abs(row[name] - exact) < 4 * se, (program, loss, name, row[name], exact)


def test_data_that_require_grad_are_constants_of_the_objective():
    """fit detaches its data: a tensor that requires grad gets no gradient from training (it
    accumulated one at every step before), and the model still trains."""
    x = torch.bernoulli(torch.full((32, 12), 0.5), generator=rng(0)).requires_grad_()
    history = fit(VAE(12, 2, (8,)), x, num_epochs=2, batch_size=16, progress=False)
    assert x.grad is None and len(history) == 2
    fit(VAE(12, 2, (8,)), torch.utils.data.TensorDataset(x), num_epochs=1, batch_size=16,
        progress=False)
    assert x.grad is None


def test_an_eager_fit_in_a_process_group_keeps_its_statistics_to_itself(tmp_path, monkeypatch):
    """``step="eager"`` in a process group trains this process's model on its own data, as
    without a group: the score-function loss's average baseline follows this process's batches
    only, and the history's training reconstruction and KL this process's steps. Another
    process's sums are offered (``parallel.all_reduce_sum`` as if a second rank, with a worse
    ELBO, had contributed) and must not be taken: the run, the baseline's average and the
    history are those of the same fit without a group. Only a data-parallel fit
    (``data_parallel_``) averages over the global batch."""
    import torch.distributed as tdist

    from pvae import parallel

    def run():
        loss = ScoreFunctionELBO(baseline="average")
        torch.manual_seed(0)
        history = fit(VAE(12, 2, (8,)), binary(), loss=loss, num_epochs=2, batch_size=32,
                      step="eager", progress=False, seed=0)
        return loss.average, [history.column(name) for name in
                              ("train_elbo", "train_reconstruction", "train_kl")]

    alone = run()
    monkeypatch.setattr(parallel, "all_reduce_sum",
                        lambda total, count, *rest: (total - 1000.0, count + 32, *rest))
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                             world_size=1)
    try:
        assert run() == alone
    finally:
        tdist.destroy_process_group()


# --- the objective a loss binds (SVIObjective), used directly ---------------------------


def test_a_fresh_objective_stands_at_step_0():
    """Before the loop's first ``set_step``, an objective is at step 0 of its beta schedule:
    with a one-step warm-up its beta is 0 and it is not settled (early stopping waits), and it
    has stood for no datapoints yet (``num_data`` is None); at step 1 beta is 1, settled."""
    objective = bind_objective(LinearGaussian(), ReparamELBO(beta=LinearWarmup(1)))
    assert objective.num_data is None
    assert objective.metrics() == {"beta": 0.0} and not objective.settled()
    objective.set_step(1)
    assert objective.metrics() == {"beta": 1.0} and objective.settled()


def test_the_value_is_linear_in_beta_whatever_beta():
    """A step's value is E[log p(x | z)] - beta KL on its draws, for any constant beta (1 and
    others alike, 2 included): on the same draws, value(beta) = value(0) - beta (value(0) -
    value(1)), float64 rounding apart."""
    x = torch.randn(16, 3, generator=rng(1), dtype=torch.float64)

    def value(beta):
        objective = bind_objective(LinearGaussian(), ReparamELBO(beta=beta))
        pyro.set_rng_seed(3)
        return objective(x)[0].item()

    v0, v1 = value(0.0), value(1.0)
    assert abs(v0 - v1) > 0.1  # a KL worth weighting
    for beta in (0.5, 2.0, 3.0):
        assert value(beta) == pytest.approx(v0 - beta * (v0 - v1), rel=1e-12, abs=1e-12), beta


@pytest.mark.parametrize("loss", [ReparamELBO(2, beta=2.0), PyroLoss(Trace_ELBO(), beta=2.0),
                                  PyroLoss(Trace_ELBO(), beta=LinearWarmup(3))],
                         ids=["reparam", "pyro", "pyro-warmup"])
def test_validation_reports_the_plain_elbo_whatever_the_training_beta(loss):
    """The validation objective is the plain ELBO (beta 1), whatever beta the loss trains
    with: a wrapped Pyro ELBO validates with itself, without the KL weight. Its value is
    Pyro's Trace_ELBO on the same draws, per datapoint, in the data's float64."""
    x = torch.randn(16, 3, generator=rng(2), dtype=torch.float64)
    program = LinearGaussian()
    validation = bind_objective(program, loss).validation()
    with torch.no_grad():
        pyro.set_rng_seed(4)
        value, _ = validation(x)
    pyro.set_rng_seed(4)
    expected = -Trace_ELBO().loss(program.model, program.guide, x) / len(x)
    assert value.item() == pytest.approx(expected, rel=1e-9)


def test_an_objective_steps_programs_that_take_no_arguments():
    """Programs that hold their data and take no argument (as in Pyro's tutorials): the
    objective is called with no batch and reports Pyro's Trace_ELBO on the same draws per
    datapoint of the data plate."""
    x = torch.randn(16, 3, generator=rng(5), dtype=torch.float64)
    lg = LinearGaussian()
    program = SimpleNamespace(model=lambda: lg.model(x), guide=lambda: lg.guide(x))
    objective = bind_objective(program, ReparamELBO())
    pyro.set_rng_seed(6)
    value, surrogate = objective()
    assert objective.num_data == len(x)
    pyro.set_rng_seed(6)
    expected = -Trace_ELBO().loss(program.model, program.guide) / len(x)
    assert value.item() == pytest.approx(expected, rel=1e-9)
    assert surrogate.item() == pytest.approx(-expected, rel=1e-9)


def test_a_model_scale_of_2_is_divided_out_of_the_value():
    """A program that scales its terms by 2, with ``poutine.scale(scale=2.0)`` or as the
    mini-batch scale of a plate of 2n datapoints subsampled to n, reports the unscaled ELBO
    per datapoint: Pyro's Trace_ELBO of the unscaled program on the same draws, divided by
    the n datapoints."""
    x = torch.randn(16, 3, generator=rng(7), dtype=torch.float64)
    lg = LinearGaussian()

    def subsampled(program):  # LinearGaussian's program in a plate of 2n subsampled to n
        def run(x):
            n = x.shape[0]
            with pyro.plate("data", 2 * n, subsample=torch.arange(n)):
                a = pyro.param("lg_a", torch.tensor([0.3, -0.2, 0.4], dtype=torch.float64))
                log_s = pyro.param("lg_log_s", torch.tensor(-0.4, dtype=torch.float64))
                if program == "guide":
                    pyro.sample("z", dist.Normal(x @ a, log_s.exp()))
                else:
                    z = pyro.sample("z", dist.Normal(x.new_zeros(n), 1.0))
                    pyro.sample("x", dist.Normal(z.unsqueeze(-1) * lg.w, 1.0).to_event(1), obs=x)
        return run

    pyro.set_rng_seed(8)
    expected = -Trace_ELBO().loss(lg.model, lg.guide, x) / len(x)
    for program in (SimpleNamespace(model=poutine.scale(lg.model, scale=2.0),
                                    guide=poutine.scale(lg.guide, scale=2.0)),
                    SimpleNamespace(model=subsampled("model"), guide=subsampled("guide"))):
        objective = bind_objective(program, ReparamELBO())
        pyro.set_rng_seed(8)
        value, _ = objective(x)
        assert value.item() == pytest.approx(expected, rel=1e-9)


def test_an_epochs_terms_are_the_datapoint_weighted_means_of_its_steps():
    """``metrics()`` reports the epoch's training reconstruction and KL as the means of its
    steps' terms weighted by their datapoints, summed in float64 (here to 1e-12 of the steps'
    own terms, each step rerun alone on its draws); the KL only over the steps with beta > 0
    (a step at beta 0 tells nothing of the KL: alone, its KL is NaN; a warm-up epoch's KL is
    its later steps'); with no step since the last call, both are NaN."""
    x = binary(120)
    sizes = [40, 56, 1, 17, 6]  # beta 0, 1/3, 2/3, 1, 1
    batches = [x[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(len(sizes))]
    objective = bind_objective(VAE(12, 2, (8,)), ReparamELBO(beta=LinearWarmup(3)))
    objective.trusted = True  # as fit sets it: the history's terms are recorded

    def run(steps):
        for step in steps:
            objective.set_step(step)
            pyro.set_rng_seed(step)
            objective(batches[step])
        return objective.metrics()

    alone = [run([step]) for step in range(len(batches))]
    epoch = run(range(len(batches)))
    assert math.isnan(alone[0]["train_kl"]) and math.isfinite(epoch["train_kl"])
    assert epoch["beta"] == 1.0
    recon = sum(a["train_reconstruction"] * n for a, n in zip(alone, sizes)) / sum(sizes)
    kl = sum(a["train_kl"] * n for a, n in zip(alone[1:], sizes[1:])) / sum(sizes[1:])
    assert epoch["train_reconstruction"] == pytest.approx(recon, rel=1e-12, abs=0)
    assert epoch["train_kl"] == pytest.approx(kl, rel=1e-12, abs=0)
    again = objective.metrics()
    assert math.isnan(again["train_reconstruction"]) and math.isnan(again["train_kl"])


def test_a_batch_the_programs_fail_on_needs_no_whole_batches():
    """``needs_whole_batches`` answers False where tracing the guide fails (here a batch of
    the wrong width for the encoder): the probe's own run then reports the error."""
    objective = bind_objective(VAE(12, 2, (8,)), ReparamELBO())
    assert objective.needs_whole_batches(torch.zeros(16, 5)) is False
    with pytest.raises(ValueError, match="x must have shape"):
        objective.trainable_parameters(torch.zeros(16, 5))


def test_the_param_store_names_are_those_the_programs_train_beside_the_model():
    """``param_store_names()`` (the param-store entries saved in the objective's state) are
    the ``pyro.param`` sites the programs use: not an entry left in the store by other code,
    nor the model's own ``nn.Module`` parameters that ``pyro.module`` puts in the store too
    (the model's ``state_dict`` saves those)."""
    pyro.param("left_by_another_model", torch.zeros(2))
    x = binary(16)
    vae = bind_objective(VAE(12, 2, (8,)), ReparamELBO())
    vae.trainable_parameters(x)
    assert any("$$$" in name for name in pyro.get_param_store().keys())  # pyro.module's
    assert vae.param_store_names() == []
    assert vae.state_dict()["_extra_state"] == {"param_store": {}}
    linear = bind_objective(LinearGaussian(), ReparamELBO())
    linear.trainable_parameters(x.double()[:, :3])
    assert sorted(linear.param_store_names()) == ["lg_a", "lg_log_s"]


class BottomUp:
    """z1 ~ N(0, 1), z2 | z1 ~ N(z1, 1), x | z2 ~ N(w z2, I); the guide draws z2 first, then
    z1 | z2 (the parent after its child: not in the model's order)."""

    w = torch.tensor([1.0, -0.5, 0.8], dtype=torch.float64)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
            pyro.sample("x", dist.Normal(z2.unsqueeze(-1) * self.w, 1.0).to_event(1), obs=x)

    def guide(self, x):
        a = pyro.param("bu_a", torch.tensor([0.3, -0.2, 0.4], dtype=torch.float64))
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(x @ a, 0.7))
            pyro.sample("z1", dist.Normal(0.5 * z2, 0.8))


def test_analytic_kl_of_a_bottom_up_guide_is_pyros_trace_elbo_on_the_same_draws():
    """With ``analytic_kl`` and a guide that is not in the model's order, ReparamELBO falls
    back to Pyro's Trace_ELBO (one particle): from the first call on, its value is
    Trace_ELBO's on the same seed (the order check draws nothing from the training stream)."""
    x = torch.randn(16, 3, generator=rng(9), dtype=torch.float64)
    program = BottomUp()
    objective = bind_objective(program, ReparamELBO(analytic_kl=True))
    for seed in (10, 11):
        pyro.set_rng_seed(seed)
        value, _ = objective(x)
        pyro.set_rng_seed(seed)
        expected = -Trace_ELBO().loss(program.model, program.guide, x) / len(x)
        assert value.item() == pytest.approx(expected, rel=1e-9), seed
