"""Your own data as a dataset: an array file (``.npy``, ``.npz``, ``.pt``) or a folder of PNG and
JPEG images, read into :class:`~pvae.data.Splits` under the data contract (``x`` float32 of
shape ``(N, D)``, images flattened with ``image_shape`` kept; labels int64 of shape ``(N,)``),
with a seeded train/test split unless the file brings its own.

What a file may hold:

- ``.npy``: one array ``x``;
- ``.npz``: ``x`` and optionally ``y`` (class labels), or a given split: ``x_train`` and
  ``x_test`` (and optionally ``y_train`` and ``y_test``);
- ``.pt`` (``torch.save``; read with ``weights_only=True``): a tensor ``x``, a tuple ``(x,)``
  or ``(x, y)``, or a dict with the keys of an ``.npz``.

``x`` has one datapoint per row: ``(N, D)``, grayscale images ``(N, H, W)``, or colour images
``(N, H, W, C)`` / ``(N, C, H, W)`` with ``C`` = 1 or 3 (kept channels-last, as
``image_shape = (H, W, 3)``). ``uint8`` values are pixels and are divided by 255 (as Pillow's
and the IDX files' are); ``bool``, integer and floating-point values are taken as they are.
An image folder holds ``DIR/*.png|jpg|jpeg`` (no labels) or ``DIR/<class>/*.png|jpg|jpeg``
(labels from the sorted sub-folder names); hidden entries and other files are skipped.

Every file is checked before it is used: its header against its size (a truncated file is
refused before anything is read, an announced size beyond :data:`MAX_DATA_BYTES` too), its
dtype, shape, and that every value is finite; the message names the file and what to do.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from pvae.data.idx import DataNotFoundError
from pvae.data.splits import Splits
from pvae.validation import check_float

__all__ = ["DEFAULT_TEST_FRACTION", "IMAGE_SUFFIXES", "MAX_CLASSES", "MAX_DATA_BYTES",
           "DataFileError", "load_data_file", "load_image_folder"]

#: The share of the datapoints held out as the test set when a file brings no split.
DEFAULT_TEST_FRACTION = 0.2
#: The most bytes that one array of a data file may announce (16 GiB), checked before reading.
MAX_DATA_BYTES = 1 << 34
#: Labels are class indices ``0 .. K-1`` with ``K`` at most this.
MAX_CLASSES = 100_000
#: The image files an image folder is read from (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: The keys a ``.npz`` file or a ``.pt`` dict may hold.
_KEYS = ({"x"}, {"x", "y"}, {"x_train", "x_test"}, {"x_train", "x_test", "y_train", "y_test"})
_GRAY_MODES, _COLOR_MODES = ("1", "L", "LA"), ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK",
                                               "YCbCr", "LAB", "HSV")


class DataFileError(ValueError):
    """A data file or image folder cannot be read as a dataset (truncated, wrong dtype or
    shape, values that are not finite, images of mixed sizes, an empty folder...)."""


# ---------------------------------------------------------------------------------------------
# array files


def load_data_file(path, *, seed: int = 0, test_fraction: float | None = None) -> Splits:
    """A dataset from an array file: ``.npy``, ``.npz`` or ``.pt`` (see the module docstring).

    :param path: the file.
    :param int seed: seeds the train/test split (a file without its own split).
    :param test_fraction: the held-out share, in (0, 1) (default
        :data:`DEFAULT_TEST_FRACTION`); only for a file without its own split.
    :returns: :class:`Splits` named ``"data-file"``, with ``digest`` (the SHA-256 of the
        arrays as read) and, without labels, all labels 0 and one class.
    :raises DataNotFoundError: no such file.
    :raises DataFileError: the file cannot be read as a dataset; the message says why.
    """
    path = _existing(path, "data file", Path.is_file)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arrays = {"x": _read_npy(path)}
    elif suffix == ".npz":
        arrays = _read_npz(path)
    elif suffix == ".pt":
        arrays = _read_pt(path)
    else:
        raise DataFileError(f"{path}: pvae reads .npy, .npz and .pt data files (and folders of "
                            f"images: --image-folder), not {suffix or 'a file without suffix'}")
    return _splits(arrays, path, seed, test_fraction, "data-file")


def _existing(path, what: str, test) -> Path:
    if path is None or not str(path).strip():
        raise DataFileError(f"no {what} given (an empty path)")
    path = Path(path)
    if not path.exists():
        raise DataNotFoundError(f"{what} {path} not found")
    if not test(path):
        raise DataFileError(f"{path} is not a {what.split()[-1]}" if what != "data file" else
                            f"{path} is not a file; pass an .npy, .npz or .pt file (or a folder "
                            "of images as --image-folder)")
    return path


def _read_npy(path: Path) -> np.ndarray:
    """An ``.npy`` array, memory-mapped first: the header is read and checked against the
    file's size before any data are."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        text = str(e)
        if "mmap length" in text or "larger than" in text:
            raise DataFileError(f"{path} is truncated: its header announces more data than the "
                                f"file holds ({os.path.getsize(path)} bytes)") from None
        if "Python objects" in text or "allow_pickle" in text:
            raise DataFileError(_object_dtype(path)) from None
        raise DataFileError(f"{path} is not a valid .npy file ({text})") from None
    except (OSError, EOFError) as e:
        raise DataFileError(f"{path} is not a valid .npy file ({e})") from None
    if not isinstance(array, np.ndarray):  # np.load of a pickle: refused above; belt and braces
        raise DataFileError(f"{path} does not hold one array")
    _check_size(array.shape, array.dtype, path, "x")
    return array


def _object_dtype(path) -> str:
    return (f"{path} holds Python objects (dtype object), which pvae does not unpickle; save a "
            "numeric array (x.astype('float32'))")


def _check_size(shape, dtype, path, key) -> None:
    size = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
    if size > MAX_DATA_BYTES:
        raise DataFileError(f"{path}: {key} announces {size:,} bytes, more than MAX_DATA_BYTES "
                            f"({MAX_DATA_BYTES:,}) that pvae reads from one array")


def _read_npz(path: Path) -> dict:
    """An ``.npz`` file's arrays; each member's header is checked against its size in the
    archive before it is inflated (a truncated member, or a compressed one that announces
    more than :data:`MAX_DATA_BYTES`, is refused)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = {Path(info.filename).stem: info for info in archive.infolist()
                       if info.filename.endswith(".npy")}
            _check_keys(set(members), path)
            for key, info in members.items():
                with archive.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = {(1, 0): np.lib.format.read_array_header_1_0,
                            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read is None:
                        raise DataFileError(f"{path}: {key} is an .npy of version {version}, "
                                            "which pvae does not read; save it with numpy's "
                                            "default format")
                    shape, _, dtype = read(f)
                    if dtype.hasobject:
                        raise DataFileError(_object_dtype(f"{path}: {key}"))
                    _check_size(shape, dtype, path, key)
                    announced = int(np.prod(shape, dtype=object)) * dtype.itemsize
                    if info.file_size < f.tell() + announced:
                        raise DataFileError(f"{path}: {key} is truncated: its header announces "
                                            f"{announced:,} bytes, the archive holds "
                                            f"{info.file_size - f.tell():,}")
            with np.load(path, allow_pickle=False) as npz:
                return {key: npz[key] for key in members}
    except zipfile.BadZipFile as e:
        raise DataFileError(f"{path} is not a valid .npz file (a zip archive of .npy arrays: "
                            f"{e}); it may be truncated") from None
    except (ValueError, OSError, EOFError) as e:
        if isinstance(e, DataFileError):
            raise
        raise DataFileError(f"{path} cannot be read as an .npz file ({e})") from None


def _read_pt(path: Path) -> dict:
    """A ``.pt`` file (``torch.load(weights_only=True)``): a tensor, a tuple, or a dict."""
    if not zipfile.is_zipfile(path):  # torch.save's format is a zip archive
        raise DataFileError(f"{path} is not a .pt file written by torch.save, or it is "
                            "truncated")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DataFileError(f"{path} holds Python objects other than tensors, which pvae does "
                            "not unpickle (torch.load(weights_only=True)); save tensors: "
                            "torch.save({'x': x, 'y': y}, path)") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, OSError, ...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataFileError(f"{path} cannot be read as a .pt file of tensors ({first}); it may "
                            "be truncated") from None
    if isinstance(obj, torch.Tensor):
        obj = {"x": obj}
    elif isinstance(obj, (tuple, list)) and 1 <= len(obj) <= 2:
        obj = dict(zip(("x", "y"), obj))
    elif not isinstance(obj, dict):
        raise DataFileError(f"{path} holds a {type(obj).__name__}; pvae reads a tensor x, a tuple "
                            "(x,) or (x, y), or a dict with x (and y) or x_train and x_test")
    _check_keys(set(obj), path)
    arrays = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise DataFileError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
        if value.is_complex():
            raise DataFileError(_dtype_error(f"{path}: {key}", value.dtype))
        arrays[key] = value.detach().cpu().numpy() if value.dtype != torch.bfloat16 else \
            value.detach().float().cpu().numpy()
    return arrays


def _check_keys(keys: set, path) -> None:
    if keys not in _KEYS:
        raise DataFileError(f"{path} holds {sorted(keys) or 'nothing'}; pvae reads 'x' (and "
                            "optional 'y', class labels), or a given split: 'x_train' and "
                            "'x_test' (and optional 'y_train' and 'y_test'), e.g. "
                            "np.savez(path, x=x, y=y)")


def _dtype_error(where, dtype) -> str:
    return (f"{where} has dtype {dtype}; pvae reads real numbers: floating point or integers "
            "as they are, uint8 pixels divided by 255, bool as 0/1")


# ---------------------------------------------------------------------------------------------
# image folders


def load_image_folder(folder, *, seed: int = 0, image_size=None,
                      test_fraction: float | None = None) -> Splits:
    """A dataset from a folder of PNG and JPEG images (Pillow, the ``images`` extra):
    ``DIR/*.png`` without labels or ``DIR/<class>/*.png`` with labels from the sorted
    sub-folder names. Grayscale images stay one channel; when any image has colour, all are
    read as RGB (``image_shape = (H, W, 3)``); alpha channels are dropped and pixels divided
    by 255.

    :param folder: the folder.
    :param int seed: seeds the train/test split.
    :param image_size: ``None`` (every image must have the same size), or ``(H, W)`` or one
        side ``(S,)``: every image is resized to it (Lanczos).
    :param test_fraction: the held-out share, in (0, 1) (default :data:`DEFAULT_TEST_FRACTION`).
    :returns: :class:`Splits` named ``"image-folder"`` (with ``digest``).
    :raises DataNotFoundError: no such folder.
    :raises DataFileError: an empty folder, a class folder without images, a folder holding
        both images and class folders, an image that cannot be read (truncated, not an
        image, 16-bit), images of different sizes without ``image_size``.
    :raises ImportError: Pillow is not installed.
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:
        raise ImportError("reading an image folder needs Pillow: pip install 'pvae-ppl[images]' "
                          "(or pip install Pillow)") from e
    folder = _existing(folder, "image folder", Path.is_dir)
    files, labels = _image_files(folder)
    size = _image_size(image_size)
    modes, sizes = [], {}
    for path in files:  # headers only: modes and sizes
        with _opened(Image, UnidentifiedImageError, path) as image:
            modes.append(image.mode)
            sizes.setdefault(image.size[::-1], path)
    unsupported = next((m for m in modes if m not in _GRAY_MODES + _COLOR_MODES), None)
    if unsupported is not None:
        path = files[modes.index(unsupported)]
        raise DataFileError(f"{path} has mode {unsupported} (16-bit or floating-point pixels), "
                            "which pvae does not read; save 8-bit grayscale or RGB images")
    if size is None and len(sizes) > 1:
        (a, path_a), (b, path_b) = list(sizes.items())[:2]
        raise DataFileError(f"the images of {folder} differ in size: {path_a.name} is "
                            f"{a[0]}x{a[1]}, {path_b.name} is {b[0]}x{b[1]} (height x width); "
                            "pass --image-size H W (image_size=) to resize them all")
    height, width = size or next(iter(sizes))
    mode = "L" if all(m in _GRAY_MODES for m in modes) else "RGB"
    shape = (height, width) if mode == "L" else (height, width, 3)
    _check_size((len(files), *shape), np.float32, folder, "the images")
    pixels = np.empty((len(files), *shape), dtype=np.uint8)
    for i, path in enumerate(files):
        with _opened(Image, UnidentifiedImageError, path) as image:
            try:
                image = image.convert(mode)
                if image.size != (width, height):
                    image = image.resize((width, height), Image.Resampling.LANCZOS)
                pixels[i] = np.asarray(image)
            except (OSError, ValueError, SyntaxError) as e:
                raise DataFileError(f"{path} cannot be read as an image ({e})") from None
    arrays = {"x": pixels} if labels is None else {"x": pixels, "y": np.asarray(labels)}
    return _splits(arrays, folder, seed, test_fraction, "image-folder")


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _image_files(folder: Path) -> tuple[list[Path], list[int] | None]:
    """The images of ``folder`` in sorted order, and their labels (``None``: no class
    folders)."""
    entries = _visible(folder)
    images = [p for p in entries if _is_image(p)]
    classes = [p for p in entries if p.is_dir()]
    where = f"{folder}: pvae reads DIR/*.png (or .jpg, .jpeg) or DIR/<class>/*.png"
    if images and classes:
        raise DataFileError(f"{folder} holds both images ({images[0].name}) and class folders "
                            f"({classes[0].name}); {where.split(': ', 1)[1]}, not both")
    if not classes:
        if not images:
            raise DataFileError(f"{folder} holds no PNG or JPEG images (nor class folders of "
                                f"them); {where.split(': ', 1)[1]}")
        return images, None
    files, labels = [], []
    for label, sub in enumerate(classes):
        inside = _visible(sub)
        nested = next((p for p in inside if p.is_dir()), None)
        if nested is not None:
            raise DataFileError(f"{nested} is a folder inside the class folder {sub.name}; "
                                f"{where.split(': ', 1)[1]}")
        found = [p for p in inside if _is_image(p)]
        if not found:
            raise DataFileError(f"the class folder {sub} holds no PNG or JPEG images")
        files += found
        labels += [label] * len(found)
    return files, labels


def _image_size(image_size):
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)):
        image_size = [image_size]
    sides = list(image_size)
    if len(sides) not in (1, 2) or any(isinstance(s, bool) or not isinstance(s, (int, np.integer))
                                       or s < 1 for s in sides):
        raise DataFileError(f"image_size must be (height, width) or one side, positive integers, "
                            f"got {image_size!r}")
    return (int(sides[0]), int(sides[-1]))


class _opened:
    """``Image.open(path)`` as a context, its errors as one :class:`DataFileError` naming the
    file."""

    def __init__(self, Image, unidentified, path):
        self.path = path
        try:
            self.image = Image.open(path)
        except unidentified:
            raise DataFileError(f"{path} is not a PNG or JPEG image Pillow can read") from None
        except Image.DecompressionBombError as e:
            raise DataFileError(f"{path}: {e}") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise DataFileError(f"{path} cannot be read as an image ({e})") from None

    def __enter__(self):
        return self.image

    def __exit__(self, *exc):
        self.image.close()


# ---------------------------------------------------------------------------------------------
# arrays to splits


def _splits(arrays: dict, source: Path, seed: int, test_fraction, name: str) -> Splits:
    """Checked arrays as :class:`Splits`: the file's own split, or a seeded one."""
    given = "x_train" in arrays
    if given and test_fraction is not None:
        raise DataFileError(f"{source} brings its own split (x_train, x_test); test_fraction "
                            "(--test-fraction) applies to data without one")
    if given:
        x_train, shape = _features(arrays["x_train"], f"{source}: x_train")
        x_test, test_shape = _features(arrays["x_test"], f"{source}: x_test")
        if test_shape != shape or x_test.shape[1:] != x_train.shape[1:]:
            raise DataFileError(f"{source}: x_train's datapoints have shape "
                                f"{arrays['x_train'].shape[1:]}, x_test's "
                                f"{arrays['x_test'].shape[1:]}; they must agree")
        has_y = "y_train" in arrays
        y_train = _labels(arrays.get("y_train"), len(x_train), f"{source}: y_train")
        y_test = _labels(arrays.get("y_test"), len(x_test), f"{source}: y_test")
    else:
        x, shape = _features(arrays["x"], f"{source}: x" if source.is_file() else str(source))
        has_y = "y" in arrays
        y = _labels(arrays.get("y"), len(x), f"{source}: y")
        fraction = DEFAULT_TEST_FRACTION if test_fraction is None else check_float(
            "test_fraction", test_fraction, minimum=0.0, maximum=1.0, strict=True)
        if fraction >= 1.0:
            raise DataFileError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
        if len(x) < 2:
            raise DataFileError(f"{source} holds {len(x)} datapoint(s); a train/test split "
                                "needs at least 2")
        # the procedure of the built-in digits: the first round(f N) of a seeded permutation
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed), device="cpu")
        num_test = min(max(1, int(round(fraction * len(x)))), len(x) - 1)
        test, train = perm[:num_test].numpy(), perm[num_test:].numpy()
        x_train, x_test, y_train, y_test = x[train], x[test], y[train], y[test]
    num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1 if has_y else 1
    digest = hashlib.sha256()
    for part in (x_train, x_test, y_train, y_test):
        digest.update(memoryview(np.ascontiguousarray(part)).cast("B"))
    tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return Splits(tensor(x_train), tensor(x_test), tensor(y_train), tensor(y_test), shape,
                  num_classes, name, digest=digest.hexdigest())


def _features(x: np.ndarray, where: str) -> tuple[np.ndarray, tuple | None]:
    """``x`` as float32 ``(N, D)`` and its ``image_shape`` (``None`` for ``(N, D)``)."""
    kind = x.dtype.kind
    if kind not in "biuf":
        raise DataFileError(_object_dtype(where) if x.dtype.hasobject else
                            _dtype_error(where, x.dtype))
    if x.ndim < 2 or x.ndim > 4:
        raise DataFileError(f"{where} has shape {tuple(x.shape)}; pvae reads one datapoint per "
                            "row: (N, D), grayscale images (N, H, W), or colour images "
                            "(N, H, W, C) or (N, C, H, W) with C = 1 or 3")
    if len(x) == 0 or any(s == 0 for s in x.shape[1:]):
        raise DataFileError(f"{where} is empty (shape {tuple(x.shape)})")
    if x.ndim == 4:
        if x.shape[-1] in (1, 3):
            pass
        elif x.shape[1] in (1, 3):
            x = np.moveaxis(x, 1, -1)  # channels first -> channels last
        else:
            raise DataFileError(f"{where} has shape {tuple(x.shape)}: neither its last nor its "
                                "second axis is 1 or 3 colour channels")
        if x.shape[-1] == 1:
            x = x[..., 0]
    shape = tuple(int(s) for s in x.shape[1:]) if x.ndim > 2 else None
    flat = np.ascontiguousarray(x).reshape(len(x), -1)
    if x.dtype == np.uint8:  # pixels, scaled as the IDX reader scales them
        return flat.astype(np.float32) / 255.0, shape
    flat = flat.astype(np.float32)
    finite = np.isfinite(flat)
    if not finite.all():
        bad = np.argwhere(~finite)
        raise DataFileError(f"{where} holds {len(bad)} NaN or infinite value(s), the first in row "
                            f"{bad[0][0]} (float64 values beyond float32's range count as "
                            "infinite); drop or impute them first")
    return flat, shape


def _labels(y, n: int, where: str) -> np.ndarray:
    """Class labels as int64 ``(n,)``; all 0 without labels."""
    if y is None:
        return np.zeros(n, dtype=np.int64)
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise DataFileError(f"{where} has shape {tuple(y.shape)}; expected ({n},): one class "
                            "label per datapoint")
    if y.dtype.kind == "f":
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise DataFileError(f"{where} holds values that are not whole numbers; labels are "
                                "class indices 0, 1, ..., K-1")
    elif y.dtype.kind not in "biu":
        raise DataFileError(_dtype_error(where, y.dtype) + "; labels are class indices")
    if n and (y.min() < 0 or y.max() >= MAX_CLASSES):
        raise DataFileError(f"{where} holds labels in [{y.min()}, {y.max()}]; labels are class "
                            f"indices 0, 1, ..., K-1 with K <= {MAX_CLASSES}")
    return y.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# the registry's loaders (pvae.data.DATASETS)


def data_file_dataset(data_dir=None, download=False, seed=0, *, data_file=None,
                      test_fraction=None) -> Splits:
    """``DATASETS["data-file"]``: :func:`load_data_file` of ``data_file``."""
    if data_file is None:
        raise DataFileError("the data-file dataset needs data_file= (--data-file PATH)")
    return load_data_file(data_file, seed=seed, test_fraction=test_fraction)


def image_folder_dataset(data_dir=None, download=False, seed=0, *, image_folder=None,
                         image_size=None, test_fraction=None) -> Splits:
    """``DATASETS["image-folder"]``: :func:`load_image_folder` of ``image_folder``."""
    if image_folder is None:
        raise DataFileError("the image-folder dataset needs image_folder= (--image-folder DIR)")
    return load_image_folder(image_folder, seed=seed, image_size=image_size,
                             test_fraction=test_fraction)
