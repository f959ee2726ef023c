"""What the transfer reuses: low-level statistics or feature structure (block-shuffled
images), the same decisions (common mistakes), and how far apart the domains are (the
proxy A-distance), after Neyshabur, Sedghi and Zhang (NeurIPS 2020), sections 3 and 4.
"""
import torch
from torch import Tensor

from l2t_fast.analysis.basins import _batches


def block_shuffle(images, block, seed=0):
    """``images`` ``[N, C, H, W]`` cut into ``block`` x ``block`` squares that are put back
    in a random order, one permutation for every image of the call (drawn from ``seed``, so
    that a run shuffles its training and test images alike). ``block`` = H keeps the
    images; 1 shuffles pixels."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a [N, C, H, W] tensor, got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    n, channels, height, width = images.shape
    if not isinstance(block, int) or block < 1 or height % block or width % block:
        raise ValueError(f"block must be a positive int dividing the image size "
                         f"{height}x{width}, got {block!r}")
    rows, columns = height // block, width // block
    order = torch.randperm(rows * columns, generator=torch.Generator().manual_seed(seed))
    blocks = images.reshape(n, channels, rows, block, columns, block)
    blocks = blocks.permute(0, 1, 2, 4, 3, 5).reshape(n, channels, rows * columns, block, block)
    blocks = blocks[:, :, order.to(images.device)]
    blocks = blocks.reshape(n, channels, rows, columns, block, block).permute(0, 1, 2, 4, 3, 5)
    return blocks.reshape(n, channels, height, width)


@torch.no_grad()
def _mistakes(model, data):
    flags = [m.training for m in model.modules()]
    model.eval()
    try:
        return torch.cat([(model(x).argmax(1) != y).cpu() for x, y in _batches(data)])
    finally:
        for module, flag in zip(model.modules(), flags):
            module.training = flag


def mistake_overlap(models, data):
    """How often networks err on the same samples of ``data``. ``models``: a dict ``{name:
    network}`` or a list. Returns ``{"models", "samples", "error": [per model],
    "both_wrong": [i][j] fraction of samples both get wrong, "overlap": [i][j] both wrong
    over either wrong (None where neither errs)}``."""
    if isinstance(models, dict):
        names, networks = list(models), list(models.values())
    else:
        networks = list(models)
        names = [str(i) for i in range(len(networks))]
    if len(networks) < 2:
        raise ValueError(f"models must hold at least 2 networks, got {len(networks)}")
    wrong = torch.stack([_mistakes(network, data) for network in networks])
    samples = wrong.shape[1]
    if not samples:
        raise ValueError("data holds no samples")
    both = (wrong[:, None] & wrong[None]).sum(2)
    either = (wrong[:, None] | wrong[None]).sum(2)
    overlap = [[both[i, j].item() / either[i, j].item() if either[i, j] else None
                for j in range(len(names))] for i in range(len(names))]
    return {"models": names, "samples": samples,
            "error": (wrong.sum(1) / samples).tolist(),
            "both_wrong": (both / samples).tolist(), "overlap": overlap}


def domain_distance(source_feats, target_feats, seed=0):
    """The proxy A-distance ``2 (1 - 2 err)`` (Ben-David et al. 2007) between two sets of
    features ``[n, ...]`` (maps are flattened): ``err`` is the held-out error of a linear
    (logistic regression) classifier trained to tell them apart on a random half of each.
    Near 2: the domains are told apart at once; near 0 (or below): they look alike.
    Returns ``{"distance", "error"}``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sides = []
    for name, feats in (("source_feats", source_feats), ("target_feats", target_feats)):
        if not isinstance(feats, Tensor) or feats.dim() < 2:
            raise ValueError(f"{name} must be a [n, ...] tensor")
        if len(feats) < 4:
            raise ValueError(f"{name} has {len(feats)} samples: at least 4 are needed to "
                             f"train and test the domain classifier on halves")
        sides.append(feats.detach().flatten(1).double().cpu())
    if sides[0].shape[1] != sides[1].shape[1]:
        raise ValueError(f"source_feats has {sides[0].shape[1]} features per sample, "
                         f"target_feats {sides[1].shape[1]}")
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label, feats in enumerate(sides):
        order = torch.randperm(len(feats), generator=generator)
        half = len(feats) // 2
        train.append((feats[order[:half]], torch.full((half,), label)))
        test.append((feats[order[half:]], torch.full((len(feats) - half,), label)))
    x_train = torch.cat([x for x, _ in train]).numpy()
    y_train = torch.cat([y for _, y in train]).numpy()
    x_test = torch.cat([x for x, _ in test]).numpy()
    y_test = torch.cat([y for _, y in test]).numpy()
    scaler = StandardScaler().fit(x_train)
    classifier = LogisticRegression(max_iter=2000).fit(scaler.transform(x_train), y_train)
    error = float((classifier.predict(scaler.transform(x_test)) != y_test).mean())
    return {"distance": 2 * (1 - 2 * error), "error": error}
