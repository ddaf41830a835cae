// CUDA kernels of the STCA ops: one kernel per op and direction. A block is
// (threads_x channel chunks) x (threads_y output rows); each thread loads and
// stores V channels at once (up to 16 bytes: V is the largest power of two
// that divides every channel-run boundary and that the tensors' alignment
// allows, kernels::vector_width), consecutive threads take consecutive
// chunks, so every warp reads and writes contiguous, coalesced memory. Every
// kernel loops over its outputs (a gather through the inverse index map), so
// no two threads write the same element and there are no atomics. The
// per-thread work is in stca_kernel_bodies.h, shared with the C++ tests,
// which run it on the CPU at every vector width.
//
// NOT YET RUN ON A GPU: the kernels compile (nvcc 13, sm_90) and their
// bodies are tested on the CPU.
#include <algorithm>
#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "stca_kernel_bodies.h"
#include "stca_ops.h"

namespace stdd {
namespace {

using kernels::MixKernelArgs;
using kernels::PadKernelArgs;

constexpr int kThreadsPerBlock = 256;

struct LaunchShape {
  dim3 grid, block;
};

// threads_x covers the row's chunks (a multiple of a warp, at most 256);
// the rest of the 256 threads take more rows.
LaunchShape launch_shape(int64_t items, int64_t chunks) {
  const int64_t threads_x = std::min<int64_t>(kThreadsPerBlock, std::max<int64_t>(32, (chunks + 31) / 32 * 32));
  const int64_t threads_y = std::max<int64_t>(1, kThreadsPerBlock / threads_x);
  const int64_t blocks = std::min<int64_t>((items + threads_y - 1) / threads_y, int64_t{1} << 30);
  return {dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(threads_x), static_cast<unsigned>(threads_y))};
}

// Grid-stride over items (output rows); per item, the row's shared index math
// once (PROLOGUE), then a block-stride over its chunks of V channels.
#define STDD_FOR_EACH_ITEM(items)                                                                                \
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; item < (items);             \
       item += static_cast<int64_t>(gridDim.x) * blockDim.y)
#define STDD_FOR_EACH_CHUNK(channels, V) \
  for (int32_t ch = static_cast<int32_t>(threadIdx.x) * (V); ch < (channels); ch += static_cast<int32_t>(blockDim.x) * (V))

template <typename scalar_t, int V>
__global__ void mix_gather_cuda_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ phase,
                                       scalar_t* __restrict__ mixed, const MixKernelArgs a, int64_t items) {
  STDD_FOR_EACH_ITEM(items) {
    const auto it = kernels::mix_gather_item(a, item);
    STDD_FOR_EACH_CHUNK(a.channels, V) { kernels::mix_gather_chunk<scalar_t, V>(x, phase, mixed, a, it, item, ch); }
  }
}

template <typename scalar_t, int V>
__global__ void mix_gather_backward_cuda_kernel(const scalar_t* __restrict__ grad_mixed,
                                                const int64_t* __restrict__ phase, scalar_t* __restrict__ grad_x,
                                                const MixKernelArgs a, int64_t items) {
  STDD_FOR_EACH_ITEM(items) {
    const auto it = kernels::token_item(a.mask, phase, a.num_frames, item);
    STDD_FOR_EACH_CHUNK(a.channels, V) {
      kernels::mix_gather_backward_chunk<scalar_t, V>(grad_mixed, grad_x, a, it, item, ch);
    }
  }
}

template <typename scalar_t, int V>
__global__ void pad_scatter_cuda_kernel(const scalar_t* __restrict__ full, const scalar_t* __restrict__ mixed,
                                        const scalar_t* __restrict__ residual, const int64_t* __restrict__ phase,
                                        scalar_t* __restrict__ pad, const PadKernelArgs a, int64_t items) {
  STDD_FOR_EACH_ITEM(items) {
    const auto it = kernels::token_item(a.mask, phase, 1, item);
    STDD_FOR_EACH_CHUNK(a.channels, V) {
      kernels::pad_scatter_chunk<scalar_t, V>(full, mixed, residual, pad, a, it, item, ch);
    }
  }
}

template <typename scalar_t, int V>
__global__ void pad_scatter_backward_cuda_kernel(const scalar_t* __restrict__ grad_pad,
                                                 const int64_t* __restrict__ phase, scalar_t* __restrict__ grad_full,
                                                 scalar_t* __restrict__ grad_mixed, const PadKernelArgs a,
                                                 int64_t items) {
  STDD_FOR_EACH_ITEM(items) {
    const auto it = kernels::token_item(a.mask, phase, 1, item);
    STDD_FOR_EACH_CHUNK(a.channels, V) {
      kernels::pad_scatter_backward_chunk<scalar_t, V>(grad_pad, grad_full, grad_mixed, a, it, item, ch);
    }
  }
}

// Calls body.template operator()<V>() for the vector width chosen at run time
// (only the widths a 16-byte access allows for this dtype are instantiated).
template <typename scalar_t, typename Body>
void with_vector_width(int width, Body&& body) {
  constexpr int widest = kernels::kMaxVectorBytes / static_cast<int>(sizeof(scalar_t));
  if constexpr (widest >= 8) {
    if (width == 8) return body.template operator()<8>();
  }
  if constexpr (widest >= 4) {
    if (width == 4) return body.template operator()<4>();
  }
  if constexpr (widest >= 2) {
    if (width == 2) return body.template operator()<2>();
  }
  TORCH_CHECK(width == 1, "internal error: vector width ", width, " for a ", sizeof(scalar_t), "-byte dtype");
  body.template operator()<1>();
}

at::Tensor mix_gather_cuda(const at::Tensor& x, const at::Tensor& phase, int64_t num_frames, at::IntArrayRef window,
                           int64_t masked, at::IntArrayRef scales, int64_t channel_fold, std::string_view mixing) {
  const auto plan = detail::check_mix_gather(x, num_frames, window, masked, scales, channel_fold, mixing);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto phase64 = detail::phase_as_int64(phase, plan.rows, num_frames, x);
  const auto input = x.contiguous();
  const MixKernelArgs args = kernels::make_mix_args(plan);
  auto mixed = at::empty({args.num_scales, plan.rows, 1 + plan.mask.num_kept(), plan.channels}, x.options());
  const int64_t items = args.num_scales * plan.rows * (1 + plan.mask.num_kept());
  if (mixed.numel() == 0) return mixed;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stdd::mix_gather (CUDA)", [&] {
    const int width = kernels::vector_width(sizeof(scalar_t), kernels::mix_boundaries(args),
                                            {input.const_data_ptr(), mixed.const_data_ptr()});
    with_vector_width<scalar_t>(width, [&]<int V>() {
      const auto shape = launch_shape(items, plan.channels / V);
      mix_gather_cuda_kernel<scalar_t, V><<<shape.grid, shape.block, 0, c10::cuda::getCurrentCUDAStream()>>>(
          input.const_data_ptr<scalar_t>(), phase64.const_data_ptr<int64_t>(), mixed.mutable_data_ptr<scalar_t>(),
          args, items);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return mixed;
}

at::Tensor mix_gather_backward_cuda(const at::Tensor& grad_mixed, const at::Tensor& phase, int64_t num_frames,
                                    int64_t grid, at::IntArrayRef window, int64_t masked, at::IntArrayRef scales,
                                    int64_t channel_fold, std::string_view mixing) {
  const auto plan =
      detail::check_mix_gather_backward(grad_mixed, num_frames, grid, window, masked, scales, channel_fold, mixing);
  const c10::cuda::CUDAGuard device_guard(grad_mixed.device());
  const auto phase64 = detail::phase_as_int64(phase, plan.rows, num_frames, grad_mixed);
  const auto grad = grad_mixed.contiguous();
  const MixKernelArgs args = kernels::make_mix_args(plan);
  auto grad_x = at::empty({plan.rows, plan.mask.num_tokens(), plan.channels}, grad_mixed.options());
  const int64_t items = plan.rows * plan.mask.num_tokens();
  if (grad_x.numel() == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "stdd::mix_gather_backward (CUDA)", [&] {
    const int width = kernels::vector_width(sizeof(scalar_t), kernels::mix_boundaries(args),
                                            {grad.const_data_ptr(), grad_x.const_data_ptr()});
    with_vector_width<scalar_t>(width, [&]<int V>() {
      const auto shape = launch_shape(items, plan.channels / V);
      mix_gather_backward_cuda_kernel<scalar_t, V><<<shape.grid, shape.block, 0, c10::cuda::getCurrentCUDAStream()>>>(
          grad.const_data_ptr<scalar_t>(), phase64.const_data_ptr<int64_t>(), grad_x.mutable_data_ptr<scalar_t>(), args,
          items);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_x;
}

at::Tensor pad_scatter_cuda(const at::Tensor& full, const at::Tensor& mixed, const at::Tensor& phase,
                            int64_t num_frames, at::IntArrayRef window, int64_t masked,
                            const std::optional<at::Tensor>& residual) {
  const auto plan = detail::check_pad_scatter(full, mixed, num_frames, window, masked, residual);
  const int64_t R = plan.rows, D = plan.channels;
  const PadKernelArgs args = kernels::make_pad_args(plan);
  const c10::cuda::CUDAGuard device_guard(full.device());
  const auto phase64 = detail::phase_as_int64(phase, R, num_frames, full);
  const auto full_c = full.contiguous();
  const auto mixed_c = mixed.contiguous();
  const auto residual_c = plan.has_residual ? residual->contiguous() : at::Tensor();
  auto pad = at::empty(full.sizes(), full.options());
  const int64_t items = R * plan.mask.num_tokens();
  if (pad.numel() == 0) return pad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, full.scalar_type(), "stdd::pad_scatter (CUDA)", [&] {
    const scalar_t* residual_ptr = plan.has_residual ? residual_c.const_data_ptr<scalar_t>() : nullptr;
    const int width = kernels::vector_width(
        sizeof(scalar_t), D, {full_c.const_data_ptr(), mixed_c.const_data_ptr(), residual_ptr, pad.const_data_ptr()});
    with_vector_width<scalar_t>(width, [&]<int V>() {
      const auto shape = launch_shape(items, D / V);
      pad_scatter_cuda_kernel<scalar_t, V><<<shape.grid, shape.block, 0, c10::cuda::getCurrentCUDAStream()>>>(
          full_c.const_data_ptr<scalar_t>(), mixed_c.const_data_ptr<scalar_t>(), residual_ptr,
          phase64.const_data_ptr<int64_t>(), pad.mutable_data_ptr<scalar_t>(), args, items);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return pad;
}

std::tuple<at::Tensor, at::Tensor> pad_scatter_backward_cuda(const at::Tensor& grad_pad, const at::Tensor& phase,
                                                             int64_t num_frames, at::IntArrayRef window,
                                                             int64_t masked, int64_t num_scales) {
  const auto plan = detail::check_pad_scatter_backward(grad_pad, num_frames, window, masked, num_scales);
  const int64_t R = plan.rows, D = plan.channels;
  const PadKernelArgs args = kernels::make_pad_args(plan);
  const c10::cuda::CUDAGuard device_guard(grad_pad.device());
  const auto phase64 = detail::phase_as_int64(phase, R, num_frames, grad_pad);
  const auto grad = grad_pad.contiguous();
  auto grad_full = at::empty(grad_pad.sizes(), grad_pad.options());
  auto grad_mixed = at::empty({num_scales, R, 1 + plan.mask.num_kept(), D}, grad_pad.options());
  const int64_t items = R * plan.mask.num_tokens();
  if (grad_full.numel() == 0) return {grad_full, grad_mixed};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "stdd::pad_scatter_backward (CUDA)", [&] {
    const int width = kernels::vector_width(
        sizeof(scalar_t), D, {grad.const_data_ptr(), grad_full.const_data_ptr(), grad_mixed.const_data_ptr()});
    with_vector_width<scalar_t>(width, [&]<int V>() {
      const auto shape = launch_shape(items, D / V);
      pad_scatter_backward_cuda_kernel<scalar_t, V><<<shape.grid, shape.block, 0, c10::cuda::getCurrentCUDAStream()>>>(
          grad.const_data_ptr<scalar_t>(), phase64.const_data_ptr<int64_t>(), grad_full.mutable_data_ptr<scalar_t>(),
          grad_mixed.mutable_data_ptr<scalar_t>(), args, items);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_full, grad_mixed};
}

}  // namespace
}  // namespace stdd

TORCH_LIBRARY_IMPL(stdd, CUDA, m) {
  m.impl("mix_gather", &stdd::mix_gather_cuda);
  m.impl("mix_gather_backward", &stdd::mix_gather_backward_cuda);
  m.impl("pad_scatter", &stdd::pad_scatter_cuda);
  m.impl("pad_scatter_backward", &stdd::pad_scatter_backward_cuda);
}
