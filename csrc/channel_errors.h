// The shared plan of the channel-error ops: which pairs share a target layer (their
// regressors are stacked into one product), where each pair's block of errors sits in
// E [B, sum_i Cs_i], and the bilinear resize tables. Used by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace l2t_fast {

using GradLists = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>,
                             std::vector<at::Tensor>, std::vector<at::Tensor>>;
using OptionalTensors = c10::List<std::optional<at::Tensor>>;

// Source index and weight of bilinear interpolation along one axis, exactly as
// F.interpolate(mode="bilinear", align_corners=False, size=...) computes them:
// out[i] = (1 - weight[i]) * in[lo[i]] + weight[i] * in[hi[i]].
struct AxisResize {
  std::vector<int64_t> lo, hi;
  std::vector<double> weight;
};
AxisResize axis_resize(int64_t in_size, int64_t out_size);

// The pairs that share target layer `target`; their regressors stack into one
// [rows, Ct] matrix, pair k of the group owning rows [row_offset[k], row_offset[k] + Cs).
struct TargetGroup {
  int64_t target = 0;
  std::vector<int64_t> pairs;
  std::vector<int64_t> row_offset;
  int64_t rows = 0;
};

struct PairPlan {
  int64_t batch = 0;
  int64_t columns = 0;                 // sum_i Cs_i: the width of E
  std::vector<int64_t> column_offset;  // pair i's first column in E
  std::vector<TargetGroup> groups;     // in order of first appearance of each target
};

// Checks the op's arguments (the Python layer gives friendlier errors first) and plans.
PairPlan make_plan(at::TensorList source, at::TensorList target, at::TensorList weight,
                   at::TensorList bias, at::IntArrayRef pair_source,
                   at::IntArrayRef pair_target);

// The stacked [rows, Ct] regressors (and [rows] biases) of a group.
at::Tensor stack_rows(at::TensorList per_pair, const TargetGroup& group);
// As stack_rows, for optional tangents: a missing one stacks as zeros shaped like `like`.
std::optional<at::Tensor> stack_optional_rows(const OptionalTensors& per_pair,
                                              at::TensorList like, const TargetGroup& group);

// Splits a group's stacked [rows, ...] gradient back into the pairs' tensors.
void scatter_rows(const at::Tensor& stacked, const TargetGroup& group,
                  std::vector<at::Tensor>& per_pair);

}  // namespace l2t_fast
