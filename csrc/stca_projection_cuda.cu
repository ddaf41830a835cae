// CUDA kernels of the shared projections (docs/stca.md section 6).
//
// mix_factors: one warp per base token (a block is 8 warps), every scale of
// it: the lanes stride over the channels (coalesced), the warp adds their
// partial sums with shuffles, so a base token's statistics are taken once and
// each of its mixed tokens costs O(2I). Its backward (derived in
// stca_projection_bodies.h and stca_projection_cpu.cpp) is the same walk,
// writing dL/dm of the borrowed channels to a scratch tensor, then a second kernel
// (a thread per channel of every token of x) gathers them back to where they
// were read, through the inverse maps: every output element is written once,
// no atomics. grad_ln_weight is the sum of per-token terms (at::sum,
// deterministic).
//
// project_mixed: the rank-(2I+2) product is one cuBLAS GEMM (at::mm_out) into
// the output when qkv's dtype is the factors', else into a float32/float64
// scratch; then one kernel adds gain * qkv[base] and rounds once, V channels
// per thread (V from the alignment, as in stca_cuda.cu). Its backward: a warp
// per token of qkv (dot products, sum over scales) and two cuBLAS GEMMs called
// by the autograd formula (stca_projection_ops.cpp).
//
// The per-lane code is stca_projection_bodies.h, run on the CPU by the C++
// tests against the CPU kernels. NOT YET RUN ON A GPU: this file compiles
// (nvcc 13, sm_80 / sm_90).
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "stca_ops.h"
#include "stca_projection_bodies.h"

namespace stdd {
namespace {

using kernels::FactorKernelArgs;
using kernels::ProjectKernelArgs;

constexpr int kWarp = kernels::kWarpLanes;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreadsPerBlock = 256;

template <typename T>
__device__ __forceinline__ T shuffle_sum(T value) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

template <typename stat_t>
__device__ __forceinline__ kernels::BaseSums<stat_t> shuffle_sum(kernels::BaseSums<stat_t> sums) {
  sums.borrowed = shuffle_sum(sums.borrowed);
  sums.own = shuffle_sum(sums.own);
  return sums;
}

template <typename stat_t>
__device__ __forceinline__ kernels::BorrowedSums<stat_t> shuffle_sum(kernels::BorrowedSums<stat_t> sums) {
  sums.difference = shuffle_sum(sums.difference);
  sums.spread = shuffle_sum(sums.spread);
  return sums;
}

// The Warp of the walks in stca_projection_bodies.h: this lane's share, then the xor butterfly
// (kernels::HostWarp adds in the same order on the CPU).
struct DeviceWarp {
  int32_t lane;

  template <typename F>
  __device__ __forceinline__ auto sum(const F& f) const {
    return shuffle_sum(f(lane, kWarp));
  }
  template <typename F>
  __device__ __forceinline__ void each(const F& f) const {
    f(lane, kWarp);
  }
};

dim3 warp_grid(int64_t items) {
  return dim3(static_cast<unsigned>(std::min<int64_t>((items + kWarpsPerBlock - 1) / kWarpsPerBlock, int64_t{1} << 30)));
}
const dim3 kWarpBlock(kWarp, kWarpsPerBlock);

// A warp per item, grid-stride; every lane of a warp takes the same items (the shuffles need the whole warp).
#define STDD_FOR_EACH_WARP_ITEM(items)                                                                          \
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; item < (items);             \
       item += static_cast<int64_t>(gridDim.x) * blockDim.y)

template <typename scalar_t, typename factor_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    mix_factors_cuda_kernel(const scalar_t* __restrict__ x, const factor_t* __restrict__ weight,
                            const int64_t* __restrict__ phase, factor_t* __restrict__ gain,
                            factor_t* __restrict__ coefficients, scalar_t* __restrict__ mixed_mean,
                            const FactorKernelArgs a, int64_t items) {
  const DeviceWarp warp{static_cast<int32_t>(threadIdx.x)};
  STDD_FOR_EACH_WARP_ITEM(items) {
    kernels::mix_factors_warp_item<scalar_t, factor_t>(warp, x, weight, phase, gain, coefficients, mixed_mean, a, item);
  }
}

template <typename scalar_t, typename factor_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    mix_factors_backward_cuda_kernel(const factor_t* __restrict__ grad_gain,
                                     const factor_t* __restrict__ grad_coefficients,
                                     const scalar_t* __restrict__ grad_mean, const scalar_t* __restrict__ x,
                                     const factor_t* __restrict__ weight, const int64_t* __restrict__ phase,
                                     scalar_t* __restrict__ grad_x, at::opmath_type<factor_t>* __restrict__ borrowed_grad,
                                     at::opmath_type<factor_t>* __restrict__ base_grad,
                                     at::opmath_type<factor_t>* __restrict__ weight_terms, const FactorKernelArgs a,
                                     int64_t items) {
  const DeviceWarp warp{static_cast<int32_t>(threadIdx.x)};
  STDD_FOR_EACH_WARP_ITEM(items) {
    kernels::mix_factors_backward_warp_item<scalar_t, factor_t>(warp, grad_gain, grad_coefficients, grad_mean, x,
                                                                weight, phase, grad_x, borrowed_grad, base_grad,
                                                                weight_terms, a, item);
  }
}

// Grid-stride over items, a block-stride over the item's channels (one thread per V channels).
#define STDD_FOR_EACH_ITEM(items)                                                                                \
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; item < (items);             \
       item += static_cast<int64_t>(gridDim.x) * blockDim.y)
#define STDD_FOR_EACH_CHUNK(channels, V) \
  for (int32_t ch = static_cast<int32_t>(threadIdx.x) * (V); ch < (channels); ch += static_cast<int32_t>(blockDim.x) * (V))

struct LaunchShape {
  dim3 grid, block;
};

// threads_x covers the row's chunks (a multiple of a warp, at most 256); the rest of the 256 take more rows.
LaunchShape launch_shape(int64_t items, int64_t chunks) {
  const int64_t threads_x = std::min<int64_t>(kThreadsPerBlock, std::max<int64_t>(kWarp, (chunks + kWarp - 1) / kWarp * kWarp));
  const int64_t threads_y = std::max<int64_t>(1, kThreadsPerBlock / threads_x);
  const int64_t blocks = std::min<int64_t>((items + threads_y - 1) / threads_y, int64_t{1} << 30);
  return {dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(threads_x), static_cast<unsigned>(threads_y))};
}

template <typename scalar_t, typename stat_t>
__global__ void mix_factors_gather_cuda_kernel(const stat_t* __restrict__ borrowed_grad,
                                               const stat_t* __restrict__ base_grad, const int64_t* __restrict__ phase,
                                               scalar_t* __restrict__ grad_x, const FactorKernelArgs a, int64_t items) {
  STDD_FOR_EACH_ITEM(items) {
    const auto it = kernels::token_item(a.mix.mask, phase, a.mix.num_frames, item);
    STDD_FOR_EACH_CHUNK(a.mix.channels, 1) {
      kernels::factor_backward_gather_chunk<scalar_t, stat_t>(borrowed_grad, base_grad, grad_x, a, it, item, ch);
    }
  }
}

// product may alias out: no __restrict__ on either.
template <typename scalar_t, typename factor_t, int V>
__global__ void project_mixed_cuda_kernel(const scalar_t* __restrict__ qkv, const factor_t* __restrict__ gain,
                                          const factor_t* product, const int64_t* __restrict__ phase, scalar_t* out,
                                          const ProjectKernelArgs a, int64_t items) {
  STDD_FOR_EACH_ITEM(items) {
    const int64_t source = kernels::project_source(a, phase, item);
    STDD_FOR_EACH_CHUNK(a.width, V) {
      kernels::project_mixed_chunk<scalar_t, factor_t, V>(qkv, gain, product, out, a, item, source, ch);
    }
  }
}

template <typename scalar_t, typename factor_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    project_mixed_backward_cuda_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ qkv,
                                       const factor_t* __restrict__ gain, const int64_t* __restrict__ phase,
                                       scalar_t* __restrict__ grad_qkv, factor_t* __restrict__ grad_gain,
                                       const ProjectKernelArgs a, int64_t items) {
  const DeviceWarp warp{static_cast<int32_t>(threadIdx.x)};
  STDD_FOR_EACH_WARP_ITEM(items) {
    kernels::project_mixed_backward_warp_item<scalar_t, factor_t>(warp, grad, qkv, gain, phase, grad_qkv, grad_gain, a,
                                                                  item);
  }
}

// Calls body.template operator()<V>() for the vector width chosen at run time.
template <int widest, typename Body>
void with_vector_width(int width, Body&& body) {
  if constexpr (widest >= 8) {
    if (width == 8) return body.template operator()<8>();
  }
  if constexpr (widest >= 4) {
    if (width == 4) return body.template operator()<4>();
  }
  if constexpr (widest >= 2) {
    if (width == 2) return body.template operator()<2>();
  }
  TORCH_CHECK(width == 1, "internal error: vector width ", width);
  body.template operator()<1>();
}

template <typename Body>
void with_factor_type(at::ScalarType dtype, Body&& body) {
  if (dtype == at::kDouble) {
    body.template operator()<double>();
  } else {
    body.template operator()<float>();
  }
}

template <typename T>
const T* pointer_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mix_factors_cuda(const at::Tensor& x, const at::Tensor& ln_weight,
                                                                const at::Tensor& phase, int64_t num_frames,
                                                                at::IntArrayRef window, int64_t masked,
                                                                at::IntArrayRef scales, int64_t channel_fold,
                                                                std::string_view mixing, double eps) {
  const auto plan = detail::check_mix_factors(x, ln_weight, num_frames, window, masked, scales, channel_fold, mixing, eps);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto phase64 = detail::phase_as_int64(phase, plan.mix.rows, num_frames, x);
  const auto input = x.contiguous();
  const auto weight = ln_weight.contiguous();
  const FactorKernelArgs args = kernels::make_factor_args(plan);
  const int64_t S = args.mix.num_scales, tokens_out = args.tokens_out();
  auto gain = at::empty({S, plan.mix.rows, tokens_out}, ln_weight.options());
  auto coefficients = at::empty({S, plan.mix.rows, tokens_out, plan.rank()}, ln_weight.options());
  auto mixed_mean = at::empty({plan.mix.rows, tokens_out, plan.mix.channels}, x.options());
  const int64_t items = plan.mix.rows * tokens_out;
  if (mixed_mean.numel() == 0) return {gain, coefficients, mixed_mean};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stdd::mix_factors (CUDA)", [&] {
    using factor_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    mix_factors_cuda_kernel<scalar_t, factor_t><<<warp_grid(items), kWarpBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
        input.const_data_ptr<scalar_t>(), weight.const_data_ptr<factor_t>(), phase64.const_data_ptr<int64_t>(),
        gain.mutable_data_ptr<factor_t>(), coefficients.mutable_data_ptr<factor_t>(),
        mixed_mean.mutable_data_ptr<scalar_t>(), args, items);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gain, coefficients, mixed_mean};
}

std::tuple<at::Tensor, at::Tensor> mix_factors_backward_cuda(
    const std::optional<at::Tensor>& grad_gain, const std::optional<at::Tensor>& grad_coefficients,
    const std::optional<at::Tensor>& grad_mixed_mean, const at::Tensor& x, const at::Tensor& ln_weight,
    const at::Tensor& phase, int64_t num_frames, at::IntArrayRef window, int64_t masked, at::IntArrayRef scales,
    int64_t channel_fold, std::string_view mixing, double eps) {
  const auto plan = detail::check_mix_factors_backward(grad_gain, grad_coefficients, grad_mixed_mean, x, ln_weight,
                                                       num_frames, window, masked, scales, channel_fold, mixing, eps);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto phase64 = detail::phase_as_int64(phase, plan.mix.rows, num_frames, x);
  const auto input = x.contiguous();
  const auto weight = ln_weight.contiguous();
  const auto g_gain = contiguous_or_undefined(grad_gain);
  const auto g_coefficients = contiguous_or_undefined(grad_coefficients);
  const auto g_mean = contiguous_or_undefined(grad_mixed_mean);
  const FactorKernelArgs args = kernels::make_factor_args(plan);
  const int64_t S = args.mix.num_scales, R = plan.mix.rows, tokens_out = args.tokens_out(), B2 = plan.borrowed;
  auto grad_x = at::empty(x.sizes(), x.options());
  auto grad_weight = at::zeros(ln_weight.sizes(), ln_weight.options());
  if (grad_x.numel() == 0) return {grad_x, grad_weight};
  // Scratch in the statistics' dtype (the factor dtype on CUDA).
  auto borrowed_grad = at::empty({S, R, tokens_out, B2}, ln_weight.options());
  auto base_grad = at::empty({R, tokens_out, B2}, ln_weight.options());
  auto weight_terms = at::empty({R * tokens_out, B2}, ln_weight.options());
  const int64_t base_items = R * tokens_out, token_items = R * plan.mix.mask.num_tokens();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stdd::mix_factors_backward (CUDA)", [&] {
    using factor_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    using stat_t = at::opmath_type<factor_t>;
    const auto stream = c10::cuda::getCurrentCUDAStream();
    mix_factors_backward_cuda_kernel<scalar_t, factor_t><<<warp_grid(base_items), kWarpBlock, 0, stream>>>(
        pointer_or_null<factor_t>(g_gain), pointer_or_null<factor_t>(g_coefficients), pointer_or_null<scalar_t>(g_mean),
        input.const_data_ptr<scalar_t>(), weight.const_data_ptr<factor_t>(), phase64.const_data_ptr<int64_t>(),
        grad_x.mutable_data_ptr<scalar_t>(), borrowed_grad.mutable_data_ptr<stat_t>(), base_grad.mutable_data_ptr<stat_t>(),
        weight_terms.mutable_data_ptr<stat_t>(), args, base_items);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto shape = launch_shape(token_items, plan.mix.channels);
    mix_factors_gather_cuda_kernel<scalar_t, stat_t><<<shape.grid, shape.block, 0, stream>>>(
        borrowed_grad.const_data_ptr<stat_t>(), base_grad.const_data_ptr<stat_t>(), phase64.const_data_ptr<int64_t>(),
        grad_x.mutable_data_ptr<scalar_t>(), args, token_items);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (B2 > 0) grad_weight.narrow(0, 0, B2).copy_(weight_terms.sum(0));
  return {grad_x, grad_weight};
}

at::Tensor project_mixed_cuda(const at::Tensor& qkv, const at::Tensor& gain, const at::Tensor& coefficients,
                              const at::Tensor& basis, const at::Tensor& phase, int64_t num_frames,
                              at::IntArrayRef window, int64_t masked) {
  const auto plan = detail::check_project_mixed(qkv, gain, coefficients, basis, num_frames, window, masked);
  const ProjectKernelArgs args = kernels::make_project_args(plan);
  const c10::cuda::CUDAGuard device_guard(qkv.device());
  const auto phase64 = detail::phase_as_int64(phase, plan.rows, num_frames, qkv);
  const auto values = qkv.contiguous();
  const auto gain_c = gain.contiguous();
  auto out = at::empty({plan.num_scales, plan.rows, 1 + plan.mask.num_kept(), plan.width}, qkv.options());
  if (out.numel() == 0) return out;
  const int64_t items = out.numel() / plan.width;
  const bool in_place = qkv.scalar_type() == gain.scalar_type();
  auto product = in_place ? out.view({items, plan.width}) : at::empty({items, plan.width}, gain.options());
  at::mm_out(product, coefficients.reshape({items, plan.rank}), basis.t());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "stdd::project_mixed (CUDA)", [&] {
    with_factor_type(gain.scalar_type(), [&]<typename factor_t>() {
      // V channels per thread: 16-byte accesses at most, for the qkv rows and the product alike.
      const int width = std::min(
          kernels::vector_width(sizeof(scalar_t), plan.width, {values.const_data_ptr(), out.const_data_ptr()}),
          kernels::vector_width(sizeof(factor_t), plan.width, {product.const_data_ptr()}));
      constexpr int widest = kernels::kMaxVectorBytes / static_cast<int>(std::max(sizeof(scalar_t), sizeof(factor_t)));
      with_vector_width<widest>(width, [&]<int V>() {
        const auto shape = launch_shape(items, plan.width / V);
        project_mixed_cuda_kernel<scalar_t, factor_t, V><<<shape.grid, shape.block, 0, c10::cuda::getCurrentCUDAStream()>>>(
            values.const_data_ptr<scalar_t>(), gain_c.const_data_ptr<factor_t>(), product.const_data_ptr<factor_t>(),
            phase64.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), args, items);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> project_mixed_backward_cuda(const at::Tensor& grad_qkv_mixed, const at::Tensor& qkv,
                                                               const at::Tensor& gain, const at::Tensor& phase,
                                                               int64_t num_frames, at::IntArrayRef window,
                                                               int64_t masked) {
  const auto plan = detail::check_project_mixed_backward(grad_qkv_mixed, qkv, gain, num_frames, window, masked);
  const ProjectKernelArgs args = kernels::make_project_args(plan);
  const c10::cuda::CUDAGuard device_guard(qkv.device());
  const auto phase64 = detail::phase_as_int64(phase, plan.rows, num_frames, qkv);
  const auto grad = grad_qkv_mixed.contiguous();
  const auto values = qkv.contiguous();
  const auto gain_c = gain.contiguous();
  auto grad_qkv = at::empty(qkv.sizes(), qkv.options());
  auto grad_gain = at::empty(gain.sizes(), gain.options());
  if (grad_qkv.numel() == 0) return {grad_qkv, grad_gain.zero_()};
  const int64_t items = plan.rows * plan.mask.num_tokens();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "stdd::project_mixed_backward (CUDA)", [&] {
    with_factor_type(gain.scalar_type(), [&]<typename factor_t>() {
      project_mixed_backward_cuda_kernel<scalar_t, factor_t>
          <<<warp_grid(items), kWarpBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
              grad.const_data_ptr<scalar_t>(), values.const_data_ptr<scalar_t>(), gain_c.const_data_ptr<factor_t>(),
              phase64.const_data_ptr<int64_t>(), grad_qkv.mutable_data_ptr<scalar_t>(),
              grad_gain.mutable_data_ptr<factor_t>(), args, items);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_qkv, grad_gain};
}

}  // namespace
}  // namespace stdd

TORCH_LIBRARY_IMPL(stdd, CUDA, m) {
  m.impl("mix_factors", &stdd::mix_factors_cuda);
  m.impl("mix_factors_backward", &stdd::mix_factors_backward_cuda);
  m.impl("project_mixed", &stdd::project_mixed_cuda);
  m.impl("project_mixed_backward", &stdd::project_mixed_backward_cuda);
}
