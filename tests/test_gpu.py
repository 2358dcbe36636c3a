"""The same code path on CUDA (skipped where there is no GPU, as on CI)."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pvae.inference import IWAE, PyroLoss, ReparamELBO, elbo_terms, iw_log_likelihood
from pvae.models import CVAE, PPCA, VAE
from pvae.train import Adam, fit

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("make", [lambda: VAE(64, 4, (32,)), lambda: PPCA(64, 4)])
def test_fit_and_evaluate_on_cuda(make):
    x = torch.bernoulli(torch.rand(256, 64))
    model = make()
    fit(model, x, num_epochs=2, batch_size=64, device="cuda", progress=False)
    assert next(model.parameters()).is_cuda
    iw = iw_log_likelihood(model, x[:32], num_samples=50)
    assert iw.per_datapoint.is_cuda and torch.isfinite(iw.per_datapoint).all()
    assert torch.isfinite(elbo_terms(model, x[:32]).elbo).all()


def test_cvae_on_cuda():
    x, y = torch.bernoulli(torch.rand(128, 64)), torch.randint(0, 10, (128,))
    model = CVAE(64, 4, num_classes=10, hidden_dims=(32,), prior="learned")
    fit(model, x, y, num_epochs=1, batch_size=64, device="cuda", progress=False)
    assert model.sample(5, c=2).is_cuda


def test_conveniences_take_inputs_from_any_device():
    model = VAE(64, 4, (32,)).to("cuda")
    x = torch.bernoulli(torch.rand(8, 64, device="cpu"))
    loc, _ = model.encode(x)
    assert loc.is_cuda and model.reconstruct(x).is_cuda and model.decode(loc.cpu()).is_cuda


def test_resume_on_cuda_and_checkpoint_loads_on_cpu(tmp_path):
    from pvae.train import load_checkpoint

    x = torch.rand(200, 12)

    def model():
        torch.manual_seed(3)
        return VAE(12, 2, (8,))

    kwargs = dict(batch_size=32, binarize="dynamic", seed=2, progress=False, device="cuda")
    full = fit(model(), x, num_epochs=4, **kwargs)
    fit(model(), x, num_epochs=2, checkpoint_dir=tmp_path, **kwargs)
    resumed = fit(model(), x, num_epochs=4, checkpoint_dir=tmp_path, resume=True, **kwargs)
    assert resumed.column("train_elbo") == full.column("train_elbo")
    state = load_checkpoint(tmp_path / "checkpoint.pt", map_location="cpu")
    cpu_model = VAE(12, 2, (8,))
    cpu_model.load_state_dict(state["model"])


@pytest.mark.parametrize("loss", [lambda: ReparamELBO(), lambda: IWAE(5)], ids=["reparam", "iwae"])
def test_captured_training_matches_eager(loss):
    """The step captured as a CUDA graph trains like the eager one: after 5 epochs the
    validation ELBOs agree within their Monte Carlo noise (different random streams)."""
    x = torch.bernoulli(torch.rand(2048, 64, generator=torch.Generator().manual_seed(0)))
    results = {}
    for step in ("eager", "cuda_graph"):
        torch.manual_seed(0)
        model = VAE(64, 8, (64,))
        history = fit(model, x, val=x[:512], num_epochs=5, batch_size=256, optim=Adam(3e-3),
                      device="cuda", step=step, progress=False, loss=loss())
        results[step] = history[-1]["val_elbo"]
    assert abs(results["cuda_graph"] - results["eager"]) < 1.0, results


def test_captured_training_stops_on_nan():
    from pvae.train import TrainingDivergedError

    x = torch.bernoulli(torch.rand(1024, 64))
    model = VAE(64, 8, (64,), likelihood="gaussian")
    with pytest.raises(TrainingDivergedError, match="epoch"):
        fit(model, x, num_epochs=3, batch_size=128, optim=Adam(1e6), device="cuda",
            step="cuda_graph", progress=False)


def test_pyro_loss_validation_value_is_on_the_datas_device():
    """Without gradients (validation) PyroLoss takes the value from Pyro's ``loss``, a Python
    float: it is put back on the data's device, as the training value is, so that the epoch's
    sums stay on CUDA."""
    x = torch.randn(8, 3, device="cuda")

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, 0.7).to_event(1))

    loss = PyroLoss(Trace_ELBO())
    value, surrogate = loss(model, guide, x)
    with torch.no_grad():
        value_ng, surrogate_ng = loss(model, guide, x)
    for t in (value, surrogate, value_ng, surrogate_ng):
        assert t.device == x.device
