"""Real data: the default VAE on Fashion-MNIST (run by `make test` and CI, which install the
Debian package dataset-fashion-mnist)."""

import pytest

from pvae import data
from pvae.inference import elbo_terms
from pvae.models import VAE
from pvae.train import fit

from conftest import fashion_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not fashion_available(),
                       reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"),
]


def test_vae_two_epochs_dynamic_binarization():
    ds = data.load("fashion-mnist", binarize="dynamic", seed=0)
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    model = VAE(784, 50, (400,))
    fit(model, ds.x_train, num_epochs=2, batch_size=256, binarize="dynamic", seed=0,
        progress=False)
    terms = elbo_terms(model, ds.x_test)
    # a plain PyTorch VAE of this size reaches about -269 nats after 2 epochs
    assert terms.summary()["elbo"] > -280
