"""The image transforms of the streaming data sets, in PIL and torch alone.

Training: the standard ImageNet-style augmentation, a random resized crop (a random part of
8% to 100% of the image's area, aspect ratio in [3/4, 4/3], resized to the image size) and a
horizontal flip half of the time. Evaluation: the central ``EVAL_CROP`` of the image, as a
resize of the shorter side to ``image_size / EVAL_CROP`` followed by a center crop of
``image_size`` does it. Both normalise each channel with the given mean and standard
deviation. The crop and the resize are one ``PIL.Image.resize`` with a box, so no pixels
are resampled twice.

Every random choice comes from a ``numpy`` generator seeded with what the caller passes
(the sampler's ``(epoch seed, position)``), so an image's augmentation does not depend on
which process decodes it or on anything decoded before it.
"""
import math

import numpy as np
import torch

EVAL_CROP = 0.875
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def random_crop_box(width, height, rng, scale=CROP_SCALE, ratio=CROP_RATIO):
    """``(left, top, right, bottom)`` of a random resized crop of a ``width x height`` image:
    up to ten tries at a random area and aspect ratio that fit, else the largest central
    crop whose ratio is within ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_crop_box(width, height, fraction=EVAL_CROP):
    """The central square of side ``fraction`` times the shorter side, as a float box."""
    side = fraction * min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


class ImageTransform:
    """PIL image -> normalised float tensor ``[3, size, size]``; ``train`` picks the
    augmentation. Picklable, so that DataLoader workers each hold a copy."""

    def __init__(self, image_size, mean, std, train):
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must be 3 numbers (std > 0), got {mean}, {std}")
        self.image_size, self.train = image_size, train
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image, seed=None):
        from PIL import Image

        image = as_rgb(image)
        width, height = image.size
        flip = False
        if self.train:
            rng = np.random.default_rng(seed)
            box = random_crop_box(width, height, rng)
            flip = bool(rng.random() < 0.5)
        else:
            box = center_crop_box(width, height)
        image = image.resize((self.image_size, self.image_size), Image.BILINEAR, box=box)
        pixels = to_tensor(image)
        if flip:
            pixels = pixels.flip(-1)
        return (pixels - self.mean) / self.std


def as_rgb(image):
    """A PIL RGB image of a PIL image or an array (as torchvision data sets give them)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    return image.convert("RGB")


def to_tensor(image):
    """PIL RGB image -> float tensor ``[3, H, W]`` in [0, 1]."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return pixels.permute(2, 0, 1).contiguous()
