"""l2t_fast.analysis against independent implementations written here, on random data and on
structured cases."""
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from l2t_fast.analysis import MinibatchCKA, cka, cka_matrix, cka_over_loader

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- independent CKA: feature space (biased) and the U-statistic definition (unbiased) ----

def biased_cka_features(x, y):
    """Kornblith et al.'s feature-space form: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    x, y = x - x.mean(0), y - y.mean(0)
    return (np.linalg.norm(y.T @ x) ** 2
            / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def unbiased_hsic_ustatistic(k, l):
    """HSIC = E[k_ij l_ij] + E[k_ij] E[l_qr] - 2 E[k_ij l_iq], each expectation the mean over
    tuples of distinct indices (the U-statistic that Song et al.'s estimator equals)."""
    n = len(k)
    pairs = list(itertools.permutations(range(n), 2))
    triples = list(itertools.permutations(range(n), 3))
    quads = list(itertools.permutations(range(n), 4))
    first = np.mean([k[i, j] * l[i, j] for i, j in pairs])
    second = np.mean([k[i, j] * l[q, r] for i, j, q, r in quads])
    third = np.mean([k[i, j] * l[i, q] for i, j, q in triples])
    return first + second - 2 * third


def gram(x):
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return x @ x.T


def debiased_cka_ustatistic(x, y):
    k, l = gram(x), gram(y)
    return unbiased_hsic_ustatistic(k, l) / np.sqrt(
        unbiased_hsic_ustatistic(k, k) * unbiased_hsic_ustatistic(l, l))


def random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def orthogonal(d, seed):
    q, _ = torch.linalg.qr(random(d, d, seed=seed).double())
    return q


# ---- cka -----------------------------------------------------------------------------------

@given(n=st.integers(2, 12), dx=st.integers(1, 9), dy=st.integers(1, 9),
       seed=st.integers(0, 1000))
def test_biased_cka_equals_feature_space_form(n, dx, dy, seed):
    x, y = random(n, dx, seed=seed), random(n, dy, seed=seed + 1) + random(n, 1, seed=seed)
    expected = biased_cka_features(x, y)
    assert cka(x, y) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@given(n=st.integers(4, 7), dx=st.integers(1, 6), dy=st.integers(1, 6),
       seed=st.integers(0, 1000))
def test_debiased_cka_equals_u_statistic(n, dx, dy, seed):
    x = random(n, dx, seed=seed)
    y = random(n, dy, seed=seed + 1) + x[:, :1]
    k, l = gram(x), gram(y)
    if unbiased_hsic_ustatistic(k, k) <= 0 or unbiased_hsic_ustatistic(l, l) <= 0:
        return  # undefined ratio on this draw (possible for tiny n)
    assert cka(x, y, debiased=True) == pytest.approx(debiased_cka_ustatistic(x, y),
                                                     rel=1e-8, abs=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_of_features_with_themselves_is_one(debiased):
    x = random(20, 7)
    assert cka(x, x, debiased=debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling(debiased):
    x, y = random(30, 6, seed=1).double(), random(30, 5, seed=2).double()
    y = y + x[:, :5]
    base = cka(x, y, debiased=debiased)
    rotated = x @ orthogonal(6, seed=3)
    assert cka(rotated, y, debiased=debiased) == pytest.approx(base, abs=1e-10)
    assert cka(x, 7.5 * y, debiased=debiased) == pytest.approx(base, abs=1e-10)
    assert cka(0.01 * rotated, y @ orthogonal(5, seed=4),
               debiased=debiased) == pytest.approx(base, abs=1e-10)
    # not invariant to everything: an anisotropic scaling changes it
    stretched = x * torch.tensor([100.0, 1, 1, 1, 1, 1], dtype=torch.float64)
    assert abs(cka(stretched, y, debiased=debiased) - base) > 1e-3


def test_cka_flattens_maps_per_sample_and_accumulates_in_float64():
    maps = random(10, 3, 4, 4, seed=5)
    y = random(10, 8, seed=6)
    assert cka(maps, y) == cka(maps.flatten(1), y)
    # large offsets: float32 accumulation would lose the centred signal
    shifted = maps.flatten(1).double() + 1e4
    assert cka(shifted.float(), y) == pytest.approx(cka(maps, y), abs=1e-4)


def test_cka_errors_name_the_problem():
    with pytest.raises(ValueError, match="at least 4"):
        cka(random(3, 5), random(3, 5), debiased=True)
    with pytest.raises(ValueError, match="at least 2"):
        cka(random(1, 5), random(1, 5))
    with pytest.raises(ValueError, match="x has 5 samples but y has 6"):
        cka(random(5, 2), random(6, 2))
    with pytest.raises(ValueError, match="y has no variance"):
        cka(random(6, 2), torch.ones(6, 3))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        cka(np.zeros((5, 2)), random(5, 2))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        cka(random(5), random(5, 2))


# ---- all pairs over batches -----------------------------------------------------------------

def test_cka_matrix_is_the_cka_of_every_pair():
    xs = [random(12, 4, seed=s) for s in range(3)]
    ys = [random(12, 2, 3, 3, seed=10 + s) + xs[s % 3][:, :1, None, None] for s in range(2)]
    for debiased in (False, True):
        matrix = cka_matrix(xs, ys, debiased=debiased)
        assert matrix.shape == (3, 2) and matrix.dtype == torch.float64
        for i, j in itertools.product(range(3), range(2)):
            assert matrix[i, j].item() == pytest.approx(cka(xs[i], ys[j], debiased=debiased),
                                                        abs=1e-12)


def test_minibatch_cka_averages_unbiased_hsic_over_batches():
    batches = [([random(6, 3, seed=b), random(6, 4, seed=b + 20)], [random(6, 2, seed=b + 40)])
               for b in range(3)]
    accumulator = MinibatchCKA(debiased=True)
    for x_feats, y_feats in batches:
        accumulator.update(x_feats, y_feats)
    result = accumulator.compute()
    for i in range(2):
        cross = np.mean([unbiased_hsic_ustatistic(gram(x[i]), gram(y[0])) for x, y in batches])
        x_self = np.mean([unbiased_hsic_ustatistic(gram(x[i]), gram(x[i])) for x, _ in batches])
        y_self = np.mean([unbiased_hsic_ustatistic(gram(y[0]), gram(y[0])) for _, y in batches])
        assert result[i, 0].item() == pytest.approx(cross / np.sqrt(x_self * y_self), rel=1e-8)
    # not the mean of per-batch CKAs
    per_batch = np.mean([cka(x[0], y[0], debiased=True) for x, y in batches])
    assert abs(result[0, 0].item() - per_batch) > 1e-6


class _CountMatmuls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm"):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layers", [(2, 2), (5, 6)])
def test_all_pairs_need_one_gram_per_layer_not_per_pair(layers):
    """Per batch: a Gram product per layer and two products for all pairs' cross terms,
    where a per-pair implementation needs two Grams per pair."""
    xs = [random(8, 5, seed=s) for s in range(layers[0])]
    ys = [random(8, 3, seed=9 + s) for s in range(layers[1])]
    accumulator = MinibatchCKA()
    with _CountMatmuls() as counter:
        accumulator.update(xs, ys)
    assert counter.count == sum(layers) + 2


def test_minibatch_cka_errors():
    accumulator = MinibatchCKA()
    with pytest.raises(ValueError, match="no batch"):
        accumulator.compute()
    with pytest.raises(ValueError, match=r"y_feats\[1\] has 7 samples"):
        accumulator.update([random(8, 2)], [random(8, 2), random(7, 2)])
    with pytest.raises(ValueError, match="x_feats has 3 samples: CKA needs at least 4"):
        accumulator.update([random(3, 2)], [random(3, 2)])
    with pytest.raises(TypeError, match="list of tensors"):
        accumulator.update(random(8, 2), [random(8, 2)])
    accumulator.update([random(8, 2)], [random(8, 2)])
    with pytest.raises(ValueError, match="batch 1 has"):
        accumulator.update([random(8, 2), random(8, 2)], [random(8, 2)])


def test_minibatch_cka_marks_a_constant_layer_nan():
    result = cka_matrix([random(8, 3), torch.ones(8, 3)], [random(8, 2)])
    assert torch.isfinite(result[0, 0]) and torch.isnan(result[1, 0])


def test_cka_over_loader_runs_both_models_once_per_batch_and_restores_modes():
    from l2t_fast.models import build_model

    torch.manual_seed(0)
    a, b = build_model("resnet8", 3), build_model("resnet8", 4).train()
    a.eval()
    images = random(20, 3, 8, 8, seed=7)
    loader = [(images[i:i + 10], torch.zeros(10)) for i in (0, 10)]
    layers = ["layer1", "layer3"]
    result = cka_over_loader(a, b, loader, layers, ["layer2", "fc"])
    expected = MinibatchCKA()
    with torch.no_grad():
        b.eval()
        for x, _ in loader:
            features_a = [a.layer1(a.stem(x))]
            features_a.append(a.layer3(a.layer2(features_a[0])))
            features_b = [b.layer2(b.layer1(b.stem(x)))]
            features_b.append(b(x))
            expected.update(features_a, features_b)
        b.train()
    torch.testing.assert_close(result, expected.compute(), rtol=1e-10, atol=1e-12)
    assert not a.training and b.training and all(m.training for m in b.modules())
    # the same model on both sides, on its own layers: ones on the diagonal
    same = cka_over_loader(a, a, [images], layers, layers)
    torch.testing.assert_close(same.diagonal(), torch.ones(2, dtype=torch.float64))
