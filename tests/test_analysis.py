"""l2t_fast.analysis against independent implementations written here, on random data and on
structured cases."""
import itertools
import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from l2t_fast.analysis import (MinibatchCKA, barrier, block_shuffle, cka, cka_matrix,
                              cka_over_loader, domain_distance, interpolation, loss_and_accuracy,
                              mistake_overlap, module_criticality, parameter_distance)

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
        if getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm", "gram"):
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


# ---- the gram kernel (csrc/gram_cpu.cpp) ----------------------------------------------------

needs_gram_kernel = pytest.mark.skipif(  # CI requires the extension: there it cannot skip
    not hasattr(torch.ops.l2t_fast, "gram")
    and os.environ.get("L2T_FAST_REQUIRE_EXTENSION") != "1", reason="compiled extension not built")


@needs_gram_kernel
@given(n=st.integers(1, 40), d=st.integers(0, 200), double=st.booleans(),
       transposed=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_gram_kernel_equals_float64_product(n, d, double, transposed, seed):
    """Both of its paths (tiles where d >= 2 n, dgemm below) and strided input, against the
    float64 product; float32 features are read as they are, so the products are exact."""
    x = random(d, n, seed=seed).T if transposed else random(n, d, seed=seed)
    x = x.double() if double else x
    expected = x.double() @ x.double().T
    result = torch.ops.l2t_fast.gram(x)
    assert result.dtype == torch.float64 and result.shape == (n, n)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)


@needs_gram_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_gram_kernel_splits_tiles_over_threads(threads):
    x = random(67, 2053, seed=5)  # rows and columns off the 4 x 4 tiles and 8 lanes
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = torch.ops.l2t_fast.gram(x)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(result, x.double() @ x.double().T, rtol=1e-12, atol=1e-10)
    assert torch.equal(result, result.T)


@needs_gram_kernel
def test_gram_kernel_passes_opcheck_and_refuses_bad_input():
    torch.library.opcheck(torch.ops.l2t_fast.gram.default, (random(6, 20),))
    with pytest.raises(RuntimeError, match=r"must be \[n, d\], got shape \[2, 3, 4\]"):
        torch.ops.l2t_fast.gram(random(2, 3, 4))
    with pytest.raises(RuntimeError, match="float32 or float64, got Half"):
        torch.ops.l2t_fast.gram(random(4, 8).half())


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


# ---- basins: distances, interpolation, criticality -------------------------------------------

def tiny_network(seed, classes=3):
    from l2t_fast.models import build_model

    torch.manual_seed(seed)
    return build_model("resnet8", classes).eval()


def tiny_data(count=24, classes=3, seed=0):
    return random(count, 3, 8, 8, seed=seed), torch.arange(count) % classes


def test_parameter_distance_per_module_and_total():
    a, b = tiny_network(0), tiny_network(1)
    result = parameter_distance(a, b)
    assert list(result["modules"]) == ["stem", "layer1", "layer2", "layer3", "fc"]
    for module, value in result["modules"].items():
        pa = torch.cat([p.flatten() for n, p in a.named_parameters() if n.startswith(module)])
        pb = torch.cat([p.flatten() for n, p in b.named_parameters() if n.startswith(module)])
        assert value == pytest.approx((pa.double() - pb.double()).norm().item(), rel=1e-12)
    everything = torch.cat([(p.double() - q.double()).flatten()
                            for p, q in zip(a.parameters(), b.parameters())])
    assert result["total"] == pytest.approx(everything.norm().item(), rel=1e-12)
    # buffers do not count
    b.layer1[0].bn1.running_mean.add_(5.0)
    assert parameter_distance(a, b)["total"] == result["total"]
    assert parameter_distance(a, a)["total"] == 0.0
    assert parameter_distance(a, b, modules=["layer2"])["modules"].keys() == {"layer2"}


def test_parameter_distance_refuses_two_architectures():
    with pytest.raises(ValueError, match=r"fc.weight is \(3, 64\) in a but \(4, 64\) in b"):
        parameter_distance(tiny_network(0), tiny_network(0, classes=4))
    from l2t_fast.models import build_model

    with pytest.raises(ValueError, match="not one architecture"):
        parameter_distance(tiny_network(0), build_model("resnet14", 3))
    with pytest.raises(ValueError, match="'layer9' is not a module"):
        parameter_distance(tiny_network(0), tiny_network(1), modules=["layer9"])


def test_barrier_is_the_largest_rise_above_the_chord():
    assert barrier([1.0, 3.0, 1.0]) == 2.0
    assert barrier([0.0, 2.0, 0.0, 0.0, 4.0]) == pytest.approx(2.0 - 1.0)
    assert barrier([2.0, 1.0, 0.0]) == 0.0
    assert barrier([1.0, 0.2, 0.3, 1.0]) == 0.0
    with pytest.raises(ValueError, match="at least 2 points"):
        barrier([1.0])


def averaged_network(a, b, t):
    """Independent: every floating tensor of the state mixed by hand, into a fresh network."""
    mixed = tiny_network(99)
    state_a, state_b = a.state_dict(), b.state_dict()
    mixed.load_state_dict({k: (1 - t) * v + t * state_b[k] if v.is_floating_point() else v
                           for k, v in state_a.items()})
    return mixed


def test_interpolation_moves_the_whole_state_batchnorm_statistics_included():
    a, b = tiny_network(0), tiny_network(1)
    with torch.no_grad():  # different BatchNorm statistics, so that they matter
        for module in b.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    data = tiny_data()
    result = interpolation(a, b, data, points=5)
    assert result["t"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for t, loss, accuracy in zip(result["t"], result["loss"], result["accuracy"]):
        expected = loss_and_accuracy(averaged_network(a, b, t), data)
        assert loss == pytest.approx(expected[0], rel=1e-6)
        assert accuracy == expected[1]
    assert result["loss_barrier"] == pytest.approx(barrier(result["loss"]))
    assert result["error_barrier"] == pytest.approx(barrier([1 - x for x in result["accuracy"]]))
    # mixing parameters alone would give another network
    params_only = averaged_network(a, b, 0.5)
    params_only.load_state_dict({**params_only.state_dict(), **{
        k: v for k, v in a.state_dict().items() if "running" in k}})
    assert loss_and_accuracy(params_only, data)[0] != pytest.approx(result["loss"][2], rel=1e-6)
    flat = interpolation(a, a, data, points=3)
    assert flat["loss_barrier"] == 0.0 and len(set(flat["loss"])) == 1


def test_interpolation_errors():
    with pytest.raises(ValueError, match="points must be an int >= 2"):
        interpolation(tiny_network(0), tiny_network(1), tiny_data(), points=1)
    with pytest.raises(ValueError, match="not one architecture"):
        interpolation(tiny_network(0), tiny_network(0, classes=4), tiny_data())


class Linear(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.head = torch.nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(x)


def test_module_criticality_against_a_hand_computed_grid():
    """A linear classifier whose rewound weights (zero) cannot classify: the grid's errors at
    a vanishing noise are those of the rewound classifiers, and the measure is the minimum of
    alpha^2 ||W_F - W_0||^2 / sigma^2 over the cells within epsilon."""
    points = random(40, 2, seed=3)
    labels = (points[:, 0] > 0).long()
    trained = Linear(torch.tensor([[-4.0, 0.0], [4.0, 0.0]]))
    initial = Linear(torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
    alphas, sigmas = [0.0, 0.5, 1.0], [1e-9, 1e-8]
    result = module_criticality(trained, initial, (points, labels), alphas=alphas,
                                sigmas=sigmas, epsilon=0.05)
    cell = result["modules"]["head"]
    assert result["base_error"] == 0.0
    expected_errors = []
    for alpha in alphas:
        weight = (1 - alpha) * initial.head.weight + alpha * trained.head.weight
        prediction = (points @ weight.detach().T).argmax(1)
        expected_errors.append((prediction != labels).float().mean().item())
    assert cell["error"][0] == pytest.approx(expected_errors)
    assert expected_errors[0] > 0.3 and expected_errors[2] == 0.0
    squared = (trained.head.weight - initial.head.weight).square().sum().item()
    assert cell["distance"] == pytest.approx(squared ** 0.5)
    scale = torch.cat([trained.head.weight.flatten(), trained.head.bias]).square().mean().sqrt()
    assert cell["sigma_scale"] == pytest.approx(scale.item())
    feasible = [alpha ** 2 * squared / (sigma * cell["sigma_scale"]) ** 2
                for row, sigma in zip(cell["error"], sigmas)
                for alpha, error in zip(alphas, row) if error <= 0.05]
    assert cell["criticality"] == pytest.approx(min(feasible))
    assert trained.head.weight[0, 0].item() == -4.0  # the network itself is untouched


def test_module_criticality_of_an_untrained_network_is_zero_and_noise_hurts():
    network = tiny_network(0)
    data = tiny_data(48)
    result = module_criticality(network, network, data, modules=["layer1", "fc"],
                                alphas=[1.0], sigmas=[1e-6, 50.0], draws=2)
    for module in ("layer1", "fc"):
        cell = result["modules"][module]
        assert cell["distance"] == 0.0 and cell["criticality"] == 0.0
        assert cell["error"][0][0] == pytest.approx(result["base_error"])
    with pytest.raises(ValueError, match=r"alphas must be numbers in \[0, 1\]"):
        module_criticality(network, network, data, alphas=[1.5])
    with pytest.raises(ValueError, match="sigmas must be numbers > 0"):
        module_criticality(network, network, data, sigmas=[0.0])


# ---- reuse: block shuffle, common mistakes, domain distance ---------------------------------

def test_block_shuffle_moves_whole_blocks_by_one_permutation():
    # each 2x2 block of a 6x4 image holds its own index; two images, two channels
    index = torch.arange(6).reshape(3, 2).repeat_interleave(2, 0).repeat_interleave(2, 1)
    images = torch.stack([index, index + 100]).float()[:, None].repeat(1, 2, 1, 1)
    shuffled = block_shuffle(images, 2, seed=4)
    blocks = shuffled.reshape(2, 2, 3, 2, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(2, 2, 6, 4)
    assert (blocks == blocks[..., :1]).all()  # every block stays whole
    order = blocks[0, 0, :, 0].long()
    assert sorted(order.tolist()) == list(range(6)) and order.tolist() != list(range(6))
    assert (blocks[1, 0, :, 0] == order + 100).all() and (blocks[:, 1] == blocks[:, 0]).all()
    assert torch.equal(block_shuffle(images, 2, seed=4), shuffled)
    assert torch.equal(block_shuffle(images[..., :4, :], 4), images[..., :4, :])  # one block
    pixels = block_shuffle(images, 1)
    assert torch.equal(pixels.flatten(2).sort(2).values, images.flatten(2).sort(2).values)
    with pytest.raises(ValueError, match="dividing the image size 6x4"):
        block_shuffle(images, 4)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        block_shuffle(images[0], 2)


class FixedPredictions(torch.nn.Module):
    """Predicts ``predictions[i]`` for the sample whose single feature is ``i``."""

    def __init__(self, predictions):
        super().__init__()
        self.register_buffer("logits", torch.nn.functional.one_hot(torch.tensor(predictions), 3)
                             .float())

    def forward(self, x):
        return self.logits[x[:, 0].long()]


def test_mistake_overlap_counts_common_mistakes():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    x = torch.arange(6.0)[:, None]
    a = FixedPredictions([0, 1, 2, 1, 1, 0])   # wrong on 3, 5
    b = FixedPredictions([1, 1, 2, 1, 1, 2])   # wrong on 0, 3
    c = FixedPredictions([0, 1, 2, 0, 1, 2])   # never wrong
    result = mistake_overlap({"a": a, "b": b, "c": c}, [(x[:4], labels[:4]), (x[4:], labels[4:])])
    assert result["models"] == ["a", "b", "c"] and result["samples"] == 6
    assert result["error"] == pytest.approx([2 / 6, 2 / 6, 0.0])
    assert result["both_wrong"][0][1] == pytest.approx(1 / 6)
    assert result["overlap"][0][1] == pytest.approx(1 / 3)   # {3} of {0, 3, 5}
    assert result["overlap"][0][0] == 1.0 and result["overlap"][2][2] is None
    assert result["overlap"][0][2] == 0.0
    assert mistake_overlap([a, b], (x, labels))["models"] == ["0", "1"]
    with pytest.raises(ValueError, match="at least 2 networks"):
        mistake_overlap([a], (x, labels))


def test_domain_distance_tells_apart_far_domains_not_alike_ones():
    near = domain_distance(random(300, 5, seed=1), random(300, 5, seed=2))
    far = domain_distance(random(300, 5, seed=1), random(300, 5, seed=2) + 3.0)
    assert abs(near["distance"]) < 0.4 and far["distance"] > 1.9
    assert far["distance"] == pytest.approx(2 * (1 - 2 * far["error"]))
    maps = domain_distance(random(20, 2, 3, 3, seed=1), random(20, 2, 3, 3, seed=2) + 5)
    assert maps["distance"] == 2.0
    with pytest.raises(ValueError, match="source_feats has 5 features per sample, target_feats 4"):
        domain_distance(random(10, 5), random(10, 4))
    with pytest.raises(ValueError, match="source_feats has 3 samples"):
        domain_distance(random(3, 5), random(10, 5))


# ---- the command: l2t-fast analyze on a tiny config -----------------------------------------

TINY_JOB = {"image_size": 8, "source_model": "resnet8", "target_model": "resnet8",
            "source_epochs": 1, "epochs": 1, "labels_per_class": 2, "device": "cpu"}
TINY_ANALYSIS = {"analysis_images": 32, "cka_batch_size": 16, "interpolation_points": 3,
                 "criticality_alphas": [0.0, 1.0], "criticality_sigmas": [0.1],
                 "block_sizes": [8, 4]}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    from l2t_fast.jobs.analyze import run_analysis

    folder = tmp_path_factory.mktemp("analysis")
    config = {**TINY_JOB, **TINY_ANALYSIS, "cache_dir": str(folder / "cache")}
    return folder, run_analysis(config, output_dir=folder, progress=False)


def test_analyze_runs_the_job_and_every_analysis(analysed):
    folder, results = analysed
    assert (folder / "analysis.png").stat().st_size > 0
    assert (folder / "transfer" / "results.json").is_file()
    import json

    written = json.loads((folder / "analysis.json").read_text())
    assert written["skipped"] == {} and results["skipped"] == {}
    assert set(written) >= {"cka", "distance", "interpolation", "criticality", "block_shuffle",
                            "mistakes", "domain"}
    assert written["networks"] == {"scratch": [0, 1], "finetune": [0, 1], "l2t-ww": [0, 1]}
    layers = ["layer1", "layer2", "layer3"]
    cka_result = written["cka"]
    assert cka_result["rows"] == layers and cka_result["columns"] == layers
    assert np.array(cka_result["source_vs"]["scratch"]).shape == (3, 3)
    assert np.array(cka_result["where_weights"]).shape == (3, 3)
    assert set(cka_result["spearman_with_where_weights"]) == {"scratch", "l2t-ww"}
    groups = written["distance"]["groups"]
    assert set(groups) == {"finetune-finetune", "scratch-scratch", "finetune-scratch",
                           "finetune-initial", "scratch-initial"}
    assert len(groups["finetune-scratch"]) == 4 and len(groups["scratch-scratch"]) == 1
    curves = written["interpolation"]["curves"]
    assert set(curves) == {"finetune-finetune", "scratch-scratch", "finetune-scratch"}
    assert all(len(curve["loss"]) == 3 for curve in curves.values())
    assert set(written["criticality"]) == {"finetune", "scratch"}
    cell = written["criticality"]["finetune"]["modules"]["layer1"]
    assert np.array(cell["error"]).shape == (1, 2)
    shuffle = written["block_shuffle"]
    assert shuffle["block_sizes"] == [8, 4] and len(shuffle["gain"]) == 2
    assert (folder / "block_shuffle" / "block4-seed1" / "models" / "scratch-seed1.pt").is_file()
    assert written["mistakes"]["models"] == ["scratch/0", "scratch/1", "finetune/0",
                                             "finetune/1", "l2t-ww/0", "l2t-ww/1"]
    assert written["domain"]["features"] == ["pixels"] + layers


def test_the_unshuffled_block_run_is_the_jobs_own_run(analysed):
    """Block size = image size shuffles nothing, so that run repeats the job's."""
    folder, results = analysed
    import json

    job = json.loads((folder / "transfer" / "results.json").read_text())
    accuracy = {(r["method"], r["seed"]): r["test_accuracy"] for r in job["runs"]}
    expected = [np.mean([accuracy[method, s] for s in (0, 1)]) for method in ("finetune",)]
    assert results["block_shuffle"]["accuracy"]["finetune"][0] == pytest.approx(expected[0])


def test_the_initial_networks_are_those_the_job_started_from(tmp_path):
    """With a vanishing learning rate the trained parameters stay the initial ones: the
    rebuilt initial networks must equal them (a wrong seed or order would differ at once)."""
    from l2t_fast.data import load_data
    from l2t_fast.jobs import runs
    from l2t_fast.jobs.analyze import initial_network
    from l2t_fast.jobs.transfer import run_transfer

    config = {**TINY_JOB, "methods": ["scratch", "finetune"], "seeds": [3], "lr": 1e-12,
              "momentum": 0.0, "weight_decay": 0.0, "cache_dir": str(tmp_path / "cache")}
    results = run_transfer(config, output_dir=tmp_path / "job", progress=False)
    data = load_data("digits", None, 8, "task")
    source = runs.load_source(tmp_path / "job")
    layers = ["layer1", "layer2", "layer3"]
    for method in ("scratch", "finetune"):
        trained = runs.load_model(tmp_path / "job", method, 3)
        initial = initial_network(results["config"], data, source, method, 3, layers, layers)
        for (name, p), q in zip(trained.named_parameters(), initial.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-8, msg=f"{method} {name}")
        other = initial_network(results["config"], data, source, method, 4, layers, layers)
        assert not torch.equal(other.fc.weight, initial.fc.weight)


def test_analyze_reads_a_job_folder_and_two_networks(analysed, tmp_path):
    from l2t_fast.jobs.analyze import run_analysis

    folder, _ = analysed
    again = run_analysis({"results": str(folder / "transfer"), "analyses": ["distance", "cka"],
                          **{k: TINY_ANALYSIS[k] for k in ("analysis_images", "cka_batch_size")}},
                         output_dir=tmp_path / "again", progress=False)
    assert set(again) & {"interpolation", "criticality", "block_shuffle"} == set()
    assert again["distance"]["mean_total"] == pytest.approx(analysed[1]["distance"]["mean_total"])
    np.testing.assert_allclose(again["cka"]["source_vs"]["scratch"],
                               analysed[1]["cka"]["source_vs"]["scratch"], rtol=1e-9)

    models = folder / "transfer" / "models"
    source_file = next((folder / "cache").glob("source-*.pt"))
    pair = run_analysis({"models": [str(models / "finetune-seed0.pt"),
                                    str(models / "scratch-seed1.pt")],
                         "image_size": 8, **TINY_ANALYSIS}, output_dir=tmp_path / "pair",
                        progress=False)
    assert set(pair) >= {"cka", "distance", "interpolation", "mistakes"}
    assert set(pair["skipped"]) == {"criticality", "block_shuffle", "domain"}
    assert pair["distance"]["total"] == pytest.approx(
        analysed[1]["distance"]["groups"]["finetune-scratch"][1]["total"])
    assert (tmp_path / "pair" / "analysis.png").is_file()
    mixed = run_analysis({"models": ["resnet14", f"resnet8={source_file}"], "image_size": 8,
                          "analyses": ["cka", "distance"], "analysis_images": 16},
                         output_dir=tmp_path / "mixed", progress=False)
    assert np.array(mixed["cka"]["matrix"]).shape == (3, 3)
    assert "distance" in mixed["skipped"]


@pytest.mark.parametrize("argv, message", [
    (["--models", "resnet8"], "models must name exactly 2 networks"),
    (["--results", "x", "--epochs", "3"], "with results the job's own config is used"),
    (["--models", "a", "b", "--results", "x"], "models or results, not both"),
    (["--analyses", "cka", "colour"], "'colour' is not one of cka"),
    (["--criticality-alphas", "2"],
     "--criticality-alphas: '2' is not a finite number >= 0 and <= 1"),
])
def test_analyze_refuses_bad_options(argv, message, capsys, tmp_path):
    from l2t_fast import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["analyze", "--output-dir", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing made


def test_analyze_options_are_in_the_one_table():
    from l2t_fast.jobs import options

    rows = options.analyze_table()
    assert rows["seeds"].default == [0, 1] and options.table()["seeds"].default != [0, 1]
    assert set(options.table()) < set(rows)
    for option in options.ANALYZE_OPTIONS:
        assert rows[option.name] is option
