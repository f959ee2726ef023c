"""Data for the transfer job, held in memory as tensors.

Every data set becomes one ``TransferData``: a target training pool (from which each seed
draws its few labelled images per class), a fixed held-out target test split, and, for the
embedded default only, a source task to pretrain the source network on. Keeping the small
data sets as tensors makes batch order and augmentation a function of one
``torch.Generator``, which is what lets a resumed run reproduce an uninterrupted one.
"""
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
DIGITS_SOURCE_CLASSES = (0, 1, 2, 3, 4)
DIGITS_TARGET_CLASSES = (5, 6, 7, 8, 9)


@dataclass
class TransferData:
    name: str
    pool_images: torch.Tensor  # [N, C, H, W] target images a seed may draw labels from
    pool_labels: torch.Tensor  # [N] int64 in [0, num_classes)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    source_images: torch.Tensor = None  # the source task, only where the data set has one
    source_labels: torch.Tensor = None
    num_source_classes: int = None


def load_data(data="digits", data_root=None, image_size=32):
    """``digits`` (embedded), an image-folder path, or a torchvision data set name."""
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if data == "digits":
        return load_digits(image_size)
    if os.path.isdir(data):
        return load_image_folder(data, image_size)
    return load_torchvision(data, data_root, image_size)


def load_digits(image_size=32, test_fraction=0.5):
    """scikit-learn's 8x8 digits: digits 0-4 are the source task, 5-9 the target task.

    Half of each target class (a fixed split) is the test set; the rest is the pool the
    few labelled training images come from. Images are upsampled bilinearly to
    ``image_size`` and repeated to 3 channels so that any model fits them.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                           align_corners=False)
    images = ((images - images.mean()) / images.std()).repeat(1, 3, 1, 1)
    labels = torch.tensor(digits.target, dtype=torch.int64)

    source = torch.isin(labels, torch.tensor(DIGITS_SOURCE_CLASSES))
    target_images, target_labels = images[~source], labels[~source] - len(DIGITS_SOURCE_CLASSES)
    test = stratified_mask(target_labels, test_fraction, seed=0)
    return TransferData("digits", target_images[~test], target_labels[~test],
                        target_images[test], target_labels[test], len(DIGITS_TARGET_CLASSES),
                        images[source], labels[source], len(DIGITS_SOURCE_CLASSES))


def stratified_mask(labels, fraction, seed):
    """Boolean mask picking ``round(fraction * count)`` samples of each class, at random."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        chosen = members[torch.randperm(len(members), generator=generator)]
        mask[chosen[:round(fraction * len(members))]] = True
    return mask


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


def labelled_subset(labels, per_class, generator):
    """Indices of ``per_class`` random samples of every class (all of them if ``per_class``
    is 0); a class with fewer samples is an error, since the run would be mislabelled."""
    chosen = []
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        if per_class and len(members) < per_class:
            raise ValueError(f"labels_per_class={per_class} but class {int(label)} has only "
                             f"{len(members)} training images")
        order = members[torch.randperm(len(members), generator=generator)]
        chosen.append(order[:per_class] if per_class else order)
    return torch.cat(chosen)


def batches(images, labels, batch_size, generator, shift=0):
    """One epoch of shuffled batches; with ``shift`` > 0 each image is translated by up to
    ``shift`` pixels (edge-replicated), the only augmentation, drawn from ``generator``.
    A last batch of one image is dropped (BatchNorm cannot train on it)."""
    order = torch.randperm(len(images), generator=generator)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        if len(index) < 2:
            continue
        x = images[index]
        if shift:
            x = random_shift(x, shift, generator)
        yield x, labels[index]


def random_shift(images, shift, generator):
    """Translate each image by a random offset in [-shift, shift]^2, replicating edges."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + height, dx:dx + width]
                        for i, (dy, dx) in enumerate(offsets)])
