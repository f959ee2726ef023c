"""The Triton kernel of the three channel-error ops (math: ``backends/registration.py``).

One kernel serves the forward, the backward and the double backward (``MODE``), so the
three cannot drift apart. A program owns one block of ``BLOCK_ROWS`` source channels of
one pair and one sample; it walks the target map in tiles of ``BLOCK_POS`` positions and,
for each tile, recomputes ``D = S~ - W T - b`` with ``tl.dot`` over the target channels,
the bilinear taps of the small source map computed in-kernel, and finishes the tile there:
nothing of size ``[B, Cs, Ht, Wt]`` is ever written. Per-channel sums (errors, their
double-backward gradient, the bias gradient) stay in registers; the gradients of the
maps and of the regressors, shared by many programs, are added with atomics.

A launch covers every pair at once: pairs are described by rows of an int64 table
(``FIELDS`` columns, offsets below), the feature maps arrive as ``SLOTS`` pointer
arguments per role and a pair names the slot of its layers. Maps are read through their
strides, so channels_last and other views need no copy.
"""
import triton
import triton.language as tl

FORWARD = tl.constexpr(0)
BACKWARD = tl.constexpr(1)
DOUBLE_BACKWARD = tl.constexpr(2)
SLOTS = 4  # layers per role that one launch can address

# Columns of a pair's row in the metadata table. Strides come in groups of four (batch,
# channel, height, width) for the source, target, their tangents and their gradients.
SOURCE_SLOT = tl.constexpr(0)
TARGET_SLOT = tl.constexpr(1)
SOURCE_CHANNELS = tl.constexpr(2)
TARGET_CHANNELS = tl.constexpr(3)
SOURCE_HEIGHT = tl.constexpr(4)
SOURCE_WIDTH = tl.constexpr(5)
TARGET_HEIGHT = tl.constexpr(6)
TARGET_WIDTH = tl.constexpr(7)
SOURCE_STRIDES = tl.constexpr(8)
TARGET_STRIDES = tl.constexpr(12)
TANGENT_SOURCE_STRIDES = tl.constexpr(16)
TANGENT_TARGET_STRIDES = tl.constexpr(20)
GRAD_SOURCE_STRIDES = tl.constexpr(24)
GRAD_TARGET_STRIDES = tl.constexpr(28)
COLUMN = tl.constexpr(32)          # the pair's first column in E [B, sum_i Cs_i]
WEIGHT_OFFSET = tl.constexpr(33)   # W_i's first element in the packed [Cs, Ct] regressors
BIAS_OFFSET = tl.constexpr(34)     # b_i's first element in the packed biases
HAS_TANGENT_SOURCE = tl.constexpr(35)  # 0 where the pair's source tangent is None
HAS_TANGENT_TARGET = tl.constexpr(36)
FIELDS = tl.constexpr(37)


@triton.jit
def _pick(slot, p0, p1, p2, p3):
    """The pointer in slot ``slot``: kernels take a fixed number of layer arguments."""
    pointer = p0
    if slot == 1:
        pointer = p1
    elif slot == 2:
        pointer = p2
    elif slot == 3:
        pointer = p3
    return pointer


@triton.jit
def _axis_taps(position, in_size, out_size, COMPUTE: tl.constexpr):
    """Bilinear taps along one axis exactly as F.interpolate(size=..., align_corners=False)."""
    scale = in_size.to(COMPUTE) / out_size.to(COMPUTE)
    real = tl.maximum(scale * (position.to(COMPUTE) + 0.5) - 0.5, 0.0)
    low = tl.minimum(real.to(tl.int64), in_size - 1)
    high = tl.where(low < in_size - 1, low + 1, low)
    return low, high, real - low.to(COMPUTE)


@triton.jit
def _sample(channels, stride_h, stride_w, low_h, high_h, low_w, high_w, lam_h, lam_w, mask,
            COMPUTE: tl.constexpr):
    """Resampled [rows, positions] tile of the maps at ``channels`` ([rows, 1] pointers).

    Taps of weight zero (all but one when the sizes agree) are masked out, not loaded.
    """
    w00 = ((1.0 - lam_h) * (1.0 - lam_w))[None, :]
    w01 = ((1.0 - lam_h) * lam_w)[None, :]
    w10 = (lam_h * (1.0 - lam_w))[None, :]
    w11 = (lam_h * lam_w)[None, :]
    top, bottom = (low_h * stride_h)[None, :], (high_h * stride_h)[None, :]
    left, right = (low_w * stride_w)[None, :], (high_w * stride_w)[None, :]
    value = w00 * tl.load(channels + top + left, mask=mask & (w00 != 0), other=0.0).to(COMPUTE)
    value += w01 * tl.load(channels + top + right, mask=mask & (w01 != 0), other=0.0).to(COMPUTE)
    value += w10 * tl.load(channels + bottom + left, mask=mask & (w10 != 0), other=0.0).to(COMPUTE)
    value += w11 * tl.load(channels + bottom + right, mask=mask & (w11 != 0), other=0.0).to(COMPUTE)
    return value


@triton.jit
def _spread(channels, stride_h, stride_w, low_h, high_h, low_w, high_w, lam_h, lam_w, mask,
            value):
    """The transpose of ``_sample``: adds ``value`` back onto the maps at ``channels``."""
    w00 = ((1.0 - lam_h) * (1.0 - lam_w))[None, :]
    w01 = ((1.0 - lam_h) * lam_w)[None, :]
    w10 = (lam_h * (1.0 - lam_w))[None, :]
    w11 = (lam_h * lam_w)[None, :]
    top, bottom = (low_h * stride_h)[None, :], (high_h * stride_h)[None, :]
    left, right = (low_w * stride_w)[None, :], (high_w * stride_w)[None, :]
    tl.atomic_add(channels + top + left, w00 * value, mask=mask & (w00 != 0), sem="relaxed")
    tl.atomic_add(channels + top + right, w01 * value, mask=mask & (w01 != 0), sem="relaxed")
    tl.atomic_add(channels + bottom + left, w10 * value, mask=mask & (w10 != 0), sem="relaxed")
    tl.atomic_add(channels + bottom + right, w11 * value, mask=mask & (w11 != 0), sem="relaxed")


@triton.jit
def channel_errors_kernel(
        items, pairs,
        source0, source1, source2, source3,
        target0, target1, target2, target3,
        tangent_source0, tangent_source1, tangent_source2, tangent_source3,
        tangent_target0, tangent_target1, tangent_target2, tangent_target3,
        grad_source0, grad_source1, grad_source2, grad_source3,
        grad_target0, grad_target1, grad_target2, grad_target3,
        weight, bias, tangent_weight, tangent_bias, grad_weight, grad_bias,
        errors, errors_stride_b, errors_stride_c,
        grad_grad_errors, grad_grad_errors_stride_b, grad_grad_errors_stride_c,
        MODE: tl.constexpr,
        HAS_TANGENT_WEIGHT: tl.constexpr, HAS_TANGENT_BIAS: tl.constexpr,
        WANT_SOURCE: tl.constexpr, WANT_TARGET: tl.constexpr,
        WANT_WEIGHT: tl.constexpr, WANT_BIAS: tl.constexpr,
        BLOCK_ROWS: tl.constexpr, BLOCK_POS: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr):
    """MODE FORWARD: ``errors`` [B, cols] gets E. BACKWARD: ``errors`` holds grad_errors and
    the wanted gradients are accumulated. DOUBLE_BACKWARD: as BACKWARD with the tangents,
    plus ``grad_grad_errors``. ``items`` [n, 2] lists (pair row, first channel) per program
    along axis 0; axis 1 is the sample. Accumulators and ``errors`` hold the compute dtype.
    """
    COMPUTE: tl.constexpr = errors.dtype.element_ty
    item = tl.program_id(0)
    sample = tl.program_id(1).to(tl.int64)
    pair = tl.load(items + 2 * item)
    first_row = tl.load(items + 2 * item + 1)
    meta = pairs + pair * FIELDS
    source_slot = tl.load(meta + SOURCE_SLOT)
    target_slot = tl.load(meta + TARGET_SLOT)
    source_channels = tl.load(meta + SOURCE_CHANNELS)
    target_channels = tl.load(meta + TARGET_CHANNELS)
    source_height = tl.load(meta + SOURCE_HEIGHT)
    source_width = tl.load(meta + SOURCE_WIDTH)
    target_height = tl.load(meta + TARGET_HEIGHT)
    target_width = tl.load(meta + TARGET_WIDTH)
    column = tl.load(meta + COLUMN)
    weight_offset = tl.load(meta + WEIGHT_OFFSET)
    bias_offset = tl.load(meta + BIAS_OFFSET)
    positions = target_height * target_width
    inv_positions = 1.0 / positions.to(COMPUTE)

    rows = first_row + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < source_channels
    k_range = tl.arange(0, BLOCK_K)
    source = (_pick(source_slot, source0, source1, source2, source3)
              + sample * tl.load(meta + SOURCE_STRIDES)
              + rows[:, None] * tl.load(meta + SOURCE_STRIDES + 1))
    source_stride_h = tl.load(meta + SOURCE_STRIDES + 2)
    source_stride_w = tl.load(meta + SOURCE_STRIDES + 3)
    target = (_pick(target_slot, target0, target1, target2, target3)
              + sample * tl.load(meta + TARGET_STRIDES))
    target_stride_c = tl.load(meta + TARGET_STRIDES + 1)
    target_stride_h = tl.load(meta + TARGET_STRIDES + 2)
    target_stride_w = tl.load(meta + TARGET_STRIDES + 3)
    weight_rows = weight_offset + rows * target_channels  # [rows]: W_i[r, 0] in the packs
    bias_rows = tl.load(bias + bias_offset + rows, mask=row_mask, other=0.0).to(COMPUTE)

    if MODE != FORWARD:
        # (2 / HW) grad_errors[b, column]: turns D (or U) into the gradient of the square.
        grad_rows = tl.load(errors + sample * errors_stride_b + (column + rows) * errors_stride_c,
                            mask=row_mask, other=0.0).to(COMPUTE) * 2.0 * inv_positions
    if MODE == DOUBLE_BACKWARD:
        # A missing tangent map reads as zeros: none of its channels is in range.
        tangent_source_rows = rows < tl.load(meta + HAS_TANGENT_SOURCE) * source_channels
        tangent_target_channels = tl.load(meta + HAS_TANGENT_TARGET) * target_channels
        tangent_source = (_pick(source_slot, tangent_source0, tangent_source1, tangent_source2,
                                tangent_source3)
                          + sample * tl.load(meta + TANGENT_SOURCE_STRIDES)
                          + rows[:, None] * tl.load(meta + TANGENT_SOURCE_STRIDES + 1))
        tangent_source_stride_h = tl.load(meta + TANGENT_SOURCE_STRIDES + 2)
        tangent_source_stride_w = tl.load(meta + TANGENT_SOURCE_STRIDES + 3)
        tangent_target = (_pick(target_slot, tangent_target0, tangent_target1, tangent_target2,
                                tangent_target3)
                          + sample * tl.load(meta + TANGENT_TARGET_STRIDES))
        tangent_target_stride_c = tl.load(meta + TANGENT_TARGET_STRIDES + 1)
        tangent_target_stride_h = tl.load(meta + TANGENT_TARGET_STRIDES + 2)
        tangent_target_stride_w = tl.load(meta + TANGENT_TARGET_STRIDES + 3)
        if HAS_TANGENT_BIAS:
            tangent_bias_rows = tl.load(tangent_bias + bias_offset + rows, mask=row_mask,
                                        other=0.0).to(COMPUTE)
    if WANT_SOURCE:
        grad_source = (_pick(source_slot, grad_source0, grad_source1, grad_source2, grad_source3)
                       + sample * tl.load(meta + GRAD_SOURCE_STRIDES)
                       + rows[:, None] * tl.load(meta + GRAD_SOURCE_STRIDES + 1))
        grad_source_stride_h = tl.load(meta + GRAD_SOURCE_STRIDES + 2)
        grad_source_stride_w = tl.load(meta + GRAD_SOURCE_STRIDES + 3)
    if WANT_TARGET:
        grad_target = (_pick(target_slot, grad_target0, grad_target1, grad_target2, grad_target3)
                       + sample * tl.load(meta + GRAD_TARGET_STRIDES))
        grad_target_stride_c = tl.load(meta + GRAD_TARGET_STRIDES + 1)
        grad_target_stride_h = tl.load(meta + GRAD_TARGET_STRIDES + 2)
        grad_target_stride_w = tl.load(meta + GRAD_TARGET_STRIDES + 3)

    row_sums = tl.zeros([BLOCK_ROWS], dtype=COMPUTE)  # sum D^2 (forward) or sum U D (double)
    bias_sums = tl.zeros([BLOCK_ROWS], dtype=COMPUTE)
    for start in range(0, positions, BLOCK_POS):
        position = start + tl.arange(0, BLOCK_POS)
        position_mask = position < positions
        tile_mask = row_mask[:, None] & position_mask[None, :]
        out_h = position // target_width
        out_w = position % target_width
        low_h, high_h, lam_h = _axis_taps(out_h, source_height, target_height, COMPUTE)
        low_w, high_w, lam_w = _axis_taps(out_w, source_width, target_width, COMPUTE)
        target_tile = (out_h * target_stride_h + out_w * target_stride_w)[None, :]

        projection = tl.zeros([BLOCK_ROWS, BLOCK_POS], dtype=COMPUTE)  # W T
        tangent_projection = tl.zeros([BLOCK_ROWS, BLOCK_POS], dtype=COMPUTE)  # W vT + vW T
        for k_start in range(0, target_channels, BLOCK_K):
            k = k_start + k_range
            k_mask = k < target_channels
            w_mask = row_mask[:, None] & k_mask[None, :]
            t_mask = k_mask[:, None] & position_mask[None, :]
            w = tl.load(weight + weight_rows[:, None] + k[None, :], mask=w_mask,
                        other=0.0).to(COMPUTE)
            t = tl.load(target + k[:, None] * target_stride_c + target_tile, mask=t_mask,
                        other=0.0).to(COMPUTE)
            projection = tl.dot(w, t, projection, input_precision=PRECISION)
            if MODE == DOUBLE_BACKWARD:
                vt = tl.load(tangent_target + k[:, None] * tangent_target_stride_c
                             + (out_h * tangent_target_stride_h
                                + out_w * tangent_target_stride_w)[None, :],
                             mask=(k < tangent_target_channels)[:, None] & position_mask[None, :],
                             other=0.0).to(COMPUTE)
                tangent_projection = tl.dot(w, vt, tangent_projection, input_precision=PRECISION)
                if HAS_TANGENT_WEIGHT:
                    vw = tl.load(tangent_weight + weight_rows[:, None] + k[None, :], mask=w_mask,
                                 other=0.0).to(COMPUTE)
                    tangent_projection = tl.dot(vw, t, tangent_projection,
                                                input_precision=PRECISION)
        resized = _sample(source, source_stride_h, source_stride_w, low_h, high_h, low_w, high_w,
                          lam_h, lam_w, tile_mask, COMPUTE)
        difference = tl.where(tile_mask, resized - projection - bias_rows[:, None], 0.0)

        if MODE == FORWARD:
            row_sums += tl.sum(difference * difference, axis=1)
        else:
            if MODE == BACKWARD:
                grad = grad_rows[:, None] * difference
            else:
                # U = resize(vS) - W vT - vW T - vb; a missing vS loads as zeros.
                change = _sample(tangent_source, tangent_source_stride_h,
                                 tangent_source_stride_w, low_h, high_h, low_w, high_w, lam_h,
                                 lam_w, tangent_source_rows[:, None] & position_mask[None, :],
                                 COMPUTE) - tangent_projection
                if HAS_TANGENT_BIAS:
                    change -= tangent_bias_rows[:, None]
                change = tl.where(tile_mask, change, 0.0)
                row_sums += tl.sum(change * difference, axis=1)
                grad = grad_rows[:, None] * change           # G_D
                grad_change = grad_rows[:, None] * difference  # G_U
            if WANT_BIAS:
                bias_sums += tl.sum(grad, axis=1)
            if WANT_SOURCE:
                _spread(grad_source, grad_source_stride_h, grad_source_stride_w, low_h, high_h,
                        low_w, high_w, lam_h, lam_w, tile_mask, grad)
            if WANT_TARGET or WANT_WEIGHT:
                for k_start in range(0, target_channels, BLOCK_K):
                    k = k_start + k_range
                    k_mask = k < target_channels
                    w_mask = row_mask[:, None] & k_mask[None, :]
                    t_mask = k_mask[:, None] & position_mask[None, :]
                    if WANT_TARGET:
                        # -W^T G_D (- vW^T G_U), summed over pairs and blocks by atomics.
                        w = tl.load(weight + weight_rows[:, None] + k[None, :], mask=w_mask,
                                    other=0.0).to(COMPUTE)
                        grad_t = tl.dot(tl.trans(w), grad, input_precision=PRECISION)
                        if MODE == DOUBLE_BACKWARD:
                            if HAS_TANGENT_WEIGHT:
                                vw = tl.load(tangent_weight + weight_rows[:, None] + k[None, :],
                                             mask=w_mask, other=0.0).to(COMPUTE)
                                grad_t = tl.dot(tl.trans(vw), grad_change, grad_t,
                                                input_precision=PRECISION)
                        tl.atomic_add(grad_target + k[:, None] * grad_target_stride_c
                                      + (out_h * grad_target_stride_h
                                         + out_w * grad_target_stride_w)[None, :],
                                      -grad_t, mask=t_mask, sem="relaxed")
                    if WANT_WEIGHT:
                        # -G_D T^T (- G_U vT^T), summed over samples and tiles by atomics.
                        t = tl.load(target + k[:, None] * target_stride_c + target_tile,
                                    mask=t_mask, other=0.0).to(COMPUTE)
                        grad_w = tl.dot(grad, tl.trans(t), input_precision=PRECISION)
                        if MODE == DOUBLE_BACKWARD:
                            vt = tl.load(tangent_target + k[:, None] * tangent_target_stride_c
                                         + (out_h * tangent_target_stride_h
                                            + out_w * tangent_target_stride_w)[None, :],
                                         mask=(k < tangent_target_channels)[:, None]
                                         & position_mask[None, :], other=0.0).to(COMPUTE)
                            grad_w = tl.dot(grad_change, tl.trans(vt), grad_w,
                                            input_precision=PRECISION)
                        tl.atomic_add(grad_weight + weight_rows[:, None] + k[None, :], -grad_w,
                                      mask=w_mask, sem="relaxed")

    columns = column + rows
    if MODE == FORWARD:
        tl.store(errors + sample * errors_stride_b + columns * errors_stride_c,
                 row_sums * inv_positions, mask=row_mask)
    if MODE == DOUBLE_BACKWARD:
        tl.store(grad_grad_errors + sample * grad_grad_errors_stride_b
                 + columns * grad_grad_errors_stride_c,
                 row_sums * 2.0 * inv_positions, mask=row_mask)
    if WANT_BIAS:
        tl.atomic_add(grad_bias + bias_offset + rows, -bias_sums, mask=row_mask, sem="relaxed")
