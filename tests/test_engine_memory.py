"""The meta step's peak memory, counted in parameter sets.

On a target whose parameters outweigh its activations (wide layers on 4x4 inputs, batch
2), the peak growth of an iteration is a count of parameter-sized tensors alive at once.
The reverse sweep needs the checkpoints theta_2 .. theta_{T+1} (T sets) and, at a double
backward (the peak), the adjoint of the step's end, the directions and the adjoint being
pulled back: T + 3 sets (the step's gradient g itself is freed once the SGD step has used
it; the double backward starts from its gradient edges). A momentum buffer of a lookahead
step, the final parameters, g, an adjoint spent before the double backward, a third
temporary in the SGD step or the real step's ``.grad`` kept through the meta step is one
set more, and fails the bound.
"""
import sys
from pathlib import Path

import pytest
import torch

from l2t_fast.methods.l2tww.engine import L2TWW
from test_engine import LAYERS, TinyNet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from memory import peak_memory_growth  # noqa: E402

SLACK = 0.5  # BatchNorm, the head and the regressors weigh little; activations ~nothing


@pytest.mark.parametrize("inner_steps", [1, 2, 3])
def test_iteration_peak_is_t_plus_3_parameter_sets(inner_steps):
    torch.manual_seed(0)
    source, target = TinyNet((64, 128)).double(), TinyNet((64, 128)).double()
    engine = L2TWW(source, target, LAYERS, LAYERS, inner_steps=inner_steps,
                   backend="reference", lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1])
    engine.step(x, y)  # momentum buffers exist from here on
    parameter_set = sum(p.numel() * p.element_size() for p in engine._theta)
    bound = (inner_steps + 3 + SLACK) * parameter_set
    cpu = torch.device("cpu")
    assert peak_memory_growth(lambda: engine.hypergradient(x, y), cpu) < bound
    assert peak_memory_growth(lambda: engine.step(x, y), cpu) < bound
    assert all(p.grad is None for p in engine._theta)
