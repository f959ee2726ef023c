"""Data sets that stream from disk: image folders and torchvision data sets.

``StreamingData`` keeps a list of images (file paths, or a torchvision data set's indices)
and their labels, never the images: each batch is decoded and transformed by
``torch.utils.data.DataLoader`` worker processes (``workers``; 0: in this process), pinned
and copied without blocking on CUDA. It has the methods of the in-memory ``TransferData``
that the jobs read, so the job does not tell the two apart.

Randomness: each pass's batch order and a seed for the pass come from the caller's
``torch.Generator`` in this process, and every image's augmentation from a generator
seeded with (that seed, the image's position in the pass) wherever it is decoded; so a
pass is a function of the generator's state alone, whatever the worker count, and a run
resumed from a checkpointed generator continues exactly.
"""
import os

import torch

from l2t_fast.data import batch_spans
from l2t_fast.data.transforms import ImageTransform

SEED_RANGE = 2 ** 62


def resolve_workers(workers):
    """The number of DataLoader worker processes of the option ``workers``: an int, or
    "auto" for ``min(4, CPU count)``."""
    if workers == "auto":
        return min(4, os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be 'auto' or an int >= 0, got {workers!r}")
    return workers


class FileImages:
    """Images in files, opened with PIL when asked for."""

    def __init__(self, paths):
        self.paths = list(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            image.load()
            return image.convert("RGB")


class DatasetImages:
    """The images of a torchvision data set (its items are ``(image, label)``)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index][0]


class _Decoded(torch.utils.data.Dataset):
    """One split's images through ``transform``; an item is ``(index, seed)``."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        index, seed = key
        return self.transform(self.images[index], seed), self.labels[index]


class StreamingData:
    """A target data set read from disk batch by batch (see the module's docstring).

    ``pool`` and ``test`` are image lists (``FileImages`` or ``DatasetImages``) with int64
    label tensors; ``mean`` and ``std`` (3 numbers each) normalise every image.
    """
    has_source_task = False
    num_source_classes = None

    def __init__(self, name, pool, pool_labels, test, test_labels, num_classes, image_size,
                 mean, std, workers=0, device="cpu"):
        if len(pool) != len(pool_labels) or len(test) != len(test_labels):
            raise ValueError(f"{name}: {len(pool)} pool images but {len(pool_labels)} labels, "
                             f"{len(test)} test images but {len(test_labels)} labels")
        self.name, self.num_classes, self.image_size = name, num_classes, image_size
        self.pool_labels, self.test_labels = pool_labels, test_labels
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.workers, self.device = resolve_workers(workers), torch.device(device)
        train = ImageTransform(image_size, self.mean, self.std, train=True)
        evaluation = ImageTransform(image_size, self.mean, self.std, train=False)
        self._pool, self._test = pool, test
        self._train_set = _Decoded(pool, pool_labels, train)
        self._pool_set = _Decoded(pool, pool_labels, evaluation)
        self._test_set = _Decoded(test, test_labels, evaluation)

    def to(self, device):
        """The same data set, its batches delivered on ``device``."""
        return StreamingData(self.name, self._pool, self.pool_labels, self._test,
                             self.test_labels, self.num_classes, self.image_size, self.mean,
                             self.std, self.workers, device)

    def _stream(self, dataset, batches):
        """``(x, y)`` on the device for each list of keys in ``batches``, decoded by the
        workers, in order."""
        cuda = self.device.type == "cuda"
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches,
                                             num_workers=self.workers, pin_memory=cuda)
        for x, y in loader:
            yield (x.to(self.device, non_blocking=cuda), y.to(self.device, non_blocking=cuda))

    def _stacked(self, dataset, keys):
        """The images of ``keys`` decoded here, as one tensor on the device."""
        return torch.stack([dataset[key][0] for key in keys]).to(self.device)

    def _in_order(self, dataset, indices, batch_size):
        indices = [int(i) for i in indices]
        return self._stream(dataset, [[(i, None) for i in indices[start:start + batch_size]]
                                      for start in range(0, len(indices), batch_size)])

    def example_input(self, count=2):
        """A few target images (evaluation transform), to tell models' feature shapes."""
        return self._stacked(self._pool_set, [(i, None) for i in range(count)])

    def labelled_batches(self, indices, batch_size, generator, shift):
        """One epoch of shuffled, augmented ``(x, y)`` batches of the pool's images
        ``indices``; a last batch of one image is dropped (BatchNorm cannot train on it).
        ``shift`` is the embedded digits' augmentation; these images have their own."""
        indices = indices.cpu()
        order = torch.randperm(len(indices), generator=generator).tolist()
        seed = int(torch.randint(SEED_RANGE, (1,), generator=generator))
        plan = [[(int(indices[order[p]]), (seed, p)) for p in range(start, stop)]
                for start, stop in batch_spans(len(order), batch_size)]
        return self._stream(self._train_set, plan)

    def pool_batches(self, indices, batch_size=256):
        """The pool's images ``indices`` as ``(x, y)`` batches, not augmented."""
        return self._in_order(self._pool_set, indices.cpu(), batch_size)

    def unlabelled_batches(self, sizes, generator, shift):
        """Batches of ``sizes`` augmented pool images drawn at random, without labels,
        decoded by the workers. Every draw is made up front, as many as a draw per batch
        would make (this data has no source task to share the generator with)."""
        plan = []
        for size in sizes:
            index = torch.randint(len(self._pool), (size,), generator=generator).tolist()
            seed = int(torch.randint(SEED_RANGE, (1,), generator=generator))
            plan.append([(i, (seed, k)) for k, i in enumerate(index)])
        return (x for x, _ in self._stream(self._train_set, plan))

    def random_source(self, count, generator, shift):
        raise ValueError(f"data {self.name!r} has no source task")

    def test_batches(self, batch_size=256):
        """The target test split as ``(x, y)`` batches (evaluation transform)."""
        return self._in_order(self._test_set, range(len(self._test)), batch_size)

    def probe_images(self, count):
        """The first ``count`` test images (what methods' outputs are measured on)."""
        count = min(count, len(self._test))
        return torch.cat([x for x, _ in self._in_order(self._test_set, range(count), 256)])

    def in_memory(self):
        """The data set as an in-memory ``TransferData`` of its pool and test images under
        the evaluation transform, for ``l2t-fast analyze``, whose measurements take whole
        tensors; it holds every image, so it is for data sets that fit."""
        from l2t_fast.data import TransferData

        pool = torch.cat([x for x, _ in self.pool_batches(torch.arange(len(self._pool)))])
        test = torch.cat([x for x, _ in self.test_batches()])
        return TransferData(self.name, pool.cpu(), self.pool_labels, test.cpu(),
                            self.test_labels, self.num_classes)

    def pool_statistics(self):
        """Per-channel mean and standard deviation of the pool's pixels under the
        evaluation transform (one pass, in float64 so that order does not matter much)."""
        raw = StreamingData(self.name, self._pool, self.pool_labels, self._test,
                            self.test_labels, self.num_classes, self.image_size,
                            (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), self.workers)
        total = torch.zeros(3, dtype=torch.float64)
        squares = torch.zeros(3, dtype=torch.float64)
        count = 0
        for x, _ in raw.pool_batches(torch.arange(len(self._pool))):
            x = x.double()
            total += x.sum(dim=(0, 2, 3))
            squares += (x * x).sum(dim=(0, 2, 3))
            count += x.shape[0] * x.shape[2] * x.shape[3]
        mean = total / count
        variance = (squares - count * mean * mean) / max(count - 1, 1)
        return mean.tolist(), variance.clamp_min(1e-12).sqrt().clamp_min(1e-6).tolist()
