"""Probabilistic PCA against its closed forms (Tipping & Bishop 1999) and scikit-learn."""

import math

import arviz as az
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from sklearn.decomposition import PCA

from pvae import data
from pvae.cli import main
from pvae.inference import ReparamELBO, iw_log_likelihood
from pvae.models import PPCA, compare_posteriors, to_inference_data
from pvae.train import Adam, ExponentialLR, fit

from conftest import fashion_available


def sklearn_score(x, q):
    # svd_solver="full": the exact eigendecomposition (sklearn's "auto" may pick randomized SVD)
    return PCA(n_components=q, svd_solver="full").fit(x.numpy()).score(x.numpy())


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_closed_form_matches_sklearn_digits(dtype, rtol):
    x = data.load("digits").x_train.to(dtype)
    model = PPCA.closed_form(x, 10, ddof=1)  # sklearn divides the covariance by N - 1
    ours = model.log_marginal(x).double().mean().item()
    ref = sklearn_score(x.double(), 10)
    assert ours == pytest.approx(ref, rel=rtol)
    # the maximum-likelihood fit (ddof=0) is at least as likely on the data it was fit to
    assert PPCA.closed_form(x.double(), 10).log_marginal(x.double()).mean() >= ours - 1e-9


@pytest.mark.slow
@pytest.mark.skipif(not fashion_available(), reason="Fashion-MNIST not installed")
def test_closed_form_matches_sklearn_fashion():
    x = data.load("fashion-mnist").x_train.double()
    ours = PPCA.closed_form(x, 10, ddof=1).log_marginal(x).mean().item()
    assert ours == pytest.approx(sklearn_score(x, 10), rel=1e-6)
    assert ours == pytest.approx(314.8, abs=0.1)


def test_log_marginal_matches_dense_mvn():
    torch.manual_seed(0)
    model = PPCA(7, 3).double()
    with torch.no_grad():
        model.mu.normal_()
        model.log_sigma.fill_(-0.7)
    x = torch.randn(11, 7, dtype=torch.float64)
    cov = model.W @ model.W.T + model.sigma2 * torch.eye(7, dtype=torch.float64)
    dense = dist.MultivariateNormal(model.mu, cov).log_prob(x)
    assert torch.allclose(model.log_marginal(x), dense, atol=1e-10)


def test_exact_posterior_by_gaussian_conditioning():
    """p(z | x) from conditioning the joint Gaussian of (z, x) directly, with mu != 0 (a
    posterior mean that forgets to subtract mu would pass with mu = 0)."""
    torch.manual_seed(1)
    model = PPCA(5, 2).double()
    with torch.no_grad():
        model.mu.copy_(torch.tensor([2.0, -1.5, 0.5, 3.0, -2.5], dtype=torch.float64))
    x = torch.randn(4, 5, dtype=torch.float64) + model.mu.detach()
    W, mu, s2 = model.W.detach(), model.mu.detach(), model.sigma2.detach()
    Sxx = W @ W.T + s2 * torch.eye(5, dtype=torch.float64)
    gain = W.T @ torch.linalg.inv(Sxx)  # Cov(z, x) Cov(x)^-1
    post = model.exact_posterior(x)
    assert torch.allclose(post.mean, (x - mu) @ gain.T, atol=1e-10)
    assert torch.allclose(post.covariance_matrix[0], torch.eye(2, dtype=torch.float64) - gain @ W,
                          atol=1e-10)


def test_closed_forms_are_computed_on_the_models_device_not_torchs_default():
    """A user who makes another device torch's default (``torch.set_default_device("cuda")``)
    and keeps a PPCA on the CPU gets the same closed forms: their matrices are built on the
    model's device. The meta device stands in for the other device on a machine without one
    (a tensor made there cannot meet the CPU's)."""
    torch.manual_seed(2)
    model = PPCA(5, 2).double()
    with torch.no_grad():
        model.mu.normal_()
        model.log_sigma.fill_(-0.4)
    x = torch.randn(6, 5, dtype=torch.float64)

    def closed_forms():
        post = model.exact_posterior(x)
        model.set_guide_to_optimum()
        return (model.log_marginal(x), post.mean, post.covariance_matrix,
                model.mean_field_kl_floor(), model.A.clone(), model.b.clone())

    expected = closed_forms()
    with torch.device("meta"):
        got = closed_forms()
    for a, b in zip(got, expected):
        assert a.device == b.device and torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_model_and_guide_hold_the_data_plate_at_dim_minus_1():
    """Both programs put their data plate at dim -1 (the class docstring), so that a plate of
    the caller's around them (vectorized particles, say) goes to its left: at dim -2 both run
    and draw z of shape (3, N, q). A plate that takes dim -1 collides in both, with Pyro's
    message naming the two plates and the fix; a guide whose data plate took the first free
    dim would move its data to dim -2 instead, where the model cannot follow: a shape mismatch
    for 3 particles, and for N of them a guide that runs with its data in the wrong place."""
    model, x = PPCA(5, 2), torch.randn(4, 5)
    for program in (model.model, model.guide):
        site = poutine.trace(program).get_trace(x).nodes["z"]
        assert [(f.name, f.dim) for f in site["cond_indep_stack"]] == [("data", -1)]
        with pyro.plate("particles", 3, dim=-2):
            site = poutine.trace(program).get_trace(x).nodes["z"]
        assert [(f.name, f.dim) for f in site["cond_indep_stack"]] == [("particles", -2),
                                                                       ("data", -1)]
        assert site["value"].shape == (3, 4, 2)
        # dim None: Pyro gives the outer plate the first free dim, -1
        for size, dim in ((3, -1), (4, -1), (3, None)):
            with pytest.raises(ValueError, match="collide at dim=-1"), \
                    pyro.plate("particles", size, dim=dim):
                poutine.trace(program).get_trace(x)


def test_closed_form_guides_reach_their_optimum():
    x = data.load("digits").x_train.double()
    full = compare_posteriors(PPCA.closed_form(x, 6, guide="full"), x[:200])
    assert full.kl_q_p.abs().max() < 1e-8 and full.mean_error.max() < 1e-8
    # W R is an ML solution for every rotation R; the ML W itself has orthogonal columns (M is
    # diagonal, floor 0), a rotated one does not
    model = PPCA.closed_form(x, 6, guide="diagonal")
    assert model.mean_field_kl_floor().abs() < 1e-10
    R, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    with torch.no_grad():
        model.W.copy_(model.W @ R)
    model.set_guide_to_optimum()
    diag = compare_posteriors(model, x[:200])
    # the mean-field optimum attains the floor exactly, for every datapoint
    assert torch.allclose(diag.kl_q_p, torch.full_like(diag.kl_q_p, diag.mean_field_floor),
                          atol=1e-8)
    assert diag.mean_field_floor > 0 and diag.mean_error.max() < 1e-8


@pytest.fixture(scope="module")
def synthetic_fit():
    ds = data.load("synthetic-ppca")
    torch.manual_seed(0)
    model = PPCA(ds.x_dim, 3, "full")
    fit(model, ds.x_train, num_epochs=100, batch_size=256, optim=Adam(5e-2, schedule=ExponentialLR(0.95)),
        loss=ReparamELBO(analytic_kl=True), progress=False)
    return ds, model


def test_svi_recovers_synthetic_truth(synthetic_fit):
    ds, model = synthetic_fit
    reference = PPCA.closed_form(ds.x_train, 3)
    cmp = compare_posteriors(model, ds.x_test, reference=reference)
    from pvae.stats import principal_angles

    assert principal_angles(model.W.detach(), ds.params["W"]).max() < 5.0
    assert model.sigma2.item() == pytest.approx(ds.params["sigma"] ** 2, rel=0.05)
    assert cmp.model["log_likelihood_gap"] < 0.1
    assert cmp.summary()["kl_q_p"] < 0.05


def test_iw_agrees_with_exact_log_marginal(synthetic_fit):
    ds, model = synthetic_fit
    x = ds.x_test[:300]
    iw = iw_log_likelihood(model, x, num_samples=1000)
    diff = iw.per_datapoint.double() - model.log_marginal(x).double()
    assert abs(diff.mean().item()) < 3 * diff.std().item() / math.sqrt(len(diff)) + 1e-4


def test_inference_data_for_arviz(synthetic_fit):
    ds, model = synthetic_fit
    idata = to_inference_data(model, ds.x_test[:2], num_draws=4000)
    summary = az.summary(idata["exact"], var_names=["z"], kind="stats")
    exact = model.exact_posterior(ds.x_test[:2])
    sd = exact.variance.sqrt().flatten()
    assert torch.allclose(torch.tensor(summary["mean"].values, dtype=torch.float32),
                          exact.mean.detach().flatten(), atol=0.1)
    assert ((torch.tensor(summary["sd"].values, dtype=torch.float32) - sd).abs() / sd).max() < 0.1


def test_bad_input():
    with pytest.raises(ValueError, match="latent_dim < x_dim"):
        PPCA(5, 5)
    with pytest.raises(ValueError, match="latent_dim < x_dim"):
        PPCA(5, 0)
    with pytest.raises(ValueError, match="NaN"):
        PPCA.closed_form(torch.full((10, 4), float("nan")), 2)
    with pytest.raises(ValueError, match="more datapoints than latent dims"):
        PPCA.closed_form(torch.randn(2, 6), 3)
    with pytest.raises(ValueError, match="NaN"):
        PPCA(4, 2).log_marginal(torch.full((3, 4), float("nan")))
    with pytest.raises(TypeError, match="exact_posterior"):
        from pvae.models import VAE

        compare_posteriors(VAE(4, 2), torch.zeros(2, 4))


def test_cli_ppca_synthetic(tmp_path):
    import json

    main(["ppca", "--dataset", "synthetic-ppca", "--latent-dim", "3", "--num-epochs", "5",
          "--num-samples", "50", "--iw-num-test", "50", "--out", str(tmp_path), "--no-progress"])
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("log_likelihood", "reference_log_likelihood", "kl_q_p", "mean_field_kl_floor",
                "max_principal_angle_deg", "svi_seconds", "closed_form_seconds",
                "iw_minus_exact", "max_angle_to_true_W_deg"):
        assert key in report
    for name in ("posterior_ellipses", "posterior_forest", "training_curve"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 1000
    # an ordinary run folder: pvae evaluate reads it, and its IW estimate matches the report's
    main(["evaluate", str(tmp_path), "--num-samples", "50", "--iw-num-test", "50"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs"] == 5
    assert abs(metrics["iw_log_likelihood"] - report["iw_log_likelihood"]) < 4 * math.hypot(
        metrics["iw_log_likelihood_stderr"], report["iw_log_likelihood_stderr"])


@pytest.mark.slow
@pytest.mark.skipif(not fashion_available(), reason="Fashion-MNIST not installed")
@pytest.mark.parametrize("guide", ["full", "diagonal"])
def test_svi_on_fashion_mnist(guide):
    """q = 10: the full guide reaches the closed-form log-likelihood within 0.5 nats and
    KL(q || p) < 0.05; the diagonal guide's KL is within 5% of the mean-field floor."""
    x = data.load("fashion-mnist").x_train
    torch.manual_seed(0)
    model = PPCA(784, 10, guide)
    fit(model, x, num_epochs=30, batch_size=256, optim=Adam(2e-2, schedule=ExponentialLR(0.8)),
        loss=ReparamELBO(num_particles=1 if guide == "full" else 8, analytic_kl=True), progress=False)
    cmp = compare_posteriors(model, x[:10000], reference=PPCA.closed_form(x, 10)).summary()
    if guide == "full":
        assert cmp["log_likelihood_gap"] < 0.5
        assert cmp["kl_q_p"] < 0.05
    else:
        assert cmp["kl_q_p"] <= 1.05 * cmp["mean_field_kl_floor"]
