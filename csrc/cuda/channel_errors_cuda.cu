// CUDA kernels of the three channel-error ops (math: l2t_fast/matching/backends/registration.py).
//
// Per target layer n, the regressors of every pair that reads n are stacked into one
// [rows, Ct] matrix (channel_errors.h). The batch is cut into chunks (whole samples while
// they fit, else tiles of one sample's positions) so that a chunk's buffers stay within a
// fixed workspace budget, and per chunk:
//   1. cuBLAS (at::bmm, tensor cores) projects the chunk: P = W T into a [rows, samples,
//      positions] buffer, in float32 for half inputs;
//   2. one fused epilogue kernel (a warp per row and sample) resizes the source on the fly,
//      forms D = S~ - b - P and reduces it: sum D^2 for the errors, or writes the scaled
//      residual grad_errors * D (or * U in the double backward) and its row sums;
//   3. the backward products take that residual through cuBLAS again: -W^T G into the
//      target gradient, -G T^T into the weight gradient, and a gather kernel applies the
//      transposed bilinear resize for the source gradient.
// The backward recomputes P instead of storing it. Nothing of size [B, Cs, Ht, Wt] is
// allocated; every reduction has a fixed order, so results are deterministic.
//
// The residual buffers hold grad_errors * D without the factor 2 / HW, which is applied in
// fp32 afterwards (as the GEMMs' alpha): this keeps float16 residuals far from underflow.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <vector>

#include "../channel_errors.h"

static_assert(TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8),
              "the l2t_fast CUDA kernels need torch >= 2.8 (at::bmm with out_dtype)");

namespace l2t_fast {
namespace {

// Default bound on one chunk's buffers (projections, residuals, transposed target copies).
// The environment variable L2T_FAST_CUDA_WORKSPACE_BYTES overrides it: the tests shrink it
// to cover chunk and tile boundaries on small maps, benchmarks to pick the best size.
constexpr int64_t kWorkspaceBytes = int64_t{64} << 20;
constexpr int kMaxSetPairs = 8;  // pairs per epilogue launch (kernel parameters are by value)
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int64_t kMaxGatherBlocks = 65536;

int64_t workspace_bytes() {
  const char* value = std::getenv("L2T_FAST_CUDA_WORKSPACE_BYTES");
  if (value == nullptr || *value == '\0') return kWorkspaceBytes;
  char* end = nullptr;
  const long long bytes = std::strtoll(value, &end, 10);
  TORCH_CHECK(end != value && *end == '\0' && bytes > 0,
              "L2T_FAST_CUDA_WORKSPACE_BYTES must be a positive integer, got '", value, "'");
  return bytes;
}

// ---------------------------------------------------------------------------------------
// Device side

// Bilinear taps along one axis, exactly as F.interpolate(mode="bilinear",
// align_corners=False, size=...) computes them: out[i] = (1 - weight) in[lo] + weight in[hi].
template <typename acc_t>
struct AxisTap {
  int64_t lo, hi;
  acc_t weight;
};

template <typename acc_t>
__device__ __forceinline__ AxisTap<acc_t> axis_tap(int64_t out_index, acc_t scale,
                                                   int64_t in_size) {
  acc_t real = scale * (static_cast<acc_t>(out_index) + acc_t(0.5)) - acc_t(0.5);
  real = real > acc_t(0) ? real : acc_t(0);
  int64_t lo = static_cast<int64_t>(real);
  lo = lo < in_size - 1 ? lo : in_size - 1;
  return {lo, lo < in_size - 1 ? lo + 1 : lo, real - static_cast<acc_t>(lo)};
}

// How much input index `in_index` weighs in the output tap `tap` (0 when it is not used).
template <typename acc_t>
__device__ __forceinline__ acc_t tap_weight(const AxisTap<acc_t>& tap, int64_t in_index) {
  return (tap.lo == in_index ? acc_t(1) - tap.weight : acc_t(0)) +
         (tap.hi == in_index ? tap.weight : acc_t(0));
}

// The output indices [begin, end) whose taps can reach input index `in_index`: those with
// lo in {in_index - 1, in_index}, widened by one each side against rounding (tap_weight
// then decides exactly, with the forward's own arithmetic).
struct IndexRange {
  int64_t begin, end;
};

__device__ __forceinline__ IndexRange reaching_outputs(int64_t in_index, double scale,
                                                       int64_t out_size) {
  const double first = (static_cast<double>(in_index) - 0.5) / scale - 0.5;
  const double last = (static_cast<double>(in_index) + 1.5) / scale - 0.5;
  const int64_t begin = static_cast<int64_t>(floor(first)) - 1;
  const int64_t end = static_cast<int64_t>(ceil(last)) + 1;
  return {begin > 0 ? begin : 0, end < out_size ? end : out_size};
}

// One pair's part of an epilogue launch.
template <typename scalar_t, typename acc_t>
struct PairSlot {
  const scalar_t* source;          // [B, Cs, Hs, Ws], contiguous
  const scalar_t* tangent_source;  // like source (double backward), or null
  acc_t* grad_source;              // [B, Cs, Hs, Ws] accumulator, or null
  int64_t channels, height, width;  // of the source map
  int64_t row_begin;               // first row of the pair in the group's stack
  int64_t column;                  // first column of the pair in E
  acc_t scale_y, scale_x;          // source size / target size, per axis
  bool identity;                   // same size as the target: no resize
};

template <typename scalar_t, typename acc_t>
struct PairSet {
  PairSlot<scalar_t, acc_t> slot[kMaxSetPairs];
  int count;
  int64_t row_begin, row_end;  // the set's pairs own these consecutive rows of the stack
};

// A block of the target layer's positions: samples [first_sample, + samples) times
// flattened positions [first_position, + positions) of an height x width map.
struct Chunk {
  int64_t first_sample, samples, first_position, positions, height, width;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t sample_plane(const scalar_t* plane,
                                              const PairSlot<scalar_t, acc_t>& slot,
                                              int64_t position, int64_t target_width) {
  if (slot.identity) return static_cast<acc_t>(plane[position]);
  // One map's positions fit in 32 bits, whose division is much cheaper than 64-bit.
  const int h = static_cast<int>(position) / static_cast<int>(target_width);
  const int w = static_cast<int>(position) - h * static_cast<int>(target_width);
  const AxisTap<acc_t> ty = axis_tap(h, slot.scale_y, slot.height);
  const AxisTap<acc_t> tx = axis_tap(w, slot.scale_x, slot.width);
  const scalar_t* top = plane + ty.lo * slot.width;
  const scalar_t* bottom = plane + ty.hi * slot.width;
  const acc_t upper = (acc_t(1) - tx.weight) * static_cast<acc_t>(top[tx.lo]) +
                      tx.weight * static_cast<acc_t>(top[tx.hi]);
  const acc_t lower = (acc_t(1) - tx.weight) * static_cast<acc_t>(bottom[tx.lo]) +
                      tx.weight * static_cast<acc_t>(bottom[tx.hi]);
  return (acc_t(1) - ty.weight) * upper + ty.weight * lower;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
  for (int offset = 16; offset > 0; offset >>= 1)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Everything the fused epilogue reads and writes for one chunk and one set of pairs.
// Buffers shaped [rows, samples, positions] are indexed by the group's stack row.
template <typename scalar_t, typename acc_t>
struct EpilogueArgs {
  PairSet<scalar_t, acc_t> pairs;
  Chunk chunk;
  int64_t group_rows, columns;
  acc_t inv_positions;                     // 1 / (Ht Wt)
  const acc_t* projection;                 // W T
  const acc_t* tangent_projection;         // W vT, or null
  const acc_t* weight_tangent_projection;  // vW T, or null
  const scalar_t* bias;                    // stacked [rows]
  const scalar_t* tangent_bias;            // stacked [rows], or null
  const acc_t* grad_errors;                // [B, columns]; null in the forward
  acc_t* errors;            // forward: E; double backward: grad of grad_errors; else null
  scalar_t* grad_residual;  // grad_errors * D (backward) or * U (double backward), or null
  scalar_t* grad_tangent_residual;  // double backward: grad_errors * D, or null
  acc_t* row_sums;                  // [B, rows]: sums of grad_residual over positions, or null
  bool tangent;                     // double backward: the residual is U, not D
};

// One warp per (row, sample) of the chunk: D = S~ - b - P over the chunk's positions, and
//   forward:          errors += mean D^2
//   backward:         grad_residual = g D, row_sums += sum g D, identity sources += 2/HW g D
//   double backward:  U = resize(vS) - vb - W vT - vW T; errors += 2/HW sum U D,
//                     grad_residual = g U, grad_tangent_residual = g D, sources += 2/HW g U
// with g = grad_errors[sample, column]. Launches of one group run in order on one stream
// and no two pairs of a set share a source, so the += never race.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    epilogue_kernel(const __grid_constant__ EpilogueArgs<scalar_t, acc_t> args) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
  const Chunk& chunk = args.chunk;
  if (warp >= (args.pairs.row_end - args.pairs.row_begin) * chunk.samples) return;
  const int64_t row = args.pairs.row_begin + warp / chunk.samples;
  const int64_t local_sample = warp % chunk.samples;
  const int64_t sample = chunk.first_sample + local_sample;
  int k = 0;
  while (k + 1 < args.pairs.count && row >= args.pairs.slot[k + 1].row_begin) ++k;
  const PairSlot<scalar_t, acc_t>& slot = args.pairs.slot[k];
  const int64_t channel = row - slot.row_begin;
  const int64_t plane_offset = (sample * slot.channels + channel) * slot.height * slot.width;
  const scalar_t* source = slot.source + plane_offset;
  const scalar_t* tangent_source =
      slot.tangent_source != nullptr ? slot.tangent_source + plane_offset : nullptr;
  acc_t* identity_grad =
      slot.identity && slot.grad_source != nullptr ? slot.grad_source + plane_offset : nullptr;
  const int64_t column = slot.column + channel;
  const int64_t base = (row * chunk.samples + local_sample) * chunk.positions;
  const acc_t bias = static_cast<acc_t>(args.bias[row]);
  const acc_t tangent_bias =
      args.tangent_bias != nullptr ? static_cast<acc_t>(args.tangent_bias[row]) : acc_t(0);
  const acc_t grad =
      args.grad_errors != nullptr ? args.grad_errors[sample * args.columns + column] : acc_t(0);
  const acc_t two_inv_positions = acc_t(2) * args.inv_positions;

  acc_t product = 0, row_sum = 0;
#pragma unroll 4
  for (int64_t j = lane; j < chunk.positions; j += 32) {
    const int64_t position = chunk.first_position + j;
    const acc_t d =
        sample_plane(source, slot, position, chunk.width) - bias - args.projection[base + j];
    acc_t residual = d;
    if (args.tangent) {
      residual = -tangent_bias;
      if (tangent_source != nullptr)
        residual += sample_plane(tangent_source, slot, position, chunk.width);
      if (args.tangent_projection != nullptr) residual -= args.tangent_projection[base + j];
      if (args.weight_tangent_projection != nullptr)
        residual -= args.weight_tangent_projection[base + j];
    }
    product += residual * d;
    if (args.grad_residual != nullptr) {
      const acc_t g = grad * residual;
      args.grad_residual[base + j] = static_cast<scalar_t>(g);
      row_sum += g;
      if (identity_grad != nullptr) identity_grad[position] += two_inv_positions * g;
      if (args.grad_tangent_residual != nullptr)
        args.grad_tangent_residual[base + j] = static_cast<scalar_t>(grad * d);
    }
  }
  product = warp_sum(product);
  row_sum = warp_sum(row_sum);
  if (lane == 0) {
    if (args.errors != nullptr)
      args.errors[sample * args.columns + column] +=
          product * (args.tangent ? two_inv_positions : args.inv_positions);
    if (args.row_sums != nullptr) args.row_sums[sample * args.group_rows + row] += row_sum;
  }
}

// The source gradient of a resized pair: resize^T of its rows of the residual, gathered
// per source pixel (deterministic, no atomics) from the target positions its taps reach.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    resize_transpose_kernel(const scalar_t* grad_residual,
                            const __grid_constant__ PairSlot<scalar_t, acc_t> slot,
                            const __grid_constant__ Chunk chunk, const acc_t two_inv_positions) {
  const int64_t plane_size = slot.height * slot.width;
  const int64_t total = slot.channels * chunk.samples * plane_size;
  const int64_t last_position = chunk.first_position + chunk.positions;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t x = index % slot.width;
    const int64_t y = (index / slot.width) % slot.height;
    const int64_t local_sample = (index / plane_size) % chunk.samples;
    const int64_t channel = index / (plane_size * chunk.samples);
    const scalar_t* plane =
        grad_residual + ((slot.row_begin + channel) * chunk.samples + local_sample) * chunk.positions;
    const IndexRange rows = reaching_outputs(y, static_cast<double>(slot.scale_y), chunk.height);
    const IndexRange cols = reaching_outputs(x, static_cast<double>(slot.scale_x), chunk.width);
    acc_t sum = 0;
    for (int64_t h = rows.begin; h < rows.end; ++h) {
      const acc_t wy = tap_weight(axis_tap(h, slot.scale_y, slot.height), y);
      if (wy == acc_t(0)) continue;
      acc_t row_sum = 0;
      for (int64_t w = cols.begin; w < cols.end; ++w) {
        const int64_t position = h * chunk.width + w;
        if (position < chunk.first_position || position >= last_position) continue;
        const acc_t wx = tap_weight(axis_tap(w, slot.scale_x, slot.width), x);
        if (wx != acc_t(0))
          row_sum += wx * static_cast<acc_t>(plane[position - chunk.first_position]);
      }
      sum += wy * row_sum;
    }
    if (sum != acc_t(0)) {
      const int64_t sample = chunk.first_sample + local_sample;
      slot.grad_source[(sample * slot.channels + channel) * plane_size + y * slot.width + x] +=
          two_inv_positions * sum;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Host side

std::vector<std::vector<size_t>> launch_sets(const TargetGroup& group,
                                             at::IntArrayRef pair_source) {
  // Consecutive pairs of the group, at most kMaxSetPairs per set and no source twice in a
  // set, so that one launch never adds twice into the same source gradient.
  std::vector<std::vector<size_t>> sets;
  std::vector<int64_t> sources;
  for (size_t k = 0; k < group.pairs.size(); ++k) {
    const int64_t m = pair_source[group.pairs[k]];
    const bool repeated = std::find(sources.begin(), sources.end(), m) != sources.end();
    if (sets.empty() || repeated || sets.back().size() == static_cast<size_t>(kMaxSetPairs)) {
      sets.emplace_back();
      sources.clear();
    }
    sets.back().push_back(k);
    sources.push_back(m);
  }
  return sets;
}

// Everything a kernel needs, prepared once per call.
struct Prepared {
  PairPlan plan;
  std::vector<int64_t> pair_source;
  std::vector<at::Tensor> source;       // contiguous NCHW: the kernels index them
  std::vector<at::Tensor> target_maps;  // [B, Ct, H*W] views (NCHW or channels_last)
  std::vector<int64_t> target_height, target_width;
  std::vector<at::Tensor> weight_stack, bias_stack;     // per group
  std::vector<std::vector<std::vector<size_t>>> sets;  // per group

  Prepared(at::TensorList source_in, at::TensorList target_in, at::TensorList weight,
           at::TensorList bias, at::IntArrayRef pair_source_in, at::IntArrayRef pair_target)
      : plan(make_plan(source_in, target_in, weight, bias, pair_source_in, pair_target)),
        pair_source(pair_source_in.begin(), pair_source_in.end()) {
    TORCH_CHECK(source_in[0].is_cuda(), "channel_errors (CUDA): the inputs must be CUDA tensors");
    for (const auto& s : source_in) source.push_back(s.contiguous());
    for (const auto& t : target_in) {
      TORCH_CHECK(t.size(2) * t.size(3) <= std::numeric_limits<int>::max(),
                  "channel_errors (CUDA): a target map has more than 2^31 positions");
      target_maps.push_back(t.flatten(2));
      target_height.push_back(t.size(2));
      target_width.push_back(t.size(3));
    }
    for (const auto& group : plan.groups) {
      weight_stack.push_back(stack_rows(weight, group));
      bias_stack.push_back(stack_rows(bias, group));
      sets.push_back(launch_sets(group, pair_source_in));
    }
  }

  int64_t positions(const TargetGroup& group) const { return target_maps[group.target].size(2); }
};

// Samples and positions per chunk: whole samples while one fits the budget, else tiles of
// one sample's positions. `bytes_per_position` counts every buffer of one sample-position.
struct ChunkShape {
  int64_t samples, positions;
};

ChunkShape chunk_shape(int64_t batch, int64_t positions, int64_t bytes_per_position) {
  const int64_t budget = workspace_bytes();
  const int64_t per_sample = bytes_per_position * positions;
  if (per_sample == 0) return {std::max<int64_t>(batch, 1), std::max<int64_t>(positions, 1)};
  if (per_sample <= budget)
    return {std::max<int64_t>(1, std::min(batch, budget / per_sample)), positions};
  return {1, std::max<int64_t>(1, budget / bytes_per_position)};
}

template <typename Visit>
void for_each_chunk(const Prepared& prep, const TargetGroup& group, const ChunkShape& shape,
                    Visit visit) {
  const int64_t batch = prep.plan.batch, positions = prep.positions(group);
  for (int64_t b0 = 0; b0 < batch; b0 += shape.samples) {
    for (int64_t p0 = 0; p0 < positions; p0 += shape.positions) {
      visit(Chunk{b0, std::min(shape.samples, batch - b0), p0,
                  std::min(shape.positions, positions - p0), prep.target_height[group.target],
                  prep.target_width[group.target]});
    }
  }
}

// A [rows, samples, positions] view of the front of a flat buffer.
at::Tensor chunk_buffer(const at::Tensor& flat, int64_t rows, const Chunk& chunk) {
  return flat.narrow(0, 0, rows * chunk.samples * chunk.positions)
      .view({rows, chunk.samples, chunk.positions});
}

// The chunk's part of [B, C, H*W] maps: [samples, C, positions].
at::Tensor chunk_maps(const at::Tensor& maps, const Chunk& chunk) {
  return maps.narrow(0, chunk.first_sample, chunk.samples)
      .narrow(2, chunk.first_position, chunk.positions);
}

// out[r, b, p] = sum_k stack[r, k] maps[b, k, p] over the chunk (cuBLAS, strided batched,
// the stack broadcast over samples), written in out's dtype (float32 for half inputs).
void project(const at::Tensor& stack, const at::Tensor& maps, const Chunk& chunk,
             at::Tensor& out) {
  at::Tensor products = out.permute({1, 0, 2});
  at::bmm_out(products, stack.expand({chunk.samples, stack.size(0), stack.size(1)}),
              chunk_maps(maps, chunk), out.scalar_type());
}

// grad_maps[chunk] = alpha * stack^T residual ([rows, samples, positions] residual, stack
// [rows, C]); the result is written once per chunk, never accumulated.
void project_back(const at::Tensor& stack, const at::Tensor& residual, const Chunk& chunk,
                  double alpha, const at::Tensor& grad_maps) {
  at::Tensor out = chunk_maps(grad_maps, chunk);
  const at::Tensor stack_t = stack.t().expand({chunk.samples, stack.size(1), stack.size(0)});
  at::baddbmm_out(out, out, stack_t, residual.permute({1, 0, 2}), 0.0, alpha);
}

// sum over the chunk of residual[r, b, p] maps[b, k, p]: [rows, C] in float32 for half.
at::Tensor correlate(const at::Tensor& residual, const at::Tensor& maps, const Chunk& chunk,
                     at::ScalarType accumulate) {
  const int64_t rows = residual.size(0), columns = chunk.samples * chunk.positions;
  const at::Tensor maps_by_channel =
      chunk_maps(maps, chunk).permute({1, 0, 2}).reshape({maps.size(1), columns});
  return at::mm(residual.reshape({rows, columns}), maps_by_channel.t(), accumulate);
}

template <typename scalar_t, typename acc_t>
PairSlot<scalar_t, acc_t> make_slot(const Prepared& prep, const TargetGroup& group, size_t k,
                                    const std::vector<at::Tensor>* tangent_source,
                                    std::vector<at::Tensor>* grad_source) {
  const int64_t i = group.pairs[k];
  const int64_t m = prep.pair_source[i];
  const at::Tensor& s = prep.source[m];
  PairSlot<scalar_t, acc_t> slot{};
  slot.source = s.data_ptr<scalar_t>();
  if (tangent_source != nullptr && (*tangent_source)[m].defined())
    slot.tangent_source = (*tangent_source)[m].data_ptr<scalar_t>();
  if (grad_source != nullptr) slot.grad_source = (*grad_source)[m].data_ptr<acc_t>();
  slot.channels = s.size(1);
  slot.height = s.size(2);
  slot.width = s.size(3);
  slot.row_begin = group.row_offset[k];
  slot.column = prep.plan.column_offset[i];
  const int64_t th = prep.target_height[group.target], tw = prep.target_width[group.target];
  slot.scale_y = static_cast<acc_t>(static_cast<double>(s.size(2)) / static_cast<double>(th));
  slot.scale_x = static_cast<acc_t>(static_cast<double>(s.size(3)) / static_cast<double>(tw));
  slot.identity = s.size(2) == th && s.size(3) == tw;
  return slot;
}

// The epilogue arguments every op sets: the chunk, its projection W T and the biases.
template <typename scalar_t, typename acc_t>
EpilogueArgs<scalar_t, acc_t> epilogue_args(const Prepared& prep, size_t g, const Chunk& chunk,
                                            const at::Tensor& projection) {
  EpilogueArgs<scalar_t, acc_t> args{};
  args.chunk = chunk;
  args.group_rows = prep.plan.groups[g].rows;
  args.columns = prep.plan.columns;
  args.inv_positions = acc_t(1) / static_cast<acc_t>(prep.positions(prep.plan.groups[g]));
  args.projection = projection.data_ptr<acc_t>();
  args.bias = prep.bias_stack[g].data_ptr<scalar_t>();
  return args;
}

// Launches the epilogue once per set of the group; `args` carries everything but the pairs.
template <typename scalar_t, typename acc_t>
void launch_epilogue(const Prepared& prep, size_t g, EpilogueArgs<scalar_t, acc_t> args,
                     const std::vector<at::Tensor>* tangent_source,
                     std::vector<at::Tensor>* grad_source) {
  const TargetGroup& group = prep.plan.groups[g];
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& set : prep.sets[g]) {
    args.pairs = PairSet<scalar_t, acc_t>{};
    args.pairs.count = static_cast<int>(set.size());
    for (size_t j = 0; j < set.size(); ++j)
      args.pairs.slot[j] = make_slot<scalar_t, acc_t>(prep, group, set[j], tangent_source,
                                                     grad_source);
    const auto& last = args.pairs.slot[set.size() - 1];
    args.pairs.row_begin = args.pairs.slot[0].row_begin;
    args.pairs.row_end = last.row_begin + last.channels;
    const int64_t warps = (args.pairs.row_end - args.pairs.row_begin) * args.chunk.samples;
    if (warps == 0) continue;
    const int64_t blocks = (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
    epilogue_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Source gradients of the group's resized pairs (identity pairs get theirs in the epilogue).
template <typename scalar_t, typename acc_t>
void launch_resize_transpose(const Prepared& prep, size_t g, const at::Tensor& residual,
                             const Chunk& chunk, acc_t two_inv_positions,
                             std::vector<at::Tensor>& grad_source) {
  const TargetGroup& group = prep.plan.groups[g];
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (size_t k = 0; k < group.pairs.size(); ++k) {
    const auto slot = make_slot<scalar_t, acc_t>(prep, group, k, nullptr, &grad_source);
    if (slot.identity) continue;
    const int64_t total = slot.channels * chunk.samples * slot.height * slot.width;
    if (total == 0) continue;
    const int64_t blocks = std::min((total + kThreads - 1) / kThreads, kMaxGatherBlocks);
    resize_transpose_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0,
                                               stream>>>(residual.data_ptr<scalar_t>(), slot,
                                                         chunk, two_inv_positions);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::ScalarType accumulate_type(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 ? at::kFloat : dtype;
}

void check_grad_errors(const at::Tensor& grad_errors, const Prepared& prep) {
  TORCH_CHECK(grad_errors.dim() == 2 && grad_errors.size(0) == prep.plan.batch &&
                  grad_errors.size(1) == prep.plan.columns,
              "channel_errors_backward: grad_errors has shape ", grad_errors.sizes(),
              ", expected [", prep.plan.batch, ", ", prep.plan.columns, "]");
  const auto expected = accumulate_type(prep.source[0].scalar_type());
  TORCH_CHECK(grad_errors.scalar_type() == expected, "channel_errors_backward: grad_errors has ",
              "dtype ", grad_errors.scalar_type(), ", expected ", expected);
  TORCH_CHECK(grad_errors.device() == prep.source[0].device(),
              "channel_errors_backward: grad_errors is on ", grad_errors.device());
}

// A gradient with its input's dtype and strides, as the fake kernels (empty_like) promise.
at::Tensor like_input(const at::Tensor& result, const at::Tensor& input) {
  at::Tensor out = at::empty_like(input);
  if (out.scalar_type() == result.scalar_type() && out.strides() == result.strides())
    return result;
  return out.copy_(result);
}

std::vector<at::Tensor> like_inputs(const std::vector<at::Tensor>& results, at::TensorList inputs) {
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < results.size(); ++i) out.push_back(like_input(results[i], inputs[i]));
  return out;
}

// Per-pair gradients from per-group stacked sums.
std::vector<at::Tensor> split_stacks(const std::vector<at::Tensor>& stacks, const Prepared& prep,
                                     at::TensorList like) {
  std::vector<at::Tensor> per_pair;
  for (const auto& t : like) per_pair.push_back(at::empty(t.sizes(), stacks[0].options()));
  for (size_t g = 0; g < stacks.size(); ++g) scatter_rows(stacks[g], prep.plan.groups[g], per_pair);
  return like_inputs(per_pair, like);
}

std::vector<at::Tensor> zero_accumulators(const std::vector<at::Tensor>& like,
                                          at::ScalarType dtype) {
  std::vector<at::Tensor> out;
  for (const auto& t : like) out.push_back(at::zeros(t.sizes(), t.options().dtype(dtype)));
  return out;
}

// Target gradients, written by one group each: [B, Ct, H*W] views of NCHW or channels_last
// tensors (zeros for targets no pair reads).
std::vector<at::Tensor> target_gradients(at::TensorList target, const Prepared& prep) {
  std::vector<at::Tensor> out;
  for (size_t n = 0; n < target.size(); ++n) {
    const bool read = std::any_of(prep.plan.groups.begin(), prep.plan.groups.end(),
                                  [n](const TargetGroup& g) { return g.target == static_cast<int64_t>(n); });
    const auto format = target[n].suggest_memory_format();
    out.push_back(read ? at::empty(target[n].sizes(), target[n].options().memory_format(format))
                       : at::zeros(target[n].sizes(), target[n].options().memory_format(format)));
  }
  return out;
}

std::optional<at::Tensor> optional_at(const OptionalTensors& list, size_t i) {
  if (i >= list.size()) return std::nullopt;
  std::optional<at::Tensor> t = list.get(i);
  if (t.has_value() && t->defined()) return t;
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------
// The ops

at::Tensor channel_errors_cuda(at::TensorList source, at::TensorList target,
                               at::TensorList weight, at::TensorList bias,
                               at::IntArrayRef pair_source, at::IntArrayRef pair_target) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // kernels are below autograd
  const Prepared prep(source, target, weight, bias, pair_source, pair_target);
  const c10::cuda::CUDAGuard device_guard(prep.source[0].device());
  const auto& plan = prep.plan;
  const auto accumulate = accumulate_type(prep.source[0].scalar_type());
  at::Tensor errors =
      at::zeros({plan.batch, plan.columns}, prep.source[0].options().dtype(accumulate));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prep.source[0].scalar_type(),
                                  "channel_errors_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    for (size_t g = 0; g < plan.groups.size(); ++g) {
      const TargetGroup& group = plan.groups[g];
      const ChunkShape shape =
          chunk_shape(plan.batch, prep.positions(group), group.rows * int64_t{sizeof(acc_t)});
      const at::Tensor projection_flat =
          at::empty({group.rows * shape.samples * shape.positions}, errors.options());
      for_each_chunk(prep, group, shape, [&](const Chunk& chunk) {
        at::Tensor projection = chunk_buffer(projection_flat, group.rows, chunk);
        project(prep.weight_stack[g], prep.target_maps[group.target], chunk, projection);
        auto args = epilogue_args<scalar_t, acc_t>(prep, g, chunk, projection);
        args.errors = errors.data_ptr<acc_t>();
        launch_epilogue<scalar_t, acc_t>(prep, g, args, nullptr, nullptr);
      });
    }
  });
  return errors;
}

GradLists channel_errors_backward_cuda(const at::Tensor& grad_errors_in, at::TensorList source,
                                       at::TensorList target, at::TensorList weight,
                                       at::TensorList bias, at::IntArrayRef pair_source,
                                       at::IntArrayRef pair_target, c10::List<bool> output_mask) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // kernels are below autograd
  const Prepared prep(source, target, weight, bias, pair_source, pair_target);
  const c10::cuda::CUDAGuard device_guard(prep.source[0].device());
  check_grad_errors(grad_errors_in, prep);
  const at::Tensor grad_errors = grad_errors_in.contiguous();
  const auto& plan = prep.plan;
  const bool want_s = output_mask[0], want_t = output_mask[1], want_w = output_mask[2],
             want_b = output_mask[3];
  if (!(want_s || want_t || want_w || want_b)) return {};
  const auto accumulate = grad_errors.scalar_type();
  std::vector<at::Tensor> grad_source = want_s ? zero_accumulators(prep.source, accumulate)
                                               : std::vector<at::Tensor>{};
  std::vector<at::Tensor> grad_target = want_t ? target_gradients(target, prep)
                                               : std::vector<at::Tensor>{};
  std::vector<at::Tensor> weight_sums, bias_sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prep.source[0].scalar_type(),
                                  "channel_errors_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    for (size_t g = 0; g < plan.groups.size(); ++g) {
      const TargetGroup& group = plan.groups[g];
      const int64_t n = group.target, ct = prep.target_maps[n].size(1);
      const double two_inv = 2.0 / static_cast<double>(prep.positions(group));
      const int64_t bytes_per_position =
          group.rows * int64_t{sizeof(acc_t) + sizeof(scalar_t)} +
          (want_w ? ct * int64_t{sizeof(scalar_t)} : 0);
      const ChunkShape shape = chunk_shape(plan.batch, prep.positions(group), bytes_per_position);
      const int64_t cells = group.rows * shape.samples * shape.positions;
      const at::Tensor projection_flat = at::empty({cells}, grad_errors.options());
      const at::Tensor residual_flat = at::empty({cells}, prep.source[0].options());
      at::Tensor row_sums = want_b ? at::zeros({plan.batch, group.rows}, grad_errors.options())
                                   : at::Tensor();
      at::Tensor weight_sum = want_w ? at::zeros(prep.weight_stack[g].sizes(), grad_errors.options())
                                     : at::Tensor();
      const at::Tensor grad_target_maps = want_t ? grad_target[n].flatten(2) : at::Tensor();
      for_each_chunk(prep, group, shape, [&](const Chunk& chunk) {
        at::Tensor projection = chunk_buffer(projection_flat, group.rows, chunk);
        at::Tensor residual = chunk_buffer(residual_flat, group.rows, chunk);
        project(prep.weight_stack[g], prep.target_maps[n], chunk, projection);
        auto args = epilogue_args<scalar_t, acc_t>(prep, g, chunk, projection);
        args.grad_errors = grad_errors.data_ptr<acc_t>();
        args.grad_residual = residual.data_ptr<scalar_t>();
        args.row_sums = want_b ? row_sums.data_ptr<acc_t>() : nullptr;
        launch_epilogue<scalar_t, acc_t>(prep, g, args, nullptr, want_s ? &grad_source : nullptr);
        if (want_s)
          launch_resize_transpose<scalar_t, acc_t>(prep, g, residual, chunk,
                                                   static_cast<acc_t>(two_inv), grad_source);
        if (want_t) project_back(prep.weight_stack[g], residual, chunk, -two_inv, grad_target_maps);
        if (want_w)
          weight_sum.add_(correlate(residual, prep.target_maps[n], chunk, accumulate), -two_inv);
      });
      if (want_w) weight_sums.push_back(weight_sum);
      if (want_b) bias_sums.push_back(row_sums.sum(0).mul_(-two_inv));
    }
  });
  return {want_s ? like_inputs(grad_source, source) : std::vector<at::Tensor>{},
          want_t ? like_inputs(grad_target, target) : std::vector<at::Tensor>{},
          want_w ? split_stacks(weight_sums, prep, weight) : std::vector<at::Tensor>{},
          want_b ? split_stacks(bias_sums, prep, bias) : std::vector<at::Tensor>{}};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>, std::vector<at::Tensor>>
channel_errors_double_backward_cuda(const at::Tensor& grad_errors_in,
                                    const OptionalTensors& tangent_source,
                                    const OptionalTensors& tangent_target,
                                    const OptionalTensors& tangent_weight,
                                    const OptionalTensors& tangent_bias, at::TensorList source,
                                    at::TensorList target, at::TensorList weight,
                                    at::TensorList bias, at::IntArrayRef pair_source,
                                    at::IntArrayRef pair_target, c10::List<bool> output_mask) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // kernels are below autograd
  const Prepared prep(source, target, weight, bias, pair_source, pair_target);
  const c10::cuda::CUDAGuard device_guard(prep.source[0].device());
  check_grad_errors(grad_errors_in, prep);
  const at::Tensor grad_errors = grad_errors_in.contiguous();
  const auto& plan = prep.plan;
  const bool want_s = output_mask[0], want_t = output_mask[1], want_w = output_mask[2],
             want_b = output_mask[3];
  const auto accumulate = grad_errors.scalar_type();
  // Tangents, prepared like the inputs they are tangent to (undefined where absent).
  std::vector<at::Tensor> v_source(prep.source.size()), v_target_maps(prep.target_maps.size());
  for (size_t m = 0; m < v_source.size(); ++m)
    if (auto v = optional_at(tangent_source, m)) v_source[m] = v->contiguous();
  for (size_t n = 0; n < v_target_maps.size(); ++n)
    if (auto v = optional_at(tangent_target, n)) v_target_maps[n] = v->flatten(2);
  at::Tensor grad_grad_errors = at::zeros_like(grad_errors);
  std::vector<at::Tensor> grad_source = want_s ? zero_accumulators(prep.source, accumulate)
                                               : std::vector<at::Tensor>{};
  std::vector<at::Tensor> grad_target = want_t ? target_gradients(target, prep)
                                               : std::vector<at::Tensor>{};
  std::vector<at::Tensor> weight_sums, bias_sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prep.source[0].scalar_type(),
                                  "channel_errors_double_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    for (size_t g = 0; g < plan.groups.size(); ++g) {
      const TargetGroup& group = plan.groups[g];
      const int64_t n = group.target, ct = prep.target_maps[n].size(1), rows = group.rows;
      const double two_inv = 2.0 / static_cast<double>(prep.positions(group));
      const at::Tensor& v_target = v_target_maps[n];
      const std::optional<at::Tensor> v_weight = stack_optional_rows(tangent_weight, weight, group);
      const std::optional<at::Tensor> v_bias = stack_optional_rows(tangent_bias, bias, group);
      const bool has_vt = v_target.defined(), has_vw = v_weight.has_value();
      // grad_errors * D is needed where D meets a tangent: -vW^T (g D) and -(g D) vT^T.
      const bool need_tangent_residual = (want_t && has_vw) || (want_w && has_vt);
      const int64_t residual_rows = need_tangent_residual ? 2 * rows : rows;
      const int64_t bytes_per_position =
          rows * int64_t{sizeof(acc_t)} * (1 + has_vt + has_vw) +
          residual_rows * int64_t{sizeof(scalar_t)} +
          (want_w ? ct * int64_t{sizeof(scalar_t)} * (1 + has_vt) : 0);
      const ChunkShape shape = chunk_shape(plan.batch, prep.positions(group), bytes_per_position);
      const int64_t cells = rows * shape.samples * shape.positions;
      const at::Tensor projection_flat = at::empty({cells}, grad_errors.options());
      const at::Tensor tangent_projection_flat =
          has_vt ? at::empty({cells}, grad_errors.options()) : at::Tensor();
      const at::Tensor weight_tangent_projection_flat =
          has_vw ? at::empty({cells}, grad_errors.options()) : at::Tensor();
      // Rows [0, rows): grad_errors * U; rows [rows, 2 rows): grad_errors * D.
      const at::Tensor residual_flat =
          at::empty({residual_rows * shape.samples * shape.positions}, prep.source[0].options());
      // -[W; vW]^T [g U; g D] in one product when the weight has a tangent.
      const at::Tensor back_stack =
          want_t && has_vw ? at::cat({prep.weight_stack[g], *v_weight}, 0) : prep.weight_stack[g];
      at::Tensor row_sums = want_b ? at::zeros({plan.batch, rows}, grad_errors.options())
                                   : at::Tensor();
      at::Tensor weight_sum = want_w ? at::zeros(prep.weight_stack[g].sizes(), grad_errors.options())
                                     : at::Tensor();
      const at::Tensor grad_target_maps = want_t ? grad_target[n].flatten(2) : at::Tensor();
      for_each_chunk(prep, group, shape, [&](const Chunk& chunk) {
        at::Tensor projection = chunk_buffer(projection_flat, rows, chunk);
        project(prep.weight_stack[g], prep.target_maps[n], chunk, projection);
        at::Tensor tangent_projection, weight_tangent_projection;
        if (has_vt) {
          tangent_projection = chunk_buffer(tangent_projection_flat, rows, chunk);
          project(prep.weight_stack[g], v_target, chunk, tangent_projection);
        }
        if (has_vw) {
          weight_tangent_projection = chunk_buffer(weight_tangent_projection_flat, rows, chunk);
          project(*v_weight, prep.target_maps[n], chunk, weight_tangent_projection);
        }
        const at::Tensor residuals = chunk_buffer(residual_flat, residual_rows, chunk);
        const at::Tensor residual = residuals.narrow(0, 0, rows);
        auto args = epilogue_args<scalar_t, acc_t>(prep, g, chunk, projection);
        args.tangent_projection = has_vt ? tangent_projection.data_ptr<acc_t>() : nullptr;
        args.weight_tangent_projection =
            has_vw ? weight_tangent_projection.data_ptr<acc_t>() : nullptr;
        args.tangent_bias = v_bias ? v_bias->data_ptr<scalar_t>() : nullptr;
        args.grad_errors = grad_errors.data_ptr<acc_t>();
        args.errors = grad_grad_errors.data_ptr<acc_t>();
        args.grad_residual = residual.data_ptr<scalar_t>();
        args.grad_tangent_residual =
            need_tangent_residual ? residuals.narrow(0, rows, rows).data_ptr<scalar_t>() : nullptr;
        args.row_sums = want_b ? row_sums.data_ptr<acc_t>() : nullptr;
        args.tangent = true;
        launch_epilogue<scalar_t, acc_t>(prep, g, args, &v_source,
                                         want_s ? &grad_source : nullptr);
        if (want_s)
          launch_resize_transpose<scalar_t, acc_t>(prep, g, residual, chunk,
                                                   static_cast<acc_t>(two_inv), grad_source);
        if (want_t)
          project_back(back_stack, has_vw ? residuals : residual, chunk, -two_inv,
                       grad_target_maps);
        if (want_w) {
          weight_sum.add_(correlate(residual, prep.target_maps[n], chunk, accumulate), -two_inv);
          if (has_vt)
            weight_sum.add_(correlate(residuals.narrow(0, rows, rows), v_target, chunk, accumulate),
                            -two_inv);
        }
      });
      if (want_w) weight_sums.push_back(weight_sum);
      if (want_b) bias_sums.push_back(row_sums.sum(0).mul_(-two_inv));
    }
  });
  return {grad_grad_errors,
          want_s ? like_inputs(grad_source, source) : std::vector<at::Tensor>{},
          want_t ? like_inputs(grad_target, target) : std::vector<at::Tensor>{},
          want_w ? split_stacks(weight_sums, prep, weight) : std::vector<at::Tensor>{},
          want_b ? split_stacks(bias_sums, prep, bias) : std::vector<at::Tensor>{}};
}

}  // namespace

TORCH_LIBRARY_IMPL(l2t_fast, CUDA, m) {
  m.impl("channel_errors", &channel_errors_cuda);
  m.impl("channel_errors_backward", &channel_errors_backward_cuda);
  m.impl("channel_errors_double_backward", &channel_errors_double_backward_cuda);
}

}  // namespace l2t_fast
