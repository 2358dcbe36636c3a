"""The training losses of :mod:`pvae.inference.objectives` against independent computations on
the same draws: the guides below record what they sample, and each test recomputes the
objective's value, its KL and its gradient from those draws with ``torch.distributions``
directly (no pvae code), for vectorized particles and for a model that loops over them, with
beta, ``poutine.scale`` and autoguides' auxiliary sites; the captured ELBO against Pyro's
``Trace_ELBO`` / ``TraceMeanField_ELBO`` on the same noise; the losses' settings, state and
bookkeeping (config, repr, param-store state, data-parallel statistics, capturable beta)."""

import contextlib
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from torch.distributions import constraints

from pvae import parallel
from pvae.inference import (
    IWAE,
    VIMCO,
    PyroLoss,
    ReparamELBO,
    ScoreFunctionELBO,
    SVILoss,
    SVIObjective,
    scale_latents,
)
from pvae.inference.schedules import LinearWarmup

from conftest import rng

N, D = 4, 2
X = torch.randn(N, D, generator=rng(11))
SIGMA_X = 0.7


def _model(vectorizable=True):
    """A linear-Gaussian model with its own parameters, written as a Pyro user would."""

    def model(x):
        w = pyro.param("w", torch.tensor([0.8, -0.5]))
        b = pyro.param("b", torch.tensor(0.2))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
            loc = z * w + b
            if not vectorizable:  # explicit sizes: does not broadcast over a particle dim
                loc = loc.reshape(x.shape[0], D)
            pyro.sample("x", dist.Normal(loc, SIGMA_X).to_event(1), obs=x)

    return model


def _guide(draws):
    def guide(x):
        mu = pyro.param("mu", lambda: 0.3 * torch.randn(N, D, generator=rng(12)))
        s = pyro.param("s", lambda: torch.full((N, D), 0.8), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(mu, s).to_event(1))
        draws.append(z.detach())

    return guide


def _scaled(fn, scale):
    return fn if scale is None else poutine.scale(fn, scale=scale)


def _densities(z, x=X):
    """log p(x | z), log p(z), log q(z | x) at draws ``z`` (..., N, D) from the param store,
    with z re-expressed through the guide's parameters (z = mu + s eps) so that gradients
    flow as in a reparameterized draw."""
    mu, s = pyro.param("mu"), pyro.param("s")
    eps = ((z - mu) / s).detach()
    z = mu + s * eps
    w, b = pyro.param("w"), pyro.param("b")
    log_lik = dist.Normal(z * w + b, SIGMA_X).log_prob(x).sum(-1)
    log_prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_q = dist.Normal(mu, s).log_prob(z).sum(-1)
    log_q_stopped = dist.Normal(mu.detach(), s.detach()).log_prob(z).sum(-1)
    return log_lik, log_prior, log_q, log_q_stopped


def _params():
    """The param store's leaves (unconstrained), in a fixed order."""
    store = dict(pyro.get_param_store().named_parameters())
    return [store[k] for k in ("w", "b", "mu", "s")]


def _grads(loss):
    return torch.autograd.grad(loss, _params())


def _run(loss, model, guide, draws, beta=1.0, scale=None):
    """Call ``loss`` once to find its layout (and warm the param store), then again on fresh
    draws: returns (value, surrogate, the draws (K, N, D))."""
    handler = scale_latents(beta)
    m, g = handler(_scaled(model, scale)), handler(_scaled(guide, scale))
    loss(m, g, X)
    draws.clear()
    pyro.set_rng_seed(3)
    value, surrogate = loss(m, g, X)
    z = torch.stack(draws) if len(draws) > 1 else draws[0]
    return value, surrogate, z


def _first_call(vectorizable):
    """The model that does not broadcast over particles is looped over them, with a warning
    that names what goes one particle at a time: training (evaluation says "evaluating")."""
    if vectorizable:
        return contextlib.nullcontext()
    return pytest.warns(RuntimeWarning, match=r"does not run with vectorized particles .*\); "
                                              r"training one particle at a time")


def _logmeanexp(t):
    return torch.logsumexp(t, 0) - torch.log(torch.tensor(float(t.shape[0])))


@pytest.mark.parametrize("vectorizable", [True, False])
@pytest.mark.parametrize("K", [2, 3])
def test_iwae_value_and_gradient_equal_an_independent_computation(vectorizable, K):
    """IWAE's value and its standard gradient, from the recorded draws, with
    a KL weight of 0.4 and a poutine.scale of 2.5 (Burda et al. eq. 8 with pvae's scaling:
    s * log mean_k exp(log p(x|z_k) + beta (log p(z_k) - log q(z_k|x))))."""
    beta, scale = 0.4, 2.5
    draws = []
    with _first_call(vectorizable):
        value, surrogate, z = _run(IWAE(K), _model(vectorizable), _guide(draws), draws, beta,
                                   scale)
    assert z.shape == (K, N, D)
    log_lik, log_prior, log_q, _ = _densities(z)
    log_w = log_lik + beta * (log_prior - log_q)
    expected = (scale * _logmeanexp(log_w)).sum()
    assert torch.allclose(value, expected.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(surrogate), _grads(-expected)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("vectorizable", [True, False])
def test_iw_losses_report_the_kl_of_their_particles(vectorizable):
    """``last_kl`` (the history's train_kl): s * sum_n mean_k (log q(z_k|x_n) - log p(z_k)),
    unweighted by beta."""
    K, beta, scale = 3, 0.4, 2.5
    for loss in (IWAE(K), VIMCO(K)):
        pyro.clear_param_store()
        draws = []
        with _first_call(vectorizable):
            _run(loss, _model(vectorizable), _guide(draws), draws, beta, scale)
        z = torch.stack(draws) if len(draws) > 1 else draws[0]
        _, log_prior, log_q, _ = _densities(z)
        expected = scale * (log_q - log_prior).mean(0).sum()
        assert torch.allclose(loss.last_kl, expected.detach(), rtol=1e-5, atol=1e-5), loss


@pytest.mark.parametrize("vectorizable", [True, False])
@pytest.mark.parametrize("K", [2, 3])
def test_dreg_gradient_equals_tucker_et_al_eq_7(vectorizable, K):
    """DReG (Tucker et al. 2019, eq. 7): the guide's parameters get
    sum_k w~_k^2 d log w_k / dz_k dz_k/dphi (log q with stopped parameters), the model's the
    standard sum_k w~_k grad log w_k; here with a different scale for each datapoint (the
    bound's s_n)."""
    scale = torch.tensor([1.0, 2.0, 0.5, 3.0])
    draws = []
    with _first_call(vectorizable):
        value, surrogate, z = _run(IWAE(K, gradient="dreg"), _model(vectorizable),
                                   _guide(draws), draws, 1.0, scale)
    log_lik, log_prior, log_q, log_q_stopped = _densities(z)
    log_w = log_lik + log_prior - log_q
    assert torch.allclose(value, (scale * _logmeanexp(log_w)).sum().detach(), rtol=1e-5,
                          atol=1e-5)
    w_tilde = torch.softmax(log_w.detach(), 0)
    model_grads = torch.autograd.grad(-(scale * _logmeanexp(log_w)).sum(), _params()[:2],
                                      retain_graph=True)
    stopped = log_lik + log_prior - log_q_stopped
    guide_grads = torch.autograd.grad(-(scale * (w_tilde ** 2 * stopped).sum(0)).sum(),
                                      _params()[2:], retain_graph=True)
    for a, b in zip(_grads(surrogate), model_grads + guide_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    # and it is not the standard gradient (which the test above pins)
    standard = torch.autograd.grad(-(scale * _logmeanexp(log_w)).sum(), _params()[2:])
    assert not torch.allclose(guide_grads[0], standard[0], rtol=1e-2)


def _vimco_reference(log_w, log_q, scale):
    """Mnih & Rezende (2016) eqs. 5-10, one leave-one-out bound at a time."""
    K = log_w.shape[0]
    bound = _logmeanexp(log_w)
    w = log_w.detach()
    baselines = []
    for k in range(K):
        others = torch.cat([w[:k], w[k + 1:]])
        replaced = torch.cat([others, others.mean(0, keepdim=True)])
        baselines.append(_logmeanexp(replaced))
    signal = bound.detach() - torch.stack(baselines)
    return (scale * bound).sum(), -(scale * ((signal * log_q).sum(0) + bound)).sum()


@pytest.mark.parametrize("vectorizable", [True, False])
@pytest.mark.parametrize("K", [2, 4])
def test_vimco_value_and_gradient_equal_mnih_and_rezende(vectorizable, K):
    beta, scale = 0.4, 2.5
    draws = []
    with _first_call(vectorizable):
        value, surrogate, z = _run(VIMCO(K), _model(vectorizable), _guide(draws), draws, beta,
                                   scale)
    z = z.detach()  # VIMCO does not differentiate the draws
    mu, s, w, b = pyro.param("mu"), pyro.param("s"), pyro.param("w"), pyro.param("b")
    log_q = dist.Normal(mu, s).log_prob(z).sum(-1)
    log_w = (dist.Normal(z * w + b, SIGMA_X).log_prob(X).sum(-1)
             + beta * (dist.Normal(0.0, 1.0).log_prob(z).sum(-1) - log_q))
    expected, expected_surrogate = _vimco_reference(log_w, log_q, scale)
    assert torch.allclose(value, expected.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(surrogate), _grads(expected_surrogate)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


# --- autoguides: the auxiliary site carries q's density ----------------------------------


def _autoguide(draws):
    guide = AutoNormal(_model(), init_scale=0.6)

    def recorded(x):
        z = guide(x)["z"]
        draws.append(z.detach())

    return guide, recorded


def test_iwae_and_vimco_count_an_autoguides_auxiliary_site():
    """AutoNormal draws z at an auxiliary site and returns it through a Delta: log q is the
    auxiliary site's Normal (Pyro's ELBOs count it too)."""
    K = 3
    for loss in (IWAE(K), VIMCO(K)):
        pyro.clear_param_store()
        draws = []
        guide, recorded = _autoguide(draws)
        value, surrogate, z = _run(loss, _model(), recorded, draws)
        z = z.detach() if isinstance(loss, VIMCO) else z
        w, b = pyro.param("w"), pyro.param("b")
        log_q = dist.Normal(guide.locs.z, guide.scales.z).log_prob(z).sum(-1)
        log_prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_w = dist.Normal(z * w + b, SIGMA_X).log_prob(X).sum(-1) + log_prior - log_q
        assert torch.allclose(value, _logmeanexp(log_w).sum().detach(), rtol=1e-5, atol=1e-5)
        assert torch.allclose(loss.last_kl, (log_q - log_prior).mean(0).sum().detach(),
                              rtol=1e-5, atol=1e-5)
        if isinstance(loss, VIMCO):
            _, expected_surrogate = _vimco_reference(log_w, log_q, 1.0)
            store = dict(pyro.get_param_store().named_parameters())
            params = [store["AutoNormal.locs.z"], store["AutoNormal.scales.z"]]
            for a, b in zip(torch.autograd.grad(surrogate, params),
                            torch.autograd.grad(expected_surrogate, params)):
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_dreg_refuses_an_autoguides_auxiliary_site():
    guide = AutoNormal(_model())
    with pytest.raises(ValueError, match="auxiliary"):
        IWAE(3, gradient="dreg")(_model(), guide, X)


# --- the captured ReparamELBO against Pyro's ELBOs, on the same noise ---------------------

F = N  # a second plate as large as the batch, neither named "data": name the data plate


def _nested_model(x):
    w = pyro.param("w2", torch.tensor(0.5))
    mask = torch.arange(N * F).reshape(N, F) % 3 != 1
    with pyro.plate("rows", N, dim=-2):
        z1 = pyro.sample("z1", dist.Normal(0.0, 1.0).expand([1, D]).to_event(1))
        with pyro.plate("feat", F, dim=-1), poutine.scale(scale=0.7):
            z2 = pyro.sample("z2", dist.Normal(z1.sum(-1), 1.0))
        with pyro.plate("feat_obs", F, dim=-1), poutine.mask(mask=mask):
            pyro.sample("x", dist.Normal(z2 * w, 0.5), obs=x)


def _nested_guide(bottom_up):
    def guide(x):
        m1 = pyro.param("m1", lambda: 0.2 * torch.randn(N, 1, D, generator=rng(13)))
        s1 = pyro.param("s1", lambda: torch.full((N, 1, D), 0.9), constraint=constraints.positive)
        m2 = pyro.param("m2", lambda: 0.2 * torch.randn(N, F, generator=rng(14)))
        s2 = pyro.param("s2", lambda: torch.full((N, F), 0.6), constraint=constraints.positive)
        with pyro.plate("rows", N, dim=-2):
            if not bottom_up:
                z1 = pyro.sample("z1", dist.Normal(m1, s1).to_event(1))
            with pyro.plate("feat", F, dim=-1), poutine.scale(scale=0.7):
                z2 = pyro.sample("z2", dist.Normal(m2 + (0.0 if bottom_up else 0.3 * z1.sum(-1)),
                                                   s2))
            if bottom_up:  # q(z2 | x) q(z1 | z2, x): the parent drawn after its child
                pyro.sample("z1", dist.Normal(m1 + 0.2 * z2.mean(-1, keepdim=True)[..., None],
                                              s1).to_event(1))

    return guide


XN = torch.randn(N, F, generator=rng(15))


def _captured_and_eager(make_loss, model, guide, x, beta):
    """(value, gradients) of the eager loss (Pyro's ELBO) and of the captured path, each on
    the noise of seed 7 (the first call finds the layout)."""
    handler = scale_latents(beta)
    m, g = handler(model), handler(guide)
    results = []
    for capturable in (False, True):
        loss = make_loss()
        if capturable:
            loss.capturable_()
        loss(m, g, x)
        pyro.set_rng_seed(7)
        value, surrogate = loss(m, g, x)
        params = [p for _, p in sorted(pyro.get_param_store().named_parameters())]
        results.append((value, torch.autograd.grad(surrogate, params)))
    return results


@pytest.mark.parametrize("bottom_up", [False, True])
@pytest.mark.parametrize("analytic_kl", [False, True])
@pytest.mark.parametrize("K", [1, 2])
def test_captured_elbo_equals_pyros_on_masked_scaled_nested_sites(K, analytic_kl, bottom_up):
    """Two latent sites in nested plates (one inside poutine.scale), a masked observed site,
    beta 0.6, 1 or 2 vectorized particles, a second plate as large as the batch (so the data
    plate is named), a guide in the model's order (closed-form KLs with analytic_kl, as
    TraceMeanField_ELBO) or bottom-up (Monte Carlo KLs, as Trace_ELBO)."""
    (v0, g0), (v1, g1) = _captured_and_eager(
        lambda: ReparamELBO(K, analytic_kl=analytic_kl, data_plate="rows"), _nested_model,
        _nested_guide(bottom_up), XN, 0.6)
    assert torch.allclose(v0, v1, rtol=1e-5, atol=1e-5), (v0, v1)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_the_captured_one_particle_elbo_needs_no_data_plate_as_pyros():
    """One particle needs no particle plate, hence no plate layout: like Pyro's Trace_ELBO,
    the captured path takes programs where two plates have the batch's size without being
    told which is the data plate (with two particles it must be told: the plate goes left of
    the deepest nesting, which the layout finds)."""
    (v0, g0), (v1, g1) = _captured_and_eager(lambda: ReparamELBO(), _nested_model,
                                             _nested_guide(False), XN, 1.0)
    assert torch.allclose(v0, v1, rtol=1e-5, atol=1e-5), (v0, v1)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    loss = ReparamELBO(2)
    loss.capturable_()
    with pytest.raises(ValueError, match="data_plate="):
        loss(_nested_model, _nested_guide(False), XN)


@pytest.mark.parametrize("analytic_kl", [False, True])
def test_captured_elbo_equals_pyros_with_an_autoguide(analytic_kl):
    guide = AutoNormal(_model(), init_scale=0.6)
    (v0, g0), (v1, g1) = _captured_and_eager(lambda: ReparamELBO(2, analytic_kl=analytic_kl),
                                             _model(), guide, X, 1.0)
    assert torch.allclose(v0, v1, rtol=1e-5, atol=1e-5), (v0, v1)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make_loss", [lambda: ReparamELBO(), lambda: ReparamELBO(2),
                                       lambda: IWAE(2), lambda: VIMCO(2)],
                         ids=["reparam", "reparam-2", "iwae-2", "vimco-2"])
@pytest.mark.parametrize("capturable", [False, True])
def test_a_param_only_trace_around_a_loss_sees_the_programs_parameters(make_loss, capturable):
    """As around Pyro's ELBOs (what SVI and trainable_parameters rely on)."""
    loss = make_loss()
    if capturable and isinstance(loss, ReparamELBO):
        loss.capturable_()
    draws = []
    with poutine.trace(param_only=True) as tr:
        loss(_model(), _guide(draws), X)
    assert set(tr.trace.nodes) == {"w", "b", "mu", "s"}


def test_vimco_names_its_data_plate_where_two_plates_have_the_batchs_size():
    loss = VIMCO(2, data_plate="rows")
    value, _ = loss(_nested_model, _nested_guide(False), XN)
    assert value.shape == ()
    with pytest.raises(ValueError, match="data_plate="):
        VIMCO(2)(_nested_model, _nested_guide(False), XN)


# --- settings: config, repr, defaults, validation losses ----------------------------------


def test_losses_record_their_settings_with_the_documented_defaults():
    assert IWAE().config == {"name": "iwae", "num_particles": 5, "gradient": "standard",
                             "beta": 1.0, "data_plate": None}
    assert IWAE().num_particles == 5
    assert ReparamELBO().config == {"name": "reparam", "num_particles": 1,
                                    "analytic_kl": False, "beta": 1.0, "data_plate": None}
    assert ReparamELBO().num_particles == 1 and ReparamELBO().analytic_kl is False
    assert ScoreFunctionELBO().config == {"name": "score", "num_particles": 1,
                                          "baseline": None, "baseline_beta": 0.9, "beta": 1.0,
                                          "data_plate": None}
    assert VIMCO().config == {"name": "vimco", "num_particles": 5, "beta": 1.0,
                              "data_plate": None}
    assert VIMCO().num_particles == 5 and VIMCO().beta == 1.0
    assert VIMCO(2).num_particles == 2  # the fewest its leave-one-out baselines take
    for loss in (ReparamELBO, ScoreFunctionELBO, IWAE, VIMCO):  # the refusal names the argument
        with pytest.raises(ValueError, match=r"^num_particles must be an integer >= 1, got 0$"):
            loss(0)
    assert repr(IWAE(3, gradient="dreg", beta=LinearWarmup(10))) == (
        "IWAE(num_particles=3, gradient='dreg', "
        "beta='LinearWarmup(10, start=0.0, end=1.0)', data_plate=None)")
    assert repr(ReparamELBO(2, analytic_kl=True)) == (
        "ReparamELBO(num_particles=2, analytic_kl=True, beta=1.0, data_plate=None)")


def test_the_reparam_validation_loss_is_the_one_particle_elbo_with_the_same_kl():
    for analytic_kl in (False, True):
        validation = ReparamELBO(4, analytic_kl=analytic_kl, beta=0.2).validation_loss()
        assert validation.config == {"name": "reparam", "num_particles": 1,
                                     "analytic_kl": analytic_kl, "beta": 1.0,
                                     "data_plate": None}
        assert validation.num_particles == 1 and validation.analytic_kl is analytic_kl


# --- PyroLoss -------------------------------------------------------------------------------


def _neg_elbo(model, guide, *args):
    return Trace_ELBO().differentiable_loss(model, guide, *args)


class _ScaledLoss(torch.nn.Module):
    """A loss with a parameter of its own."""

    def __init__(self):
        super().__init__()
        self.log_c = torch.nn.Parameter(torch.tensor(0.0))

    def forward(self, model, guide, *args):
        return _neg_elbo(model, guide, *args) * self.log_c.exp()


def test_pyro_loss_names_and_registers_what_it_wraps():
    assert PyroLoss(Trace_ELBO(num_particles=2, max_plate_nesting=1)).config == {
        "name": "Trace_ELBO", "num_particles": 2, "max_plate_nesting": 1,
        "vectorize_particles": False, "strict_enumeration_warning": True, "beta": 1.0}
    assert PyroLoss(_neg_elbo).config == {"name": "_neg_elbo", "beta": 1.0}
    module = _ScaledLoss()
    loss = PyroLoss(module)
    assert loss.config == {"name": "_ScaledLoss", "beta": 1.0}
    assert "Trace_ELBO" in PyroLoss(Trace_ELBO()).capture_blocker()
    assert "_neg_elbo" in PyroLoss(_neg_elbo).capture_blocker()
    # the module's parameter is the loss's: trained and saved with it
    assert [p for p in loss.parameters()] == [module.log_c]
    assert "module.log_c" in loss.state_dict()


@pytest.mark.parametrize("make", [lambda: Trace_ELBO(), lambda: _neg_elbo],
                         ids=["Trace_ELBO", "callable"])
def test_pyro_loss_reports_minus_the_loss_with_and_without_gradients(make):
    draws = []
    model, guide = _model(), _guide(draws)
    loss = PyroLoss(make())
    pyro.set_rng_seed(5)
    value, surrogate = loss(model, guide, X)
    assert torch.equal(value, -surrogate.detach())
    with torch.no_grad():  # validation
        pyro.set_rng_seed(5)
        value_ng, surrogate_ng = loss(model, guide, X)
    assert torch.allclose(value_ng, value, rtol=1e-6) and torch.equal(value_ng, -surrogate_ng)
    assert value_ng.device == X.device  # on the data's device (test_gpu: on CUDA)


def test_pyro_loss_validates_a_float64_model_in_float64():
    """Validation (no gradients) runs Pyro's ``loss``, a Python float: it comes back in the
    data's dtype, as the training value does, not rounded to torch's default float32."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0).expand([D]).to_event(1))
            pyro.sample("x", dist.Normal(z, SIGMA_X).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, 0.5).to_event(1))

    x, loss = X.double() + 1 / 3, PyroLoss(Trace_ELBO())
    pyro.set_rng_seed(3)
    value, _ = loss(model, guide, x)
    with torch.no_grad():
        pyro.set_rng_seed(3)
        value_ng, _ = loss(model, guide, x)
    assert value.dtype == value_ng.dtype == torch.float64
    assert value_ng.item() == pytest.approx(value.item(), rel=1e-12, abs=0)


def test_pyro_loss_validates_count_data_in_a_floating_point_dtype():
    """Integer (count) data, as Pyro's Poisson examples pass them: the validation value of
    Pyro's ``loss`` is a float in torch's default dtype (the data's int64 would truncate
    it), Trace_ELBO's value on the same draws."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
            pyro.sample("x", dist.Poisson(rate), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("rate", dist.Gamma(2.0 + x, 2.0))

    x, loss = torch.tensor([0, 3, 1, 7]), PyroLoss(Trace_ELBO())
    with torch.no_grad():
        pyro.set_rng_seed(4)
        value, _ = loss(model, guide, x)
    pyro.set_rng_seed(4)
    expected = -Trace_ELBO().loss(model, guide, x)
    assert value.dtype == torch.get_default_dtype()
    assert value.item() == pytest.approx(expected, rel=1e-6)


# --- SVIObjective: param-store state, capturable beta, data-parallel statistics -----------


def _program(draws):
    return SimpleNamespace(model=_model(), guide=_guide(draws))


def test_param_store_parameters_are_found_saved_and_restored():
    objective = SVIObjective(_program([]), ReparamELBO())
    params = objective.trainable_parameters(X)
    assert sorted(objective.param_store_names()) == ["b", "mu", "s", "w"]
    assert len(params) == 4
    state = objective.state_dict()
    saved = {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    objective.load_state_dict(state)
    for name, p in pyro.get_param_store().named_parameters():
        assert torch.equal(p, saved[name]), name
    # a state that holds no param-store entries leaves the store as it is
    objective.set_extra_state({})
    objective.set_extra_state({"param_store": {"absent": torch.zeros(1)}})
    for name, p in pyro.get_param_store().named_parameters():
        assert torch.equal(p, saved[name]), name


def test_capturable_holds_a_scheduled_beta_in_a_tensor_updated_in_place():
    like = torch.zeros((), dtype=torch.float64)
    objective = SVIObjective(_program([]), ReparamELBO(beta=LinearWarmup(4))).capturable_(like)
    beta = objective.kl_scale.beta
    assert isinstance(beta, torch.Tensor) and beta.shape == () and beta.dtype == torch.float64
    assert objective.estimator.capturable
    for step in (1, 3, 7):
        objective.set_step(step)
        assert objective.kl_scale.beta is beta and beta.item() == min(step / 4, 1.0)
    constant = SVIObjective(_program([]), ReparamELBO(beta=0.5)).capturable_(like)
    assert constant.kl_scale.beta == 0.5 and not isinstance(constant.kl_scale.beta, torch.Tensor)


def _another_process(extra):
    """``parallel.all_reduce_sum`` as if a second process had contributed ``extra``."""
    def all_reduce_sum(*values):
        return tuple(v + e for v, e in zip(values, extra))
    return all_reduce_sum


def test_data_parallel_objective_reports_the_global_batchs_terms(monkeypatch):
    objective = SVIObjective(_program([]), ReparamELBO())
    objective.trusted = True
    pyro.set_rng_seed(4)
    objective(X)
    local = objective.metrics()  # this process's batch alone
    objective.data_parallel_()
    monkeypatch.setattr(parallel, "all_reduce_sum", _another_process((-30.0, 6, 9.0, 6)))
    pyro.set_rng_seed(4)
    objective(X)
    metrics = objective.metrics()
    recon, kl = local["train_reconstruction"] * N, local["train_kl"] * N
    assert metrics["train_reconstruction"] == pytest.approx((recon - 30.0) / (N + 6))
    assert metrics["train_kl"] == pytest.approx((kl + 9.0) / (N + 6))


def test_data_parallel_score_function_average_follows_the_global_batch(monkeypatch):
    draws = []
    loss = ScoreFunctionELBO(baseline="average")
    pyro.set_rng_seed(2)
    elbo, _ = loss(_model(), _guide(draws), X)
    assert loss.average == pytest.approx(elbo.item() / N)
    loss.average = None
    loss.data_parallel_()
    monkeypatch.setattr(parallel, "all_reduce_sum", _another_process((-50.0, 6)))
    pyro.set_rng_seed(2)
    elbo, _ = loss(_model(), _guide(draws), X)
    assert loss.average == pytest.approx((elbo.item() - 50.0) / (N + 6))


def test_without_latent_sites_the_iw_bounds_are_the_exact_log_likelihood():
    """Every weight is p(x): log mean_k p(x) = log p(x), for any K."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(0.5, 2.0).expand([D]).to_event(1), obs=x)

    def guide(x):
        pass

    exact = dist.Normal(0.5, 2.0).log_prob(X).sum()
    for loss in (IWAE(3), IWAE(3, gradient="dreg"), VIMCO(3)):
        value, surrogate = loss(model, guide, X)
        assert torch.allclose(value, exact) and torch.allclose(surrogate, -exact), loss
        assert loss.last_kl == 0


def _semi_supervised(vectorizable):
    """y ~ Bernoulli(0.3), x | y ~ N(2y, 1) per datapoint (the M2 pattern VIMCO trains): y is
    observed in a labelled batch, else proposed by the guide, which then has no latent site."""

    def model(x, y=None):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Bernoulli(0.3), obs=y)
            loc = 2.0 * y
            if not vectorizable:  # explicit sizes: does not broadcast over a particle dim
                loc = loc.reshape(x.shape[0])
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def guide(x, y=None):
        if y is None:
            probs = pyro.param("q", torch.full((x.shape[0],), 0.4),
                               constraint=constraints.unit_interval)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("y", dist.Bernoulli(probs))

    return model, guide


@pytest.mark.parametrize("vectorizable", [True, False])
def test_iw_bounds_of_a_labelled_batch_after_an_unlabelled_one_are_exact(vectorizable):
    """The layout (vectorized particles or one at a time) is found on the first batch and kept
    until ``bind``: on a labelled batch after an unlabelled one the guide has no latent site,
    every weight is p(x, y), and both bounds are exactly log p(x, y) whether the particles are
    vectorized or looped over (VIMCO's log q is then 0 for each of the K particles)."""
    x, y = X[:, 0], torch.tensor([0.0, 1.0, 1.0, 0.0])
    exact = (dist.Bernoulli(0.3).log_prob(y) + dist.Normal(2.0 * y, 1.0).log_prob(x)).sum()
    for loss in (IWAE(3), VIMCO(3)):
        pyro.clear_param_store()
        model, guide = _semi_supervised(vectorizable)
        with _first_call(vectorizable):
            loss(model, guide, x)  # unlabelled: the guide proposes y
        value, surrogate = loss(model, guide, x, y)
        assert torch.allclose(value, exact) and torch.allclose(surrogate, -exact), loss


def test_later_calls_are_refused_site_by_site_with_the_layout_kept():
    """The layout is traced on the first call only (``bind`` forgets it), yet each call's sites
    are checked as they are reduced: a later call on which the model observes nothing, or with
    a guide whose auxiliary draw lies outside the data plate (AutoDiagonalNormal's one joint
    latent), is refused with the error that says so and names the site, not a TypeError from
    the arithmetic of the weights."""

    def model(x, observe=True):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
            pyro.sample("x", dist.Normal(z, SIGMA_X).to_event(1), obs=x if observe else None)

    for loss in (IWAE(2), VIMCO(2)):
        pyro.clear_param_store()
        guide = AutoNormal(model)
        loss(model, guide, X)
        with pytest.raises(ValueError, match=r"^the model has no observed site"):
            loss(model, guide, X, False)
        with pytest.raises(ValueError, match=r"^the guide's auxiliary site "
                                             r"'_AutoDiagonalNormal_latent' is outside the data "
                                             r"plate pyro.plate\('data', ...\)"):
            loss(model, AutoDiagonalNormal(model), X)


# --- ScoreFunctionELBO's average baseline -------------------------------------------------


def test_the_average_baseline_starts_at_zero_then_follows_the_elbo_per_datapoint():
    """With no history the "average" baseline is 0 (the first step's gradient is the
    baseline-free one); then the per-datapoint ELBO, averaged with decay 0.9 (the second
    step's gradient differs)."""
    steps = []
    for baseline in (None, "average"):
        pyro.clear_param_store()
        loss, draws = ScoreFunctionELBO(baseline=baseline), []
        model, guide = _model(), _guide(draws)
        grads, elbos = [], []
        for seed in (1, 2):
            pyro.set_rng_seed(seed)
            elbo, surrogate = loss(model, guide, X)
            grads.append(_grads(surrogate))
            elbos.append(elbo.item() / N)
        steps.append(grads)
        if baseline == "average":  # a decaying average with baseline_beta = 0.9
            assert loss.average == pytest.approx(0.9 * elbos[0] + 0.1 * elbos[1], rel=1e-6)
    (none_1, none_2), (avg_1, avg_2) = steps
    for a, b in zip(none_1, avg_1):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(none_2[2], avg_2[2], rtol=1e-3)


def rows_and_cols_model(x):
    """An (N, 3) grid of observations in two plates, neither named "data"."""
    with pyro.plate("rows", N, dim=-2), pyro.plate("cols", 3, dim=-1):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def rows_and_cols_guide(x):
    loc = pyro.param("loc", torch.zeros(N, 3))
    with pyro.plate("rows", N, dim=-2), pyro.plate("cols", 3, dim=-1):
        pyro.sample("z", dist.Normal(loc, 1.0))


def test_the_average_baseline_counts_the_datapoints_of_the_plate_with_the_batchs_size():
    """Two plates around the observed site, neither named "data": the batch's leading size
    picks the data plate (4 rows, not 3 columns)."""
    x = torch.randn(N, 3, generator=rng(16))

    model, guide = rows_and_cols_model, rows_and_cols_guide

    loss = ScoreFunctionELBO(baseline="average")
    elbo, _ = loss(model, guide, x)
    assert loss.average == pytest.approx(elbo.item() / N)


def test_the_default_score_function_loss_trains_the_plain_one_particle_elbo():
    """The documented defaults at work, not only as recorded (``config`` is read off the
    constructor's signature): beta 1 and one particle, so that the bound objective's value is
    Pyro's Trace_ELBO on the same draws per datapoint, the guide drawing one (N, D) sample."""
    loss = ScoreFunctionELBO()
    assert loss.beta == 1.0
    draws = []
    model, guide = _model(), _guide(draws)
    objective = SVIObjective(SimpleNamespace(model=model, guide=guide), loss)
    pyro.set_rng_seed(5)
    value, _ = objective(X)
    assert [d.shape for d in draws] == [(N, D)]
    pyro.set_rng_seed(5)
    expected = -Trace_ELBO().loss(model, guide, X) / N
    assert value.item() == pytest.approx(expected, rel=1e-6)


def _on_the_same_draws(seed, loss, model, guide, x, reference=None):
    """The ELBO that ``loss`` returns for the programs, and Pyro's Trace_ELBO of ``reference``
    (a (model, guide) pair; by default the same programs) on the same draws, both in nats."""
    pyro.set_rng_seed(seed)
    elbo, _ = loss(model, guide, x)
    pyro.set_rng_seed(seed)
    return elbo.item(), -Trace_ELBO().loss(*(reference or (model, guide)), x)


def test_score_function_particles_are_drawn_in_one_vectorized_trace():
    """num_particles=2 draws both particles in one trace, as Pyro's
    ``Trace_ELBO(num_particles=2, vectorize_particles=True)`` does: a (2, N, D) sample, and the
    same ELBO on the same draws."""
    draws = []
    model, guide = _model(), _guide(draws)
    pyro.set_rng_seed(7)
    elbo, _ = ScoreFunctionELBO(num_particles=2)(model, guide, X)
    assert draws[-1].shape == (2, N, D)  # (after Pyro's trace that finds the plate nesting)
    pyro.set_rng_seed(7)
    expected = -Trace_ELBO(num_particles=2, vectorize_particles=True).loss(model, guide, X)
    assert elbo.item() == pytest.approx(expected, rel=1e-6)


def test_the_average_baseline_removes_a_common_scale_of_the_observed_sites():
    """Under ``poutine.scale(scale=0.3)`` the returned ELBO is 0.3 times Pyro's Trace_ELBO of the
    unscaled programs on the same draws; the average is the unscaled ELBO per datapoint (the
    returned ELBO over N * 0.3 datapoints), not the scaled one over N."""
    s, draws = 0.3, []
    model, guide = _model(), _guide(draws)
    loss = ScoreFunctionELBO(baseline="average")
    elbo, unscaled = _on_the_same_draws(5, loss, _scaled(model, s), _scaled(guide, s), X,
                                        reference=(model, guide))
    assert elbo == pytest.approx(s * unscaled, rel=1e-6)
    assert loss.average == pytest.approx(unscaled / N, rel=1e-6)


def test_the_average_baseline_divides_by_the_datapoints_alone_where_observed_scales_differ():
    """Two observed sites in the data plate, the first under ``poutine.scale(scale=3.0)``: no
    single scale makes the (weighted) ELBO per datapoint, so the average is Pyro's Trace_ELBO
    of these programs on the same draws divided by the N datapoints alone (not by 3 N, the
    first site's scale)."""

    def model(x):
        w = pyro.param("w", torch.tensor([0.8, -0.5]))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
            with poutine.scale(scale=3.0):
                pyro.sample("x", dist.Normal(z * w, SIGMA_X).to_event(1), obs=x)
            pyro.sample("x_sum", dist.Normal(z.sum(-1), 1.0), obs=x.sum(-1))

    draws = []
    guide = _guide(draws)
    loss = ScoreFunctionELBO(baseline="average")
    elbo, expected = _on_the_same_draws(6, loss, model, guide, X)
    assert elbo == pytest.approx(expected, rel=1e-6)
    assert loss.average == pytest.approx(expected / N, rel=1e-6)


def test_the_average_baseline_counts_the_data_plate_it_is_told():
    """Two plates of the batch's size around the observed site ("rows" and "feat_obs"): the
    average needs the data plate named, ``data_plate="rows"`` as for the other losses (and in
    the loss's config); the average is then Pyro's Trace_ELBO on the same draws over the N
    rows (unnamed, it is refused, naming the argument)."""
    guide = _nested_guide(False)
    with pytest.raises(ValueError, match="data_plate="):
        ScoreFunctionELBO(baseline="average")(_nested_model, guide, XN)
    loss = ScoreFunctionELBO(baseline="average", data_plate="rows")
    assert loss.config["data_plate"] == "rows"
    elbo, expected = _on_the_same_draws(8, loss, _nested_model, guide, XN)
    assert elbo == pytest.approx(expected, rel=1e-5)
    assert loss.average == pytest.approx(expected / N, rel=1e-5)


def test_losses_refuse_a_negative_beta_and_bind_only_a_model():
    for loss in (ReparamELBO, ScoreFunctionELBO, IWAE, VIMCO):
        with pytest.raises(ValueError, match=r"^beta must be a finite number >= 0, got -0.5$"):
            loss(beta=-0.5)
        assert loss(beta=0.0).beta == 0.0  # beta = 0: the reconstruction term alone
    program = _program([])
    objective = IWAE(3).bind(program)
    assert isinstance(objective, SVIObjective)
    assert objective.program is program and objective.estimator.num_particles == 3
    with pytest.raises(TypeError, match=r"^fit needs an object with model\(x, c=None\) and "
                                        r"guide\(x, c=None\) methods .*got str$"):
        IWAE(3).bind("not a model")


# --- a user's own loss; programs without tensor arguments ---------------------------------


class _UsersELBO(SVILoss):
    """A new estimator written as the module docstring says (one subclass of SVILoss, its
    constructor's beta left at SVILoss's default): Pyro's Trace_ELBO. No ``name``, so that it
    does not join LOSSES for the rest of the suite."""

    def forward(self, model, guide, *args):
        loss = Trace_ELBO().differentiable_loss(model, guide, *args)
        return -loss.detach(), loss


def test_a_users_loss_that_keeps_the_default_beta_trains_the_plain_elbo():
    """SVILoss's documented default beta is 1: a subclass that calls ``super().__init__()``
    records beta 1, and its objective reports Pyro's own ELBO per datapoint on the same draws
    (no KL weight applied to the latent sites)."""
    loss = _UsersELBO()
    assert loss.beta == 1.0 and loss.config == {"name": "_UsersELBO", "beta": 1.0}
    objective = loss.bind(_program([]))
    pyro.set_rng_seed(6)
    value, surrogate = objective(X)
    pyro.set_rng_seed(6)
    expected = -Trace_ELBO().loss(_model(), _guide([]), X) / N
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(surrogate, -value)
    assert objective.metrics()["beta"] == 1.0


def test_losses_run_programs_that_take_no_tensor_argument():
    """Programs may close over their data and take no argument: what the losses fork the RNG
    on or put their value on is then the CPU. The analytic-KL ELBO (which traces the programs
    once, on a forked RNG, to decide between TraceMeanField_ELBO and Trace_ELBO) equals Pyro's
    TraceMeanField_ELBO on the same seed; a wrapped Pyro ELBO under ``torch.no_grad``
    (validation) reports minus Pyro's loss; an objective asked whether such programs need whole
    batches answers no."""
    model, guide = _model(), _guide([])

    def closed_model():
        model(X)

    def closed_guide():
        guide(X)

    pyro.set_rng_seed(8)
    value, _ = ReparamELBO(analytic_kl=True)(closed_model, closed_guide)
    pyro.set_rng_seed(8)
    expected = -TraceMeanField_ELBO().loss(closed_model, closed_guide)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():
        pyro.set_rng_seed(8)
        value, loss = PyroLoss(Trace_ELBO())(closed_model, closed_guide)
    pyro.set_rng_seed(8)
    expected = -Trace_ELBO().loss(closed_model, closed_guide)
    assert value.item() == pytest.approx(expected, rel=1e-6) and torch.equal(value, -loss)
    assert value.device == torch.device("cpu")
    objective = SVIObjective(SimpleNamespace(model=closed_model, guide=closed_guide),
                             ReparamELBO())
    assert objective.needs_whole_batches() is False


# --- SVIObjective: before any step; the data plate from the batch; the history's terms ----


def test_a_fresh_objective_names_no_param_store_parameters_and_saves_none():
    """Before :meth:`trainable_parameters` has found any, the objective trains no param-store
    parameter: ``param_store_names()`` is empty and its state (a checkpoint saved before the
    first step) holds an empty param store, which restores nothing."""
    objective = SVIObjective(_program([]), ReparamELBO())
    assert objective.param_store_names() == []
    state = objective.state_dict()
    assert state["_extra_state"] == {"param_store": {}}
    objective.load_state_dict(state)


def test_the_batchs_leading_size_picks_the_data_plate_of_the_objective():
    """Two plates around the observed site, neither named "data": the objective hints the
    batch's leading size, which picks the plate of 4 rows, not that of 3 columns; the value is
    Pyro's Trace_ELBO on the same draws divided by the 4 datapoints."""
    x = torch.randn(N, 3, generator=rng(16))

    model, guide = rows_and_cols_model, rows_and_cols_guide

    objective = SVIObjective(SimpleNamespace(model=model, guide=guide), ReparamELBO())
    pyro.set_rng_seed(9)
    value, _ = objective(x)
    assert objective.num_data == N
    pyro.set_rng_seed(9)
    expected = -Trace_ELBO().loss(model, guide, x) / N
    assert value.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("beta, step", [(0.5, 0), (LinearWarmup(4), 1)],
                         ids=["constant", "warmup"])
def test_the_historys_kl_is_the_kl_of_the_steps_draws_whatever_beta(beta, step):
    """With beta != 1 the step's value is E[log p(x | z)] - beta KL: the history's training
    KL is (reconstruction - value) / beta, the Monte Carlo KL log q(z | x) - log p(z) of the
    step's draws per datapoint, recomputed here from the recorded draws with
    torch.distributions (as its reconstruction, log p(x | z)); for a constant beta of 0.5 and
    a warm-up at beta 0.25. The tolerance is float32 rounding of sums over 8 terms."""
    draws = []
    objective = SVIObjective(_program(draws), ReparamELBO(beta=beta))
    objective.trusted = True
    objective.set_step(step)
    pyro.set_rng_seed(10)
    value, _ = objective(X)
    metrics = objective.metrics()
    log_lik, log_prior, log_q, _ = (t.detach() for t in _densities(draws[-1]))
    recon, kl = log_lik.mean().item(), (log_q - log_prior).mean().item()
    b = metrics["beta"]
    assert b == (0.5 if step == 0 else 0.25)
    assert metrics["train_reconstruction"] == pytest.approx(recon, rel=1e-5, abs=1e-5)
    assert metrics["train_kl"] == pytest.approx(kl, rel=1e-5, abs=1e-5)
    assert value.item() == pytest.approx(recon - b * kl, rel=1e-5, abs=1e-5)


def test_the_historys_terms_are_kept_in_double_precision():
    """The epoch's terms are float64 sums (values, beta and counts filled in float64 on the
    device): with beta = 0.1 (not a float32 number) the training KL is (reconstruction -
    value) / 0.1 to double precision, not divided by float32's 0.1 (a relative error of
    1.5e-8)."""
    objective = SVIObjective(_program([]), ReparamELBO(beta=0.1))
    objective.trusted = True
    pyro.set_rng_seed(12)
    value, _ = objective(X)
    metrics = objective.metrics()
    expected = (metrics["train_reconstruction"] - value.double().item()) / 0.1
    assert metrics["train_kl"] == pytest.approx(expected, rel=1e-12, abs=0)
