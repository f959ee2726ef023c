"""All-pairs minibatch CKA of two 4-stage ResNets over the same data: ``MinibatchCKA`` (one
Gram matrix per layer and batch, from the extension's ``gram`` kernel, every pair's terms
from two products) against the straightforward per-pair implementation that the public CKA
packages follow (each pair's Gram matrices and HSIC terms recomputed), on the same
features, in one run.

    nice -n 10 python -m pytest benchmarks/bench_cka.py --benchmark-only

Both take the same feature batches (the networks' forward passes, which both would share,
are done once beforehand and not timed) and must agree to 1e-6. The summary at the end
prints each config's speed-up ("x eager": per-pair time / ours).
"""
import pytest
import torch
from torch import nn

from l2t_fast.analysis import MinibatchCKA
from l2t_fast.models import BasicBlock
from l2t_fast.models.hooks import FeatureHooks
from memory import peak_memory_growth

BATCHES, BATCH_SIZE, IMAGE_SIZE = 2, 64, 32
WIDTHS, BLOCKS = (16, 32, 64, 128), 2


class FourStageResNet(nn.Module):
    """A CIFAR-style ResNet with four stages of two basic blocks (ResNet-18's layout)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, WIDTHS[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(WIDTHS[0]), nn.ReLU())
        channels = WIDTHS[0]
        for index, width in enumerate(WIDTHS):
            blocks = [BasicBlock(channels if b == 0 else width, width,
                                 1 if index == 0 or b else 2) for b in range(BLOCKS)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            channels = width

    def forward(self, x):
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


STAGES = [f"layer{i}" for i in range(1, 5)]
# name: the layers of each network whose every pair is compared
CONFIGS = {"stages-4x4": STAGES,
           "blocks-8x8": [f"layer{i}.{b}" for i in range(1, 5) for b in range(BLOCKS)]}


def feature_batches(layers):
    """``[(x_feats, y_feats)]``: both networks' features of the same random images."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    a, b = FourStageResNet().eval(), FourStageResNet().eval()
    batches = []
    with torch.no_grad(), FeatureHooks(a, layers) as hooks_a, FeatureHooks(b, layers) as hooks_b:
        for _ in range(BATCHES):
            images = torch.randn(BATCH_SIZE, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
            batches.append((hooks_a(images)[1], hooks_b(images)[1]))
    return batches


def all_pairs(batches):
    accumulator = MinibatchCKA(debiased=True)
    for x_feats, y_feats in batches:
        accumulator.update(x_feats, y_feats)
    return accumulator.compute()


def unbiased_hsic(k, l):
    """Song et al.'s unbiased HSIC of two Gram matrices, as the formula reads."""
    n = k.shape[0]
    k, l = k.clone(), l.clone()
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    ones = torch.ones(n, 1, dtype=k.dtype)
    value = (torch.trace(k @ l)
             + (ones.T @ k @ ones) * (ones.T @ l @ ones) / ((n - 1) * (n - 2))
             - 2 / (n - 2) * (ones.T @ k @ l @ ones))
    return value.item() / (n * (n - 3))


def per_pair(batches):
    """For every pair and batch: both Gram matrices, then HSIC(K, L), HSIC(K, K), HSIC(L, L)."""
    rows, columns = len(batches[0][0]), len(batches[0][1])
    cross, x_self, y_self = (torch.zeros(rows, columns, dtype=torch.float64) for _ in range(3))
    for x_feats, y_feats in batches:
        for i, x in enumerate(x_feats):
            for j, y in enumerate(y_feats):
                x_matrix, y_matrix = x.flatten(1).double(), y.flatten(1).double()
                k, l = x_matrix @ x_matrix.T, y_matrix @ y_matrix.T
                cross[i, j] += unbiased_hsic(k, l)
                x_self[i, j] += unbiased_hsic(k, k)
                y_self[i, j] += unbiased_hsic(l, l)
    return cross / (x_self * y_self).sqrt()


IMPLEMENTATIONS = {"reference": per_pair, "all-pairs": all_pairs}


@pytest.fixture(scope="module", params=list(CONFIGS))
def config(request):
    batches = feature_batches(CONFIGS[request.param])
    return request.param, batches, per_pair(batches)


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_all_pairs_cka(benchmark, config, implementation):
    name, batches, expected = config
    fn = IMPLEMENTATIONS[implementation]
    result = expected if implementation == "reference" else fn(batches)
    assert (result - expected).abs().max().item() < 1e-6
    benchmark.extra_info["max_abs_difference"] = (result - expected).abs().max().item()
    benchmark.extra_info["config"] = name
    benchmark.extra_info["kernel"] = f"cka/{name}"  # history.csv: one series per config
    benchmark.extra_info["implementation"] = implementation
    benchmark.extra_info["pairs"] = result.numel()
    benchmark.extra_info["peak_bytes"] = peak_memory_growth(lambda: fn(batches),
                                                            torch.device("cpu"))
    benchmark.pedantic(fn, args=(batches,), rounds=7, iterations=1, warmup_rounds=1)
