"""Forward + backward of the weighted feature-matching loss: our backends against the
eager reference, torch.compile of it, and the loss as a user would write it in plain
PyTorch (``F.interpolate``, a 1x1 ``F.conv2d``, the weights; eager and compiled), on the
same inputs, in one run.

    python -m pytest benchmarks/bench_loss.py --benchmark-only
    python -m pytest benchmarks/bench_loss.py --benchmark-only -k gpu   # on a CUDA machine

Each case also records its peak memory growth (``extra_info["peak_bytes"]``); the
summary at the end of the run prints time and memory as ratios to the references.
"""
import pytest
import torch
import torch.nn.functional as F

import l2t_fast
from l2t_fast.matching.backends import reference as reference_backend
from memory import peak_memory_growth

# name: (device, dtype, batch, source (C, H), target (C, H), pairs = all)
CONFIGS = {
    # The paper's CIFAR-scale setting, on the CPU.
    "cifar": ("cpu", torch.float32, 64, [(16, 32), (32, 16), (64, 8)],
              [(64, 32), (128, 16), (256, 8), (512, 4)]),
    # ImageNet ResNet34 -> ResNet18 at 224x224, all 16 pairs of layer1..layer4.
    "gpu-resnet-fp32": ("cuda", torch.float32, 64, [(64, 56), (128, 28), (256, 14), (512, 7)],
                        [(64, 56), (128, 28), (256, 14), (512, 7)]),
    "gpu-resnet-bf16": ("cuda", torch.bfloat16, 64, [(64, 56), (128, 28), (256, 14), (512, 7)],
                        [(64, 56), (128, 28), (256, 14), (512, 7)]),
}
REFERENCES = ("reference", "reference-compiled", "conv2d", "conv2d-compiled")
OUR_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
CASES = [(config, implementation) for config, (device, *_) in CONFIGS.items()
         for implementation in REFERENCES + OUR_BACKENDS[device]]


def make_inputs(config):
    device, dtype, batch, source, target = CONFIGS[config]
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    pairs = [(m, n) for m in range(len(source)) for n in range(len(target))]
    source_feats = [rand(batch, c, h, h) for c, h in source]
    target_feats = [rand(batch, c, h, h).requires_grad_() for c, h in target]
    weight = [(rand(source[m][0], target[n][0]) * target[n][0] ** -0.5).requires_grad_()
              for m, n in pairs]
    bias = [rand(source[m][0]).requires_grad_() for m, _ in pairs]
    channel_weights = [torch.softmax(rand(batch, source[m][0]).float(), 1).to(dtype)
                       for m, _ in pairs]
    pair_weights = [torch.rand(batch, generator=generator).to(device=device, dtype=dtype)
                    for _ in pairs]
    return dict(source_feats=source_feats, target_feats=target_feats, pairs=pairs,
                weight=weight, bias=bias, channel_weights=channel_weights,
                pair_weights=pair_weights)


def reference_loss(source_feats, target_feats, pairs, weight, bias, channel_weights,
                   pair_weights, beta=0.5):
    """The reference backend's loss, as one function for torch.compile to take whole."""
    errors = reference_backend.channel_errors(source_feats, target_feats, weight, bias,
                                              [m for m, _ in pairs], [n for _, n in pairs])
    total, start = 0, 0
    for i, (m, _) in enumerate(pairs):
        width = source_feats[m].shape[1]
        per = (errors[:, start:start + width] * channel_weights[i]).sum(1) * pair_weights[i]
        total = total + beta * per.mean()
        start += width
    return total


def conv2d_loss(source_feats, target_feats, pairs, weight, bias, channel_weights,
                pair_weights, beta=0.5):
    """The loss as a user would write it: resize, project by a 1x1 convolution, weigh."""
    total = 0
    for i, (m, n) in enumerate(pairs):
        target = target_feats[n]
        source = source_feats[m]
        if source.shape[-2:] != target.shape[-2:]:
            source = F.interpolate(source, size=target.shape[-2:], mode="bilinear",
                                   align_corners=False)
        projection = F.conv2d(target, weight[i][:, :, None, None], bias[i])
        error = (source - projection).pow(2).mean(dim=(2, 3))
        total = total + beta * ((error * channel_weights[i]).sum(1) * pair_weights[i]).mean()
    return total


def loss_function(implementation):
    if implementation == "reference":
        return reference_loss
    if implementation == "reference-compiled":
        return torch.compile(reference_loss)
    if implementation == "conv2d":
        return conv2d_loss
    if implementation == "conv2d-compiled":
        return torch.compile(conv2d_loss)
    if implementation not in l2t_fast.available_backends():
        pytest.skip(f"backend {implementation!r} is not available here")
    return lambda **inputs: l2t_fast.weighted_feature_matching(**inputs, backend=implementation)


def forward_backward(fn, inputs):
    differentiable = inputs["target_feats"] + inputs["weight"] + inputs["bias"]
    loss = fn(**inputs)
    torch.autograd.grad(loss, differentiable)
    if inputs["target_feats"][0].is_cuda:
        torch.cuda.synchronize()


@pytest.mark.parametrize("config, implementation", CASES)
def test_forward_backward(benchmark, config, implementation):
    device = CONFIGS[config][0]
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    inputs = make_inputs(config)
    fn = loss_function(implementation)
    forward_backward(fn, inputs)  # warm-up: compilation, autotuning, allocator
    benchmark.extra_info["peak_bytes"] = peak_memory_growth(
        lambda: forward_backward(fn, inputs), inputs["target_feats"][0].device)
    benchmark.extra_info["config"] = config
    benchmark.extra_info["implementation"] = implementation
    benchmark.extra_info["kernel"] = f"loss/{config}"
    benchmark.extra_info["mode"] = "forward+backward"
    benchmark.pedantic(forward_backward, args=(fn, inputs), rounds=5 if device == "cpu" else 20,
                       warmup_rounds=1)
