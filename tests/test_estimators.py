"""Gradient estimators against closed forms: unbiasedness (k standard errors of the mean of
many independent gradient estimates), IWAE bound ordering and scaling, schedules, and
score-function training of a discrete-latent model."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceGraph_ELBO
from torch import nn

from pvae import data
from pvae.inference import (
    IWAE,
    LOSSES,
    VIMCO,
    Cyclical,
    LinearWarmup,
    ReparamELBO,
    ScoreFunctionELBO,
    elbo_terms,
    gradient_variance,
    make_schedule,
    scale_latents,
)
from pvae.inference.traces import traces
from pvae.models import VAE
from pvae.train import Adam, fit

X = torch.tensor([[0.7], [-1.3], [2.1]], dtype=torch.float64)
A, B, S = 1.5, 0.3, 0.8  # x | z ~ N(A z + B, S^2)


class Toy:
    """z ~ N(0, 1), x | z ~ N(A z + B, S^2); guide N(c x + d, exp(log_s)^2) with pyro.param."""

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(A * z + B, S).to_event(1), obs=x)

    def guide(self, x):
        c = pyro.param("c", torch.tensor(0.2, dtype=x.dtype))
        d = pyro.param("d", torch.tensor(-0.1, dtype=x.dtype))
        log_s = pyro.param("log_s", torch.tensor(-0.3, dtype=x.dtype))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(c * x + d, log_s.exp()).to_event(1))


def exact_elbo_grad():
    """Gradient of the closed-form ELBO, summed over X, w.r.t. (c, d, log_s)."""
    c, d, log_s = (torch.tensor(v, dtype=torch.float64, requires_grad=True)
                   for v in (0.2, -0.1, -0.3))
    m, v = c * X + d, torch.exp(2 * log_s)
    elbo = (-0.5 * math.log(2 * math.pi * S**2) - ((X - A * m - B) ** 2 + A**2 * v) / (2 * S**2)
            - 0.5 * math.log(2 * math.pi) - (m**2 + v) / 2 + 0.5 * torch.log(2 * math.pi * math.e * v))
    return torch.stack(torch.autograd.grad(elbo.sum(), (c, d, log_s)))


def estimates(estimator, n):
    toy = Toy()
    est = LOSSES[estimator["name"]](**estimator.get("kwargs", {}))
    out = []
    for _ in range(n):
        _, surrogate = est(toy.model, toy.guide, X)
        params = [pyro.param(k).unconstrained() for k in ("c", "d", "log_s")]
        out.append(-torch.stack(torch.autograd.grad(surrogate, params)))  # gradient of +ELBO
    return torch.stack(out)


@pytest.mark.parametrize("estimator", [
    {"name": "reparam"},
    {"name": "score"},
    {"name": "score", "kwargs": {"baseline": "average"}},
], ids=["reparam", "score", "score-average-baseline"])
def test_elbo_gradient_unbiased(estimator):
    g = estimates(estimator, 3000)
    exact = exact_elbo_grad()
    se = g.std(0) / math.sqrt(len(g))
    assert ((g.mean(0) - exact).abs() < 4 * se).all(), (g.mean(0), exact, se)


def test_score_has_higher_variance_than_reparam():
    v_reparam = estimates({"name": "reparam"}, 500).var(0).sum()
    v_score = estimates({"name": "score"}, 500).var(0).sum()
    # 500 estimates: the variance estimates are good to ~6%, so a factor 2 is far outside noise
    assert v_score > 2 * v_reparam


def _tracegraph_value(K, program, arg, ours):
    """The ELBO estimate of one step at seed 0, from pvae's ScoreFunctionELBO or from Pyro's
    own TraceGraph_ELBO."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    if ours:
        return ScoreFunctionELBO(num_particles=K)(program.model, program.guide, arg)[0].item()
    elbo = TraceGraph_ELBO(num_particles=K, vectorize_particles=K > 1)
    return -elbo.loss(program.model, program.guide, arg)


class ToyOnADict:
    """:class:`Toy` whose programs take their data as ``{"x": tensor}``: a first argument that
    is not a tensor gives no hint of the batch's size, and the data plate is found alone."""

    def model(self, batch):
        Toy().model(batch["x"])

    def guide(self, batch):
        Toy().guide(batch["x"])


@pytest.mark.parametrize("K", [1, 3])
def test_score_function_elbo_is_pyros_tracegraph_elbo_draw_for_draw(K):
    """ScoreFunctionELBO's value is Pyro's TraceGraph_ELBO estimate: from the same seed it
    draws the same z and reports the same ELBO, with one particle (not vectorized: a
    vectorized run first traces the programs to guess the plate nesting, drawing other z) and
    with three (vectorized, as Pyro's is), on programs called with a tensor and with a dict.
    (Its gradient is the score-function one even for this reparameterizable guide, where
    Pyro's is pathwise: their unbiasedness is test_elbo_gradient_unbiased's.)"""
    for program, arg in ((Toy(), X), (ToyOnADict(), {"x": X})):
        value = _tracegraph_value(K, program, arg, ours=True)
        reference = _tracegraph_value(K, program, arg, ours=False)
        assert value == pytest.approx(reference, rel=1e-12, abs=1e-12), (program, K)


def test_dreg_mean_matches_standard_iwae():
    K = 5
    std = estimates({"name": "iwae", "kwargs": {"num_particles": K}}, 3000)
    dreg = estimates({"name": "iwae", "kwargs": {"num_particles": K, "gradient": "dreg"}}, 3000)
    se = torch.sqrt(std.var(0) / len(std) + dreg.var(0) / len(dreg))
    assert ((std.mean(0) - dreg.mean(0)).abs() < 4 * se).all()
    # DReG's point: lower variance for the guide's parameters
    assert dreg.var(0).sum() < std.var(0).sum()


def iwae_value(K, x, n=1500):
    toy, est = Toy(), IWAE(K)
    return torch.stack([est(toy.model, toy.guide, x)[0] for _ in range(n)])


def test_iwae_bound_above_elbo_and_increasing():
    x = X[:2]
    values = {K: iwae_value(K, x) for K in (1, 5, 50)}
    means = {K: v.mean().item() for K, v in values.items()}
    se = {K: v.std().item() / math.sqrt(len(v)) for K, v in values.items()}
    elbo = elbo_terms(Toy(), x, num_samples=20000).elbo.sum().item()
    assert abs(means[1] - elbo) < 4 * se[1] + 0.01  # K = 1 is the ELBO
    assert means[5] > means[1] + 4 * math.hypot(se[1], se[5])
    assert means[50] > means[5] + 4 * math.hypot(se[5], se[50])


def test_iwae_scaling_is_applied_after_log_mean_exp():
    """beta on the latent sites and a mini-batch scale s on everything:
    objective = s * sum_n logmeanexp_k [log p(x|z) + beta (log p(z) - log q(z))]."""
    toy, K, beta, s = Toy(), 7, 0.4, 3.0
    model = pyro.poutine.scale(scale_latents(beta)(toy.model), scale=s)
    guide = pyro.poutine.scale(scale_latents(beta)(toy.guide), scale=s)
    est = IWAE(K)
    est(model, guide, X)  # the first call also traces once to find the plate nesting
    pyro.set_rng_seed(3)
    value, _ = est(model, guide, X)
    # direct computation from the same draws of z
    pyro.set_rng_seed(3)
    guide_tr, model_tr = traces(toy.model, toy.guide, (X,), K, 1)
    z = guide_tr.nodes["z"]["value"]  # (K, N, 1)
    c, d, log_s = (pyro.param(k) for k in ("c", "d", "log_s"))
    log_q = dist.Normal(c * X + d, log_s.exp()).log_prob(z).sum(-1)
    log_pz = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_px = dist.Normal(A * z + B, S).log_prob(X).sum(-1)
    direct = s * (torch.logsumexp(log_px + beta * (log_pz - log_q), 0) - math.log(K)).sum()
    assert torch.allclose(value, direct, atol=1e-10)
    # not the same as scaling inside the log-mean-exp, as Pyro's RenyiELBO does
    inside = (torch.logsumexp(s * (log_px + beta * (log_pz - log_q)), 0) - math.log(K)).sum()
    assert not torch.allclose(value, inside, atol=1e-3)


def test_schedules():
    warm = LinearWarmup(10)
    assert [warm(s) for s in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]
    cyc = Cyclical(10, ratio=0.5)
    assert [cyc(s) for s in (0, 2, 5, 9, 10, 12)] == [0.0, 0.4, 1.0, 1.0, 0.0, 0.4]
    assert make_schedule(0.5)(100) == 0.5
    assert make_schedule(2.0, kl_warmup_steps=4)(2) == 1.0
    with pytest.raises(ValueError, match="either"):
        make_schedule(1.0, kl_warmup_steps=3, kl_cycle_steps=3)


def test_the_objective_is_settled_once_its_schedule_is():
    """What early stopping and the best checkpoint wait for: ``settled()`` at the step last
    given to ``set_step`` is the schedule's own answer there, not the constant's (always)."""
    cases = ((LinearWarmup(4), lambda step: step >= 4),
             (Cyclical(4, ratio=0.5), lambda step: step % 4 >= 2),
             (0.5, lambda step: True))
    for beta, expected in cases:
        objective = ReparamELBO(beta=beta).bind(Toy())
        for step in range(10):
            objective.set_step(step)
            assert objective.settled() is expected(step), (beta, step)


def binary_digits(n=400):
    return data.load("digits", binarize="static").x_train[:n]


def test_beta_one_equals_plain_elbo_and_beta_changes_training():
    x = binary_digits()
    runs = {}
    for key, beta in (("default", 1.0), ("schedule", make_schedule(1.0)), ("half", 0.5)):
        torch.manual_seed(0)
        runs[key] = fit(VAE(64, 4, (32,)), x, val=x[:100], num_epochs=3, batch_size=64,
                        loss=ReparamELBO(beta=beta), progress=False)
    assert runs["default"].column("train_elbo") == runs["schedule"].column("train_elbo")
    assert runs["half"].column("train_elbo") != runs["default"].column("train_elbo")
    assert runs["half"].column("beta") == [0.5] * 3


def test_kl_warmup_recorded_in_history():
    x = binary_digits(128)
    h = fit(VAE(64, 2, (16,)), x, num_epochs=3, batch_size=64,
            loss=ReparamELBO(beta=LinearWarmup(4)), progress=False)
    assert h.column("beta") == [0.25, 0.75, 1.0]  # beta at the last step of each epoch


@pytest.mark.parametrize("loss", [
    lambda: IWAE(5),
    lambda: IWAE(5, gradient="dreg"),
    lambda: ReparamELBO(num_particles=4),
    lambda: ScoreFunctionELBO(baseline="neural"),
], ids=["iwae", "iwae-dreg", "reparam-4", "score-neural"])
def test_estimators_train_a_vae(loss):
    x = binary_digits()
    torch.manual_seed(0)
    h = fit(VAE(64, 4, (32,)), x, val=x[:200], num_epochs=8, batch_size=64, optim=Adam(3e-3),
            progress=False, loss=loss())
    val = h.column("val_elbo")
    assert val[-1] > val[0] + 1.0


class SigmoidBeliefNet(nn.Module):
    """z ~ Bernoulli(sigmoid(a))^L, x | z ~ Bernoulli(f(z)); q(z | x) = Bernoulli(g(x))."""

    def __init__(self, x_dim=64, latent_dim=20, hidden=64):
        super().__init__()
        self.prior_logits = nn.Parameter(torch.zeros(latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.Tanh(),
                                     nn.Linear(hidden, x_dim))
        self.encoder = nn.Sequential(nn.Linear(x_dim, hidden), nn.Tanh(),
                                     nn.Linear(hidden, latent_dim))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(logits=self.prior_logits.expand(x.shape[0], -1))
                            .to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=self.encoder(x)).to_event(1))


def test_score_function_trains_discrete_latents_and_baseline_helps():
    ds = data.load("digits", binarize="static")
    results = {}
    for baseline in (None, "average"):
        torch.manual_seed(0)
        model = SigmoidBeliefNet()
        h = fit(model, ds.x_train, val=ds.x_test, num_epochs=12, batch_size=64, optim=Adam(3e-3),
                loss=ScoreFunctionELBO(baseline=baseline), progress=False, seed=0)
        val = h.column("val_elbo")
        # improves: the last 4 epochs are clearly better than the first
        assert sum(val[8:]) / 4 > val[0] + 0.5, (baseline, val)
        results[baseline] = elbo_terms(model, ds.x_test, num_samples=50).elbo
    diff = results["average"] - results[None]  # paired over test images
    assert diff.mean() > 3 * diff.std() / math.sqrt(len(diff))


def test_gradient_variance_table():
    x = binary_digits(64)
    torch.manual_seed(0)
    vae = VAE(64, 4, (32,))
    reparam = gradient_variance(vae, x, loss=ReparamELBO(), num_estimates=50)
    score = gradient_variance(vae, x, loss=ScoreFunctionELBO(), num_estimates=50)
    score_avg = gradient_variance(vae, x, loss=ScoreFunctionELBO(baseline="average"),
                                  num_estimates=50)
    assert set(reparam) == {"encoder", "decoder", "likelihood", "total"} - {"likelihood"}
    # same decoder gradient estimator (reparameterized z is not used by score for decoder)...
    assert score["encoder"]["variance"] > 10 * reparam["encoder"]["variance"]
    assert score_avg["encoder"]["variance"] < score["encoder"]["variance"]


class ToyModule(nn.Module):
    """:class:`Toy` with its guide's c, d and log_s as module parameters (one group each)."""

    def __init__(self):
        super().__init__()
        self.c, self.d, self.log_s = (nn.Parameter(torch.tensor(v, dtype=torch.float64))
                                      for v in (0.2, -0.1, -0.3))

    def model(self, x):
        Toy().model(x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.c * x + self.d, self.log_s.exp()).to_event(1))


def test_gradient_variance_values_against_closed_forms():
    """gradient_variance's mean and variance per parameter group against the closed forms of
    the one-particle reparameterized gradient of the ELBO per datapoint on the toy model. With
    z_n = m_n + s e_n and log p(x_n, z_n) = -alpha z_n^2 + beta_n z_n + const, the gradient
    w.r.t. m_n is g_n = beta_n - 2 alpha z_n and w.r.t. log s it is g_n s e_n + 1 (log q's
    path cancels), each averaged over the 3 datapoints: d has variance 4 alpha^2 s^2 / 3, c
    sum x_n^2 4 alpha^2 s^2 / 9, log_s sum (a_n^2 + 2 b^2) / 9 with a_n = (beta_n - 2 alpha
    m_n) s, b = -2 alpha s^2. Tolerance: 5 standard deviations of a sample variance of 1000
    draws, from the closed-form fourth moments (3 a^4 + 60 a^2 b^2 + 60 b^4 per datapoint for
    a e + b (e^2 - 1)). The means are exact_elbo_grad() / 3 (the closed-form ELBO's gradient)
    and the SNR is their ratio to the sds."""
    toy, n = ToyModule(), 1000
    got = gradient_variance(toy, X, num_estimates=n)
    x = X[:, 0]
    alpha, beta = A**2 / (2 * S**2) + 0.5, A * (x - B) / S**2
    m, s = 0.2 * x - 0.1, math.exp(-0.3)
    a, b = (beta - 2 * alpha * m) * s, -2 * alpha * s**2
    # (variance, fourth cumulant) of each coordinate's estimate
    gauss = lambda coef: ((coef**2).sum() / 9, torch.zeros(()))  # noqa: E731
    moments = {"c": gauss(2 * alpha * s * x), "d": gauss(2 * alpha * s * torch.ones(3)),
               "log_s": ((a**2 + 2 * b**2).sum() / 9,
                         (3 * a**4 + 60 * a**2 * b**2 + 60 * b**4 - 3 * (a**2 + 2 * b**2) ** 2)
                         .sum() / 81)}
    means = dict(zip(("c", "d", "log_s"), exact_elbo_grad() / 3))
    assert set(got) == {"c", "d", "log_s", "total"}
    for name, (var, k4) in moments.items():
        sd_of_var = math.sqrt((k4 + 2 * var**2) / n)  # var of a sample variance: (mu4 - var^2)/n
        assert abs(got[name]["variance"] - var) < 5 * sd_of_var, (name, got[name], var.item())
        se = math.sqrt(var / n)  # the mean of n estimates
        assert abs(math.sqrt(got[name]["mean_sq"]) - means[name].abs()) < 5 * se, (name, got[name])
        snr = (means[name].abs() / var.sqrt()).item()  # |mean| / sd: errors of both, to first order
        assert abs(got[name]["snr"] - snr) < 5 * (1 / math.sqrt(n) + snr * sd_of_var / (2 * var))
        assert got[name]["num_params"] == 1
    # the trace of the covariance and the mean's squared norm, over all three
    for key in ("variance", "mean_sq"):
        assert got["total"][key] == pytest.approx(sum(got[k][key] for k in moments), rel=1e-12)


def test_bad_options():
    with pytest.raises(ValueError, match="unknown baseline"):
        ScoreFunctionELBO(baseline="median")
    with pytest.raises(ValueError, match="unknown gradient"):
        IWAE(5, gradient="reinforce")
    with pytest.raises(ValueError, match="num_particles"):
        IWAE(num_particles=0)
    with pytest.raises(ValueError, match="num_particles >= 2"):
        VIMCO(1)
    with pytest.raises(TypeError, match="analytic_kl"):
        IWAE(5, analytic_kl=True)
