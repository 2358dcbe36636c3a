"""Hermetic tests: seed before every test, clear Pyro's param store, keep validation on.

``PVAE_TEST_DEVICE`` (default ``cpu``) selects the device the suite runs on: it becomes torch's
default device, so models and data that the tests create live there, and :func:`rng` makes
generators for it. ``PVAE_TEST_DEVICE=cuda python -m pytest`` runs the same tests on a GPU.
"""

import os

import pyro
import pytest
import torch

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
TEST_DEVICE = torch.device(os.environ.get("PVAE_TEST_DEVICE", "cpu"))

# Under pytest-xdist (``-n auto`` in ``make test``) each worker takes its share of the cores:
# without this, N workers each start torch's default of one thread per core and fight over them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def rng(seed: int) -> torch.Generator:
    """A seeded generator on the test device."""
    return torch.Generator(device=TEST_DEVICE).manual_seed(seed)


@pytest.fixture(autouse=True)
def _hermetic():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    torch.set_default_dtype(torch.float32)
    if TEST_DEVICE.type != "cpu":  # (a default device costs a Python hook per tensor made)
        torch.set_default_device(TEST_DEVICE)
    yield
    torch.set_default_device(None)
    pyro.clear_param_store()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA (none on this machine)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def fashion_available() -> bool:
    return os.path.isfile(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")) or bool(
        os.environ.get("PVAE_DATA_DIR"))
