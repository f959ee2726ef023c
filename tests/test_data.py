"""The data sets, the labelled subsets, batching and augmentation of the in-memory ones
(the streaming ones: tests/test_data_pipeline.py)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from l2t_fast.data import batches, labelled_subset, load_data, random_shift
from l2t_fast.data.digits import load_digits
from l2t_fast.data.folders import load_image_folder


def test_digits_split_into_source_and_few_label_target():
    data = load_digits(image_size=12)
    assert data.pool_images.shape[1:] == (3, 12, 12)
    assert data.num_classes == 5 and data.num_source_classes == 5
    assert set(data.source_labels.tolist()) == set(range(5))
    assert set(data.pool_labels.tolist()) == set(data.test_labels.tolist()) == set(range(5))
    target = len(data.pool_labels) + len(data.test_labels)
    assert target + len(data.source_labels) == 1797
    assert abs(len(data.test_labels) - target / 2) <= 5
    # the split is fixed: loading again gives the same test set
    assert torch.equal(load_digits(image_size=12).test_images, data.test_images)


def test_labelled_subset_draws_per_class_by_seed():
    labels = torch.tensor([0] * 5 + [1] * 7 + [2] * 4)
    chosen = labelled_subset(labels, 3, torch.Generator().manual_seed(1))
    assert torch.bincount(labels[chosen]).tolist() == [3, 3, 3]
    again = labelled_subset(labels, 3, torch.Generator().manual_seed(1))
    assert torch.equal(chosen, again)
    assert len(labelled_subset(labels, 0, torch.Generator())) == 16
    with pytest.raises(ValueError, match="class 2 has only 4"):
        labelled_subset(labels, 5, torch.Generator())


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 40), st.integers(2, 9), st.integers(0, 2**31 - 1))
def test_batches_cover_the_data_once_in_generator_order(count, batch_size, seed):
    images = torch.arange(count, dtype=torch.float32).view(count, 1, 1, 1)
    labels = torch.arange(count)
    seen = [y for _, y in batches(images, labels, batch_size,
                                  torch.Generator().manual_seed(seed))]
    flat = torch.cat(seen)
    dropped = 1 if count % batch_size == 1 else 0
    assert len(flat) == count - dropped and len(set(flat.tolist())) == len(flat)
    assert all(len(y) >= 2 for y in seen)
    replay = [y for _, y in batches(images, labels, batch_size, torch.Generator().manual_seed(seed))]
    assert all(torch.equal(a, b) for a, b in zip(seen, replay))


def test_random_shift_translates_within_bounds():
    image = torch.zeros(1, 1, 9, 9)
    image[0, 0, 4, 4] = 1.0
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        shifted = random_shift(image, 2, generator)
        assert shifted.shape == image.shape
        row, col = (int(i) for i in torch.nonzero(shifted[0, 0])[0])
        assert abs(row - 4) <= 2 and abs(col - 4) <= 2
    assert torch.equal(random_shift(image, 0, generator), image)


def write_folder(root, classes=("cat", "dog"), per_class=4):
    from PIL import Image

    for index, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((10, 14, 3), 40 * index + i, dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


def test_image_folder_is_listed_split_and_standardised(tmp_path):
    write_folder(tmp_path)
    data = load_data(str(tmp_path), image_size=8)
    assert data.num_classes == 2 and not data.has_source_task
    assert torch.bincount(data.pool_labels).tolist() == [2, 2]
    assert len(data.test_labels) == 4
    (pool, labels), = data.pool_batches(torch.arange(4))
    assert pool.shape == (4, 3, 8, 8) and torch.equal(labels, data.pool_labels)
    assert abs(float(pool.mean())) < 1e-5


def test_image_folder_with_train_and_test_subfolders(tmp_path):
    write_folder(tmp_path / "train", per_class=3)
    write_folder(tmp_path / "test", per_class=2)
    data = load_image_folder(str(tmp_path), image_size=8)
    assert len(data.pool_labels) == 6 and len(data.test_labels) == 4


def test_bad_data_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="at least 2 class subfolders"):
        load_data(str(tmp_path))
    (tmp_path / "empty_a").mkdir()
    (tmp_path / "empty_b").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_data(str(tmp_path))
    with pytest.raises(ValueError, match="no_such_data"):
        load_data("no_such_data")
    with pytest.raises(ValueError, match="image_size"):
        load_data("digits", image_size=4)
