"""The dataset registry and :func:`load`: real images (Fashion-MNIST, MNIST, scikit-learn
digits) and synthetic PPCA data, optionally binarized.

Every dataset follows the data contract of ``DESIGN.md``: ``x`` is a float32 tensor of shape
``(N, D)`` with images flattened and ``image_shape`` kept for plotting, labels are int64 of
shape ``(N,)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np
import torch

from pvae.data.binarize import binarize as _binarize
from pvae.data.binarize import check_intensities
from pvae.data.idx import DataNotFoundError, load_idx_dataset, search_paths
from pvae.data.own import data_file_dataset, image_folder_dataset
from pvae.data.splits import Splits

__all__ = ["DATASETS", "dataset_options", "load"]



def _load_digits(data_dir=None, download=False, seed=0, test_fraction=0.2) -> Splits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed), device="cpu")
    num_test = int(round(test_fraction * len(x)))
    test, train = perm[:num_test], perm[num_test:]
    return Splits(x[train], x[test], y[train], y[test], (8, 8), 10, "digits")


def _load_synthetic_ppca(data_dir=None, download=False, seed=0, num_train=5000, num_test=1000,
                         x_dim=20, latent_dim=3, sigma=0.5) -> Splits:
    """Data from z ~ N(0, I_q), x = W z + mu + sigma * eps with known W, mu, sigma."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(x_dim, latent_dim, generator=g) * 2.0
    mu = torch.randn(x_dim, generator=g)

    def draw(n):
        z = torch.randn(n, latent_dim, generator=g)
        return z @ W.T + mu + sigma * torch.randn(n, x_dim, generator=g)

    x_train, x_test = draw(num_train), draw(num_test)
    zeros = torch.zeros
    return Splits(x_train, x_test, zeros(num_train, dtype=torch.int64),
                   zeros(num_test, dtype=torch.int64), None, 1, "synthetic-ppca",
                   params={"W": W, "mu": mu, "sigma": sigma})


FREY_FILE = "frey_rawface.mat"
FREY_URL = "https://cs.nyu.edu/~roweis/data/frey_rawface.mat"


def _load_frey(data_dir=None, download=False, seed=0, test_fraction=0.1) -> Splits:
    """The Frey faces (1965 grayscale images of 28 x 20 pixels, one face, from a video; the
    continuous dataset of Kingma & Welling 2014, §5) from a user-supplied ``frey_rawface.mat``
    (Roweis' file: variable ``ff``, uint8 of shape (560, 1965), one image per column), scaled to
    [0, 1]; a seeded random 10% are the test set. Labels are all 0 (one class).

    :raises DataNotFoundError: the file is in none of the searched folders (the message says
        where to put it; nothing is downloaded).
    :raises ValueError: the file has no ``ff`` array of 560 rows.
    """
    from scipy.io import loadmat

    folders = search_paths("frey-faces", data_dir)
    path = next((f / FREY_FILE for f in folders if (f / FREY_FILE).is_file()), None)
    if path is None:
        raise DataNotFoundError(
            f"{FREY_FILE} not found in {', '.join(str(f) for f in folders)}; pvae does not "
            f"download it: fetch {FREY_URL} yourself and pass its folder as data_dir "
            "(--data-dir)")
    try:
        ff = loadmat(path)["ff"]
    except KeyError:
        raise ValueError(f"{path} has no 'ff' array; expected Roweis' frey_rawface.mat") from None
    if ff.ndim != 2 or ff.shape[0] != 28 * 20:
        raise ValueError(f"{path}: 'ff' has shape {ff.shape}; expected (560, num_images), one "
                         "28 x 20 image per column")
    x = torch.from_numpy(np.ascontiguousarray(ff.T).astype(np.float32) / 255.0)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed), device="cpu")
    num_test = max(1, int(round(test_fraction * len(x))))
    test, train = perm[:num_test], perm[num_test:]
    zeros = torch.zeros
    return Splits(x[train], x[test], zeros(len(train), dtype=torch.int64),
                  zeros(len(test), dtype=torch.int64), (28, 20), 1, "frey-faces")


#: Registry of dataset loaders, by the name used in :func:`load` and on the command line.
DATASETS: dict[str, Callable[..., Splits]] = {
    "fashion-mnist": lambda data_dir=None, download=False, seed=0: load_idx_dataset(
        "fashion-mnist", data_dir, download),
    "mnist": lambda data_dir=None, download=False, seed=0: load_idx_dataset(
        "mnist", data_dir, download),
    "digits": _load_digits,
    "frey-faces": _load_frey,
    "synthetic-ppca": _load_synthetic_ppca,
    # your own data (pvae.data.own): an array file, a folder of images
    "data-file": data_file_dataset,
    "image-folder": image_folder_dataset,
}

def dataset_options(name: str) -> tuple[str, ...]:
    """The options of a dataset, its loader's keyword-only arguments (every loader also takes
    ``data_dir``, ``download`` and ``seed``): ``("data_file", "test_fraction")`` for
    ``data-file``, none for the built-in datasets.

    :raises ValueError: unknown dataset name.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return tuple(k for k, p in inspect.signature(DATASETS[name]).parameters.items()
                 if p.kind is p.KEYWORD_ONLY)


def load(name: str, *, data_dir=None, binarize: str | None = None, seed: int = 0,
         download: bool = False, **options) -> Splits:
    """Load a dataset by name.

    :param str name: one of :data:`DATASETS` (``fashion-mnist``, ``mnist``, ``digits``,
        ``frey-faces`` (from a user-supplied ``frey_rawface.mat``), ``synthetic-ppca``, and your
        own data: ``data-file`` (``data_file=PATH``, an ``.npy``, ``.npz`` or ``.pt``) and
        ``image-folder`` (``image_folder=DIR``, ``image_size=``), each with ``test_fraction=``
        (:mod:`pvae.data.own`)).
    :param data_dir: folder holding the IDX files (searched first, see :func:`pvae.data.search_paths`).
    :param binarize: ``None`` (grayscale), ``"static"`` (train and test binarized once with
        ``seed``) or ``"dynamic"`` (only the test set is binarized once with ``seed``, for
        evaluation as in Burda et al. 2015; pass ``binarize="dynamic"`` to
        :func:`pvae.inference.fit` to resample the training set every epoch).
    :param int seed: seed for binarization and for the train/test split of the datasets that
        draw one (digits, your own data).
    :param bool download: fetch the official files into ``~/.cache/pvae/<name>`` (or
        ``data_dir``) when they are found nowhere. Off by default: nothing is downloaded
        unless asked.
    :param options: the dataset's own options (:func:`dataset_options`), e.g. ``data_file``.
    :raises ValueError: unknown dataset name, binarization mode or option, or binarizing data
        that are not intensities in [0, 1].
    :raises pvae.data.DataFileError: your own data cannot be read (the message says why).
    :raises DataNotFoundError: no files found; the message lists every folder searched.
    :raises IDXError: truncated or corrupt files.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    if binarize not in (None, "static", "dynamic"):
        raise ValueError(f"binarize must be None, 'static' or 'dynamic', got {binarize!r}")
    unknown = sorted(set(options) - set(dataset_options(name)))
    if unknown:
        takes = dataset_options(name)
        raise TypeError(f"the dataset {name!r} takes no option {', '.join(unknown)}"
                        + (f" (its options: {', '.join(takes)})" if takes else ""))
    ds = DATASETS[name](data_dir=data_dir, download=download, seed=seed, **options)
    if binarize is not None:
        if name == "synthetic-ppca":
            raise ValueError("synthetic-ppca data are real-valued and cannot be binarized; "
                             "use binarize=None with a gaussian likelihood")
        for x in (ds.x_train, ds.x_test):
            check_intensities(x, f"binarize={binarize!r}")
        if binarize == "static":
            ds.x_train = _binarize(ds.x_train, seed=seed)
        ds.x_test = _binarize(ds.x_test, seed=seed + 1)
        ds.binarized = binarize
    return ds


