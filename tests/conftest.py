"""Hermetic tests: seed before every test, clear Pyro's param store, keep validation on."""

import os

import pyro
import pytest
import torch

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def _hermetic():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    torch.set_default_dtype(torch.float32)
    yield
    pyro.clear_param_store()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA (none on this machine)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def fashion_available() -> bool:
    return os.path.isfile(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")) or bool(
        os.environ.get("PVAE_DATA_DIR"))
