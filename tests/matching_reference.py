"""An independent float64 statement of docs/SPEC.md section 1, for the tests only.

Written from the spec, loop by loop, without l2t_fast's code: the backends are checked
against this, not against each other.
"""
import torch
import torch.nn.functional as F
from hypothesis import strategies as st


def spec_loss(source, target, pairs, weight, bias=None, channel_weights=None,
              pair_weights=None, beta=0.5, reduction="mean"):
    betas = beta if isinstance(beta, (list, tuple)) else [beta] * len(pairs)
    rows = []
    for i, (m, n) in enumerate(pairs):
        s = source[m].double()
        t = target[n].double()
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        w = weight[i].double().reshape(weight[i].shape[0], -1)
        projection = F.conv2d(t, w[:, :, None, None],
                              None if bias is None else bias[i].double())
        error = ((s - projection) ** 2).mean(dim=(2, 3))  # [B, Cs]
        if channel_weights is None:
            per = error.mean(dim=1)
        else:
            per = (channel_weights[i].double() * error).sum(dim=1)
        if pair_weights is not None:
            per = per * pair_weights[i].double().reshape(-1)
        rows.append(betas[i] * per)
    out = torch.stack(rows)
    return out if reduction == "none" else out.mean(dim=1).sum()


def random_problem(source_shapes, target_shapes, pairs, dtype=torch.float64, bias=True,
                   channel_weights=True, pair_weights=True, generator=None, requires_grad=True):
    """Feature maps, regressors and weights for the given shapes, all requiring grad."""
    def rand(*shape, positive=False):
        t = torch.rand(*shape, generator=generator, dtype=torch.float64) if positive else \
            torch.randn(*shape, generator=generator, dtype=torch.float64)
        return t.to(dtype).requires_grad_(requires_grad)

    batch = source_shapes[0][0]
    source = [rand(*s) for s in source_shapes]
    target = [rand(*t) for t in target_shapes]
    weight = [rand(source_shapes[m][1], target_shapes[n][1]) for m, n in pairs]
    problem = dict(source_feats=source, target_feats=target, pairs=pairs, weight=weight)
    if bias:
        problem["bias"] = [rand(source_shapes[m][1]) for m, _ in pairs]
    if channel_weights:
        problem["channel_weights"] = [
            torch.softmax(torch.randn(batch, source_shapes[m][1], generator=generator,
                                      dtype=torch.float64), 1).to(dtype).requires_grad_(requires_grad)
            for m, _ in pairs]
    if pair_weights:
        problem["pair_weights"] = [rand(batch, positive=True) for _ in pairs]
    return problem


def as_spec_args(problem):
    return dict(source=problem["source_feats"], target=problem["target_feats"],
                pairs=problem["pairs"], weight=problem["weight"], bias=problem.get("bias"),
                channel_weights=problem.get("channel_weights"),
                pair_weights=problem.get("pair_weights"))


map_sizes = st.tuples(st.integers(1, 9), st.integers(1, 9))


@st.composite
def problems(draw):
    """Shapes, pairs, optional inputs and a seed of a random loss problem."""
    # Batches of 32 and more put several samples of a small map into one of the CPU
    # kernels' blocks (16 chunks of samples, and whole maps side by side within a chunk).
    batch = draw(st.one_of(st.integers(1, 3), st.integers(32, 40)))
    num_source = draw(st.integers(1, 3))
    num_target = draw(st.integers(1, 3))
    source = [(batch, draw(st.integers(1, 7)), *draw(map_sizes)) for _ in range(num_source)]
    target = [(batch, draw(st.integers(1, 7)), *draw(map_sizes)) for _ in range(num_target)]
    all_pairs = [(m, n) for m in range(num_source) for n in range(num_target)]
    pairs = draw(st.lists(st.sampled_from(all_pairs), min_size=1, max_size=6))
    options = dict(bias=draw(st.booleans()), channel_weights=draw(st.booleans()),
                   pair_weights=draw(st.booleans()))
    seed = draw(st.integers(0, 2**31 - 1))
    return source, target, pairs, options, seed
