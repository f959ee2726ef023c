"""Fake kernels and autograd for the channel-error ops, shared by every compiled backend.

Each compiled backend (C++ CPU, CUDA, Triton) implements the same three ops, named in its
own namespace (the C++ CPU kernels a fourth, the fused training step, below):

- ``channel_errors(source, target, weight, bias, pair_source, pair_target) -> Tensor``:
  ``E [B, sum_i Cs_i]``, ``E[b, off_i + c] = mean_hw (S~ - W_i T - b_i)^2``.
- ``channel_errors_backward(grad_errors, source, target, weight, bias, pair_source,
  pair_target, output_mask) -> (grad_source[], grad_target[], grad_weight[], grad_bias[])``:
  with ``G = (2 / HW) grad_errors * D``: ``resize^T G``, ``-W^T G``, ``-sum_b G T^T``,
  ``-sum G``. A group whose ``output_mask`` entry is False comes back as an empty list.
- ``channel_errors_double_backward(grad_errors, tangent_source, tangent_target,
  tangent_weight, tangent_bias, source, target, weight, bias, pair_source, pair_target,
  output_mask) -> (grad_grad_errors, grad_source[], grad_target[], grad_weight[],
  grad_bias[])``: the vector-Jacobian product of the backward with the cotangents
  (tangents) of its outputs. With ``U = resize(vS) - W vT - vW T - vb`` (the change of D
  along the tangent; a None tangent counts as zero): ``grad_grad_errors = (2 / HW) sum_hw U D``
  and, with ``G_D = (2 / HW) grad_errors * U`` and ``G_U = (2 / HW) grad_errors * D``:
  ``resize^T G_D``, ``-W^T G_D - vW^T G_U``, ``-sum_b (G_D T^T + G_U vT^T)``, ``-sum G_D``.

- ``channel_errors_with_grads(grad_errors, source, target, weight, bias, pair_source,
  pair_target, output_mask) -> (errors, grad_source[], grad_target[], grad_weight[],
  grad_bias[])``: ``channel_errors`` and ``channel_errors_backward`` at once, from the same
  blocks of D (three GEMM passes, not four), for a caller that knows ``grad_errors`` before
  the forward: the loss is linear in E. Not differentiable itself (no autograd formula);
  ``l2t_fast.matching.loss`` wraps it in an ``autograd.Function``.

The backward is linear in ``grad_errors``, so the double backward never needs third
derivatives of the kernels; the weighting by channel and pair weights stays in PyTorch.
"""
import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


def errors_dtype(dtype):
    """Half inputs accumulate, and return their errors, in float32."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def _fake_errors(source, target, weight, bias, pair_source, pair_target):
    batch = source[0].shape[0]
    width = sum(source[m].shape[1] for m in pair_source)
    return source[0].new_empty((batch, width), dtype=errors_dtype(source[0].dtype))


def _fake_grads(source, target, weight, bias, output_mask):
    groups = (source, target, weight, bias)
    return tuple([torch.empty_like(t) for t in group] if wanted else []
                 for group, wanted in zip(groups, output_mask))


def _fake_backward(grad_errors, source, target, weight, bias, pair_source, pair_target,
                   output_mask):
    return _fake_grads(source, target, weight, bias, output_mask)


def _fake_double_backward(grad_errors, tangent_source, tangent_target, tangent_weight,
                          tangent_bias, source, target, weight, bias, pair_source, pair_target,
                          output_mask):
    return (torch.empty_like(grad_errors),) + _fake_grads(source, target, weight, bias,
                                                          output_mask)


def _fake_with_grads(grad_errors, source, target, weight, bias, pair_source, pair_target,
                     output_mask):
    return ((_fake_errors(source, target, weight, bias, pair_source, pair_target),)
            + _fake_grads(source, target, weight, bias, output_mask))


def _grad_mask(*groups):
    return [any(t.requires_grad for t in group) for group in groups]


def _per_tensor(grads, wanted, like):
    """Gradients of a list input, one per tensor (autograd wants the input's structure)."""
    return list(grads) if wanted else [None] * len(like)


def _tangents(cotangents, like):
    """Cotangents of a list output, one per tensor, None where autograd gives none."""
    if not cotangents:
        return [None] * len(like)
    return list(cotangents)


def errors_tangent(ops, source, target, weight, bias, pair_source, pair_target,
                   tangent_target, tangent_weight, tangent_bias):
    """The errors' derivative along tangents of target, weight and bias (source fixed).

    The ops have no forward-mode rule, but the double backward's ``grad_grad_errors``,
    ``(2 / HW) sum_hw U D``, is exactly that derivative and does not depend on
    ``grad_errors``; with every gradient masked off, nothing else is computed.
    """
    batch = source[0].shape[0]
    width = sum(source[m].shape[1] for m in pair_source)
    unused = source[0].new_zeros((batch, width), dtype=errors_dtype(source[0].dtype))
    return ops.channel_errors_double_backward(
        unused, [None] * len(source), tangent_target, tangent_weight, tangent_bias, source,
        target, weight, bias, pair_source, pair_target, [False] * 4)[0]


def errors_vjp(ops, grad_errors, source, target, weight, bias, pair_source, pair_target):
    """Gradients of ``<grad_errors, E>`` in target, weight and bias, by the backward op alone.

    For a caller that knows ``grad_errors`` without ``E`` (the loss is linear in the
    errors), the forward would only be thrown away. Differentiable through the backward
    op's autograd (the double backward) when grad mode is on.
    """
    _, grad_target, grad_weight, grad_bias = ops.channel_errors_backward(
        grad_errors.contiguous(), source, target, weight, bias, pair_source, pair_target,
        [False, True, True, True])
    return list(grad_target), list(grad_weight), list(grad_bias)


def register(namespace):
    """Register fake kernels and autograd for ``{namespace}::channel_errors*``."""
    ops = getattr(torch.ops, namespace)
    name = f"{namespace}::channel_errors"
    torch.library.register_fake(name)(_fake_errors)
    torch.library.register_fake(name + "_backward")(_fake_backward)
    torch.library.register_fake(name + "_double_backward")(_fake_double_backward)
    if hasattr(ops, "channel_errors_with_grads"):  # only the C++ library defines it
        torch.library.register_fake(name + "_with_grads")(_fake_with_grads)

    def setup_errors(ctx, inputs, output):
        source, target, weight, bias, pair_source, pair_target = inputs
        ctx.counts = (len(source), len(target), len(weight))
        ctx.pairs = (pair_source, pair_target)
        ctx.mask = _grad_mask(source, target, weight, bias)
        ctx.save_for_backward(*source, *target, *weight, *bias)

    def unpack(ctx, saved):
        s, t, w = ctx.counts
        return saved[:s], saved[s:s + t], saved[s + t:s + t + w], saved[s + t + w:]

    def errors_backward(ctx, grad_errors):
        source, target, weight, bias = unpack(ctx, ctx.saved_tensors)
        grads = ops.channel_errors_backward(grad_errors.contiguous(), source, target, weight,
                                            bias, *ctx.pairs, ctx.mask)
        return tuple(_per_tensor(g, m, like) for g, m, like in
                     zip(grads, ctx.mask, (source, target, weight, bias))) + (None, None)

    def setup_backward(ctx, inputs, output):
        grad_errors, source, target, weight, bias, pair_source, pair_target, mask = inputs
        ctx.counts = (len(source), len(target), len(weight))
        ctx.pairs = (pair_source, pair_target)
        ctx.forward_mask = list(mask)
        ctx.mask = _grad_mask(source, target, weight, bias)
        ctx.save_for_backward(grad_errors, *source, *target, *weight, *bias)

    def backward_backward(ctx, *cotangents):
        grad_errors, *saved = ctx.saved_tensors
        source, target, weight, bias = unpack(ctx, saved)
        tangents = [_tangents(c, like) if wanted else [None] * len(like)
                    for c, like, wanted in zip(cotangents, (source, target, weight, bias),
                                               ctx.forward_mask)]
        outputs = ops.channel_errors_double_backward(
            grad_errors, *tangents, source, target, weight, bias, *ctx.pairs, ctx.mask)
        grad_grad_errors, grads = outputs[0], outputs[1:]
        return ((grad_grad_errors,)
                + tuple(_per_tensor(g, m, like) for g, m, like in
                        zip(grads, ctx.mask, (source, target, weight, bias)))
                + (None, None, None))

    torch.library.register_autograd(name, errors_backward, setup_context=setup_errors)
    torch.library.register_autograd(name + "_backward", backward_backward,
                                    setup_context=setup_backward)
