#include "channel_errors.h"

#include <algorithm>

namespace l2t_fast {

AxisResize axis_resize(int64_t in_size, int64_t out_size) {
  AxisResize axis;
  axis.lo.resize(out_size);
  axis.hi.resize(out_size);
  axis.weight.resize(out_size);
  const double scale = static_cast<double>(in_size) / static_cast<double>(out_size);
  for (int64_t i = 0; i < out_size; ++i) {
    if (in_size == out_size) {  // F.interpolate's taps too: lo = hi, weights 1 and 0
      axis.lo[i] = axis.hi[i] = i;
      axis.weight[i] = 0.0;
      continue;
    }
    const double real = std::max(scale * (i + 0.5) - 0.5, 0.0);
    const int64_t lo = std::min(static_cast<int64_t>(real), in_size - 1);
    axis.lo[i] = lo;
    axis.hi[i] = lo < in_size - 1 ? lo + 1 : lo;
    axis.weight[i] = std::min(std::max(real - lo, 0.0), 1.0);
  }
  return axis;
}

PairPlan make_plan(at::TensorList source, at::TensorList target, at::TensorList weight,
                   at::TensorList bias, at::IntArrayRef pair_source,
                   at::IntArrayRef pair_target) {
  const int64_t pairs = static_cast<int64_t>(pair_source.size());
  TORCH_CHECK(pairs >= 1, "channel_errors: no pairs");
  TORCH_CHECK(static_cast<int64_t>(pair_target.size()) == pairs &&
                  static_cast<int64_t>(weight.size()) == pairs &&
                  static_cast<int64_t>(bias.size()) == pairs,
              "channel_errors: pair_source, pair_target, weight and bias must have one entry "
              "per pair");
  TORCH_CHECK(!source.empty() && !target.empty(), "channel_errors: no feature maps");
  PairPlan plan;
  plan.batch = source[0].size(0);
  const auto dtype = source[0].scalar_type();
  const auto device = source[0].device();
  auto check_tensor = [&](const at::Tensor& t, const char* name, int64_t i, int64_t dim) {
    TORCH_CHECK(t.dim() == dim, "channel_errors: ", name, "[", i, "] must be ", dim,
                "-D, got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == dtype, "channel_errors: ", name, "[", i, "] has dtype ",
                t.scalar_type(), ", expected ", dtype);
    TORCH_CHECK(t.device() == device, "channel_errors: ", name, "[", i, "] is on ",
                t.device(), ", expected ", device);
  };
  // An empty batch is fine (no work); empty channels, rows or columns are not: the
  // resize would read from an empty map and the mean over positions divide by zero.
  auto check_map = [&](const at::Tensor& t, const char* name, int64_t i) {
    check_tensor(t, name, i, 4);
    TORCH_CHECK(t.size(0) == plan.batch, "channel_errors: ", name, "[", i, "] has batch size ",
                t.size(0), ", expected ", plan.batch);
    TORCH_CHECK(t.size(1) > 0 && t.size(2) > 0 && t.size(3) > 0, "channel_errors: ", name, "[",
                i, "] has shape ", t.sizes(), ": channels, height and width must be >= 1");
  };
  for (size_t i = 0; i < source.size(); ++i) check_map(source[i], "source", i);
  for (size_t i = 0; i < target.size(); ++i) check_map(target[i], "target", i);
  plan.column_offset.resize(pairs);
  for (int64_t i = 0; i < pairs; ++i) {
    const int64_t m = pair_source[i], n = pair_target[i];
    TORCH_CHECK(m >= 0 && m < static_cast<int64_t>(source.size()) && n >= 0 &&
                    n < static_cast<int64_t>(target.size()),
                "channel_errors: pair ", i, " = (", m, ", ", n, ") is out of range");
    const int64_t cs = source[m].size(1), ct = target[n].size(1);
    check_tensor(weight[i], "weight", i, 2);
    check_tensor(bias[i], "bias", i, 1);
    TORCH_CHECK(weight[i].size(0) == cs && weight[i].size(1) == ct, "channel_errors: weight[",
                i, "] has shape ", weight[i].sizes(), ", expected [", cs, ", ", ct, "]");
    TORCH_CHECK(bias[i].size(0) == cs, "channel_errors: bias[", i, "] has shape ",
                bias[i].sizes(), ", expected [", cs, "]");
    plan.column_offset[i] = plan.columns;
    plan.columns += cs;
    auto group = std::find_if(plan.groups.begin(), plan.groups.end(),
                              [n](const TargetGroup& g) { return g.target == n; });
    if (group == plan.groups.end()) {
      plan.groups.push_back(TargetGroup{});
      group = plan.groups.end() - 1;
      group->target = n;
    }
    group->pairs.push_back(i);
    group->row_offset.push_back(group->rows);
    group->rows += cs;
  }
  return plan;
}

at::Tensor stack_rows(at::TensorList per_pair, const TargetGroup& group) {
  std::vector<at::Tensor> rows;
  rows.reserve(group.pairs.size());
  for (int64_t i : group.pairs) rows.push_back(per_pair[i]);
  return at::cat(rows, 0).contiguous();
}

std::optional<at::Tensor> stack_optional_rows(const OptionalTensors& per_pair,
                                              at::TensorList like, const TargetGroup& group) {
  if (per_pair.size() == 0) return std::nullopt;
  std::vector<at::Tensor> rows;
  bool any = false;
  for (int64_t i : group.pairs) {
    const std::optional<at::Tensor> t = per_pair.get(i);
    if (t.has_value() && t->defined()) {
      rows.push_back(*t);
      any = true;
    } else {
      rows.push_back(at::zeros_like(like[i]));
    }
  }
  if (!any) return std::nullopt;
  return at::cat(rows, 0).contiguous();
}

void scatter_rows(const at::Tensor& stacked, const TargetGroup& group,
                  std::vector<at::Tensor>& per_pair) {
  for (size_t k = 0; k < group.pairs.size(); ++k) {
    const int64_t i = group.pairs[k];
    const int64_t rows = per_pair[i].size(0);
    per_pair[i].copy_(stacked.narrow(0, group.row_offset[k], rows));
  }
}

}  // namespace l2t_fast
