"""Data for the transfer job.

Every data set gives a target training pool (from which each seed draws its few labelled
images per class; all of it serves as unlabelled target images), a fixed held-out target
test split, and, for the embedded scenarios only, a source task to pretrain the source
network on. The small embedded data sets are held in memory as tensors
(``TransferData``); image folders and torchvision data sets stream from disk through
DataLoader workers (``l2t_fast.data.streaming.StreamingData``), with the same methods. In
both, batch order and augmentation are a function of the ``torch.Generator`` the job
passes, which is what lets a resumed run reproduce an uninterrupted one.
"""
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

@dataclass
class TransferData:
    """A data set of the job, in memory. The job reads it only through the methods below,
    so that a data set that streams from disk (``StreamingData``) can stand in for it."""
    name: str
    pool_images: torch.Tensor  # [N, C, H, W] target images a seed may draw labels from
    pool_labels: torch.Tensor  # [N] int64 in [0, num_classes)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    source_images: torch.Tensor = None  # the source task, only where the data set has one
    source_labels: torch.Tensor = None
    num_source_classes: int = None

    @property
    def has_source_task(self):
        return self.source_images is not None

    def to(self, device):
        """The same data with every tensor on ``device``."""
        moved = {name: value.to(device) if isinstance(value, torch.Tensor) else value
                 for name, value in vars(self).items()}
        return TransferData(**moved)

    def example_input(self, count=2):
        """A few target images, to tell models' feature shapes."""
        return self.pool_images[:count]

    def labelled(self, indices):
        """The labelled training images ``indices`` of the pool: ``(images, labels)``."""
        return self.pool_images[indices], self.pool_labels[indices]

    def pool_batches(self, indices, batch_size=256):
        """The pool's images ``indices`` as ``(x, y)`` batches, not augmented."""
        images, labels = self.labelled(indices)
        return [(images[i:i + batch_size], labels[i:i + batch_size])
                for i in range(0, len(images), batch_size)]

    def labelled_batches(self, indices, batch_size, generator, shift):
        """One epoch of shuffled ``(x, y)`` batches of the pool's images ``indices``."""
        images, labels = self.labelled(indices)
        return batches(images, labels, batch_size, generator, shift)

    def random_source(self, count, generator, shift):
        """``count`` labelled source-task images drawn at random: ``(x, y)``."""
        index = torch.randint(len(self.source_images), (count,), generator=generator)
        index = index.to(self.source_images.device)
        return _shifted(self.source_images[index], shift, generator), self.source_labels[index]

    def random_unlabelled(self, count, generator, shift):
        """``count`` target training images drawn at random, without their labels."""
        index = torch.randint(len(self.pool_images), (count,), generator=generator)
        return _shifted(self.pool_images[index.to(self.pool_images.device)], shift, generator)

    def unlabelled_batches(self, sizes, generator, shift):
        """Batches of ``sizes`` target training images drawn at random, without labels,
        drawn lazily: each when it is asked for, so draws from a generator shared with
        ``random_source`` keep their order."""
        return (self.random_unlabelled(size, generator, shift) for size in sizes)

    def test_batches(self, batch_size=256):
        """The target test split as ``(x, y)`` batches."""
        return [(self.test_images[i:i + batch_size], self.test_labels[i:i + batch_size])
                for i in range(0, len(self.test_images), batch_size)]

    def probe_images(self, count):
        """The first ``count`` test images (what methods' outputs are measured on)."""
        return self.test_images[:count]


def _shifted(images, shift, generator):
    return random_shift(images, shift, generator) if shift else images


def offers(data, scenario):
    """What methods may need (``l2t_fast.methods.NEEDS``) that data ``data`` provides: every
    data set has unlabelled target images (its training pool); only the embedded scenarios
    have a source task, and only the domain scenario's source has the target's classes."""
    if data != "digits":
        return {"unlabelled"}
    if scenario == "domain":
        return {"unlabelled", "source_batches", "shared_labels"}
    return {"unlabelled", "source_batches"}


def load_data(data="digits", data_root=None, image_size=32, scenario="task", *,
              statistics=None, workers=0):
    """``digits`` (embedded, in memory; ``scenario`` picks which), or, streamed from disk,
    an image-folder path or a torchvision data set name: normalised with ``statistics``
    (``(mean, std)`` per channel, e.g. the source model's) or else the pool's own, and
    decoded by ``workers`` DataLoader processes ("auto": ``min(4, CPU count)``)."""
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if data == "digits":
        from l2t_fast.data.digits import load_scenario

        return load_scenario(scenario, image_size)
    from l2t_fast.data.folders import load_image_folder, load_torchvision

    if os.path.isdir(data):
        return load_image_folder(data, image_size, statistics=statistics, workers=workers)
    return load_torchvision(data, data_root, image_size, statistics=statistics,
                            workers=workers)


def stratified_mask(labels, fraction, seed):
    """Boolean mask picking ``round(fraction * count)`` samples of each class, at random."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        chosen = members[torch.randperm(len(members), generator=generator)]
        mask[chosen[:round(fraction * len(members))]] = True
    return mask


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


def batch_spans(count, batch_size):
    """``(start, stop)`` of an epoch's batches of ``count`` shuffled images; a last batch
    of one image is dropped (BatchNorm cannot train on it)."""
    spans = [(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    return [(start, stop) for start, stop in spans if stop - start >= 2]


def batches(images, labels, batch_size, generator, shift=0):
    """One epoch of shuffled batches; with ``shift`` > 0 each image is translated by up to
    ``shift`` pixels (edge-replicated), the only augmentation, drawn from ``generator``.
    A last batch of one image is dropped (BatchNorm cannot train on it)."""
    order = torch.randperm(len(images), generator=generator)
    for start, stop in batch_spans(len(order), batch_size):
        index = order[start:stop]
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
