"""Datasets: real images (Fashion-MNIST, MNIST, scikit-learn digits), synthetic PPCA data,
and binarization.

Every dataset follows the data contract of ``DESIGN.md``: ``x`` is a float32 tensor of shape
``(N, D)`` with images flattened and ``image_shape`` kept for plotting, labels are int64 of
shape ``(N,)``.

>>> from pvae import data
>>> ds = data.load("digits")
>>> ds.x_train.shape, ds.image_shape, ds.num_classes
(torch.Size([1438, 64]), (8, 8), 10)
"""

from __future__ import annotations

import gzip
import os
import struct
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "Dataset",
    "IDXError",
    "DataNotFoundError",
    "CONDITIONS",
    "ConditionSplit",
    "bernoulli_sample",
    "binarize",
    "check_intensities",
    "condition_mask",
    "load",
    "read_idx",
    "search_paths",
]

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

_DOWNLOAD_URLS = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
}

_HOW_TO_GET = {
    "fashion-mnist": "install Debian's package (`apt-get install -y dataset-fashion-mnist`), "
    "put the four IDX .gz files in a folder and pass data_dir=/--data-dir or set "
    "$PVAE_DATA_DIR, or pass download=True / --download",
    "mnist": "put the four MNIST IDX .gz files in a folder and pass data_dir=/--data-dir "
    "or set $PVAE_DATA_DIR, or pass download=True / --download",
}


class IDXError(ValueError):
    """An IDX file is truncated, corrupt or not an IDX file at all."""


class DataNotFoundError(FileNotFoundError):
    """A dataset's files were found in none of the searched folders."""


@dataclass
class Dataset:
    """A train/test split following the data contract.

    :ivar torch.Tensor x_train: float32, shape ``(N_train, D)``, values in [0, 1]
        (or real-valued for ``synthetic-ppca``).
    :ivar torch.Tensor x_test: float32, shape ``(N_test, D)``.
    :ivar torch.Tensor y_train: int64, shape ``(N_train,)`` (all zeros where there are no labels).
    :ivar torch.Tensor y_test: int64, shape ``(N_test,)``.
    :ivar tuple image_shape: ``(H, W)`` for plotting, or ``None`` for non-image data.
    :ivar int num_classes: number of label classes.
    :ivar str name: registry name of the dataset.
    :ivar dict params: generating parameters for synthetic data (e.g. PPCA's ``W``, ``mu``,
        ``sigma``); empty for real data.
    """

    x_train: torch.Tensor
    x_test: torch.Tensor
    y_train: torch.Tensor
    y_test: torch.Tensor
    image_shape: tuple | None
    num_classes: int
    name: str
    binarized: str | None = None
    params: dict = field(default_factory=dict)

    @property
    def x_dim(self) -> int:
        """Data dimension ``D``."""
        return self.x_train.shape[-1]


# ---------------------------------------------------------------------------------------------
# IDX reading


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not.

    :param path: path to a ``.gz`` or uncompressed IDX file.
    :returns: a numpy array with the shape stored in the header.
    :raises FileNotFoundError: if ``path`` does not exist.
    :raises IDXError: on a bad magic number, an unknown data type, or a file whose length does
        not match its header (truncated or corrupt download).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise IDXError(f"{path}: cannot be read as {'gzip' if opener is gzip.open else 'IDX'} "
                       f"({e}); the file is corrupt or truncated: delete it and fetch it again") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IDXError(f"{path}: bad magic number {raw[:4].hex() or '(empty file)'}; an IDX file "
                       "starts with two zero bytes, a type code and the number of dimensions")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES or ndim == 0:
        raise IDXError(f"{path}: bad magic number {raw[:4].hex()} (type code {type_code:#04x}, "
                       f"{ndim} dimensions)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXError(f"{path}: truncated header ({len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise IDXError(f"{path}: size mismatch: header says shape {shape} ({expected} bytes) but "
                       f"the file has {len(raw)} bytes; it is truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def search_paths(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for ``name``'s IDX files, in order.

    ``data_dir`` (and ``data_dir/<name>``), ``$PVAE_DATA_DIR`` (and ``$PVAE_DATA_DIR/<name>``),
    ``/usr/share/datasets/<name>`` (Debian's ``dataset-fashion-mnist``), ``~/.cache/pvae/<name>``.
    """
    paths = []
    for root in (data_dir, os.environ.get("PVAE_DATA_DIR")):
        if root:
            paths += [Path(root), Path(root) / name]
    paths += [Path("/usr/share/datasets") / name, Path.home() / ".cache" / "pvae" / name]
    return paths


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _download(name: str, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for stem in _IDX_FILES.values():
        target = dest / f"{stem}.gz"
        if target.is_file():
            continue
        tmp = target.with_suffix(".gz.part")
        urllib.request.urlretrieve(_DOWNLOAD_URLS[name] + f"{stem}.gz", tmp)
        os.replace(tmp, target)


def _load_idx_dataset(name: str, data_dir=None, download: bool = False) -> Dataset:
    folders = search_paths(name, data_dir)
    found = None
    for folder in folders:
        files = {k: _find_idx(folder, stem) for k, stem in _IDX_FILES.items()}
        if all(files.values()):
            found = files
            break
    if found is None and download:
        dest = Path(data_dir) if data_dir else folders[-1]
        _download(name, dest)
        found = {k: _find_idx(dest, stem) for k, stem in _IDX_FILES.items()}
    if found is None:
        searched = "\n  ".join(str(p) for p in folders)
        raise DataNotFoundError(
            f"{name}: the IDX files ({', '.join(s + '.gz' for s in _IDX_FILES.values())}) were "
            f"not found in any of:\n  {searched}\nTo get them: {_HOW_TO_GET[name]}."
        )
    arrays = {k: read_idx(p) for k, p in found.items()}
    for split in ("train", "test"):
        nx, ny = len(arrays[f"x_{split}"]), len(arrays[f"y_{split}"])
        if nx != ny:
            raise IDXError(f"{name}: {split} split has {nx} images but {ny} labels")
    image_shape = tuple(arrays["x_train"].shape[1:])

    def images(a):
        return torch.from_numpy(a.reshape(len(a), -1).astype(np.float32) / 255.0)

    return Dataset(
        x_train=images(arrays["x_train"]),
        x_test=images(arrays["x_test"]),
        y_train=torch.from_numpy(arrays["y_train"].astype(np.int64)),
        y_test=torch.from_numpy(arrays["y_test"].astype(np.int64)),
        image_shape=image_shape,
        num_classes=10,
        name=name,
    )


def _load_digits(data_dir=None, download=False, seed=0, test_fraction=0.2) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    num_test = int(round(test_fraction * len(x)))
    test, train = perm[:num_test], perm[num_test:]
    return Dataset(x[train], x[test], y[train], y[test], (8, 8), 10, "digits")


def _load_synthetic_ppca(data_dir=None, download=False, seed=0, num_train=5000, num_test=1000,
                         x_dim=20, latent_dim=3, sigma=0.5) -> Dataset:
    """Data from z ~ N(0, I_q), x = W z + mu + sigma * eps with known W, mu, sigma."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(x_dim, latent_dim, generator=g) * 2.0
    mu = torch.randn(x_dim, generator=g)

    def draw(n):
        z = torch.randn(n, latent_dim, generator=g)
        return z @ W.T + mu + sigma * torch.randn(n, x_dim, generator=g)

    x_train, x_test = draw(num_train), draw(num_test)
    zeros = torch.zeros
    return Dataset(x_train, x_test, zeros(num_train, dtype=torch.int64),
                   zeros(num_test, dtype=torch.int64), None, 1, "synthetic-ppca",
                   params={"W": W, "mu": mu, "sigma": sigma})


#: Registry of dataset loaders, by the name used in :func:`load` and on the command line.
DATASETS: dict[str, Callable[..., Dataset]] = {
    "fashion-mnist": lambda data_dir=None, download=False, seed=0: _load_idx_dataset(
        "fashion-mnist", data_dir, download),
    "mnist": lambda data_dir=None, download=False, seed=0: _load_idx_dataset(
        "mnist", data_dir, download),
    "digits": _load_digits,
    "synthetic-ppca": _load_synthetic_ppca,
}


def bernoulli_sample(probs: torch.Tensor, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """One Bernoulli draw per entry: 1 where a uniform draw on [0, 1) falls below ``probs``.

    The same distribution as ``torch.bernoulli(probs)`` (P(u < p) = p), about 4x faster on CPU
    (torch's uniform sampler is vectorized, its Bernoulli sampler is not), which matters for
    dynamic binarization, done on every mini-batch. No range check: see :func:`binarize`.

    :param torch.Tensor probs: floating-point probabilities, any shape.
    :param generator: a ``torch.Generator`` on the device of ``probs``, or ``None`` for torch's
        global one.
    :returns: 0s and 1s with the shape, dtype and device of ``probs``.
    """
    u = torch.rand(probs.shape, generator=generator, dtype=probs.dtype, device=probs.device)
    return torch.lt(u, probs, out=u)


def check_intensities(x: torch.Tensor, who: str = "binarize") -> None:
    """Raise a :class:`ValueError` naming ``who`` unless every entry of ``x`` lies in [0, 1]
    (the Bernoulli probabilities of stochastic binarization)."""
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"{who} needs intensities in [0, 1], got values in "
                         f"[{x.min().item():.3g}, {x.max().item():.3g}]; rescale the data "
                         "(e.g. divide 8-bit pixels by 255)")


def binarize(x: torch.Tensor, seed: int | None = 0, generator: torch.Generator | None = None
             ) -> torch.Tensor:
    """Stochastic binarization: each pixel becomes 1 with probability equal to its intensity.

    :param torch.Tensor x: intensities in [0, 1], any shape.
    :param seed: seed for a fresh generator (ignored when ``generator`` is given).
    :returns: a tensor of 0s and 1s with the dtype and device of ``x``.
    :raises ValueError: if ``x`` has values outside [0, 1].
    """
    check_intensities(x)
    if generator is None:
        generator = torch.Generator(device=x.device).manual_seed(seed)
    return bernoulli_sample(x, generator)


_binarize = binarize  # `load` takes a parameter of the same name


def load(name: str, *, data_dir=None, binarize: str | None = None, seed: int = 0,
         download: bool = False) -> Dataset:
    """Load a dataset by name.

    :param str name: one of :data:`DATASETS` (``fashion-mnist``, ``mnist``, ``digits``,
        ``synthetic-ppca``).
    :param data_dir: folder holding the IDX files (searched first, see :func:`search_paths`).
    :param binarize: ``None`` (grayscale), ``"static"`` (train and test binarized once with
        ``seed``) or ``"dynamic"`` (only the test set is binarized once with ``seed``, for
        evaluation as in Burda et al. 2015; pass ``binarize="dynamic"`` to
        :func:`pvae.inference.fit` to resample the training set every epoch).
    :param int seed: seed for binarization and for the digits train/test split.
    :param bool download: fetch the official files into ``~/.cache/pvae/<name>`` (or
        ``data_dir``) when they are found nowhere. Off by default: nothing is downloaded
        unless asked.
    :raises ValueError: unknown dataset name or binarization mode, or binarizing data that
        are not intensities in [0, 1].
    :raises DataNotFoundError: no files found; the message lists every folder searched.
    :raises IDXError: truncated or corrupt files.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    if binarize not in (None, "static", "dynamic"):
        raise ValueError(f"binarize must be None, 'static' or 'dynamic', got {binarize!r}")
    ds = DATASETS[name](data_dir=data_dir, download=download, seed=seed)
    if binarize is not None:
        if name == "synthetic-ppca":
            raise ValueError("synthetic-ppca data are real-valued and cannot be binarized; "
                             "use binarize=None with a gaussian likelihood")
        if binarize == "static":
            ds.x_train = _binarize(ds.x_train, seed=seed)
        ds.x_test = _binarize(ds.x_test, seed=seed + 1)
        ds.binarized = binarize
    return ds


#: Structured-prediction splits of an image: the observed part c and the part x to predict.
CONDITIONS = ("top-half", "quadrant")


def condition_mask(image_shape, condition: str) -> torch.Tensor:
    """Boolean mask ``(H * W,)`` of the pixels that are observed (the conditioning ``c``) for
    structured output prediction (Sohn et al. 2015): ``"top-half"`` (predict the bottom half)
    or ``"quadrant"`` (the top-left quadrant is observed; predict the other three, as in Pyro's
    CVAE example).

    :raises ValueError: unknown condition or non-image data.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; choose one of {CONDITIONS}")
    if not image_shape or len(image_shape) != 2:
        raise ValueError(f"condition {condition!r} needs image data with (H, W), got "
                         f"image_shape={image_shape}")
    h, w = image_shape
    m = torch.zeros(h, w, dtype=torch.bool)
    if condition == "top-half":
        m[: h // 2] = True
    else:
        m[: h // 2, : w // 2] = True
    return m.flatten()


class ConditionSplit(torch.utils.data.Dataset):
    """Structured-prediction pairs ``(x_missing, x_observed)`` of images, for a CVAE
    p(x_m | z, c = x_o): item ``i`` is ``(x[i][~mask], x[i][mask])``.

    :param torch.Tensor x: ``(N, D)`` images with intensities in [0, 1].
    :param torch.Tensor mask: ``(D,)`` bool, True where observed (see :func:`condition_mask`).
    :param binarize: ``"dynamic"``: both parts are binarized afresh at every access, from the
        same Bernoulli draw of the whole image (dynamic binarization of the pair); ``None``:
        ``x`` as given.
    :raises ValueError: shapes disagree, ``binarize`` unknown, intensities outside [0, 1] with
        ``binarize="dynamic"``.
    """

    def __init__(self, x: torch.Tensor, mask: torch.Tensor, binarize: str | None = "dynamic"):
        if x.dim() != 2 or mask.shape != (x.shape[1],) or mask.dtype != torch.bool:
            raise ValueError(f"x must be (N, D) and mask a bool (D,) tensor, got {tuple(x.shape)} "
                             f"and {tuple(mask.shape)} {mask.dtype}")
        if binarize not in (None, "dynamic"):
            raise ValueError(f"binarize must be None or 'dynamic', got {binarize!r}")
        if binarize == "dynamic":
            check_intensities(x, "binarize='dynamic'")
        self.x, self.mask, self.binarize = x, mask, binarize

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, indices):
        """A whole mini-batch at once (``DataLoader`` calls this when it exists): one
        Bernoulli draw for the batch instead of one per image."""
        xb = self.x[indices]
        if self.binarize == "dynamic":
            xb = bernoulli_sample(xb)
        return list(zip(xb[:, ~self.mask], xb[:, self.mask]))

    def __getitem__(self, i):
        return self.__getitems__([i])[0]
