"""One L2T-ww meta step (T = 2) on CPU: ``L2TWW.hypergradient`` vs the snapshot-and-replay
step of the paper's code (``naive_meta_step.py``).

Setting: source and target are the same small 4-stage ResNet (BasicBlocks, widths 16-128,
BatchNorm), CIFAR-like 32x32 inputs, batch 32, all 16 (source stage, target stage) pairs,
float32. Implementations (``IMPLEMENTATIONS``), each on its own engine built from the same
seed:

- ``l2tww``: ours, the loss on the ``"auto"`` backend (the fused C++ op when built);
- ``naive``: the straightforward step as the paper's code does it, deep copies and replay
  with the loss written plainly in PyTorch (the ``"reference"`` backend, which
  materialises every per-pair projection);
- ``naive-fused``: the same replay on our fused op, which isolates what the meta-step
  algorithm alone is worth.

Time: ``pytest benchmarks/bench_meta_step.py --benchmark-only``, and
``python benchmarks/bench_meta_step.py --paired 9``, which times the implementations in
turn within each round, so that the drift of a shared host's speed (~10% within an hour
on ours) hits all of a round alike, and prints every round's speed-up of ours.
Peak memory: ``python benchmarks/bench_meta_step.py`` runs each implementation once in a
fresh process and reports how far the peak resident set size rose above the resident size
just before the call (the kernel's high-water mark VmHWM, reset right before the call by
writing 5 to /proc/self/clear_refs, so set-up does not count). Python-level tracers
(tracemalloc) do not see PyTorch's allocations; RSS does. glibc is told to serve every
block over 64 KiB by mmap and to give freed memory back at once (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_, one arena), so that the RSS peak follows the live tensors rather
than allocator caching. The pytest run records the same numbers in each benchmark's
``extra_info``.
"""
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from naive_meta_step import naive_hypergradient  # noqa: E402

from l2t_fast.methods.l2tww.engine import L2TWW  # noqa: E402
from l2t_fast.models import BasicBlock  # noqa: E402

BATCH, SIZE, WIDTHS, CLASSES = 32, 32, (16, 32, 64, 128), 10
STAGES = ["layer1", "layer2", "layer3", "layer4"]
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
              "MALLOC_ARENA_MAX": "1"}


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        channels = WIDTHS[0]
        for i, width in enumerate(WIDTHS):
            setattr(self, f"layer{i + 1}", BasicBlock(channels, width, 1 if i == 0 else 2))
            channels = width
        self.fc = nn.Linear(channels, CLASSES)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for stage in STAGES:
            x = getattr(self, stage)(x)
        return self.fc(x.mean((2, 3)))


def make_problem(backend, dtype=torch.float32):
    """An engine one real step into training (so momentum buffers exist) and a batch.

    The set-up step always runs on the "auto" backend, so that every implementation starts
    from the same state (Adam's first meta step turns round-off into sign flips); then the
    loss switches to ``backend``.
    """
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count()))
    engine = L2TWW(SmallResNet().to(dtype), SmallResNet().to(dtype), STAGES, STAGES,
                   inner_steps=2)
    x = torch.randn(BATCH, 3, SIZE, SIZE, dtype=dtype)
    y = torch.randint(0, CLASSES, (BATCH,))
    engine.step(x, y)
    engine.backend = engine.matching.backend = backend
    return engine, x, y


def ours(engine, x, y):
    return engine.hypergradient(x, y)


# name: (meta step, loss backend of its engine)
IMPLEMENTATIONS = {
    "l2tww": (ours, "auto"),
    "naive": (naive_hypergradient, "reference"),
    "naive-fused": (naive_hypergradient, "auto"),
}


def _status_kib(field):
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1])


def peak_memory_mib(name):
    """Peak RSS growth of one call of implementation ``name``, measured in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--one", name], check=True,
                         capture_output=True, text=True, env={**os.environ, **MALLOC_ENV}).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_growth_mib"]


def _measure_one(name):
    step, backend = IMPLEMENTATIONS[name]
    engine, x, y = make_problem(backend)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    before = _status_kib("VmRSS")
    step(engine, x, y)
    peak = _status_kib("VmHWM")
    print(json.dumps({"implementation": name, "peak_growth_mib": (peak - before) / 1024}))


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_meta_step(benchmark, name):
    step, backend = IMPLEMENTATIONS[name]
    engine, x, y = make_problem(backend)
    benchmark.extra_info["peak_rss_growth_mib"] = peak_memory_mib(name)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.extra_info["loss_backend"] = backend
    benchmark.pedantic(step, args=(engine, x, y), rounds=5, warmup_rounds=1)


def test_same_hypergradient():
    """Every implementation computes the same hypergradient, in float64.

    (In float32 this hypergradient is ill-conditioned: the plain and the fused loss, each
    exact, round differently and the What-network gradients then differ by ~10%, while two
    implementations on the same loss agree to 1e-6.)
    """
    results = {}
    for name, (step, backend) in IMPLEMENTATIONS.items():
        engine, x, y = make_problem(backend, torch.float64)
        results[name] = step(engine, x, y)
    expected = results.pop("naive")
    for name, result in results.items():
        for key in expected:
            scale = expected[key].abs().max().clamp_min(1e-30)
            assert (result[key] - expected[key]).abs().max() / scale < 1e-9, (name, key)


def paired_times(rounds):
    """``{name: [seconds per round]}``: every round runs each implementation in turn, twice
    in a row, and times the second call (the allocator warm from the same work, as in a
    back-to-back benchmark)."""
    problems = {name: make_problem(backend) for name, (_, backend) in IMPLEMENTATIONS.items()}
    times = {name: [] for name in IMPLEMENTATIONS}
    for _ in range(rounds):
        for name, (step, _) in IMPLEMENTATIONS.items():
            step(*problems[name])
            start = time.perf_counter()
            step(*problems[name])
            times[name].append(time.perf_counter() - start)
    return times


def _print_paired(rounds):
    times = paired_times(rounds)
    ours = times["l2tww"]
    for name, seconds in times.items():
        line = f"{name}: median {statistics.median(seconds) * 1e3:.0f} ms"
        if name != "l2tww":
            ratios = sorted(t / o for t, o in zip(seconds, ours))
            line += (f"; ours faster by {statistics.median(ratios):.2f}x (median of rounds), "
                     f"{ratios[0]:.2f}-{ratios[-1]:.2f}x (every round)")
        print(line)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        _measure_one(sys.argv[2])
    elif sys.argv[1:2] == ["--paired"]:
        _print_paired(int(sys.argv[2]))
    else:
        for implementation in IMPLEMENTATIONS:
            print(f"{implementation}: peak RSS growth {peak_memory_mib(implementation):.1f} MiB")
