"""The same code path on CUDA (skipped where there is no GPU, as on CI)."""

import pytest
import torch

from pvae.inference import elbo_terms, fit, iw_log_likelihood
from pvae.models import CVAE, PPCA, VAE

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
    fit(model, x, c=y, num_epochs=1, batch_size=64, device="cuda", progress=False)
    assert model.sample(5, c=2).is_cuda
