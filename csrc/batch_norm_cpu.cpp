// CPU kernel of batch_norm_double_backward: the derivative of train-mode BatchNorm's
// backward, which every Hessian-vector product of the meta step runs through
// (l2t_fast/methods/l2tww/batchnorm.py says where it is used). PyTorch writes it as a composite of some
// twenty elementwise ops over the whole map; here it is two passes per channel: one that
// reduces five sums, one that writes both outputs.
//
// Per channel, with N values, <a> their mean, xh = (x - mean) invstd = (x - mean) r, the
// backward's input g (grad_out), and the adjoints ggx, ggw, ggb of its outputs
// (dx, dweight, dbias), P = <ggx xh>, Q = <g xh>, A = <ggx g> - <ggx><g>:
//   grad_input    = a (ggx - <ggx>) + b (g - <g>) + k xh,
//                   a = -w r^2 Q,  b = r (ggw - w r P),  k = -w r^2 (A - 3 P Q) - ggw r Q
//   grad_weight   = N r (A - P Q)
//   grad_grad_out = w r (ggx - <ggx> - xh P) + ggw xh + ggb
// (derived from dx = w r (g - <g> - xh <g xh>), dweight = N <g xh>, dbias = N <g>;
// tests/test_batchnorm.py checks them against PyTorch's double backward in float64).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

namespace l2t_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_double_backward_cpu(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& grad_out,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& grad_grad_input,
    const at::Tensor& grad_grad_weight, const at::Tensor& grad_grad_bias) {
  TORCH_CHECK(input.dim() >= 2, "batch_norm_double_backward: input needs a channel dimension");
  const int64_t batch = input.size(0), channels = input.size(1);
  const int64_t inner = channels == 0 ? 0 : input.numel() / (batch * channels);
  for (const auto* t : {&grad_out, &grad_grad_input}) {
    TORCH_CHECK(t->sizes() == input.sizes(), "batch_norm_double_backward: a map's shape ",
                t->sizes(), " differs from input's ", input.sizes());
  }
  for (const auto* t : {&weight, &mean, &invstd, &grad_grad_weight, &grad_grad_bias}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == channels,
                "batch_norm_double_backward: per-channel tensors must be [", channels,
                "], got ", t->sizes());
  }
  const at::Tensor x = input.contiguous(), g = grad_out.contiguous(),
                   ggx = grad_grad_input.contiguous();
  at::Tensor grad_input = at::empty_like(x), grad_grad_out = at::empty_like(x);
  at::Tensor grad_weight = at::empty({channels}, weight.options());

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "batch_norm_double_backward_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const auto w_ = weight.contiguous(), mean_ = mean.contiguous().to(input.scalar_type()),
               invstd_ = invstd.contiguous().to(input.scalar_type()),
               ggw_ = grad_grad_weight.contiguous(), ggb_ = grad_grad_bias.contiguous();
    const scalar_t *xs = x.data_ptr<scalar_t>(), *gs = g.data_ptr<scalar_t>(),
                   *ggxs = ggx.data_ptr<scalar_t>();
    scalar_t *gis = grad_input.data_ptr<scalar_t>(), *ggos = grad_grad_out.data_ptr<scalar_t>();
    at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const acc_t mu = mean_.data_ptr<scalar_t>()[c], r = invstd_.data_ptr<scalar_t>()[c];
        const acc_t w = w_.data_ptr<scalar_t>()[c], ggw = ggw_.data_ptr<scalar_t>()[c],
                    ggb = ggb_.data_ptr<scalar_t>()[c];
        acc_t sum_ggx = 0, sum_g = 0, sum_ggx_xh = 0, sum_g_xh = 0, sum_ggx_g = 0;
        for (int64_t n = 0; n < batch; ++n) {
          const int64_t at = (n * channels + c) * inner;
          const scalar_t *xp = xs + at, *gp = gs + at, *ggxp = ggxs + at;
          _Pragma("omp simd reduction(+ : sum_ggx, sum_g, sum_ggx_xh, sum_g_xh, sum_ggx_g)")
          for (int64_t i = 0; i < inner; ++i) {
            const acc_t xh = (acc_t(xp[i]) - mu) * r, gi = gp[i], ggxi = ggxp[i];
            sum_ggx += ggxi;
            sum_g += gi;
            sum_ggx_xh += ggxi * xh;
            sum_g_xh += gi * xh;
            sum_ggx_g += ggxi * gi;
          }
        }
        const acc_t count = acc_t(batch * inner);
        const acc_t mean_ggx = sum_ggx / count, mean_g = sum_g / count;
        const acc_t P = sum_ggx_xh / count, Q = sum_g_xh / count;
        const acc_t A = sum_ggx_g / count - mean_ggx * mean_g;
        const acc_t a = -w * r * r * Q, b = r * (ggw - w * r * P);
        const acc_t k = -w * r * r * (A - 3 * P * Q) - ggw * r * Q;
        grad_weight.data_ptr<scalar_t>()[c] = static_cast<scalar_t>(count * r * (A - P * Q));
        // In x rather than xh: grad_input = a ggx + b g + k r x + input_offset, and
        // grad_grad_out = w r ggx + out_slope x + out_offset.
        const acc_t input_offset = -a * mean_ggx - b * mean_g - k * r * mu;
        const acc_t out_slope = (ggw - w * r * P) * r;
        const acc_t out_offset = ggb - w * r * mean_ggx - out_slope * mu;
        const acc_t kr = k * r, wr = w * r;
        for (int64_t n = 0; n < batch; ++n) {
          const int64_t at = (n * channels + c) * inner;
          const scalar_t *xp = xs + at, *gp = gs + at, *ggxp = ggxs + at;
          scalar_t *gip = gis + at, *ggop = ggos + at;
          _Pragma("omp simd")
          for (int64_t i = 0; i < inner; ++i) {
            const acc_t xi = xp[i], ggxi = ggxp[i];
            gip[i] = static_cast<scalar_t>(a * ggxi + b * acc_t(gp[i]) + kr * xi + input_offset);
            ggop[i] = static_cast<scalar_t>(wr * ggxi + out_slope * xi + out_offset);
          }
        }
      }
    });
  });
  return {grad_input, grad_weight, grad_grad_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(l2t_fast, CPU, m) {
  m.impl("batch_norm_double_backward", &batch_norm_double_backward_cpu);
}

}  // namespace l2t_fast
