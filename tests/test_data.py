"""Data: the embedded mnist5k split, the tfds path (mocked), batching."""

from __future__ import annotations

import numpy as np
import pytest

from kwta_jax import data


@pytest.fixture(scope="module")
def mnist5k():
    return data.load_dataset("mnist5k", seed=0)


def test_mnist5k_shapes_dtypes_and_range(mnist5k):
    ds = mnist5k
    assert ds.name == "mnist5k" and ds.num_classes == 10
    assert ds.train_images.shape == (4000, 28, 28, 1) and ds.test_images.shape == (1000, 28, 28, 1)
    assert ds.train_images.dtype == np.float32 and ds.train_labels.dtype == np.int32
    assert ds.input_shape == (28, 28, 1)
    for x in (ds.train_images, ds.test_images):
        assert 0.0 <= x.min() and x.max() <= 1.0
    # Real digits, not noise: mostly background, and ink reaches full intensity.
    assert 0.05 < ds.train_images.mean() < 0.25 and ds.train_images.max() == 1.0
    # Pixels are k/255 exactly.
    np.testing.assert_array_equal(np.round(ds.test_images * 255) / 255, ds.test_images)


def test_mnist5k_split_is_stratified_and_disjoint(mnist5k):
    np.testing.assert_array_equal(np.bincount(mnist5k.train_labels), [400] * 10)
    np.testing.assert_array_equal(np.bincount(mnist5k.test_labels), [100] * 10)
    train = {x.tobytes() for x in mnist5k.train_images}
    overlap = sum(x.tobytes() in train for x in mnist5k.test_images)
    assert overlap <= 2  # the raw data may hold a few duplicate digits, never the split


def test_mnist5k_split_is_seeded(mnist5k):
    again = data.load_dataset("mnist5k", seed=0)
    np.testing.assert_array_equal(again.test_images, mnist5k.test_images)
    other = data.load_dataset("mnist5k", seed=1, test_size=500)
    assert other.test_images.shape[0] == 500 and other.train_images.shape[0] == 4500
    a, b = data.stratified_split(np.repeat(np.arange(10), 500), 1000, seed=0)
    c, d = data.stratified_split(np.repeat(np.arange(10), 500), 1000, seed=1)
    assert not np.array_equal(b, d)
    assert len(np.intersect1d(a, b)) == 0 and len(a) + len(b) == 5000


def test_stratified_split_uneven_classes():
    labels = np.array([0] * 70 + [1] * 20 + [2] * 10)
    train, test = data.stratified_split(labels, 15, seed=3)
    assert len(test) == 15 and len(train) == 85
    # Quotas 10.5, 3, 1.5: the spare one goes to the first tied class (class order).
    np.testing.assert_array_equal(np.bincount(labels[test]), [11, 3, 1])
    with pytest.raises(ValueError, match="test_size"):
        data.stratified_split(labels, 100, seed=0)


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*mnist5k"):
        data.load_dataset("imagenet")


def test_max_train_and_max_test_subsample(mnist5k):
    ds = data.load_dataset("mnist5k", max_train=100, max_test=30)
    assert len(ds.train_labels) == 100 and len(ds.test_labels) == 30


def test_batch_indices_cover_every_example_once_and_pad_with_zero_weight():
    idx, w = data.batch_indices(10, 4, shuffle=True, seed=0, epoch=0)
    assert idx.shape == (3, 4) and w.shape == (3, 4)
    real = idx.reshape(-1)[w.reshape(-1) == 1]
    np.testing.assert_array_equal(np.sort(real), np.arange(10))
    assert w.sum() == 10 and w[-1].tolist() == [1, 1, 0, 0]
    assert set(idx[-1][w[-1] == 0]) <= set(range(10))  # padding repeats real examples


def test_batch_order_is_a_pure_function_of_seed_and_epoch():
    a = data.batch_indices(100, 32, shuffle=True, seed=5, epoch=3)[0]
    b = data.batch_indices(100, 32, shuffle=True, seed=5, epoch=3)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, data.batch_indices(100, 32, shuffle=True, seed=5, epoch=4)[0])
    assert not np.array_equal(a, data.batch_indices(100, 32, shuffle=True, seed=6, epoch=3)[0])
    np.testing.assert_array_equal(
        data.batch_indices(8, 4, shuffle=False)[0].reshape(-1), np.arange(8)
    )


def test_iterate_batches_keeps_the_last_partial_batch():
    x = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    y = np.arange(10, dtype=np.int32)
    batches = list(data.iterate_batches(x, y, 4))
    assert [b.images.shape[0] for b in batches] == [4, 4, 4]
    seen = np.concatenate([b.labels[b.weights == 1] for b in batches])
    np.testing.assert_array_equal(seen, y)
    np.testing.assert_array_equal(batches[0].images[:, 0, 0, 0], batches[0].labels)
    assert len(list(data.iterate_batches(x, y, 4, start=2))) == 1
    with pytest.raises(ValueError, match="batch_size"):
        list(data.iterate_batches(x, y, 0))


@pytest.mark.parametrize(
    "name, shape", [("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)),
                    ("cifar10", (32, 32, 3)), ("svhn_cropped", (32, 32, 3))],
)  # fmt: skip
def test_tfds_datasets_through_data_source(name, shape, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load_dataset(name, data_dir=str(tmp_path))
    assert ds.train_images.shape == (12, *shape) and ds.test_images.shape[1:] == shape
    assert ds.train_images.dtype == np.float32 and ds.train_labels.dtype == np.int32
    assert 0.0 <= ds.train_images.min() and ds.train_images.max() <= 1.0
    assert ds.num_classes == 10 and ds.train_labels.min() >= 0 and ds.train_labels.max() < 10


def test_missing_tfds_dataset_says_how_to_get_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load_dataset("cifar10", data_dir=str(tmp_path / "empty"))
    msg = str(info.value)
    assert "cifar10" in msg and "--data-dir" in msg and "tfds.data_source('cifar10'" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_check_available_fails_fast_without_reading(tmp_path):
    data.check_available("mnist5k")
    with pytest.raises(data.DatasetUnavailableError, match="(?s)cifar10.*--data-dir"):
        data.check_available("cifar10", data_dir=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown dataset 'cifar100'"):
        data.check_available("cifar100")


def test_check_available_accepts_a_prepared_tfds_dataset(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    # Without the mock the empty directory holds no dataset: the mock is what makes it pass.
    with pytest.raises(data.DatasetUnavailableError, match="not available offline"):
        data.check_available("mnist", data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=4):
        assert data.check_available("mnist", data_dir=str(tmp_path)) is None
        assert len(data._open_tfds_source("mnist", "test", str(tmp_path))) == 4


def test_a_missing_data_dir_is_reported_as_such(tmp_path):
    with pytest.raises(data.DatasetUnavailableError, match="directory does not exist"):
        data.check_available("cifar10", data_dir=str(tmp_path / "nope"))
