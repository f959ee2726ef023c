"""The paper's CIFAR setting (benchmarks/paper_setting.py): our hypergradient against the
paper-style deepcopy-and-replay step, in float64, on the paper's architectures (ResNet32
source, VGG9-BN target, 15 pairs), a batch of two 32x32 images."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import paper_setting  # noqa: E402


@pytest.fixture(scope="module")
def problem():
    torch.set_num_threads(1)
    engine, x, y = paper_setting.make_engine(dtype=torch.float64, batch=2, warm_iterations=0)
    engine.meta_period = 2  # the first iteration is the real step alone: momentum exists
    engine.step(x, y)
    return engine, x, y


def test_architectures_are_the_papers(problem):
    engine, x, _ = problem
    assert engine.pairs == [(m, n) for m in range(3) for n in range(5)]
    _, source_feats = engine._source_hooks(x)
    _, target_feats = engine._target_hooks(x)
    assert [tuple(f.shape[1:]) for f in source_feats] == [(16, 32, 32), (32, 16, 16),
                                                          (64, 8, 8)]
    assert [tuple(f.shape[1:]) for f in target_feats] == [(64, 32, 32), (128, 16, 16),
                                                          (256, 8, 8), (512, 4, 4), (512, 2, 2)]
    source_blocks = [len(getattr(engine.source_model, f"stage{i}")) for i in (1, 2, 3)]
    assert source_blocks == [5, 5, 5]  # 1 + 6 * 5 = 31 convs and the head: ResNet32
    target_convs = sum(isinstance(m, torch.nn.Conv2d) for m in engine.target_model.modules())
    assert target_convs == 8  # and the head: VGG9


def test_hypergradient_equals_paper_style_replay(problem):
    engine, x, y = problem
    before = [p.detach().clone() for p in engine._theta]
    ours = engine.hypergradient(x, y)
    paper = paper_setting.PaperStyle(engine).hypergradient(x, y)
    assert all(torch.equal(p, b) for p, b in zip(engine._theta, before))  # both restore
    assert set(ours) == set(paper)
    reached = 0
    for name, expected in paper.items():
        scale = expected.abs().max()
        if scale == 0:  # a Where unit saturated by relu6 on both sides
            assert torch.equal(ours[name], expected), name
            continue
        reached += 1
        assert (ours[name] - expected).abs().max() / scale < 1e-12, name
    assert reached >= len(paper) // 2
