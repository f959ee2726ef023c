"""The domain-shift scenario: the same ten digits, in a new domain (MNIST-M style).

Source: scikit-learn's 8x8 digits, grey, all ten classes, all labelled. Target: other
images of the same ten digits, each blended over a random crop of the colour photographs
bundled with scikit-learn (``load_sample_images``, no download) as in MNIST-M (Ganin et
al. 2015): ``|photo - digit|`` per colour channel. The digits are split in two fixed,
stratified halves, one per domain, so that no target test digit is a source image
in another colour; the target half is split again into the training pool (few labels
per seed, all of it unlabelled) and the test split.
"""
import torch
import torch.nn.functional as F

from l2t_fast.data import TransferData, stratified_mask

# Side, in photograph pixels, of the square crop behind each digit: large enough to hold
# some texture once shrunk to the image size (the photographs are 427 x 640).
PHOTO_CROP = 64
DOMAIN_SEED = 0  # fixes the split and every crop


def photographs():
    """scikit-learn's sample photographs as ``[3, H, W]`` float tensors in [0, 1]."""
    from sklearn.datasets import load_sample_images

    return [torch.tensor(image, dtype=torch.float32).permute(2, 0, 1) / 255.0
            for image in load_sample_images().images]


def random_crops(photos, count, image_size, generator):
    """``count`` random ``PHOTO_CROP``-pixel squares of random ``photos``, each resized to
    ``image_size``: ``[count, 3, image_size, image_size]`` in [0, 1]."""
    which = torch.randint(len(photos), (count,), generator=generator).tolist()
    corners = torch.rand(count, 2, generator=generator).tolist()
    crops = []
    for index, (u, v) in zip(which, corners):
        photo = photos[index]
        top = int(u * (photo.shape[1] - PHOTO_CROP + 1))
        left = int(v * (photo.shape[2] - PHOTO_CROP + 1))
        crops.append(photo[:, top:top + PHOTO_CROP, left:left + PHOTO_CROP])
    crops = F.interpolate(torch.stack(crops), size=(image_size, image_size), mode="bilinear",
                          align_corners=False, antialias=True)
    return crops.clamp(0, 1)


def blend(digits, backgrounds):
    """MNIST-M's blend: ``|background - digit|`` per channel (digits ``[N, 1, H, W]`` and
    backgrounds ``[N, 3, H, W]``, both in [0, 1])."""
    if digits.shape[0] != backgrounds.shape[0] or digits.shape[-2:] != backgrounds.shape[-2:]:
        raise ValueError(f"digits {tuple(digits.shape)} and backgrounds "
                         f"{tuple(backgrounds.shape)} must have the same count and size")
    return (backgrounds - digits).abs()


def _standardised(images):
    """Zero mean, unit standard deviation per channel (over the whole set)."""
    mean = images.mean(dim=(0, 2, 3), keepdim=True)
    std = images.std(dim=(0, 2, 3), keepdim=True)
    return (images - mean) / std


def load_domain(image_size=32, seed=DOMAIN_SEED, test_fraction=0.5):
    """The domain scenario at ``image_size``; ``seed`` fixes the split and the crops."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                           align_corners=False).clamp(0, 1)
    labels = torch.tensor(digits.target, dtype=torch.int64)

    in_target = stratified_mask(labels, 0.5, seed=seed)
    source_images = _standardised(images[~in_target]).repeat(1, 3, 1, 1)
    generator = torch.Generator().manual_seed(seed)
    target_digits, target_labels = images[in_target], labels[in_target]
    backgrounds = random_crops(photographs(), len(target_digits), image_size, generator)
    target_images = _standardised(blend(target_digits, backgrounds))

    test = stratified_mask(target_labels, test_fraction, seed=seed)
    return TransferData("digits-domain", target_images[~test], target_labels[~test],
                        target_images[test], target_labels[test], 10,
                        source_images, labels[~in_target], 10)
