// CPU kernels of the four channel-error ops (math: l2t_fast/matching/backends/registration.py).
//
// Work is split per sample (parallel over the batch) and per target layer: the regressors
// of every pair that reads target layer n are stacked into one [rows, Ct] matrix, so a
// single product with a tile of the sample's target map, [Ct, tile], projects all those
// pairs at once. The tile of D = S~ - W T - b ([rows, tile], a few hundred KB at most) is
// then finished in place: the bilinear resize of the small source map, the subtraction
// and the reductions, and it is recomputed in the backward instead of being stored.
// Where the gradient of the errors is known before the forward (a training step: the loss
// is linear in E), channel_errors_with_grads makes E and the gradients from the same blocks.
// Nothing of size [B, Cs, Ht, Wt] is ever allocated. The loops over a row of a block are
// the row loops below, each vectorised for the CPU it runs on.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define L2T_FAST_WINDOWED_RESIZE 1
#endif

#include "channel_errors.h"

namespace l2t_fast {
namespace {

constexpr int64_t kTile = 256;  // HW positions per block: [rows, 256] floats stay in L2

// Row loops, on rows of a block in cache. Each is compiled for x86-64-v4 (AVX-512), v3
// (AVX2) and the build's baseline (SSE2), and the loader picks the clone for the CPU
// (function multiversioning). The build passes -ffp-contract=off, so no clone fuses a
// multiply and an add that the baseline rounds twice; the clones differ only in the order
// of a row's sums, and the results still do not depend on the thread count. The sums are
// `omp simd` reductions: without that, the compiler keeps the sequential order of the
// additions and does not vectorise them.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define L2T_ROW_LOOP __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define L2T_ROW_LOOP
#endif

// out[j] = in[j] - minus.
template <typename scalar_t>
L2T_ROW_LOOP void subtract(const scalar_t* in, scalar_t minus, scalar_t* out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = in[j] - minus;
}

// Row r < rows of out (rows n apart) blends two rows of in (rows n apart):
// out[r][j] = lo_weight[r] * in[lo[r]][j] + hi_weight[r] * in[hi[r]][j] - minus. One call for
// all the rows of a block: a call per row of 32 cost more than its work.
template <typename scalar_t>
L2T_ROW_LOOP void blend_rows(const scalar_t* in, const int64_t* lo, const scalar_t* lo_weight,
                             const int64_t* hi, const scalar_t* hi_weight, int64_t rows,
                             scalar_t minus, scalar_t* out, int64_t n) {
  for (int64_t r = 0; r < rows; ++r, out += n) {
    const scalar_t* a = in + lo[r] * n;
    const scalar_t* b = in + hi[r] * n;
    const scalar_t a_weight = lo_weight[r], b_weight = hi_weight[r];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = a_weight * a[j] + b_weight * b[j] - minus;
  }
}

// out[j] = lo_weight[j] * in[lo[j]] + hi_weight[j] * in[hi[j]] - minus.
template <typename scalar_t>
L2T_ROW_LOOP void gather_blend(const scalar_t* in, const int64_t* lo, const scalar_t* lo_weight,
                               const int64_t* hi, const scalar_t* hi_weight, scalar_t minus,
                               scalar_t* out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    out[j] = lo_weight[j] * in[lo[j]] + hi_weight[j] * in[hi[j]] - minus;
  }
}

// sum_j a[j] * b[j].
template <typename scalar_t>
L2T_ROW_LOOP scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

// row[j] *= factor; returns the sum of the scaled row.
template <typename scalar_t>
L2T_ROW_LOOP scalar_t scale_and_sum(scalar_t* row, scalar_t factor, int64_t n) {
  scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    row[j] *= factor;
    sum += row[j];
  }
  return sum;
}

// As scale_and_sum, and sets `squares` to the row's sum of squares, taken before the scaling.
template <typename scalar_t>
L2T_ROW_LOOP scalar_t scale_and_sum_squares(scalar_t* row, scalar_t factor, int64_t n,
                                            scalar_t& squares) {
  scalar_t sum = 0, square_sum = 0;
#pragma omp simd reduction(+ : sum, square_sum)
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t value = row[j];
    square_sum += value * value;
    row[j] = value * factor;
    sum += row[j];
  }
  squares = square_sum;
  return sum;
}

// out[j] += in[j].
template <typename scalar_t>
L2T_ROW_LOOP void add_to(scalar_t* out, const scalar_t* in, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] += in[j];
}

// gather_blend of a resize along rows (`rows` of them, `size` inputs and `n` outputs apart),
// for float32 on AVX-512, without gathers: gathers run no faster than scalar loads here
// (0.75 ns an element either way; leaving the resize out took 1.2 ms off the 35.5 ms of the
// "cifar" step), but the inputs of 16 consecutive outputs of a resize by a factor >= 1/2
// lie within 32 consecutive inputs, which two loads bring into registers and a
// two-register permute distributes (`vpermt2ps`).
// Run r of 16 outputs reads in[start[r] .. start[r] + 32), its lanes at lo[j] - start[r] and
// hi[j] - start[r] (`lo_offset`, `hi_offset`), or, where start[r] is -1 (a stronger
// downsampling), by scalar loads at lo[j] and hi[j] (the offsets are then the indices
// themselves). Loads past in[size - 1] are masked off. The same multiplications, addition
// and subtraction as gather_blend, so the same bits. A run's offsets and weights stay in
// registers over all the rows: one call per row cost about as much as the work of a
// 32-wide row.
constexpr int64_t kWindowLanes = 16;
#ifdef L2T_FAST_WINDOWED_RESIZE
__attribute__((target("avx512f"))) void windowed_blend(
    const float* in, int64_t size, int64_t rows, const int64_t* start,
    const int32_t* lo_offset, const float* lo_weight, const int32_t* hi_offset,
    const float* hi_weight, float minus, float* out, int64_t n) {
  const __m512 minus_v = _mm512_set1_ps(minus);
  auto lanes = [](int64_t count) {
    if (count <= 0) return __mmask16(0);
    return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
  };
  for (int64_t j = 0, run = 0; j < n; j += kWindowLanes, ++run) {
    if (start[run] < 0) {
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = in + r * size;
        for (int64_t k = j; k < std::min(n, j + kWindowLanes); ++k) {
          out[r * n + k] =
              lo_weight[k] * row[lo_offset[k]] + hi_weight[k] * row[hi_offset[k]] - minus;
        }
      }
      continue;
    }
    const __mmask16 written = lanes(n - j);
    const __mmask16 first_loaded = lanes(size - start[run]);
    const __mmask16 second_loaded = lanes(size - start[run] - 16);
    const __m512i lo_lanes = _mm512_maskz_loadu_epi32(written, lo_offset + j);
    const __m512i hi_lanes = _mm512_maskz_loadu_epi32(written, hi_offset + j);
    const __m512 lo_w = _mm512_maskz_loadu_ps(written, lo_weight + j);
    const __m512 hi_w = _mm512_maskz_loadu_ps(written, hi_weight + j);
    for (int64_t r = 0; r < rows; ++r) {
      const float* window = in + r * size + start[run];
      const __m512 first = _mm512_maskz_loadu_ps(first_loaded, window);
      const __m512 second = _mm512_maskz_loadu_ps(second_loaded, window + 16);
      const __m512 lo = _mm512_permutex2var_ps(first, lo_lanes, second);
      const __m512 hi = _mm512_permutex2var_ps(first, hi_lanes, second);
      const __m512 blended = _mm512_sub_ps(
          _mm512_add_ps(_mm512_mul_ps(lo_w, lo), _mm512_mul_ps(hi_w, hi)), minus_v);
      _mm512_mask_storeu_ps(out + r * n + j, written, blended);
    }
  }
}
#endif

// A [C, H*W] view of one sample of a feature map, when H and W can be merged.
at::Tensor sample_matrix(const at::Tensor& map, int64_t b) {
  return map.select(0, b).flatten(1);
}

// Feature maps whose H and W cannot be merged into one stride (rare views) are copied;
// NCHW and channels_last inputs are used as they are.
at::Tensor mergeable(const at::Tensor& map) {
  const bool ok = map.size(3) == 1 || map.size(2) == 1 || map.stride(2) == map.stride(3) * map.size(3);
  return ok ? map : map.contiguous();
}

// Samples one source channel at a block of target positions (whole target rows), and
// spreads gradients back: F.interpolate's bilinear resize and its transpose, done
// separably (first between two source rows, then along the row). Each tap is blended as
// F.interpolate blends it, `(1 - w) * lo + w * hi` with both weights, never as
// `lo + w * (hi - lo)`: the two agree on finite maps, but with an infinite value the
// difference form gives NaN (inf - inf) where F.interpolate gives inf.
template <typename scalar_t>
struct Resampler {
  bool identity = false;
  int64_t source_height = 0, source_width = 0, target_width = 0;
  std::vector<int64_t> row_lo, row_hi, col_lo, col_hi;
  std::vector<scalar_t> row_lo_weight, row_hi_weight, col_lo_weight, col_hi_weight;
  // The column resize's runs for windowed_blend, where it is used (float32 on AVX-512).
  bool windowed = false;
  std::vector<int64_t> window_start;
  std::vector<int32_t> col_lo_offset, col_hi_offset;

  Resampler(const AxisResize& rows, const AxisResize& cols, int64_t source_height_,
            int64_t source_width_)
      : source_height(source_height_), source_width(source_width_),
        target_width(static_cast<int64_t>(cols.lo.size())) {
    identity = source_height == static_cast<int64_t>(rows.lo.size()) &&
               source_width == target_width;
    row_lo = rows.lo, row_hi = rows.hi, col_lo = cols.lo, col_hi = cols.hi;
    split_weights(rows.weight, row_lo_weight, row_hi_weight);
    split_weights(cols.weight, col_lo_weight, col_hi_weight);
#ifdef L2T_FAST_WINDOWED_RESIZE
    static const bool avx512 = __builtin_cpu_supports("avx512f");
    if (std::is_same_v<scalar_t, float> && avx512 && !identity) plan_windows();
#endif
  }

  // windowed_blend's runs: the first input each run of outputs reads, or -1 where its
  // inputs span more than two registers.
  void plan_windows() {
    windowed = true;
    for (int64_t j = 0; j < target_width; j += kWindowLanes) {
      const int64_t end = std::min(target_width, j + kWindowLanes);
      const int64_t first = *std::min_element(col_lo.begin() + j, col_lo.begin() + end);
      const int64_t last = *std::max_element(col_hi.begin() + j, col_hi.begin() + end);
      const int64_t start = last - first < 2 * kWindowLanes ? first : -1;
      window_start.push_back(start);
      for (int64_t k = j; k < end; ++k) {
        col_lo_offset.push_back(static_cast<int32_t>(col_lo[k] - std::max<int64_t>(start, 0)));
        col_hi_offset.push_back(static_cast<int32_t>(col_hi[k] - std::max<int64_t>(start, 0)));
      }
    }
  }

  // As F.interpolate: the hi weight in scalar_t, the lo weight 1 minus it.
  static void split_weights(const std::vector<double>& weight, std::vector<scalar_t>& lo,
                            std::vector<scalar_t>& hi) {
    for (double w : weight) {
      hi.push_back(static_cast<scalar_t>(w));
      lo.push_back(scalar_t(1) - hi.back());
    }
  }

  // out[j] = S~[p0 + j] - minus for j < len (whole target rows); `between` has room for
  // source_width values per target row of the block. The kernels subtract the bias here,
  // while the row is being written. The rows are blended first, then resized in one call.
  void sample(const scalar_t* channel, int64_t p0, int64_t len, scalar_t minus, scalar_t* out,
              scalar_t* between) const {
    if (identity) return subtract(channel + p0, minus, out, len);
    const int64_t first = p0 / target_width, rows = len / target_width;
    blend_rows(channel, row_lo.data() + first, row_lo_weight.data() + first,
               row_hi.data() + first, row_hi_weight.data() + first, rows, scalar_t(0), between,
               source_width);
    resize_rows(between, rows, minus, out);
  }

  // Upsampling rows (fewer source rows than target rows), `sample` blends the same source
  // rows again for every target row. Resizing each source row along the columns once per
  // sample (`resize_columns`) and then blending two of those per target row
  // (`sample_rows`: contiguous, vectorised) does Ht / Hs times fewer gathers.
  bool columns_first() const {
    return !identity && source_height < static_cast<int64_t>(row_lo.size());
  }

  // out[r * target_width + w] = source row r (of `rows`, source_width apart) resized along
  // the columns, minus `minus`.
  void resize_rows(const scalar_t* in, int64_t rows, scalar_t minus, scalar_t* out) const {
#ifdef L2T_FAST_WINDOWED_RESIZE
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (windowed) {
        return windowed_blend(in, source_width, rows, window_start.data(), col_lo_offset.data(),
                              col_lo_weight.data(), col_hi_offset.data(), col_hi_weight.data(),
                              minus, out, target_width);
      }
    }
#endif
    for (int64_t r = 0; r < rows; ++r, in += source_width, out += target_width) {
      gather_blend(in, col_lo.data(), col_lo_weight.data(), col_hi.data(), col_hi_weight.data(),
                   minus, out, target_width);
    }
  }

  // out[(c * source_height + h) * target_width + w] = source row h of channel c (of
  // `channels` consecutive ones) resized along the columns.
  void resize_columns(const scalar_t* channels_in, int64_t channels, scalar_t* out) const {
    resize_rows(channels_in, channels * source_height, scalar_t(0), out);
  }

  // As `sample`, from the channel's `resize_columns` output.
  void sample_rows(const scalar_t* columns, int64_t p0, int64_t len, scalar_t minus,
                   scalar_t* out) const {
    const int64_t first = p0 / target_width;
    blend_rows(columns, row_lo.data() + first, row_lo_weight.data() + first,
               row_hi.data() + first, row_hi_weight.data() + first, len / target_width, minus,
               out, target_width);
  }

  // The transpose of `sample`: adds resize^T(grad[0:len]) onto the source channel.
  void spread(scalar_t* channel, int64_t p0, int64_t len, const scalar_t* grad,
              scalar_t* between) const {
    if (identity) return add_to(channel + p0, grad, len);
    for (int64_t h = p0 / target_width; h * target_width < p0 + len; ++h, grad += target_width) {
      std::fill(between, between + source_width, scalar_t(0));
      for (int64_t w = 0; w < target_width; ++w) {
        between[col_lo[w]] += col_lo_weight[w] * grad[w];
        between[col_hi[w]] += col_hi_weight[w] * grad[w];
      }
      scalar_t* top = channel + row_lo[h] * source_width;
      scalar_t* bottom = channel + row_hi[h] * source_width;
      const scalar_t wt = row_lo_weight[h], wb = row_hi_weight[h];
      for (int64_t x = 0; x < source_width; ++x) {
        top[x] += wt * between[x];
        bottom[x] += wb * between[x];
      }
    }
  }
};

// Per-worker scratch: the resamplers of every pair, blended source rows for `sample`, the
// column-resized source channels of the block's samples for the pairs that use them, and
// room for the target (and its gradient) of a block of several samples, side by side.
template <typename scalar_t>
struct Scratch {
  std::vector<Resampler<scalar_t>> resample;  // per pair
  std::vector<scalar_t> between;
  std::vector<scalar_t> columns;
  at::Tensor target_block, target_grad_block;
};

// Everything a kernel needs, prepared once per call.
struct Prepared {
  PairPlan plan;
  std::vector<at::Tensor> source;  // contiguous NCHW
  std::vector<at::Tensor> target;  // H and W mergeable
  std::vector<at::Tensor> weight_stack, bias_stack;  // per group
  std::vector<std::pair<AxisResize, AxisResize>> resize;  // per pair

  Prepared(at::TensorList source_in, at::TensorList target_in, at::TensorList weight,
           at::TensorList bias, at::IntArrayRef pair_source, at::IntArrayRef pair_target)
      : plan(make_plan(source_in, target_in, weight, bias, pair_source, pair_target)) {
    for (const auto& s : source_in) source.push_back(s.contiguous());
    for (const auto& t : target_in) target.push_back(mergeable(t));
    for (const auto& group : plan.groups) {
      weight_stack.push_back(stack_rows(weight, group));
      bias_stack.push_back(stack_rows(bias, group));
    }
    for (size_t i = 0; i < pair_source.size(); ++i) {
      const auto& s = source[pair_source[i]];
      const auto& t = target[pair_target[i]];
      resize.emplace_back(axis_resize(s.size(2), t.size(2)), axis_resize(s.size(3), t.size(3)));
    }
  }
};

// Positions per block: whole target rows, about kTile of them.
int64_t tile_length(int64_t height, int64_t width) {
  return std::min(height, std::max<int64_t>(1, kTile / width)) * width;
}

// Samples per block of a group: `side_by_side`, maps smaller than a tile go several samples
// to a block, so that the products are not thin (a 4x4 map alone gives a GEMM 16 columns
// wide), but no more than make kTargetBlock elements of the target: its copy and its
// gradient's then stay in L2 beside D and W (16 samples of a [512, 4, 4] map made 512 KB
// each, and that group ran at 1.7x its floor; 4 samples, 1.45x). The chunks of
// kSampleChunks below cap it further.
constexpr int64_t kTargetBlock = 32768;
int64_t samples_per_block(const Prepared& prep, const TargetGroup& group, bool side_by_side) {
  if (!side_by_side) return 1;
  const at::Tensor& t = prep.target[group.target];
  const int64_t hw = t.size(2) * t.size(3);
  return std::max<int64_t>(1, std::min(kTile / hw, kTargetBlock / (t.size(1) * hw)));
}

// The largest block of any group, in elements of D (`rows`) or of the target (`channels`).
int64_t largest_block(const Prepared& prep, bool side_by_side, bool channels = false) {
  int64_t size = 0;
  for (const auto& group : prep.plan.groups) {
    const at::Tensor& t = prep.target[group.target];
    const int64_t samples = samples_per_block(prep, group, side_by_side);
    if (channels && samples == 1) continue;  // single-sample blocks use views of the target
    size = std::max(size, (channels ? t.size(1) : group.rows) * samples *
                              tile_length(t.size(2), t.size(3)));
  }
  return size;
}

// Values of `Resampler::resize_columns` that one group's pairs need for one sample: the
// same `columns_first()` rule as the kernels use to choose between the two samplings.
template <typename scalar_t>
int64_t column_scratch_size(const Prepared& prep, const TargetGroup& group,
                            at::IntArrayRef pair_source,
                            const std::vector<Resampler<scalar_t>>& resample) {
  const at::Tensor& t = prep.target[group.target];
  int64_t size = 0;
  for (const int64_t i : group.pairs) {
    const at::Tensor& s = prep.source[pair_source[i]];
    if (resample[i].columns_first()) size += s.size(1) * s.size(2) * t.size(3);
  }
  return size;
}

// Sums over samples (the regressor and bias gradients) are taken per chunk of consecutive
// samples, each chunk in sample order by whichever worker takes it, and the chunks' sums are
// then added in chunk order: the result depends neither on scheduling nor on the number of
// threads, so that a run (and a resumed run) is bit for bit reproducible.
constexpr int64_t kSampleChunks = 16;

// One block of group `group`: positions [p0, p0 + len) of samples [first_sample,
// first_sample + samples), side by side (sample s owns columns [s * len, (s + 1) * len));
// several samples only where the whole map fits (p0 = 0, len = HW).
struct Block {
  int64_t first_sample = 0, samples = 1;
  size_t group = 0;
  int64_t p0 = 0, len = 0;
  int64_t width = 0;  // samples * len, the row length of d
  at::Tensor d;       // D = S~ - W T - b, [rows, width], contiguous
  at::Tensor t;       // the target at the block, [Ct, width]: a view, or a copy
};

// Visits every block with D computed in `block.d`. `visit(state, block, scratch)` gets the
// private accumulators `State` of the block's chunk; `finish(states)` merges them (the
// chunks' states, in chunk order) after all blocks are visited. `side_by_side`: several
// samples per block where maps are small (see samples_per_block).
template <typename scalar_t, typename State, typename MakeState, typename Visit,
          typename Finish>
void for_each_block(const Prepared& prep, at::IntArrayRef pair_source, bool side_by_side,
                    MakeState make_state, Visit visit, Finish finish) {
  const auto& plan = prep.plan;
  const int64_t block_size = largest_block(prep, side_by_side);
  const int64_t target_block_size = largest_block(prep, side_by_side, true);
  std::vector<int64_t> per_block;
  for (const auto& group : plan.groups) {
    per_block.push_back(samples_per_block(prep, group, side_by_side));
  }
  // Samples are taken in sets of the largest block, each set group by group.
  const int64_t set_size = *std::max_element(per_block.begin(), per_block.end());
  int64_t between_size = 0;  // Resampler::sample's: a source row per target row of a block
  for (const auto& group : plan.groups) {
    const at::Tensor& t = prep.target[group.target];
    const int64_t tile_rows = tile_length(t.size(2), t.size(3)) / t.size(3);
    for (const int64_t i : group.pairs) {
      between_size = std::max(between_size, tile_rows * prep.source[pair_source[i]].size(3));
    }
  }
  const int64_t chunks = std::min(plan.batch, kSampleChunks);
  std::vector<State> states;
  states.reserve(chunks);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) states.push_back(make_state());
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    // Thread-local, so each worker sets it again.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor buffer = at::empty({block_size}, prep.source[0].options());
    Scratch<scalar_t> scratch;
    scratch.between.resize(between_size);
    if (target_block_size > 0) {
      scratch.target_block = at::empty({target_block_size}, prep.source[0].options());
      scratch.target_grad_block = at::empty({target_block_size}, prep.source[0].options());
    }
    for (size_t i = 0; i < pair_source.size(); ++i) {
      const at::Tensor& s = prep.source[pair_source[i]];
      scratch.resample.emplace_back(prep.resize[i].first, prep.resize[i].second, s.size(2),
                                    s.size(3));
    }
    int64_t column_size = 0;
    for (size_t g = 0; g < plan.groups.size(); ++g) {
      column_size = std::max(column_size, per_block[g] * column_scratch_size(
                                              prep, plan.groups[g], pair_source, scratch.resample));
    }
    scratch.columns.resize(column_size);
    std::vector<const scalar_t*> columns_of(pair_source.size());  // per pair; null: `sample`
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      State& state = states[chunk];
      const int64_t chunk_end_sample = (chunk + 1) * plan.batch / chunks;
      for (int64_t set = chunk * plan.batch / chunks; set < chunk_end_sample; set += set_size) {
        const int64_t set_end = std::min(set + set_size, chunk_end_sample);
        for (size_t g = 0; g < plan.groups.size(); ++g) {
          const auto& group = plan.groups[g];
          const at::Tensor& t = prep.target[group.target];
          const int64_t ct = t.size(1), hw = t.size(2) * t.size(3);
          const int64_t tile = tile_length(t.size(2), t.size(3));
          const scalar_t* bias = prep.bias_stack[g].data_ptr<scalar_t>();
          for (int64_t b0 = set; b0 < set_end; b0 += per_block[g]) {
            const int64_t samples = std::min(per_block[g], set_end - b0);
            // Column-resized source channels, sample after sample within each pair.
            scalar_t* columns = scratch.columns.data();
            for (const int64_t i : group.pairs) {
              const Resampler<scalar_t>& resample = scratch.resample[i];
              columns_of[i] = nullptr;
              if (!resample.columns_first()) continue;
              const at::Tensor& s = prep.source[pair_source[i]];
              const int64_t cs = s.size(1), plane = s.size(2) * s.size(3);
              const int64_t resized = s.size(2) * t.size(3);
              columns_of[i] = columns;
              resample.resize_columns(s.data_ptr<scalar_t>() + b0 * cs * plane, samples * cs,
                                      columns);
              columns += samples * cs * resized;
            }
            for (int64_t p0 = 0; p0 < hw; p0 += tile) {
              Block block;
              block.first_sample = b0, block.samples = samples, block.group = g;
              block.p0 = p0, block.len = std::min(tile, hw - p0);
              const int64_t len = block.len, width = block.width = samples * len;
              block.d = buffer.narrow(0, 0, group.rows * width).view({group.rows, width});
              // D = (S~ - b) - W T: the resized source minus the bias goes in first, and
              // the product is subtracted in place by the GEMM (beta = 1), one pass less.
              scalar_t* d_data = block.d.data_ptr<scalar_t>();
              for (size_t k = 0; k < group.pairs.size(); ++k) {
                const int64_t i = group.pairs[k];
                const at::Tensor& s = prep.source[pair_source[i]];
                const int64_t cs = s.size(1), plane = s.size(2) * s.size(3);
                const int64_t resized = s.size(2) * t.size(3);
                for (int64_t sample = 0; sample < samples; ++sample) {
                  const scalar_t* s_b = s.data_ptr<scalar_t>() + (b0 + sample) * cs * plane;
                  for (int64_t c = 0; c < cs; ++c) {
                    const int64_t r = group.row_offset[k] + c;
                    scalar_t* row = d_data + r * width + sample * len;
                    if (columns_of[i]) {
                      scratch.resample[i].sample_rows(
                          columns_of[i] + (sample * cs + c) * resized, p0, len, bias[r], row);
                    } else {
                      scratch.resample[i].sample(s_b + c * plane, p0, len, bias[r], row,
                                                 scratch.between.data());
                    }
                  }
                }
              }
              if (samples == 1) {
                block.t = sample_matrix(t, b0).narrow(1, p0, len);
              } else {  // whole maps (p0 = 0, len = hw), copied side by side
                block.t = scratch.target_block.narrow(0, 0, ct * width).view({ct, width});
                block.t.view({ct, samples, hw})
                    .copy_(t.narrow(0, b0, samples).view({samples, ct, hw}).transpose(0, 1));
              }
              block.d.addmm_(prep.weight_stack[g], block.t, 1, -1);
              visit(state, block, scratch);
            }
          }
        }
      }
    }
  });
  finish(states);
}

// The target gradient of a block, -W^T G with G the block's gradient of D (`grad`, [rows,
// width]) plus `extra` (a [Ct, width] product to add, or undefined), written into `out`'s
// positions of the block's samples.
template <typename scalar_t>
void write_target_grad(at::Tensor& out, const Prepared& prep, const Block& block,
                       const at::Tensor& grad, Scratch<scalar_t>& scratch,
                       const std::optional<at::Tensor>& extra_weight = std::nullopt,
                       const at::Tensor& extra_grad = at::Tensor()) {
  const at::Tensor& w = prep.weight_stack[block.group];
  const int64_t ct = out.size(1), hw = out.size(2) * out.size(3);
  at::Tensor dest;
  if (block.samples == 1) {
    dest = sample_matrix(out, block.first_sample).narrow(1, block.p0, block.len);
  } else {
    dest = scratch.target_grad_block.narrow(0, 0, ct * block.width).view({ct, block.width});
  }
  // Zeroed here, in cache, and accumulated into (beta = 1): MKL's beta = 0 runs a scaling
  // pass of its own over the destination, slower than these fills.
  if (dest.stride(1) == 1) {
    scalar_t* dest_data = dest.data_ptr<scalar_t>();
    for (int64_t c = 0; c < ct; ++c) std::fill_n(dest_data + c * dest.stride(0), block.width, 0);
  } else {  // a channels_last map
    dest.zero_();
  }
  dest.addmm_(w.t(), grad, 1, -1);
  if (extra_weight) dest.addmm_(extra_weight->t(), extra_grad, 1, -1);
  if (block.samples > 1) {
    out.narrow(0, block.first_sample, block.samples)
        .view({block.samples, ct, hw})
        .copy_(dest.view({ct, block.samples, hw}).transpose(0, 1));
  }
}

struct NoState {};

at::Tensor channel_errors_cpu(at::TensorList source, at::TensorList target,
                              at::TensorList weight, at::TensorList bias,
                              at::IntArrayRef pair_source, at::IntArrayRef pair_target) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // kernels are below autograd
  const Prepared prep(source, target, weight, bias, pair_source, pair_target);
  const auto& plan = prep.plan;
  at::Tensor errors = at::zeros({plan.batch, plan.columns}, prep.source[0].options());
  AT_DISPATCH_FLOATING_TYPES(errors.scalar_type(), "channel_errors_cpu", [&] {
    scalar_t* e = errors.data_ptr<scalar_t>();
    for_each_block<scalar_t, NoState>(
        prep, pair_source, /*side_by_side=*/true, [] { return NoState{}; },
        [&](NoState&, const Block& block, Scratch<scalar_t>&) {
          const auto& group = plan.groups[block.group];
          const at::Tensor& t = prep.target[group.target];
          const scalar_t inv_hw = scalar_t(1) / static_cast<scalar_t>(t.size(2) * t.size(3));
          const int64_t len = block.len;
          const scalar_t* d_data = block.d.data_ptr<scalar_t>();
          for (int64_t sample = 0; sample < block.samples; ++sample) {
            for (size_t k = 0; k < group.pairs.size(); ++k) {
              const int64_t i = group.pairs[k];
              const int64_t cs = prep.source[pair_source[i]].size(1);
              scalar_t* e_b =
                  e + (block.first_sample + sample) * plan.columns + plan.column_offset[i];
              for (int64_t c = 0; c < cs; ++c) {
                const scalar_t* row =
                    d_data + (group.row_offset[k] + c) * block.width + sample * len;
                e_b[c] += dot(row, row, len) * inv_hw;
              }
            }
          }
        },
        [](const std::vector<NoState>&) {});
  });
  return errors;
}

// Sums over samples of the stacked weight and bias gradients, per group: a chunk's, or the
// total. A chunk's weight sums start unwritten (not zeroed: at 16 chunks that would be
// megabytes of zeros per call); the first product of each group overwrites them.
struct GroupSums {
  std::vector<at::Tensor> weight, bias;
  std::vector<bool> weight_written;

  // weight[g] -= a b, or = -a b for the group's first product.
  void subtract_product(size_t g, const at::Tensor& a, const at::Tensor& b) {
    weight[g].addmm_(a, b, weight_written[g] ? 1 : 0, -1);
    weight_written[g] = true;
  }
};

GroupSums make_group_sums(const Prepared& prep, bool weights, bool biases, bool total) {
  GroupSums sums;
  for (size_t g = 0; g < prep.plan.groups.size(); ++g) {
    if (weights) {
      sums.weight.push_back(total ? at::zeros_like(prep.weight_stack[g])
                                  : at::empty_like(prep.weight_stack[g]));
      sums.weight_written.push_back(total);
    }
    if (biases) sums.bias.push_back(at::zeros_like(prep.bias_stack[g]));
  }
  return sums;
}

// Adds the chunks' sums onto `total`: each element chunk after chunk, in chunk order, so
// the bits depend neither on the thread count nor on how the elements are split among the
// threads. Done one tensor after another by the calling thread, this merge was 0.6-0.8 ms
// of serial work per call on the "cifar" config (16 chunks).
template <typename scalar_t>
void add_chunk_sums(GroupSums& total, const std::vector<const GroupSums*>& chunks) {
  auto add_all = [&](at::Tensor& sum, const std::vector<const at::Tensor*>& parts) {
    TORCH_INTERNAL_ASSERT(sum.is_contiguous());
    std::vector<const scalar_t*> data;
    for (const at::Tensor* part : parts) {
      TORCH_INTERNAL_ASSERT(part->is_contiguous() && part->numel() == sum.numel());
      data.push_back(part->data_ptr<scalar_t>());
    }
    scalar_t* out = sum.data_ptr<scalar_t>();
    at::parallel_for(0, sum.numel(), 4096, [&](int64_t begin, int64_t end) {
      for (const scalar_t* part : data) add_to(out + begin, part + begin, end - begin);
    });
  };
  for (size_t g = 0; g < total.weight.size(); ++g) {
    std::vector<const at::Tensor*> parts;
    for (const GroupSums* chunk : chunks) {
      if (chunk->weight_written[g]) parts.push_back(&chunk->weight[g]);
    }
    add_all(total.weight[g], parts);
  }
  for (size_t g = 0; g < total.bias.size(); ++g) {
    std::vector<const at::Tensor*> parts;
    for (const GroupSums* chunk : chunks) parts.push_back(&chunk->bias[g]);
    add_all(total.bias[g], parts);
  }
}

std::vector<at::Tensor> split_group_sums(const std::vector<at::Tensor>& sums,
                                         const Prepared& prep, at::TensorList like) {
  std::vector<at::Tensor> per_pair;
  for (const auto& t : like) per_pair.push_back(at::empty_like(t));
  for (size_t g = 0; g < sums.size(); ++g) scatter_rows(sums[g], prep.plan.groups[g], per_pair);
  return per_pair;
}

// Gradients in the layout of their inputs, as the fake kernels promise (empty_like).
std::vector<at::Tensor> in_input_layout(std::vector<at::Tensor> grads, at::TensorList inputs) {
  for (size_t k = 0; k < grads.size(); ++k) {
    at::Tensor like = at::empty_like(inputs[k]);
    if (like.strides() != grads[k].strides()) grads[k] = like.copy_(grads[k]);
  }
  return grads;
}

// Scales the rows of one sample's [rows, len] part of a block (rows `stride` apart) by
// (2 / HW) * grad_errors[b, column(row)] and,
// given `minus_row_sums` (the bias gradient, [rows]), subtracts each scaled row's sum from
// it in the same pass. Given `errors_b` (sample b's row of E), it also adds each row's
// mean square, taken before the scaling, while the block is in cache: the forward's
// reduction without a pass of its own (the fused op).
template <typename scalar_t>
void scale_rows(scalar_t* block, const scalar_t* scaled_grad_b, const TargetGroup& group,
                const PairPlan& plan, const Prepared& prep, at::IntArrayRef pair_source,
                int64_t len, int64_t stride, scalar_t* minus_row_sums,
                scalar_t* errors_b = nullptr) {
  const at::Tensor& t = prep.target[group.target];
  const scalar_t inv_hw = scalar_t(1) / static_cast<scalar_t>(t.size(2) * t.size(3));
  for (size_t k = 0; k < group.pairs.size(); ++k) {
    const int64_t i = group.pairs[k];
    const int64_t cs = prep.source[pair_source[i]].size(1);
    for (int64_t c = 0; c < cs; ++c) {
      const int64_t r = group.row_offset[k] + c, column = plan.column_offset[i] + c;
      const scalar_t factor = scaled_grad_b[column];
      scalar_t* row = block + r * stride;
      scalar_t sum;
      if (errors_b) {
        scalar_t squares;
        sum = scale_and_sum_squares(row, factor, len, squares);
        errors_b[column] += squares * inv_hw;
      } else {
        sum = scale_and_sum(row, factor, len);
      }
      if (minus_row_sums) minus_row_sums[r] -= sum;
    }
  }
}

// resize^T of the rows of sample b's part of a block (rows `stride` apart), added onto the
// pairs' source gradients of sample b.
template <typename scalar_t>
void spread_rows(std::vector<at::Tensor>& grad_source, const scalar_t* block, int64_t b,
                 const TargetGroup& group, at::IntArrayRef pair_source,
                 Scratch<scalar_t>& scratch, int64_t p0, int64_t len, int64_t stride) {
  for (size_t k = 0; k < group.pairs.size(); ++k) {
    const int64_t i = group.pairs[k];
    at::Tensor& gs = grad_source[pair_source[i]];
    const int64_t cs = gs.size(1), plane = gs.size(2) * gs.size(3);
    scalar_t* gs_b = gs.data_ptr<scalar_t>() + b * cs * plane;
    for (int64_t c = 0; c < cs; ++c) {
      scratch.resample[i].spread(gs_b + c * plane, p0, len,
                                 block + (group.row_offset[k] + c) * stride,
                                 scratch.between.data());
    }
  }
}

std::vector<at::Tensor> zeros_like_all(const std::vector<at::Tensor>& like) {
  std::vector<at::Tensor> out;
  for (const auto& t : like) out.push_back(at::zeros_like(t));
  return out;
}

// Gradients of the target maps: every position of a map that some pair reads is written
// by the kernels, so only maps that no pair reads need zeros.
std::vector<at::Tensor> target_grads(const Prepared& prep) {
  std::vector<at::Tensor> out;
  for (size_t n = 0; n < prep.target.size(); ++n) {
    const bool read = std::any_of(prep.plan.groups.begin(), prep.plan.groups.end(),
                                  [n](const TargetGroup& g) { return g.target == static_cast<int64_t>(n); });
    out.push_back(read ? at::empty_like(prep.target[n]) : at::zeros_like(prep.target[n]));
  }
  return out;
}

// (2 / HW) * grad_errors, per column: the factor that turns D into the gradient of the
// squared error.
at::Tensor scaled_grad(const at::Tensor& grad_errors, const Prepared& prep,
                       at::IntArrayRef pair_target) {
  std::vector<double> factor(prep.plan.columns);
  for (size_t i = 0; i < pair_target.size(); ++i) {
    const auto& t = prep.target[pair_target[i]];
    const int64_t cs = (i + 1 < pair_target.size() ? prep.plan.column_offset[i + 1]
                                                   : prep.plan.columns) -
                       prep.plan.column_offset[i];
    for (int64_t c = 0; c < cs; ++c)
      factor[prep.plan.column_offset[i] + c] = 2.0 / static_cast<double>(t.size(2) * t.size(3));
  }
  at::Tensor f = at::tensor(factor, at::TensorOptions().dtype(at::kDouble))
                     .to(grad_errors.scalar_type());
  return (grad_errors * f).contiguous();
}

void check_grad_errors(const at::Tensor& grad_errors, const Prepared& prep) {
  TORCH_CHECK(grad_errors.dim() == 2 && grad_errors.size(0) == prep.plan.batch &&
                  grad_errors.size(1) == prep.plan.columns,
              "channel_errors_backward: grad_errors has shape ", grad_errors.sizes(),
              ", expected [", prep.plan.batch, ", ", prep.plan.columns, "]");
  TORCH_CHECK(grad_errors.scalar_type() == prep.source[0].scalar_type(),
              "channel_errors_backward: grad_errors has dtype ", grad_errors.scalar_type());
}

using ErrorsAndGrads = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                                  std::vector<at::Tensor>, std::vector<at::Tensor>>;

// The backward's sweep over the blocks (one GEMM per gradient wanted of T and W, after the
// one that makes D). With `with_errors`, E comes out too, from the same blocks: the errors
// and the gradients of <grad_errors, E> in three GEMM passes instead of four.
ErrorsAndGrads backward_sweep(const at::Tensor& grad_errors, at::TensorList source,
                              at::TensorList target, at::TensorList weight,
                              at::TensorList bias, at::IntArrayRef pair_source,
                              at::IntArrayRef pair_target, const c10::List<bool>& output_mask,
                              bool with_errors) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // kernels are below autograd
  const Prepared prep(source, target, weight, bias, pair_source, pair_target);
  check_grad_errors(grad_errors, prep);
  TORCH_CHECK(output_mask.size() == 4, "output_mask has ", output_mask.size(),
              " entries, expected 4 (source, target, weight, bias)");
  const bool want_s = output_mask[0], want_t = output_mask[1], want_w = output_mask[2],
             want_b = output_mask[3];
  at::Tensor errors = with_errors ? at::zeros({prep.plan.batch, prep.plan.columns},
                                              prep.source[0].options())
                                  : at::Tensor();
  std::vector<at::Tensor> grad_source = want_s ? zeros_like_all(prep.source) : std::vector<at::Tensor>{};
  std::vector<at::Tensor> grad_target = want_t ? target_grads(prep) : std::vector<at::Tensor>{};
  GroupSums total = make_group_sums(prep, want_w, want_b, true);
  const at::Tensor scaled = scaled_grad(grad_errors, prep, pair_target);
  AT_DISPATCH_FLOATING_TYPES(grad_errors.scalar_type(), "channel_errors_backward_cpu", [&] {
    const scalar_t* sg = scaled.data_ptr<scalar_t>();
    scalar_t* e = with_errors ? errors.data_ptr<scalar_t>() : nullptr;
    for_each_block<scalar_t, GroupSums>(
        prep, pair_source, /*side_by_side=*/true, [&] { return make_group_sums(prep, want_w, want_b, false); },
        [&](GroupSums& sums, const Block& block, Scratch<scalar_t>& scratch) {
          const size_t g = block.group;
          const auto& group = prep.plan.groups[g];
          const int64_t columns = prep.plan.columns;
          scalar_t* grad = block.d.data_ptr<scalar_t>();  // becomes G = scale * D in place
          for (int64_t sample = 0; sample < block.samples; ++sample) {
            const int64_t b = block.first_sample + sample;
            scalar_t* part = grad + sample * block.len;
            scale_rows(part, sg + b * columns, group, prep.plan, prep, pair_source, block.len,
                       block.width, want_b ? sums.bias[g].data_ptr<scalar_t>() : nullptr,
                       e ? e + b * columns : nullptr);
            if (want_s) {
              spread_rows(grad_source, static_cast<const scalar_t*>(part), b, group, pair_source,
                          scratch, block.p0, block.len, block.width);
            }
          }
          if (want_t) write_target_grad(grad_target[group.target], prep, block, block.d, scratch);
          if (want_w) sums.subtract_product(g, block.d, block.t.t());
        },
        [&](const std::vector<GroupSums>& chunks) {
          std::vector<const GroupSums*> sums;
          for (const GroupSums& chunk : chunks) sums.push_back(&chunk);
          add_chunk_sums<scalar_t>(total, sums);
        });
  });
  return {errors, in_input_layout(grad_source, source), in_input_layout(grad_target, target),
          want_w ? split_group_sums(total.weight, prep, weight) : std::vector<at::Tensor>{},
          want_b ? split_group_sums(total.bias, prep, bias) : std::vector<at::Tensor>{}};
}

GradLists channel_errors_backward_cpu(const at::Tensor& grad_errors, at::TensorList source,
                                      at::TensorList target, at::TensorList weight,
                                      at::TensorList bias, at::IntArrayRef pair_source,
                                      at::IntArrayRef pair_target,
                                      c10::List<bool> output_mask) {
  auto [errors, grad_source, grad_target, grad_weight, grad_bias] = backward_sweep(
      grad_errors, source, target, weight, bias, pair_source, pair_target, output_mask, false);
  return {grad_source, grad_target, grad_weight, grad_bias};
}

ErrorsAndGrads channel_errors_with_grads_cpu(const at::Tensor& grad_errors,
                                             at::TensorList source, at::TensorList target,
                                             at::TensorList weight, at::TensorList bias,
                                             at::IntArrayRef pair_source,
                                             at::IntArrayRef pair_target,
                                             c10::List<bool> output_mask) {
  return backward_sweep(grad_errors, source, target, weight, bias, pair_source, pair_target,
                        output_mask, true);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>, std::vector<at::Tensor>>
channel_errors_double_backward_cpu(const at::Tensor& grad_errors,
                                   const OptionalTensors& tangent_source,
                                   const OptionalTensors& tangent_target,
                                   const OptionalTensors& tangent_weight,
                                   const OptionalTensors& tangent_bias, at::TensorList source,
                                   at::TensorList target, at::TensorList weight,
                                   at::TensorList bias, at::IntArrayRef pair_source,
                                   at::IntArrayRef pair_target, c10::List<bool> output_mask) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // kernels are below autograd
  const Prepared prep(source, target, weight, bias, pair_source, pair_target);
  check_grad_errors(grad_errors, prep);
  const auto& plan = prep.plan;
  const bool want_s = output_mask[0], want_t = output_mask[1], want_w = output_mask[2],
             want_b = output_mask[3];
  auto defined = [](const OptionalTensors& list, size_t i) {
    if (i >= list.size()) return std::optional<at::Tensor>{};
    std::optional<at::Tensor> t = list.get(i);
    return t.has_value() && t->defined() ? t : std::optional<at::Tensor>{};
  };
  // Tangents, prepared like the inputs they are tangent to.
  std::vector<std::optional<at::Tensor>> v_source, v_target;
  for (size_t m = 0; m < prep.source.size(); ++m) {
    auto v = defined(tangent_source, m);
    v_source.push_back(v ? std::optional<at::Tensor>(v->contiguous()) : std::nullopt);
  }
  for (size_t n = 0; n < prep.target.size(); ++n) {
    auto v = defined(tangent_target, n);
    // Same layout as the target, so one view serves both in the products.
    v_target.push_back(v ? std::optional<at::Tensor>(v->contiguous(prep.target[n].suggest_memory_format()))
                         : std::nullopt);
  }
  std::vector<std::optional<at::Tensor>> v_weight_stack, v_bias_stack;
  for (const auto& group : plan.groups) {
    v_weight_stack.push_back(stack_optional_rows(tangent_weight, weight, group));
    v_bias_stack.push_back(stack_optional_rows(tangent_bias, bias, group));
  }
  at::Tensor grad_grad_errors = at::zeros({plan.batch, plan.columns}, grad_errors.options());
  std::vector<at::Tensor> grad_source = want_s ? zeros_like_all(prep.source) : std::vector<at::Tensor>{};
  std::vector<at::Tensor> grad_target = want_t ? target_grads(prep) : std::vector<at::Tensor>{};
  GroupSums total = make_group_sums(prep, want_w, want_b, true);
  const at::Tensor scaled = scaled_grad(grad_errors, prep, pair_target);
  // (2 / HW) per column, to turn sum_hw U D into grad_grad_errors.
  const at::Tensor column_scale = scaled_grad(at::ones_like(grad_errors), prep, pair_target);
  AT_DISPATCH_FLOATING_TYPES(grad_errors.scalar_type(), "channel_errors_double_backward_cpu", [&] {
    const scalar_t* sg = scaled.data_ptr<scalar_t>();
    const scalar_t* cscale = column_scale.data_ptr<scalar_t>();
    scalar_t* gge = grad_grad_errors.data_ptr<scalar_t>();
    struct Worker {
      GroupSums sums;
      at::Tensor tangent;  // U, [rows * tile]
    };
    // One sample per block: the tangents of the target are not copied side by side.
    const int64_t block_size = largest_block(prep, false);
    for_each_block<scalar_t, Worker>(
        prep, pair_source, /*side_by_side=*/false,
        [&] {
          return Worker{make_group_sums(prep, want_w, want_b, false),
                        at::empty({block_size}, prep.source[0].options())};
        },
        [&](Worker& worker, const Block& block, Scratch<scalar_t>& scratch) {
          const size_t g = block.group;
          const int64_t b = block.first_sample, p0 = block.p0, len = block.len;
          const at::Tensor& d = block.d;
          const auto& group = plan.groups[g];
          const int64_t n = group.target;
          at::Tensor u = worker.tangent.narrow(0, 0, group.rows * len).view({group.rows, len});
          scalar_t* u_data = u.data_ptr<scalar_t>();
          // U = resize(vS) - vb - W vT - vW T
          for (size_t k = 0; k < group.pairs.size(); ++k) {
            const int64_t i = group.pairs[k];
            const auto& vs = v_source[pair_source[i]];
            const int64_t cs = prep.source[pair_source[i]].size(1);
            const int64_t plane = prep.source[pair_source[i]].size(2) * prep.source[pair_source[i]].size(3);
            const scalar_t* vb = v_bias_stack[g] ? v_bias_stack[g]->data_ptr<scalar_t>() : nullptr;
            for (int64_t c = 0; c < cs; ++c) {
              const int64_t r = group.row_offset[k] + c;
              scalar_t* row = u_data + r * len;
              const scalar_t minus = vb ? vb[r] : scalar_t(0);
              if (vs) {
                const scalar_t* channel = vs->data_ptr<scalar_t>() + (b * cs + c) * plane;
                scratch.resample[i].sample(channel, p0, len, minus, row, scratch.between.data());
              } else {
                std::fill(row, row + len, -minus);
              }
            }
          }
          const at::Tensor& t_tile = block.t;
          at::Tensor vt_tile;
          if (v_target[n]) {
            vt_tile = sample_matrix(*v_target[n], b).narrow(1, p0, len);
            u.addmm_(prep.weight_stack[g], vt_tile, 1, -1);
          }
          const auto& vw = v_weight_stack[g];
          if (vw) u.addmm_(*vw, t_tile, 1, -1);
          // grad_grad_errors += (2 / HW) sum_hw U D; then G_D = s U (in u), G_U = s D (in d).
          scalar_t* d_data = d.data_ptr<scalar_t>();
          for (size_t k = 0; k < group.pairs.size(); ++k) {
            const int64_t i = group.pairs[k];
            const int64_t cs = prep.source[pair_source[i]].size(1);
            for (int64_t c = 0; c < cs; ++c) {
              const int64_t r = group.row_offset[k] + c, col = plan.column_offset[i] + c;
              const scalar_t* ur = u_data + r * len;
              const scalar_t* dr = d_data + r * len;
              gge[b * plan.columns + col] += dot(ur, dr, len) * cscale[col];
            }
          }
          const scalar_t* sg_b = sg + b * plan.columns;
          scale_rows(u_data, sg_b, group, plan, prep, pair_source, len, len,
                     want_b ? worker.sums.bias[g].data_ptr<scalar_t>() : nullptr);
          scale_rows(d_data, sg_b, group, plan, prep, pair_source, len, len,
                     static_cast<scalar_t*>(nullptr));
          if (want_s) {
            spread_rows(grad_source, static_cast<const scalar_t*>(u_data), b, group, pair_source,
                        scratch, p0, len, len);
          }
          if (want_t) write_target_grad(grad_target[n], prep, block, u, scratch, vw, d);
          if (want_w) {
            worker.sums.subtract_product(g, u, t_tile.t());
            if (vt_tile.defined()) worker.sums.subtract_product(g, d, vt_tile.t());
          }
        },
        [&](const std::vector<Worker>& chunks) {
          std::vector<const GroupSums*> sums;
          for (const Worker& chunk : chunks) sums.push_back(&chunk.sums);
          add_chunk_sums<scalar_t>(total, sums);
        });
  });
  return {grad_grad_errors, in_input_layout(grad_source, source),
          in_input_layout(grad_target, target), want_w ? split_group_sums(total.weight, prep, weight) : std::vector<at::Tensor>{},
          want_b ? split_group_sums(total.bias, prep, bias) : std::vector<at::Tensor>{}};
}

}  // namespace

TORCH_LIBRARY_IMPL(l2t_fast, CPU, m) {
  m.impl("channel_errors", &channel_errors_cpu);
  m.impl("channel_errors_backward", &channel_errors_backward_cpu);
  m.impl("channel_errors_double_backward", &channel_errors_double_backward_cpu);
  m.impl("channel_errors_with_grads", &channel_errors_with_grads_cpu);
}

}  // namespace l2t_fast
