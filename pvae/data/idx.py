"""The IDX format of MNIST and Fashion-MNIST: reading, locating and (only when asked)
downloading the four files of a dataset."""

from __future__ import annotations

import gzip
import os
import struct
import urllib.request
from pathlib import Path

import numpy as np
import torch

from pvae.data.splits import Splits

__all__ = ["DataNotFoundError", "IDXError", "load_idx_dataset", "read_idx", "search_paths"]

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

    :raises ValueError: ``data_dir`` exists but is not a folder.
    """
    if data_dir and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise ValueError(f"data_dir={str(data_dir)!r} is a file, not a folder; pass the folder "
                         "that holds the IDX files")
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


def load_idx_dataset(name: str, data_dir=None, download: bool = False) -> Splits:
    """The train and test splits of ``name`` (``fashion-mnist`` or ``mnist``) from IDX files found
    by :func:`search_paths` (or downloaded into the last of them when ``download``).

    :raises DataNotFoundError: no folder holds all four files (the message lists them all).
    :raises IDXError: a file is corrupt, or images and labels disagree in number.
    """
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
    if tuple(arrays["x_test"].shape[1:]) != image_shape:
        raise IDXError(f"{name}: test images are {tuple(arrays['x_test'].shape[1:])} but training "
                       f"images are {image_shape}; the files belong to different datasets")

    def images(a):
        return torch.from_numpy(a.reshape(len(a), -1).astype(np.float32) / 255.0)

    return Splits(
        x_train=images(arrays["x_train"]),
        x_test=images(arrays["x_test"]),
        y_train=torch.from_numpy(arrays["y_train"].astype(np.int64)),
        y_test=torch.from_numpy(arrays["y_test"].astype(np.int64)),
        image_shape=image_shape,
        num_classes=10,
        name=name,
    )

