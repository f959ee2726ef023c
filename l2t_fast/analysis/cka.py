"""Linear centered kernel alignment (CKA) of feature matrices, one pair or all pairs.

CKA (Kornblith et al., ICML 2019) compares two representations of the same ``n`` samples
through their Gram matrices ``K = X X^T`` and ``L = Y Y^T``:

    CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

with the biased HSIC ``tr(H K H L) / (n - 1)^2`` (``H`` the centering matrix), or, with
``debiased=True``, the unbiased HSIC of Song et al. (2012):

    [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3))

where ``K~`` is ``K`` with a zero diagonal (undefined for ``n < 4``). Over a data loader,
``MinibatchCKA`` averages each HSIC over batches before the ratio (Nguyen et al., ICLR
2021), for every (x layer, y layer) pair at once.

Why all pairs are cheap: every HSIC above is a function of three summaries of each Gram
matrix alone, its flattened (centered or zero-diagonal) entries, its row sums and its total,
because ``tr(K~ L~)`` is the dot product of the flattened matrices (both are symmetric) and
``1^T K~ L~ 1`` is the dot product of the row sums. So each layer's Gram matrix is computed
once per batch, and the cross terms of all pairs are one matrix product of the stacked
summaries. Everything is accumulated in float64.

On CPU the Gram matrices come from the extension's ``gram`` kernel (csrc/gram_cpu.cpp):
float32 features read as they are, one triangle computed, float64 products and sums.
"""
import math

import torch
from torch import Tensor

from l2t_fast.matching.backends import compiled


def _check_features(features, name):
    """``features`` must be a floating-point ``[n, ...]`` tensor (maps are flattened)."""
    if not isinstance(features, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() < 2:
        raise ValueError(f"{name} must be [n, ...] with at least 2 dimensions, got shape "
                         f"{tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {features.dtype}")


# An extension built before the kernel existed has no gram op: it keeps working.
_HAS_GRAM_KERNEL = compiled.load_problem() is None and hasattr(torch.ops.l2t_fast, "gram")
if _HAS_GRAM_KERNEL:
    @torch.library.register_fake("l2t_fast::gram")
    def _fake_gram(features):
        return features.new_empty((features.shape[0], features.shape[0]), dtype=torch.float64)


def _gram(features, workspace):
    """The float64 Gram matrix ``X X^T`` of one layer's features, flattened per sample."""
    flat = features.detach().flatten(1)
    if (flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64)
            and _HAS_GRAM_KERNEL):
        return torch.ops.l2t_fast.gram(flat)
    matrix = workspace.matrix(flat)
    return matrix @ matrix.T


class _Float64Workspace:
    """Where each layer's features become a float64 ``[n, d]`` matrix, one layer at a time,
    where the ``gram`` kernel does not run (GPU tensors, half precision, no extension).

    One buffer, reused for every layer and batch: a fresh float64 copy per layer costs as
    much as its Gram matrix (the page faults of a new multi-megabyte allocation), and
    converting every layer first would hold all of them at once."""

    def __init__(self):
        self._buffer = None

    def matrix(self, flat):
        if flat.dtype == torch.float64:
            return flat
        if (self._buffer is None or self._buffer.numel() < flat.numel()
                or self._buffer.device != flat.device):
            self._buffer = torch.empty(flat.numel(), dtype=torch.float64, device=flat.device)
        return self._buffer[:flat.numel()].view(flat.shape).copy_(flat)


def _min_samples(debiased):
    return 4 if debiased else 2


def _check_samples(n, debiased, where):
    if n < _min_samples(debiased):
        estimator = ("the debiased (unbiased-HSIC) estimator divides by n (n - 3)"
                     if debiased else "centering leaves nothing of a single sample")
        raise ValueError(f"{where} has {n} samples: CKA needs at least "
                         f"{_min_samples(debiased)} ({estimator})")


class _GramSummaries:
    """What every HSIC needs of one layer's Gram matrices, stacked over layers: the
    flattened matrices ``[layers, n*n]``, their row sums ``[layers, n]`` and totals."""

    def __init__(self, features, debiased, workspace):
        n = features[0].shape[0]
        grams = torch.stack([_gram(x, workspace) for x in features])
        if debiased:
            grams.diagonal(dim1=1, dim2=2).zero_()
        else:  # H K H
            grams = grams - grams.mean(1, keepdim=True)
            grams = grams - grams.mean(2, keepdim=True)
        self.flat = grams.reshape(len(features), n * n)
        self.row_sums = grams.sum(2)
        self.totals = self.row_sums.sum(1)
        self.n, self.debiased = n, debiased

    def hsic(self, other):
        """``[layers of self, layers of other]`` HSIC of every pair."""
        n = self.n
        trace = self.flat @ other.flat.T
        if not self.debiased:
            return trace / (n - 1) ** 2
        return (trace + torch.outer(self.totals, other.totals) / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * (self.row_sums @ other.row_sums.T)) / (n * (n - 3))

    def self_hsic(self):
        """``[layers]`` HSIC of each layer with itself."""
        n = self.n
        trace = (self.flat * self.flat).sum(1)
        if not self.debiased:
            return trace / (n - 1) ** 2
        return (trace + self.totals ** 2 / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * (self.row_sums * self.row_sums).sum(1)) / (n * (n - 3))


def _summaries(features, name, debiased, workspace, n=None):
    if isinstance(features, Tensor) or not isinstance(features, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors (one per layer), got "
                        f"{type(features).__name__}")
    if not features:
        raise ValueError(f"{name} is empty: give at least one layer's features")
    for i, f in enumerate(features):
        _check_features(f, f"{name}[{i}]")
        expected = features[0].shape[0] if n is None else n
        if f.shape[0] != expected:
            raise ValueError(f"{name}[{i}] has {f.shape[0]} samples, but the other "
                             f"features have {expected}: every layer must see the same "
                             f"samples")
    _check_samples(features[0].shape[0], debiased, name)
    return _GramSummaries(features, debiased, workspace)


class MinibatchCKA:
    """The CKA of every (x layer, y layer) pair over a stream of batches.

    ``update(x_feats, y_feats)`` takes one batch's features of the same samples (two lists
    of ``[n, ...]`` tensors, one per layer); ``compute()`` gives the ``[len(x_feats),
    len(y_feats)]`` float64 matrix of HSIC averaged over batches, normalised by the
    averaged self-HSICs (Nguyen et al. 2021; with one batch, plain ``cka``). A pair whose
    layer had no variance in any batch is NaN. Every batch needs at least 4 samples
    (``debiased``) or 2."""

    def __init__(self, debiased=True):
        self.debiased = debiased
        self.batches = 0
        self._cross = self._x_self = self._y_self = None
        self._workspace = _Float64Workspace()

    def update(self, x_feats, y_feats):
        x = _summaries(x_feats, "x_feats", self.debiased, self._workspace)
        y = _summaries(y_feats, "y_feats", self.debiased, self._workspace, n=x.n)
        cross, x_self, y_self = x.hsic(y), x.self_hsic(), y.self_hsic()
        if self._cross is None:
            self._cross, self._x_self, self._y_self = cross, x_self, y_self
        elif cross.shape != self._cross.shape:
            raise ValueError(f"batch {self.batches} has {tuple(cross.shape)} (x, y) layers, "
                             f"earlier batches {tuple(self._cross.shape)}")
        else:
            self._cross = self._cross + cross
            self._x_self = self._x_self + x_self
            self._y_self = self._y_self + y_self
        self.batches += 1

    def compute(self):
        if self._cross is None:
            raise ValueError("no batch was given: call update() first")
        scale = torch.outer(self._x_self, self._y_self).sqrt()
        return torch.where(scale > 0, self._cross / scale, torch.full_like(scale, math.nan))


def cka_matrix(x_feats, y_feats, debiased=False):
    """``[len(x_feats), len(y_feats)]`` CKA of every pair of layers on one batch."""
    accumulator = MinibatchCKA(debiased)
    accumulator.update(x_feats, y_feats)
    return accumulator.compute()


def cka(x, y, debiased=False):
    """Linear CKA of features ``x`` ``[n, ...]`` and ``y`` ``[n, ...]`` of the same ``n``
    samples (maps are flattened per sample), a float in [0, 1] (the debiased estimate may
    fall slightly outside). A ValueError if ``n`` differs, is too small (below 4 when
    ``debiased``: the unbiased HSIC is undefined there) or a side has no variance."""
    _check_features(x, "x")
    _check_features(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}: "
                         f"CKA compares features of the same samples")
    _check_samples(x.shape[0], debiased, "x")
    workspace = _Float64Workspace()
    xs, ys = (_GramSummaries([x], debiased, workspace),
              _GramSummaries([y], debiased, workspace))
    for name, summary in (("x", xs), ("y", ys)):
        if not summary.self_hsic()[0] > 0:
            raise ValueError(f"{name} has no variance across its samples (HSIC({name}, "
                             f"{name}) = {summary.self_hsic()[0].item():.3g}): CKA is "
                             f"undefined")
    return (xs.hsic(ys)[0, 0] / (xs.self_hsic()[0] * ys.self_hsic()[0]).sqrt()).item()


@torch.no_grad()
def cka_over_loader(model_x, model_y, loader, layers_x, layers_y, debiased=True,
                    device="cpu", progress=False):
    """The ``[len(layers_x), len(layers_y)]`` minibatch CKA of every pair of named layers
    of two models over ``loader`` (batches of images, or ``(images, labels)``), in one pass:
    both models run once per batch, in eval mode (their modes are restored)."""
    from tqdm.auto import tqdm

    from l2t_fast.models.hooks import FeatureHooks

    accumulator = MinibatchCKA(debiased)
    models = (model_x, model_y)
    flags = [[m.training for m in model.modules()] for model in models]
    for model in models:
        model.eval()
    try:
        with FeatureHooks(model_x, layers_x) as hooks_x, \
                FeatureHooks(model_y, layers_y) as hooks_y:
            for batch in tqdm(loader, desc="CKA", unit="batch", disable=not progress,
                              leave=False):
                images = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device)
                _, x_feats = hooks_x.run(model_x, images, stop_early=True)
                _, y_feats = hooks_y.run(model_y, images, stop_early=True)
                accumulator.update(x_feats, y_feats)
    finally:
        for model, model_flags in zip(models, flags):
            for module, flag in zip(model.modules(), model_flags):
                module.training = flag
    return accumulator.compute()
