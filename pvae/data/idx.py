"""The IDX format of MNIST and Fashion-MNIST: reading, locating and (only when asked)
downloading the four files of a dataset."""

from __future__ import annotations

import gzip
import math
import os
import struct
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch

from pvae.data.splits import Splits

__all__ = ["MAX_IDX_BYTES", "DataNotFoundError", "IDXError", "load_idx_dataset", "read_idx",
           "search_paths"]

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


#: The most bytes of data an IDX header may announce (MNIST's training images are 47 MB): a
#: header beyond it is refused before anything is read or inflated.
MAX_IDX_BYTES = 1 << 31


def read_idx(path: str | os.PathLike, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not, bounded by its header: the header
    (magic number, sizes) is read and checked first, and then exactly the bytes it announces
    (one more shows a file that is too long), so neither a gzip bomb nor a header with absurd
    sizes can make the reader inflate or allocate more than the header promised, and that
    at most ``max_bytes``.

    :param path: path to a ``.gz`` or uncompressed IDX file.
    :param int max_bytes: the largest data size (bytes after the header) accepted.
    :returns: a numpy array with the shape stored in the header.
    :raises FileNotFoundError: if ``path`` does not exist.
    :raises IDXError: on a bad magic number, an unknown data type, a header that announces
        more than ``max_bytes``, or a file whose length does not match its header (truncated
        or corrupt download).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    gzipped = path.suffix == ".gz"
    try:
        with (gzip.open if gzipped else open)(path, "rb") as f:
            return _read_idx_stream(f, path, max_bytes, None if gzipped else path.stat().st_size)
    except (OSError, EOFError, zlib.error) as e:  # gzip: BadGzipFile (an OSError), EOFError
        raise IDXError(f"{path}: cannot be read as {'gzip' if gzipped else 'IDX'} ({e}); the "
                       "file is corrupt or truncated: delete it and fetch it again") from e


def _read_idx_stream(f, path: Path, max_bytes: int, file_size: int | None) -> np.ndarray:
    magic = f.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
        raise IDXError(f"{path}: bad magic number {magic.hex() or '(empty file)'}; an IDX file "
                       "starts with two zero bytes, a type code and the number of dimensions")
    type_code, ndim = magic[2], magic[3]
    if type_code not in _IDX_DTYPES or ndim == 0:
        raise IDXError(f"{path}: bad magic number {magic.hex()} (type code {type_code:#04x}, "
                       f"{ndim} dimensions)")
    sizes = f.read(4 * ndim)
    if len(sizes) < 4 * ndim:
        raise IDXError(f"{path}: truncated header ({4 + len(sizes)} bytes)")
    shape = struct.unpack(f">{ndim}I", sizes)
    dtype = np.dtype(_IDX_DTYPES[type_code])
    header = 4 + 4 * ndim
    nbytes = math.prod(shape) * dtype.itemsize  # Python integers: no overflow
    if nbytes > max_bytes:
        raise IDXError(f"{path}: the header announces shape {shape}, {nbytes} bytes of data, "
                       f"more than max_bytes={max_bytes}; the file is corrupt (or pass a larger "
                       "max_bytes to read_idx if it really is that large)")
    if file_size is not None and file_size != header + nbytes:
        raise IDXError(f"{path}: size mismatch: header says shape {shape} ({header + nbytes} "
                       f"bytes) but the file has {file_size} bytes; it is truncated or corrupt")
    raw = f.read(nbytes + 1)
    if len(raw) != nbytes:
        found = f"{header + len(raw)}" if len(raw) < nbytes else f"more than {header + nbytes}"
        raise IDXError(f"{path}: size mismatch: header says shape {shape} ({header + nbytes} "
                       f"bytes) but the file has {found} bytes; it is truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


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

