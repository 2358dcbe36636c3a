"""Your own data on the command line (issue 29): ``pvae train --data-file`` (.npy, .npz, .pt)
equals the built-in dataset's run when given the same images and split, ``--image-folder``
reads PNGs written here (labels from class folders, RGB, resizing), and ``pvae evaluate``
finds the same data again, or says why not."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pvae import data
from pvae.cli import main

from conftest import FASHION_DIR, fashion_available

TINY = ["--latent-dim", "2", "--hidden-dims", "8", "--num-epochs", "2", "--no-progress"]
#: The history columns that a seeded run reproduces (not the timings).
SEEDED = ("epoch", "train_elbo", "val_elbo", "beta", "lr")


def history(run):
    with open(run / "history.csv") as f:
        return [{k: row[k] for k in SEEDED} for row in csv.DictReader(f)]


def digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt"])
def test_a_data_file_of_the_digits_trains_as_the_builtin_digits(tmp_path, suffix):
    """The 1797 digits in their original order, as (N, 8, 8) float images: the seeded split is
    the built-in one, so the histories agree to the last digit; labels come with .npz/.pt."""
    images, labels = digits()
    x = (images / 16.0).astype(np.float32)
    path = tmp_path / f"digits{suffix}"
    if suffix == ".npy":
        np.save(path, x)
    elif suffix == ".npz":
        np.savez(path, x=x, y=labels)
    else:
        torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(labels)}, path)
    main(["train", "--dataset", "digits", *TINY, "--num-val", "100", "--out",
          str(tmp_path / "builtin")])
    main(["train", "--data-file", str(path), *TINY, "--num-val", "100", "--out",
          str(tmp_path / "own")])
    assert history(tmp_path / "own") == history(tmp_path / "builtin")
    config = json.loads((tmp_path / "own" / "config.json").read_text())
    assert config["dataset"] == "data-file" and config["data_file"] == str(path)
    assert config["image_shape"] == [8, 8] and len(config["data_sha256"]) == 64
    ours, builtin = data.load("data-file", data_file=path), data.load("digits")
    assert torch.equal(ours.x_test, builtin.x_test)
    assert ours.num_classes == (1 if suffix == ".npy" else 10)


@pytest.mark.skipif(not fashion_available(), reason="Fashion-MNIST IDX files not found")
def test_an_npz_of_fashion_mnist_with_its_split_equals_the_builtin_run(tmp_path):
    """The acceptance check: the first 500 training and 100 test images of Fashion-MNIST as
    uint8 pixels in an .npz with the given split; divided by 255 as the IDX reader does, the
    run equals the built-in dataset's with --num-train 500 --num-val 100."""
    builtin = data.load("fashion-mnist", data_dir=FASHION_DIR)
    pixels = lambda x: np.rint(x.numpy() * 255).astype(np.uint8).reshape(-1, 28, 28)  # noqa
    path = tmp_path / "fashion.npz"
    np.savez(path, x_train=pixels(builtin.x_train[:500]), y_train=builtin.y_train[:500].numpy(),
             x_test=pixels(builtin.x_test[:100]), y_test=builtin.y_test[:100].numpy())
    flags = ["--latent-dim", "5", "--hidden-dims", "32", "--num-epochs", "2", "--no-progress",
             "--batch-size", "100"]
    main(["train", "--dataset", "fashion-mnist", "--data-dir", FASHION_DIR, "--num-train", "500",
          "--num-val", "100", *flags, "--out", str(tmp_path / "builtin")])
    main(["train", "--data-file", str(path), "--num-val", "100", *flags, "--out",
          str(tmp_path / "own")])
    assert history(tmp_path / "own") == history(tmp_path / "builtin")


def write_pngs(folder, images, labels=None, rgb=False):
    for i, image in enumerate(images):
        where = folder if labels is None else folder / f"class-{labels[i]}"
        where.mkdir(parents=True, exist_ok=True)
        pixels = (image * 16).clip(0, 255).astype(np.uint8)
        Image.fromarray(np.stack([pixels] * 3, -1) if rgb else pixels).save(where / f"{i:04d}.png")


def test_an_image_folder_with_class_folders_trains_and_evaluates(tmp_path, capsys):
    """240 digits as 8-bit PNGs in three class folders: labels from the folder names, pixels
    as uint8 / 255, a cvae conditioned on them, and pvae evaluate reading the folder again."""
    images, labels = digits()
    folder = tmp_path / "pngs"
    write_pngs(folder, images[:240], labels[:240] % 3)
    ds = data.load("image-folder", image_folder=folder)
    assert ds.image_shape == (8, 8) and ds.num_classes == 3 and ds.x_dim == 64
    assert len(ds.x_train) + len(ds.x_test) == 240 and len(ds.x_test) == 48
    expected = np.sort(np.round(images[:240] * 16).clip(0, 255).reshape(240, -1) / 255, 0)
    got = np.sort(np.concatenate([ds.x_train.numpy(), ds.x_test.numpy()]), 0)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    out = tmp_path / "run"
    main(["train", "--image-folder", str(folder), "--model", "cvae", "--condition", "label",
          *TINY, "--num-val", "40", "--out", str(out)])
    main(["evaluate", str(out), "--num-samples", "0", "--tsne-points", "0"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_test"] == 48 and metrics["test_elbo"] < 0
    assert (out / "figures" / "latent_embedding.png").is_file()


def test_rgb_images_are_resized_and_kept_channels_last(tmp_path):
    images, _ = digits()
    folder = tmp_path / "rgb"
    write_pngs(folder, images[:20], rgb=True)
    ds = data.load("image-folder", image_folder=folder, image_size=[4, 6], seed=3)
    assert ds.image_shape == (4, 6, 3) and ds.x_dim == 72 and ds.num_classes == 1
    x = ds.x_train.reshape(-1, 4, 6, 3)
    assert torch.equal(x[..., 0], x[..., 1])  # grey pixels stay grey in RGB
    out = tmp_path / "run"
    main(["train", "--image-folder", str(folder), "--image-size", "4", "6", *TINY,
          "--num-val", "4", "--out", str(out)])
    assert json.loads((out / "config.json").read_text())["image_shape"] == [4, 6, 3]
    main(["evaluate", str(out), "--num-samples", "0", "--tsne-points", "0"])
    assert (out / "figures" / "reconstructions.png").is_file()


def test_pixels_and_layouts_of_data_files(tmp_path):
    """uint8 pixels are divided by 255 (as the IDX reader does), channels-first images become
    channels-last, bool becomes 0/1, integral float labels are class indices."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (10, 3, 4, 5), dtype=np.uint8)
    np.savez(tmp_path / "chw.npz", x=pixels, y=np.arange(10) % 2 * 1.0)
    ds = data.load("data-file", data_file=tmp_path / "chw.npz", test_fraction=0.3)
    assert ds.image_shape == (4, 5, 3) and len(ds.x_test) == 3 and ds.num_classes == 2
    expected = (np.moveaxis(pixels, 1, -1).reshape(10, -1).astype(np.float32) / 255.0)
    got = np.concatenate([ds.x_train, ds.x_test])
    assert sorted(map(tuple, got)) == sorted(map(tuple, expected))
    np.save(tmp_path / "bool.npy", rng.random((6, 7)) < 0.5)
    ds = data.load("data-file", data_file=tmp_path / "bool.npy")
    assert ds.image_shape is None and set(ds.x_train.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("change", ["moved", "edited"])
def test_evaluate_finds_the_same_data_or_says_why_not(tmp_path, change, capsys):
    images, labels = digits()
    path = tmp_path / "digits.npz"
    np.savez(path, x=(images / 16.0).astype(np.float32), y=labels)
    out = tmp_path / "run"
    main(["train", "--data-file", str(path), *TINY, "--num-epochs", "1", "--num-val", "50",
          "--out", str(out)])
    if change == "moved":
        path.rename(tmp_path / "elsewhere.npz")
        pattern = f"the run's data, '{path}' .config.json's data_file., is not found here"
    else:
        np.savez(path, x=(images[::-1] / 16.0).astype(np.float32), y=labels[::-1])
        pattern = f"the data at {path} are not those the run was trained on"
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main(["evaluate", str(out), "--num-samples", "0"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.count("\n") == 1
    assert __import__("re").search(pattern, err), err
    assert not (out / "metrics.json").exists()
