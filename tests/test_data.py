import gzip
import struct

import numpy as np
import pytest
import torch

from pvae import data

from conftest import rng


def write_idx(path, array, dtype_code=0x08, compress=True, truncate=0, magic=None):
    header = magic if magic is not None else bytes([0, 0, dtype_code, array.ndim])
    raw = header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    raw = raw[: len(raw) - truncate]
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(raw)


def write_split(folder, n_train=6, n_test=4, shape=(3, 2)):
    """Random 8-bit images and labels as the four IDX files; returns the arrays written."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"x_train": rng.integers(0, 256, (n_train, *shape)),
              "y_train": rng.integers(0, 10, n_train),
              "x_test": rng.integers(0, 256, (n_test, *shape)),
              "y_test": rng.integers(0, 10, n_test)}
    write_idx(folder / "train-images-idx3-ubyte.gz", arrays["x_train"])
    write_idx(folder / "train-labels-idx1-ubyte.gz", arrays["y_train"])
    write_idx(folder / "t10k-images-idx3-ubyte.gz", arrays["x_test"])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", arrays["y_test"])
    return arrays


def test_read_idx_roundtrip(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    write_idx(tmp_path / "b", a, compress=False)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz"), a)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "b"), a)


def test_read_idx_bad_magic(tmp_path):
    write_idx(tmp_path / "a.gz", np.zeros((2, 2)), magic=b"\x01\x02\x08\x02")
    with pytest.raises(data.IDXError, match="bad magic number"):
        data.read_idx(tmp_path / "a.gz")


def test_read_idx_truncated(tmp_path):
    write_idx(tmp_path / "a.gz", np.zeros((5, 4, 4)), truncate=7)
    with pytest.raises(data.IDXError, match="size mismatch"):
        data.read_idx(tmp_path / "a.gz")


def test_read_idx_corrupt_gzip(tmp_path):
    (tmp_path / "a.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(data.IDXError, match="corrupt"):
        data.read_idx(tmp_path / "a.gz")


def test_load_idx_folder(tmp_path):
    written = write_split(tmp_path / "mnist")
    ds = data.load("mnist", data_dir=tmp_path)
    assert ds.x_train.shape == (6, 6) and ds.x_train.dtype == torch.float32
    assert ds.y_test.shape == (4,) and ds.y_test.dtype == torch.int64
    assert ds.image_shape == (3, 2)
    # the pixels divided by 255 (0 -> 0, 255 -> 1), rows and labels in the files' order
    for split in ("train", "test"):
        pixels = written[f"x_{split}"].reshape(len(written[f"x_{split}"]), -1)
        np.testing.assert_array_equal(getattr(ds, f"x_{split}").numpy(),
                                      pixels.astype(np.float32) / np.float32(255))
        np.testing.assert_array_equal(getattr(ds, f"y_{split}").numpy(), written[f"y_{split}"])
    static = data.load("mnist", data_dir=tmp_path, binarize="static", seed=3)
    assert set(static.x_train.unique().tolist()) <= {0.0, 1.0}
    again = data.load("mnist", data_dir=tmp_path, binarize="static", seed=3)
    assert torch.equal(static.x_train, again.x_train)


def test_env_data_dir(tmp_path, monkeypatch):
    write_split(tmp_path / "mnist")
    monkeypatch.setenv("PVAE_DATA_DIR", str(tmp_path))
    assert len(data.load("mnist").x_test) == 4


def test_not_found_lists_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("PVAE_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(data.DataNotFoundError) as e:
        data.load("mnist", data_dir=tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "/usr/share/datasets/mnist" in msg
    assert "--data-dir" in msg


def test_label_image_mismatch(tmp_path):
    write_split(tmp_path / "mnist")
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", np.zeros(3))
    with pytest.raises(data.IDXError, match="4 images but 3 labels"):
        data.load("mnist", data_dir=tmp_path)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("cifar")


def test_digits_split_is_fixed():
    a, b = data.load("digits"), data.load("digits")
    assert a.x_train.shape == (1438, 64) and a.x_test.shape == (359, 64)
    assert torch.equal(a.x_test, b.x_test)
    # the 1797 digits of 4-bit pixels divided by 16, each once: the split is a permutation
    from sklearn.datasets import load_digits

    expected = torch.from_numpy(load_digits().data.astype(np.float32) / np.float32(16))
    both = torch.cat([a.x_train, a.x_test])
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, expected.tolist()))


def test_synthetic_ppca_params():
    ds = data.load("synthetic-ppca")
    W, mu, sigma = ds.params["W"], ds.params["mu"], ds.params["sigma"]
    cov = torch.cov(ds.x_train.T)
    expected = W @ W.T + sigma**2 * torch.eye(len(mu))
    assert torch.allclose(ds.x_train.mean(0), mu, atol=0.3)
    assert (cov - expected).abs().max() / expected.abs().max() < 0.1


def test_binarize_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        data.binarize(torch.tensor([0.5, 1.5]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_sample_is_bernoulli(dtype):
    """0/1 draws whose frequencies match p within 4 binomial standard errors per probability
    (200,000 draws each), including the edges p = 0 and p = 1; a seeded generator repeats."""
    p = torch.tensor([0.0, 0.01, 0.3, 0.5, 0.9, 1.0], dtype=dtype)
    probs = p.expand(200_000, 6)
    draws = data.bernoulli_sample(probs, rng(0))
    assert draws.dtype == dtype and draws.shape == probs.shape
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    freq = draws.mean(0)
    se = (p * (1 - p) / 200_000).sqrt()
    assert ((freq - p).abs() <= 4 * se + 1e-12).all(), (freq, p)
    again = data.bernoulli_sample(probs, rng(0))
    assert torch.equal(draws, again)


def test_download_only_when_asked(tmp_path, monkeypatch):
    """The download path, exercised on local files through a file:// URL."""
    monkeypatch.delenv("PVAE_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write_split(tmp_path / "mirror")
    monkeypatch.setitem(data.idx._DOWNLOAD_URLS, "mnist", (tmp_path / "mirror").as_uri() + "/")
    dest = tmp_path / "dest"
    with pytest.raises(data.DataNotFoundError):
        data.load("mnist", data_dir=dest)  # nothing is fetched unless asked
    ds = data.load("mnist", data_dir=dest, download=True)
    assert len(ds.x_train) == 6 and (dest / "train-images-idx3-ubyte.gz").is_file()
    assert not list(dest.glob("*.part"))
