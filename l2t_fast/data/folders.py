"""Real data sets: image folders and torchvision data sets, loaded into memory."""
import os

import numpy as np
import torch

from l2t_fast.data import IMAGE_SUFFIXES, TransferData, stratified_mask


def load_image_folder(path, image_size=32, test_fraction=0.5):
    """ImageFolder layout: ``path/CLASS/*.png``, or ``path/train/CLASS`` and ``path/test/CLASS``
    (or ``val``). Without a test folder, a fixed half of each class is held out as test.
    Images are loaded with PIL, converted to RGB, resized, and standardised per channel
    with the training pool's statistics."""
    split_dirs = [os.path.join(path, name) for name in ("test", "val")]
    test_dir = next((d for d in split_dirs if os.path.isdir(d)), None)
    if test_dir is not None and os.path.isdir(os.path.join(path, "train")):
        classes = _class_names(os.path.join(path, "train"))
        pool_images, pool_labels = _read_folder(os.path.join(path, "train"), classes, image_size)
        test_images, test_labels = _read_folder(test_dir, classes, image_size)
    else:
        classes = _class_names(path)
        images, labels = _read_folder(path, classes, image_size)
        test = stratified_mask(labels, test_fraction, seed=0)
        pool_images, pool_labels = images[~test], labels[~test]
        test_images, test_labels = images[test], labels[test]
    mean = pool_images.mean(dim=(0, 2, 3), keepdim=True)
    std = pool_images.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return TransferData(os.path.basename(os.path.normpath(path)), (pool_images - mean) / std,
                        pool_labels, (test_images - mean) / std, test_labels, len(classes))


def _class_names(path):
    classes = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
    if len(classes) < 2:
        raise ValueError(f"image folder {path!r} needs at least 2 class subfolders, "
                         f"found {classes}")
    return classes


def _read_folder(path, classes, image_size):
    from PIL import Image

    images, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(path, name)
        if not os.path.isdir(class_dir):
            raise ValueError(f"{path!r} has no subfolder for class {name!r}")
        files = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise ValueError(f"class folder {class_dir!r} holds no images "
                             f"(looked for {', '.join(IMAGE_SUFFIXES)})")
        for file in files:
            with Image.open(os.path.join(class_dir, file)) as image:
                images.append(_to_tensor(image, image_size))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _to_tensor(image, image_size):
    """PIL image (or array) -> float tensor [3, image_size, image_size] in [0, 1]."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    image = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def load_torchvision(name, root, image_size=32):
    """A torchvision data set class by name (e.g. ``CIFAR10``), already downloaded to
    ``root``; its train split is the pool and its test split the test set."""
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
        images = torch.stack([_to_tensor(image, image_size) for image, _ in dataset])
        labels = torch.tensor([int(label) for _, label in dataset], dtype=torch.int64)
        splits.append((images, labels))
    (pool_images, pool_labels), (test_images, test_labels) = splits
    mean = pool_images.mean(dim=(0, 2, 3), keepdim=True)
    std = pool_images.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    num_classes = int(max(pool_labels.max(), test_labels.max())) + 1
    return TransferData(name, (pool_images - mean) / std, pool_labels,
                        (test_images - mean) / std, test_labels, num_classes)
