"""The three channel-error ops in namespace ``l2t_fast_triton``, and how they launch.

Each op is a ``torch.library.triton_op`` whose body only calls PyTorch ops and the
kernel through ``wrap_triton``, so ``torch.compile`` traces into it. Every op issues one
launch per (group of ``SLOTS`` source layers, group of ``SLOTS`` target layers) that some
pair uses: a single launch for up to four source and four target layers, whatever the
number of pairs. Regressors and biases (small) are packed into one buffer each; feature
maps are passed as they are, with their strides, and never copied.
"""
import os
from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from l2t_fast.matching.backends.registration import errors_dtype
from l2t_fast.matching.backends.triton import kernels

NAMESPACE = "l2t_fast_triton"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _blocks(dtype):
    """(BLOCK_ROWS, BLOCK_POS, BLOCK_K). The interpreter runs every program in Python:
    small blocks keep the tests fast. On a GPU, tiles of 64 channels x 64 positions; in
    float64 a K step of 16 keeps the double backward's pipelined tiles within the shared
    memory of one block (136 KB instead of 208 KB on sm_90)."""
    if INTERPRETED:
        return 16, 16, 16
    return (64, 64, 16) if dtype == torch.float64 else (64, 64, 32)


FORWARD, BACKWARD, DOUBLE_BACKWARD = 0, 1, 2  # the kernel's MODE


def _define(name):
    """A ``triton_op``, which ``torch.compile`` traces into, down to the kernel launches.

    Under the interpreter ``wrap_triton`` hands the kernel back unwrapped (torch 2.13), so
    tracing would run it on fake tensors: there the op is an opaque ``custom_op``, which
    ``torch.compile`` keeps as one node of its graph.
    """
    if INTERPRETED:
        return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())
    return triton_op(f"{NAMESPACE}::{name}", mutates_args=())


def _dot_precision(dtype):
    """Full precision in float64 and under the interpreter. In float32 on a GPU the
    regressor, a 1x1 convolution, follows PyTorch's setting for convolutions
    (``torch.backends.cudnn.allow_tf32``, True by default)."""
    if INTERPRETED or dtype == torch.float64 or not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def _check(source, target, weight, bias, pair_source, pair_target):
    pairs = len(pair_source)
    if pairs == 0 or not source or not target:
        raise ValueError("channel_errors needs at least one pair, source map and target map")
    if not (len(pair_target) == len(weight) == len(bias) == pairs):
        raise ValueError(f"pair_source, pair_target, weight and bias need one entry per pair: "
                         f"got {pairs}, {len(pair_target)}, {len(weight)}, {len(bias)}")
    first = source[0]
    for name, group in (("source", source), ("target", target), ("weight", weight),
                        ("bias", bias)):
        for i, t in enumerate(group):
            if t.dtype != first.dtype or t.device != first.device:
                raise TypeError(f"{name}[{i}] is {t.dtype} on {t.device}, source[0] is "
                                f"{first.dtype} on {first.device}")
    for name, maps in (("source", source), ("target", target)):
        for i, t in enumerate(maps):
            if t.dim() != 4 or t.shape[0] != first.shape[0]:
                raise ValueError(f"{name}[{i}] must be [B, C, H, W] with B = {first.shape[0]}, "
                                 f"got {list(t.shape)}")
    for i, (m, n) in enumerate(zip(pair_source, pair_target)):
        if not (0 <= m < len(source) and 0 <= n < len(target)):
            raise ValueError(f"pair {i} = ({m}, {n}) is out of range for {len(source)} source "
                             f"and {len(target)} target maps")
        cs, ct = source[m].shape[1], target[n].shape[1]
        if list(weight[i].shape) != [cs, ct] or list(bias[i].shape) != [cs]:
            raise ValueError(f"pair {i}: weight must be [{cs}, {ct}] and bias [{cs}], got "
                             f"{list(weight[i].shape)} and {list(bias[i].shape)}")


def _offsets(sizes):
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += size
    return offsets, total


def _pack(tensors):
    """The tensors' elements, row-major, one after the other (regressors are small)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _pack_tangents(tangents, like):
    """Packed tangents (a missing one as zeros), or None when every one is missing."""
    tangents = [tangents[i] if i < len(tangents) else None for i in range(len(like))]
    if all(t is None for t in tangents):
        return None
    return _pack([t if t is not None else torch.zeros_like(w) for t, w in zip(tangents, like)])


def _unpack(pack, like):
    """Splits a packed gradient into tensors laid out like ``like`` (copies: outputs of an
    op may not alias each other)."""
    offsets, _ = _offsets([t.numel() for t in like])
    return [torch.empty_like(t).copy_(pack[o:o + t.numel()].view(t.shape))
            for o, t in zip(offsets, like)]


def _strides(t):
    return list(t.stride()) if t is not None else [0, 0, 0, 0]


def _launch(mode, source, target, weight, bias, pair_source, pair_target, errors, *,
            grad_grad_errors=None, tangent_source=(), tangent_target=(), tangent_weight=None,
            tangent_bias=None, grad_source=(), grad_target=(), grad_weight=None,
            grad_bias=None):
    """Runs ``mode`` over every pair. ``weight``/``bias`` (and their tangents and
    gradients) are packs; ``errors`` is E (forward) or grad_errors; grad_* accumulate."""
    batch = source[0].shape[0]
    compute = errors.dtype
    block_rows, block_pos, block_k = _blocks(source[0].dtype)
    device = errors.device
    # A pair's first column in E is also its first element in the packed biases.
    column, _ = _offsets([source[m].shape[1] for m in pair_source])
    weight_offset, _ = _offsets([source[m].shape[1] * target[n].shape[1]
                                 for m, n in zip(pair_source, pair_target)])
    tangent_source = [tangent_source[m] if m < len(tangent_source) else None
                      for m in range(len(source))]
    tangent_target = [tangent_target[n] if n < len(tangent_target) else None
                      for n in range(len(target))]

    def dummy():
        return torch.empty(1, dtype=compute, device=device)

    def slots(layers, group, placeholder):
        """The ``SLOTS`` pointer arguments of layer group ``group``; ``placeholder(i)``
        fills a slot with no layer, or a layer whose tensor is None (never accessed)."""
        chosen = []
        for slot in range(kernels.SLOTS):
            index = group * kernels.SLOTS + slot
            layer = layers[index] if index < len(layers) else None
            chosen.append(layer if layer is not None else placeholder(index))
        return chosen

    def input_placeholder(layers):
        return lambda index: layers[min(index, len(layers) - 1)]

    def output_slots(layers, group):
        return slots(layers, group, lambda index: dummy())

    groups = []
    for m, n in zip(pair_source, pair_target):
        key = (m // kernels.SLOTS, n // kernels.SLOTS)
        if key not in groups:
            groups.append(key)
    for source_group, target_group in groups:
        table, items = [], []
        for i, (m, n) in enumerate(zip(pair_source, pair_target)):
            if (m // kernels.SLOTS, n // kernels.SLOTS) != (source_group, target_group):
                continue
            s, t = source[m], target[n]
            row = [m % kernels.SLOTS, n % kernels.SLOTS, s.shape[1], t.shape[1], s.shape[2],
                   s.shape[3], t.shape[2], t.shape[3]]
            row += _strides(s) + _strides(t) + _strides(tangent_source[m])
            row += _strides(tangent_target[n])
            row += _strides(grad_source[m] if grad_source else None)
            row += _strides(grad_target[n] if grad_target else None)
            row += [column[i], weight_offset[i], column[i],
                    int(tangent_source[m] is not None), int(tangent_target[n] is not None)]
            work = t.shape[1] * t.shape[2] * t.shape[3]  # per channel: heaviest blocks first
            items += [(work, len(table), first) for first in range(0, s.shape[1], block_rows)]
            table.append(row)
        items.sort(key=lambda item: -item[0])
        if not items or batch == 0:
            continue
        table = torch.tensor(table, dtype=torch.int64, device=device)
        items = torch.tensor([item[1:] for item in items], dtype=torch.int64, device=device)
        wrap_triton(kernels.channel_errors_kernel)[(items.shape[0], batch)](
            items, table,
            *slots(source, source_group, input_placeholder(source)),
            *slots(target, target_group, input_placeholder(target)),
            *slots(tangent_source, source_group, input_placeholder(source)),
            *slots(tangent_target, target_group, input_placeholder(target)),
            *output_slots(grad_source, source_group),
            *output_slots(grad_target, target_group),
            weight, bias,
            tangent_weight if tangent_weight is not None else weight,
            tangent_bias if tangent_bias is not None else bias,
            grad_weight if grad_weight is not None else dummy(),
            grad_bias if grad_bias is not None else dummy(),
            errors, errors.stride(0), errors.stride(1),
            *((grad_grad_errors, grad_grad_errors.stride(0), grad_grad_errors.stride(1))
              if grad_grad_errors is not None else (dummy(), 0, 0)),
            MODE=mode,
            HAS_TANGENT_WEIGHT=tangent_weight is not None,
            HAS_TANGENT_BIAS=tangent_bias is not None,
            WANT_SOURCE=bool(grad_source), WANT_TARGET=bool(grad_target),
            WANT_WEIGHT=grad_weight is not None, WANT_BIAS=grad_bias is not None,
            BLOCK_ROWS=block_rows, BLOCK_POS=block_pos, BLOCK_K=block_k,
            PRECISION=_dot_precision(source[0].dtype))


def _accumulators(maps, wanted, compute):
    """Zeroed gradient accumulators in the compute dtype, laid out like the maps."""
    return [torch.zeros_like(t, dtype=compute) for t in maps] if wanted else []


def _gradients(mode, grad_errors, source, target, weight, bias, pair_source, pair_target,
               output_mask, **tangents):
    _check(source, target, weight, bias, pair_source, pair_target)
    want_source, want_target, want_weight, want_bias = (bool(w) for w in output_mask)
    compute = errors_dtype(source[0].dtype)
    grad_source = _accumulators(source, want_source, compute)
    grad_target = _accumulators(target, want_target, compute)
    grad_weight = (torch.zeros(sum(w.numel() for w in weight), dtype=compute,
                               device=grad_errors.device) if want_weight else None)
    grad_bias = (torch.zeros(sum(b.numel() for b in bias), dtype=compute,
                             device=grad_errors.device) if want_bias else None)
    grad_grad_errors = torch.empty_like(grad_errors) if mode == DOUBLE_BACKWARD else None
    _launch(mode, source, target, _pack(weight), _pack(bias), pair_source, pair_target,
            grad_errors.to(compute), grad_grad_errors=grad_grad_errors,
            grad_source=grad_source, grad_target=grad_target, grad_weight=grad_weight,
            grad_bias=grad_bias, **tangents)
    grads = ([g.to(s.dtype) for g, s in zip(grad_source, source)],
             [g.to(t.dtype) for g, t in zip(grad_target, target)],
             _unpack(grad_weight, weight) if want_weight else [],
             _unpack(grad_bias, bias) if want_bias else [])
    return grads, grad_grad_errors


@_define("channel_errors")
def channel_errors(source: list[Tensor], target: list[Tensor], weight: list[Tensor],
                   bias: list[Tensor], pair_source: list[int], pair_target: list[int]) -> Tensor:
    _check(source, target, weight, bias, pair_source, pair_target)
    columns = sum(source[m].shape[1] for m in pair_source)
    errors = source[0].new_empty((source[0].shape[0], columns),
                                 dtype=errors_dtype(source[0].dtype))
    _launch(FORWARD, source, target, _pack(weight), _pack(bias), pair_source, pair_target, errors)
    return errors


@_define("channel_errors_backward")
def channel_errors_backward(grad_errors: Tensor, source: list[Tensor], target: list[Tensor],
                            weight: list[Tensor], bias: list[Tensor], pair_source: list[int],
                            pair_target: list[int], output_mask: list[bool]
                            ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    grads, _ = _gradients(BACKWARD, grad_errors, source, target, weight, bias, pair_source,
                          pair_target, output_mask)
    return grads


@_define("channel_errors_double_backward")
def channel_errors_double_backward(
        grad_errors: Tensor, tangent_source: list[Optional[Tensor]],
        tangent_target: list[Optional[Tensor]], tangent_weight: list[Optional[Tensor]],
        tangent_bias: list[Optional[Tensor]], source: list[Tensor], target: list[Tensor],
        weight: list[Tensor], bias: list[Tensor], pair_source: list[int], pair_target: list[int],
        output_mask: list[bool]
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    grads, grad_grad_errors = _gradients(
        DOUBLE_BACKWARD, grad_errors, source, target, weight, bias, pair_source, pair_target,
        output_mask,
        tangent_source=tangent_source, tangent_target=tangent_target,
        tangent_weight=_pack_tangents(tangent_weight, weight),
        tangent_bias=_pack_tangents(tangent_bias, bias))
    return (grad_grad_errors,) + grads
