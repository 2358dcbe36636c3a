"""Capturable training steps, checked without a GPU: the capturable objectives compute what
Pyro's ELBOs compute, and the whole step of every built-in model runs on ``device="meta"``
(which refuses ``.item()`` and any tensor made on the CPU from a Python scalar: what breaks
CUDA-graph capture)."""

import pyro
import pytest
import torch

from pvae.data import bernoulli_sample
from pvae.inference import IWAE, VIMCO, ReparamELBO, ScoreFunctionELBO, SVIObjective, scale_latents
from pvae.models import CVAE, PPCA, VAE

from conftest import rng

X_DIM, N = 12, 16


def _binary(n=N, seed=0):
    return torch.bernoulli(torch.full((n, X_DIM), 0.4), generator=rng(seed))


# (constructor, data: (x, c) from a generator-free function)
MODELS = {
    "vae": (lambda: VAE(X_DIM, 2, (8,)), lambda: (_binary(), None)),
    "cvae-label": (lambda: CVAE(X_DIM, 2, num_classes=3, hidden_dims=(8,), prior="learned"),
                   lambda: (_binary(), torch.arange(N) % 3)),
    "cvae-vector": (lambda: CVAE(X_DIM, 2, c_dim=4, hidden_dims=(8,)),
                    lambda: (_binary(), torch.rand(N, 4, generator=rng(1)))),
    "ppca-full": (lambda: PPCA(X_DIM, 2, "full"), lambda: (torch.randn(N, X_DIM), None)),
    "ppca-diagonal": (lambda: PPCA(X_DIM, 3, "diagonal"), lambda: (torch.randn(N, X_DIM), None)),
}


def _args(x, c):
    return (x,) if c is None else (x, c)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("analytic_kl", [False, True])
@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_capturable_reparam_equals_pyro_elbo(name, num_particles, analytic_kl, beta):
    """Same noise, same value and gradient as Trace_ELBO / TraceMeanField_ELBO."""
    make_model, make_data = MODELS[name]
    torch.manual_seed(0)
    model = make_model()
    args = _args(*make_data())
    handler = scale_latents(beta)
    results = []
    for capturable in (False, True):
        est = ReparamELBO(num_particles, analytic_kl=analytic_kl)
        if capturable:
            est.capturable_()
        pyro.set_rng_seed(7)
        value, loss = est(handler(model.model), handler(model.guide), *args)
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        results.append((value, [g if g is not None else torch.zeros(()) for g in grads]))
    (v0, g0), (v1, g1) = results
    assert torch.allclose(v0, v1, rtol=1e-5, atol=1e-5), (v0, v1)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


CAPTURABLE = {
    "reparam": lambda: ReparamELBO(),
    "reparam-analytic_kl": lambda: ReparamELBO(analytic_kl=True),
    "reparam-3": lambda: ReparamELBO(3),
    "iwae-3": lambda: IWAE(3),
    "iwae-3-dreg": lambda: IWAE(3, gradient="dreg"),
    "vimco-3": lambda: VIMCO(3),
}


def _meta_step(name, loss, capturable=True, beta=1.0):
    """One whole training step on the meta device: binarization, the objective (trusted, as
    in the training loop), backward and the optimizer step."""
    make_model, make_data = MODELS[name]
    model = make_model().to("meta")
    x, c = make_data()
    x = torch.empty_like(x, device="meta")
    c = None if c is None else torch.empty_like(c, device="meta")
    loss = CAPTURABLE[loss]()
    objective = SVIObjective(model, loss, beta)
    if capturable:
        loss.capturable_()
    objective.trusted = True
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    xb = bernoulli_sample(x) if name != "ppca-full" and name != "ppca-diagonal" else x
    value, loss = objective(*_args(xb, c))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return value, loss


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("loss", list(CAPTURABLE))
def test_whole_step_runs_on_meta(name, loss):
    """Every loss whose ``capture_blocker()`` is None runs on the meta device."""
    assert CAPTURABLE[loss]().capture_blocker() is None
    value, loss = _meta_step(name, loss)
    assert value.device.type == loss.device.type == "meta"


def test_meta_step_catches_host_syncs():
    """The guard has teeth: Pyro's Trace_ELBO reads every site's log-density on the host."""
    with pytest.raises(RuntimeError, match="meta"):
        _meta_step("vae", "reparam", capturable=False)


def test_score_function_and_pyro_losses_say_why_they_are_not_capturable():
    from pyro.infer import Trace_ELBO

    from pvae.inference import PyroLoss

    why = ScoreFunctionELBO().capture_blocker()
    assert "host" in why and why.startswith("the score-function ELBO"), why  # names the loss
    assert "Trace_ELBO" in PyroLoss(Trace_ELBO()).capture_blocker()


# --- the captured step's plumbing, on CPU, with a stand-in for the CUDA graph --------------


class RerunGraph:
    """Stands in for a CUDA graph on the CPU: ``capture`` records the step function without
    running it, ``replay`` runs it. A real replay overwrites the gradients that the captured
    backward allocated (they were None at capture), so the stand-in starts each run from None
    gradients too."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def capture(self, fn):
        self.fn = fn

    def replay(self):
        self.optimizer.zero_grad(set_to_none=True)
        self.fn()


def _train(step_kind, model_cls=VAE, num_epochs=3, x=None, beta=1.0, check_every=100):
    from pvae.train import (
        CapturedStep,
        Scheduler,
        TrainingData,
        TrainState,
        make_adam,
        run_epochs,
        seed_all,
    )

    torch.manual_seed(0)
    model = model_cls(X_DIM, 2, (8,))
    x = torch.rand(70, X_DIM, generator=rng(3)) if x is None else x
    data = TrainingData(x, model=model, batch_size=16, device=torch.device("cpu"),
                        dtype=torch.float32, binarize="dynamic")
    objective = SVIObjective(model, ReparamELBO(), beta)
    seed_all(0)
    probe = data.probe(0)
    params = objective.trainable_parameters(*probe)
    objective.trusted = True
    objective.capturable_(probe[0])
    shuffling = torch.Generator(device="cpu").manual_seed(0)
    optimizer = make_adam(params, 1e-2)
    scheduler = Scheduler(torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9), "epoch")
    state = TrainState(model, objective, optimizer, scheduler, shuffling, {})
    step = None
    if step_kind == "captured":
        step = CapturedStep(state, data, graph_factory=lambda: RerunGraph(state.optimizer),
                            check_every=check_every)
    history = run_epochs(state, data, num_epochs, step=step)
    return history, model


def test_captured_step_plumbing_equals_eager():
    """Static input buffers, in-graph binarization, the value copied out, beta updated in place,
    eager warm-up and an eager last batch (70 = 4 x 16 + 6): the same history and parameters
    as the eager loop."""
    from pvae.inference import LinearWarmup

    eager, eager_model = _train("eager", beta=LinearWarmup(7, 0.2))
    captured, captured_model = _train("captured", beta=LinearWarmup(7, 0.2))
    assert eager.column("train_elbo") == captured.column("train_elbo")
    assert eager.column("beta") == captured.column("beta") and eager[-1]["beta"] == 1.0
    for a, b in zip(eager_model.parameters(), captured_model.parameters()):
        assert torch.equal(a, b)


class NaNAtStep(VAE):
    """Its model returns NaN at one call (counted from the probe's)."""

    calls, bad_call = 0, 1 + 5 + 2  # probe, epoch 1 (5 steps), step 2 of epoch 2

    def model(self, x, c=None):
        type(self).calls += 1
        if type(self).calls == self.bad_call:
            x = x * float("nan")
        super().model(x, c)


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_captured_step_reports_the_first_nonfinite_step():
    """The device-side flag names the first bad step although it is read only later. With the
    stand-in, every step re-runs the model, so the NaN lands where the eager loop's would."""
    from pvae.train import TrainingDivergedError

    NaNAtStep.calls = 0
    with pytest.raises(TrainingDivergedError, match=r"epoch 2, step 2;"):
        _train("captured", model_cls=NaNAtStep, check_every=1000)
