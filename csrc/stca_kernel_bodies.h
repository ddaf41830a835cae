// What one CUDA thread does in the STCA kernels (stca_cuda.cu): one chunk of
// V consecutive channels of one output row. Kept in a header of host+device
// functions so the C++ tests (tests/cpp/) can run the very same code on the
// CPU, item by item, and compare it with the CPU kernels: the CUDA kernels
// cannot run on a machine without a GPU, but their index logic can.
//
// V channels of a chunk always read the same neighbour frame: the host picks
// V so that it divides every channel-run boundary (D, I, 2I, I/s) and the
// tensors are 16-byte aligned, else V = 1.
#pragma once

#include <cstdint>

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include "stca_index.h"
#include "stca_ops.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define STDD_UNROLL _Pragma("unroll")
#else
#define STDD_UNROLL
#endif

namespace stdd {
namespace kernels {

constexpr int kMaxScales = 8;

// Kernel arguments passed by value (no device allocation for the scale list).
struct MixKernelArgs {
  MaskGeometry mask;
  int64_t rows;          // B*T
  int64_t num_frames;    // T
  int64_t channels;      // D
  int64_t mix_channels;  // I
  Mixing mixing;
  int64_t num_scales;
  int64_t scales[kMaxScales];
};

inline MixKernelArgs make_mix_args(const detail::MixPlan& plan) {
  TORCH_CHECK(static_cast<int64_t>(plan.scales.size()) <= kMaxScales, "the CUDA kernels take at most ", kMaxScales,
              " scales, got ", plan.scales.size());
  MixKernelArgs args{plan.mask, plan.rows, plan.num_frames, plan.channels, plan.mix_channels, plan.mixing,
                     static_cast<int64_t>(plan.scales.size()), {}};
  for (size_t i = 0; i < plan.scales.size(); ++i) args.scales[i] = plan.scales[i];
  return args;
}

template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Pack {
  scalar_t value[V];
};

template <typename scalar_t, int V>
STDD_HOST_DEVICE Pack<scalar_t, V> load_pack(const scalar_t* source) {
  return *reinterpret_cast<const Pack<scalar_t, V>*>(source);
}

template <typename scalar_t, int V>
STDD_HOST_DEVICE void store_pack(scalar_t* target, const Pack<scalar_t, V>& pack) {
  *reinterpret_cast<Pack<scalar_t, V>*>(target) = pack;
}

template <typename scalar_t, int V>
STDD_HOST_DEVICE Pack<scalar_t, V> zero_pack() {
  Pack<scalar_t, V> pack;
STDD_UNROLL
  for (int i = 0; i < V; ++i) pack.value[i] = static_cast<scalar_t>(0.0f);
  return pack;
}

// mixed[s, row, slot, ch:ch+V]; item = (s * rows + row) * (1 + N_keep) + slot.
template <typename scalar_t, int V>
STDD_HOST_DEVICE void mix_gather_chunk(const scalar_t* x, const int64_t* phase, scalar_t* mixed,
                                       const MixKernelArgs& a, int64_t item, int64_t ch) {
  const int64_t D = a.channels;
  const int64_t tokens_in = a.mask.num_tokens();
  const int64_t tokens_out = 1 + a.mask.num_kept();
  const int64_t slot = item % tokens_out;
  const int64_t row = (item / tokens_out) % a.rows;
  Pack<scalar_t, V> pack;
  if (slot == 0) {
    pack = load_pack<scalar_t, V>(x + row * tokens_in * D + ch);  // CLS, unmixed
  } else {
    const int64_t scale = a.scales[item / (tokens_out * a.rows)];
    const ChannelRun run = channel_run(ch, D, a.mix_channels, scale, a.mixing);
    const int64_t source_frame = row % a.num_frames + run.delta;
    if (source_frame < 0 || source_frame >= a.num_frames) {
      pack = zero_pack<scalar_t, V>();
    } else {
      const int64_t source_row = row + run.delta;
      const int64_t token = kept_token(phase[source_row], slot - 1, a.mask);
      pack = load_pack<scalar_t, V>(x + (source_row * tokens_in + token) * D + ch);
    }
  }
  store_pack<scalar_t, V>(mixed + item * D + ch, pack);
}

// grad_x[row, token, ch:ch+V]; item = row * (1 + P*P) + token. Sums, over
// scales, the grad_mixed elements that read this x element (no atomics).
template <typename scalar_t, int V>
STDD_HOST_DEVICE void mix_gather_backward_chunk(const scalar_t* grad_mixed, const int64_t* phase, scalar_t* grad_x,
                                                const MixKernelArgs& a, int64_t item, int64_t ch) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t D = a.channels;
  const int64_t tokens_in = a.mask.num_tokens();
  const int64_t tokens_out = 1 + a.mask.num_kept();
  const int64_t token = item % tokens_in;
  const int64_t row = item / tokens_in;
  const int64_t slot = token == 0 ? 0 : 1 + kept_index(phase[row], token, a.mask);
  opmath_t sum[V];
STDD_UNROLL
  for (int i = 0; i < V; ++i) sum[i] = opmath_t(0);
  if (slot != 0 || token == 0) {  // a masked token (slot 0, token > 0) is read by nobody
    const int64_t t = row % a.num_frames;
    for (int64_t s = 0; s < a.num_scales; ++s) {
      int64_t reader_row = row;  // CLS: read by its own frame at every scale
      if (slot != 0) {
        const int64_t delta = channel_run(ch, D, a.mix_channels, a.scales[s], a.mixing).delta;
        if (t - delta < 0 || t - delta >= a.num_frames) continue;
        reader_row = row - delta;
      }
      const auto pack = load_pack<scalar_t, V>(grad_mixed + ((s * a.rows + reader_row) * tokens_out + slot) * D + ch);
STDD_UNROLL
      for (int i = 0; i < V; ++i) sum[i] += static_cast<opmath_t>(pack.value[i]);
    }
  }
  Pack<scalar_t, V> out;
STDD_UNROLL
  for (int i = 0; i < V; ++i) out.value[i] = static_cast<scalar_t>(sum[i]);
  store_pack<scalar_t, V>(grad_x + item * D + ch, out);
}

// pad[row, token, ch:ch+V]; item = row * (1 + P*P) + token. Same rounding as
// the CPU kernel: mean over scales rounded to the dtype, then + residual.
template <typename scalar_t, int V>
STDD_HOST_DEVICE void pad_scatter_chunk(const scalar_t* full, const scalar_t* mixed, const scalar_t* residual,
                                        const int64_t* phase, scalar_t* pad, int64_t num_scales, int64_t rows,
                                        int64_t D, const MaskGeometry& mask, int64_t item, int64_t ch) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t tokens_in = mask.num_tokens();
  const int64_t tokens_out = 1 + mask.num_kept();
  const int64_t token = item % tokens_in;
  const int64_t row = item / tokens_in;
  const int64_t slot = token == 0 ? 0 : 1 + kept_index(phase[row], token, mask);
  Pack<scalar_t, V> out;
  if (slot == 0 && token != 0) {
    out = load_pack<scalar_t, V>(full + item * D + ch);
  } else {
    opmath_t sum[V];
STDD_UNROLL
    for (int i = 0; i < V; ++i) sum[i] = opmath_t(0);
    for (int64_t s = 0; s < num_scales; ++s) {
      const auto pack = load_pack<scalar_t, V>(mixed + ((s * rows + row) * tokens_out + slot) * D + ch);
STDD_UNROLL
      for (int i = 0; i < V; ++i) sum[i] += static_cast<opmath_t>(pack.value[i]);
    }
STDD_UNROLL
    for (int i = 0; i < V; ++i) out.value[i] = static_cast<scalar_t>(sum[i] / static_cast<opmath_t>(num_scales));
  }
  if (residual != nullptr) {
    const auto res = load_pack<scalar_t, V>(residual + item * D + ch);
STDD_UNROLL
    for (int i = 0; i < V; ++i) {
      out.value[i] = static_cast<scalar_t>(static_cast<opmath_t>(out.value[i]) + static_cast<opmath_t>(res.value[i]));
    }
  }
  store_pack<scalar_t, V>(pad + item * D + ch, out);
}

// grad_full[row, token, ch:ch+V] and, for CLS / kept tokens, grad_mixed at
// the token's slot in every scale; item = row * (1 + P*P) + token.
template <typename scalar_t, int V>
STDD_HOST_DEVICE void pad_scatter_backward_chunk(const scalar_t* grad_pad, const int64_t* phase, scalar_t* grad_full,
                                                 scalar_t* grad_mixed, int64_t num_scales, int64_t rows, int64_t D,
                                                 const MaskGeometry& mask, int64_t item, int64_t ch) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t tokens_in = mask.num_tokens();
  const int64_t tokens_out = 1 + mask.num_kept();
  const int64_t token = item % tokens_in;
  const int64_t row = item / tokens_in;
  const int64_t slot = token == 0 ? 0 : 1 + kept_index(phase[row], token, mask);
  const auto grad = load_pack<scalar_t, V>(grad_pad + item * D + ch);
  if (slot == 0 && token != 0) {
    store_pack<scalar_t, V>(grad_full + item * D + ch, grad);
    return;
  }
  store_pack<scalar_t, V>(grad_full + item * D + ch, zero_pack<scalar_t, V>());
  Pack<scalar_t, V> share;
STDD_UNROLL
  for (int i = 0; i < V; ++i) {
    share.value[i] = static_cast<scalar_t>(static_cast<opmath_t>(grad.value[i]) / static_cast<opmath_t>(num_scales));
  }
  for (int64_t s = 0; s < num_scales; ++s) {
    store_pack<scalar_t, V>(grad_mixed + ((s * rows + row) * tokens_out + slot) * D + ch, share);
  }
}

}  // namespace kernels
}  // namespace stdd
