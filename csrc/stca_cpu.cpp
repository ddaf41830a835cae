// CPU kernels of the STCA ops. Each output row of D channels is one work item
// of at::parallel_for over (scale, frame, token); inside an item the channels
// are handled in runs that read the same neighbour frame (channel_run), so the
// inner loops are contiguous copies / sums the compiler vectorizes.
// Every output element is written exactly once: each kernel loops over its
// output, never scatters, so there are no races and no atomics.
#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "stca_index.h"
#include "stca_ops.h"

namespace stdd {
namespace {

// Items per task: about GRAIN_SIZE elements of work per task, as ATen's own
// element-wise CPU kernels do.
int64_t grain_for(int64_t channels) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(channels, 1)); }

template <typename scalar_t>
void mix_gather_kernel(const scalar_t* x, const int64_t* phase, scalar_t* mixed, const detail::MixPlan& plan) {
  const int64_t D = plan.channels, T = plan.num_frames, R = plan.rows;
  const int64_t tokens_in = plan.mask.num_tokens();
  const int64_t tokens_out = 1 + plan.mask.num_kept();
  const int64_t items = static_cast<int64_t>(plan.scales.size()) * R * tokens_out;
  // item = (scale_index * R + row) * tokens_out + slot; slot 0 is CLS, slot 1 + j kept token j.
  at::parallel_for(0, items, grain_for(D), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t slot = item % tokens_out;
      const int64_t row = (item / tokens_out) % R;
      const int64_t scale = plan.scales[item / (tokens_out * R)];
      scalar_t* out = mixed + item * D;
      if (slot == 0) {  // CLS: the frame's own, unmixed
        std::copy_n(x + row * tokens_in * D, D, out);
        continue;
      }
      const int64_t t = row % T;
      for (int64_t ch = 0; ch < D;) {
        const ChannelRun run = channel_run(ch, D, plan.mix_channels, scale, plan.mixing);
        const int64_t source = source_frame(t, run.delta, T, plan.mixing);
        if (source < 0) {
          std::fill(out + ch, out + run.stop, scalar_t(0));  // outside the clip: zero
        } else {
          const int64_t source_row = row + (source - t);
          const int64_t token = kept_token(phase[source_row], slot - 1, plan.mask);
          std::copy(x + (source_row * tokens_in + token) * D + ch, x + (source_row * tokens_in + token) * D + run.stop,
                    out + ch);
        }
        ch = run.stop;
      }
    }
  });
}

// grad_x[row, token] = sum over scales of the grad_mixed elements that read
// x[row, token]: kept token j of frame t is read, channel by channel, by
// frame t - delta_s(ch) (when inside the clip; with the release's rule also
// by the frames whose clamped reads land on an edge frame, reader_frames),
// at the same slot 1 + j.
template <typename scalar_t>
void mix_gather_backward_kernel(const scalar_t* grad_mixed, const int64_t* phase, scalar_t* grad_x,
                                const detail::MixPlan& plan) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t D = plan.channels, T = plan.num_frames, R = plan.rows;
  const int64_t tokens_in = plan.mask.num_tokens();
  const int64_t tokens_out = 1 + plan.mask.num_kept();
  const int64_t num_scales = static_cast<int64_t>(plan.scales.size());
  at::parallel_for(0, R * tokens_in, grain_for(D * num_scales), [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> sum(D);  // accumulate the scales in opmath (float for half/bfloat16)
    for (int64_t item = begin; item < end; ++item) {
      const int64_t token = item % tokens_in;
      const int64_t row = item / tokens_in;
      scalar_t* out = grad_x + item * D;
      const int64_t slot = token == 0 ? 0 : 1 + kept_index(phase[row], token, plan.mask);
      if (slot == 0 && token != 0) {  // masked in this frame: read by nobody
        std::fill(out, out + D, scalar_t(0));
        continue;
      }
      std::fill(sum.begin(), sum.end(), opmath_t(0));
      const int64_t t = row % T;
      for (int64_t s = 0; s < num_scales; ++s) {
        const scalar_t* grad_scale = grad_mixed + s * R * tokens_out * D;
        if (slot == 0) {  // CLS is copied unmixed by every scale
          const scalar_t* g = grad_scale + row * tokens_out * D;
          for (int64_t ch = 0; ch < D; ++ch) sum[ch] += static_cast<opmath_t>(g[ch]);
          continue;
        }
        for (int64_t ch = 0; ch < D;) {
          const ChannelRun run = channel_run(ch, D, plan.mix_channels, plan.scales[s], plan.mixing);
          const auto readers = reader_frames(t, run.delta, T, plan.mixing);
          for (int64_t reader = readers.first; reader <= readers.last; ++reader) {
            const scalar_t* g = grad_scale + ((row + (reader - t)) * tokens_out + slot) * D;
            for (int64_t c = ch; c < run.stop; ++c) sum[c] += static_cast<opmath_t>(g[c]);
          }
          ch = run.stop;
        }
      }
      for (int64_t ch = 0; ch < D; ++ch) out[ch] = static_cast<scalar_t>(sum[ch]);
    }
  });
}

// pad[row, token] = full[row, token] for masked patch tokens; for CLS and the
// kept tokens, the mean of mixed over scales at their slot. Plus residual.
// Rounding follows the unfused ops (mean rounded to the dtype, then the
// residual add), so float32/float64 results equal the reference's.
template <typename scalar_t>
void pad_scatter_kernel(const scalar_t* full, const scalar_t* mixed, const scalar_t* residual, const int64_t* phase,
                        scalar_t* pad, int64_t num_scales, int64_t R, int64_t D, const MaskGeometry& mask) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t tokens_in = mask.num_tokens();
  const int64_t tokens_out = 1 + mask.num_kept();
  at::parallel_for(0, R * tokens_in, grain_for(D * num_scales), [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> sum(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t token = item % tokens_in;
      const int64_t row = item / tokens_in;
      scalar_t* out = pad + item * D;
      const scalar_t* res = residual == nullptr ? nullptr : residual + item * D;
      const int64_t slot = token == 0 ? 0 : 1 + kept_index(phase[row], token, mask);
      if (slot == 0 && token != 0) {  // masked: the full path's token
        const scalar_t* f = full + item * D;
        if (res == nullptr) {
          std::copy_n(f, D, out);
        } else {
          for (int64_t ch = 0; ch < D; ++ch) out[ch] = static_cast<scalar_t>(static_cast<opmath_t>(f[ch]) + static_cast<opmath_t>(res[ch]));
        }
        continue;
      }
      const scalar_t* m0 = mixed + (row * tokens_out + slot) * D;
      for (int64_t ch = 0; ch < D; ++ch) sum[ch] = static_cast<opmath_t>(m0[ch]);
      for (int64_t s = 1; s < num_scales; ++s) {
        const scalar_t* ms = m0 + s * R * tokens_out * D;
        for (int64_t ch = 0; ch < D; ++ch) sum[ch] += static_cast<opmath_t>(ms[ch]);
      }
      const opmath_t count = static_cast<opmath_t>(num_scales);
      if (res == nullptr) {
        for (int64_t ch = 0; ch < D; ++ch) out[ch] = static_cast<scalar_t>(sum[ch] / count);
      } else {
        for (int64_t ch = 0; ch < D; ++ch) {
          const scalar_t mean = static_cast<scalar_t>(sum[ch] / count);
          out[ch] = static_cast<scalar_t>(static_cast<opmath_t>(mean) + static_cast<opmath_t>(res[ch]));
        }
      }
    }
  });
}

// One pass over grad_pad: a masked token's gradient goes to full; CLS's and a
// kept token's go, divided by S, to its slot of every scale of mixed (zero to
// full). Kept tokens and slots are in one-to-one correspondence, so every
// element of both outputs is written once.
template <typename scalar_t>
void pad_scatter_backward_kernel(const scalar_t* grad_pad, const int64_t* phase, scalar_t* grad_full,
                                 scalar_t* grad_mixed, int64_t num_scales, int64_t R, int64_t D,
                                 const MaskGeometry& mask) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t tokens_in = mask.num_tokens();
  const int64_t tokens_out = 1 + mask.num_kept();
  at::parallel_for(0, R * tokens_in, grain_for(D * (num_scales + 1)), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t token = item % tokens_in;
      const int64_t row = item / tokens_in;
      const scalar_t* g = grad_pad + item * D;
      scalar_t* gf = grad_full + item * D;
      const int64_t slot = token == 0 ? 0 : 1 + kept_index(phase[row], token, mask);
      if (slot == 0 && token != 0) {
        std::copy_n(g, D, gf);
        continue;
      }
      std::fill(gf, gf + D, scalar_t(0));
      const opmath_t count = static_cast<opmath_t>(num_scales);
      scalar_t* gm0 = grad_mixed + (row * tokens_out + slot) * D;
      for (int64_t ch = 0; ch < D; ++ch) gm0[ch] = static_cast<scalar_t>(static_cast<opmath_t>(g[ch]) / count);
      for (int64_t s = 1; s < num_scales; ++s) std::copy_n(gm0, D, gm0 + s * R * tokens_out * D);
    }
  });
}

at::Tensor mix_gather_cpu(const at::Tensor& x, const at::Tensor& phase, int64_t num_frames, at::IntArrayRef window,
                          int64_t masked, at::IntArrayRef scales, int64_t channel_fold, std::string_view mixing) {
  const auto plan = detail::check_mix_gather(x, num_frames, window, masked, scales, channel_fold, mixing);
  const auto phase64 = detail::phase_as_int64(phase, plan.rows, num_frames, x);
  const auto input = x.contiguous();
  auto mixed = at::empty({static_cast<int64_t>(plan.scales.size()), plan.rows, 1 + plan.mask.num_kept(), plan.channels},
                         x.options());
  if (mixed.numel() == 0) return mixed;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stdd::mix_gather (CPU)", [&] {
    mix_gather_kernel<scalar_t>(input.const_data_ptr<scalar_t>(), phase64.const_data_ptr<int64_t>(),
                                mixed.mutable_data_ptr<scalar_t>(), plan);
  });
  return mixed;
}

at::Tensor mix_gather_backward_cpu(const at::Tensor& grad_mixed, const at::Tensor& phase, int64_t num_frames,
                                   int64_t grid, at::IntArrayRef window, int64_t masked, at::IntArrayRef scales,
                                   int64_t channel_fold, std::string_view mixing) {
  const auto plan =
      detail::check_mix_gather_backward(grad_mixed, num_frames, grid, window, masked, scales, channel_fold, mixing);
  const auto phase64 = detail::phase_as_int64(phase, plan.rows, num_frames, grad_mixed);
  const auto grad = grad_mixed.contiguous();
  auto grad_x = at::empty({plan.rows, plan.mask.num_tokens(), plan.channels}, grad_mixed.options());
  if (grad_x.numel() == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "stdd::mix_gather_backward (CPU)", [&] {
    mix_gather_backward_kernel<scalar_t>(grad.const_data_ptr<scalar_t>(), phase64.const_data_ptr<int64_t>(),
                                         grad_x.mutable_data_ptr<scalar_t>(), plan);
  });
  return grad_x;
}

at::Tensor pad_scatter_cpu(const at::Tensor& full, const at::Tensor& mixed, const at::Tensor& phase,
                           int64_t num_frames, at::IntArrayRef window, int64_t masked,
                           const std::optional<at::Tensor>& residual) {
  const auto plan = detail::check_pad_scatter(full, mixed, num_frames, window, masked, residual);
  const auto phase64 = detail::phase_as_int64(phase, plan.rows, num_frames, full);
  const auto full_c = full.contiguous();
  const auto mixed_c = mixed.contiguous();
  const auto residual_c = plan.has_residual ? residual->contiguous() : at::Tensor();
  auto pad = at::empty(full.sizes(), full.options());
  if (pad.numel() == 0) return pad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, full.scalar_type(), "stdd::pad_scatter (CPU)", [&] {
    pad_scatter_kernel<scalar_t>(full_c.const_data_ptr<scalar_t>(), mixed_c.const_data_ptr<scalar_t>(),
                                 plan.has_residual ? residual_c.const_data_ptr<scalar_t>() : nullptr,
                                 phase64.const_data_ptr<int64_t>(), pad.mutable_data_ptr<scalar_t>(), plan.num_scales,
                                 plan.rows, plan.channels, plan.mask);
  });
  return pad;
}

std::tuple<at::Tensor, at::Tensor> pad_scatter_backward_cpu(const at::Tensor& grad_pad, const at::Tensor& phase,
                                                            int64_t num_frames, at::IntArrayRef window, int64_t masked,
                                                            int64_t num_scales) {
  const auto plan = detail::check_pad_scatter_backward(grad_pad, num_frames, window, masked, num_scales);
  const auto phase64 = detail::phase_as_int64(phase, plan.rows, num_frames, grad_pad);
  const auto grad = grad_pad.contiguous();
  auto grad_full = at::empty(grad_pad.sizes(), grad_pad.options());
  auto grad_mixed = at::empty({plan.num_scales, plan.rows, 1 + plan.mask.num_kept(), plan.channels}, grad_pad.options());
  if (grad_full.numel() == 0) return {grad_full, grad_mixed};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "stdd::pad_scatter_backward (CPU)", [&] {
    pad_scatter_backward_kernel<scalar_t>(grad.const_data_ptr<scalar_t>(), phase64.const_data_ptr<int64_t>(),
                                          grad_full.mutable_data_ptr<scalar_t>(), grad_mixed.mutable_data_ptr<scalar_t>(),
                                          plan.num_scales, plan.rows, plan.channels, plan.mask);
  });
  return {grad_full, grad_mixed};
}

}  // namespace
}  // namespace stdd

TORCH_LIBRARY_IMPL(stdd, CPU, m) {
  m.impl("mix_gather", &stdd::mix_gather_cpu);
  m.impl("mix_gather_backward", &stdd::mix_gather_backward_cpu);
  m.impl("pad_scatter", &stdd::pad_scatter_cpu);
  m.impl("pad_scatter_backward", &stdd::pad_scatter_backward_cpu);
}
