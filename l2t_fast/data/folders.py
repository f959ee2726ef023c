"""Real data sets: image folders and torchvision data sets, streamed from disk
(``l2t_fast.data.streaming``): only their file lists (or indices) and labels are held."""
import os

import torch

from l2t_fast.data import IMAGE_SUFFIXES, stratified_mask
from l2t_fast.data.streaming import DatasetImages, FileImages, StreamingData


def load_image_folder(path, image_size=32, test_fraction=0.5, statistics=None, workers=0):
    """ImageFolder layout: ``path/CLASS/*.png``, or ``path/train/CLASS`` and ``path/test/CLASS``
    (or ``val``). Without a test folder, a fixed half of each class is held out as test.
    Images are normalised per channel with ``statistics`` (``(mean, std)``, e.g. the
    source model's), or else with the training pool's own."""
    split_dirs = [os.path.join(path, name) for name in ("test", "val")]
    test_dir = next((d for d in split_dirs if os.path.isdir(d)), None)
    if test_dir is not None and os.path.isdir(os.path.join(path, "train")):
        classes = _class_names(os.path.join(path, "train"))
        pool_files, pool_labels = _list_folder(os.path.join(path, "train"), classes)
        test_files, test_labels = _list_folder(test_dir, classes)
    else:
        classes = _class_names(path)
        files, labels = _list_folder(path, classes)
        test = stratified_mask(labels, test_fraction, seed=0).tolist()
        pool_files = [f for f, held_out in zip(files, test) if not held_out]
        test_files = [f for f, held_out in zip(files, test) if held_out]
        mask = torch.tensor(test)
        pool_labels, test_labels = labels[~mask], labels[mask]
    return _streaming(os.path.basename(os.path.normpath(path)), FileImages(pool_files),
                      pool_labels, FileImages(test_files), test_labels, len(classes),
                      image_size, statistics, workers)


def _streaming(name, pool, pool_labels, test, test_labels, num_classes, image_size,
               statistics, workers):
    """The streaming data set, normalised with ``statistics`` or the pool's own."""
    if statistics is None:
        unnormalised = StreamingData(name, pool, pool_labels, test, test_labels, num_classes,
                                     image_size, (0.0,) * 3, (1.0,) * 3, workers)
        statistics = unnormalised.pool_statistics()
    mean, std = statistics
    return StreamingData(name, pool, pool_labels, test, test_labels, num_classes, image_size,
                         mean, std, workers)


def _class_names(path):
    classes = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
    if len(classes) < 2:
        raise ValueError(f"image folder {path!r} needs at least 2 class subfolders, "
                         f"found {classes}")
    return classes


def _list_folder(path, classes):
    """The image files of ``path/CLASS/`` for each class, sorted, and their labels."""
    files, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(path, name)
        if not os.path.isdir(class_dir):
            raise ValueError(f"{path!r} has no subfolder for class {name!r}")
        names = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise ValueError(f"class folder {class_dir!r} holds no images "
                             f"(looked for {', '.join(IMAGE_SUFFIXES)})")
        files += [os.path.join(class_dir, f) for f in names]
        labels += [label] * len(names)
    return files, torch.tensor(labels, dtype=torch.int64)


def load_torchvision(name, root, image_size=32, statistics=None, workers=0):
    """A torchvision data set class by name (e.g. ``CIFAR10``), already downloaded to
    ``root``; its train split is the pool and its test split the test set. Its images are
    read through the data set object (in the workers); its labels from ``targets`` or
    ``_labels`` where it has them, else by reading every item once."""
    try:
        import torchvision
    except ImportError as error:
        raise ValueError(f"--data {name!r} is neither 'digits' nor an existing folder, and "
                         f"torchvision (needed for named data sets) does not import") from error
    dataset_class = getattr(torchvision.datasets, name, None)
    if dataset_class is None:
        raise ValueError(f"--data {name!r} is neither 'digits', an existing folder, nor a "
                         f"torchvision.datasets class")
    if root is None:
        raise ValueError(f"--data {name} needs --data-root, the folder it was downloaded to")
    splits = []
    for train in (True, False):
        try:
            dataset = dataset_class(root, train=train, download=False)
        except TypeError:
            dataset = dataset_class(root, split="train" if train else "test", download=False)
        splits.append((DatasetImages(dataset), _labels_of(dataset)))
    (pool, pool_labels), (test, test_labels) = splits
    num_classes = int(max(pool_labels.max(), test_labels.max())) + 1
    return _streaming(name, pool, pool_labels, test, test_labels, num_classes, image_size,
                      statistics, workers)


def _labels_of(dataset):
    for attribute in ("targets", "_labels"):
        labels = getattr(dataset, attribute, None)
        if labels is not None and len(labels) == len(dataset):
            return torch.as_tensor([int(label) for label in labels], dtype=torch.int64)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.int64)
