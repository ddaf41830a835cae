// What one CUDA thread does in the STCA kernels (stca_cuda.cu). A kernel
// loops over output rows ("items": one token row of D channels); per item a
// thread first computes what all of the row's chunks share (the *_item
// functions: row, frame, slot, window, in-frame index math), then, for each of
// its chunks of V consecutive channels, does the loads, sums and one store
// (the *_chunk functions), so the per-element work is V-wide loads/stores and
// arithmetic only. Kept in a header of host+device functions so the C++ tests
// (tests/cpp/) run the very same code on the CPU, item by item and chunk by
// chunk, and compare it with the CPU kernels: the CUDA kernels cannot run on
// a machine without a GPU, but their index logic and arithmetic can.
//
// V channels of a chunk always read the same neighbour frame: the host picks
// V (vector_width below) so that it divides every channel-run boundary
// (D, I, 2I, I/s; official: I >> i) and every tensor's base address is V
// elements aligned.
// Index math inside a frame row is 32-bit (the host checks the sizes fit);
// offsets into the tensors are 64-bit.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <limits>

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

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
constexpr int kMaxVectorBytes = 16;  // the widest global load/store of one thread (ld.global.v4.b32)
using Mask32 = BasicMaskGeometry<int32_t>;

inline int32_t checked_int32(int64_t value, const char* what) {
  TORCH_CHECK(value >= 0 && value <= std::numeric_limits<int32_t>::max(), "the CUDA kernels need ", what,
              " < 2**31, got ", value);
  return static_cast<int32_t>(value);
}

inline Mask32 mask32(const MaskGeometry& mask, int64_t channels) {
  checked_int32(mask.num_tokens() * channels, "(1 + P*P) * D");
  return mask.as<int32_t>();
}

// Kernel arguments passed by value (no device allocation for the scale list).
struct MixKernelArgs {
  Mask32 mask;
  int64_t rows;          // B*T
  int32_t num_frames;    // T
  int32_t channels;      // D
  int32_t mix_channels;  // I
  Mixing mixing;
  int32_t num_scales;
  int32_t scales[kMaxScales];
};

inline MixKernelArgs make_mix_args(const detail::MixPlan& plan) {
  TORCH_CHECK(static_cast<int64_t>(plan.scales.size()) <= kMaxScales, "the CUDA kernels take at most ", kMaxScales,
              " scales, got ", plan.scales.size());
  MixKernelArgs args{mask32(plan.mask, plan.channels),
                     plan.rows,
                     checked_int32(plan.num_frames, "num_frames"),
                     checked_int32(plan.channels, "D"),
                     checked_int32(plan.mix_channels, "I"),
                     plan.mixing,
                     static_cast<int32_t>(plan.scales.size()),
                     {}};
  for (size_t i = 0; i < plan.scales.size(); ++i) args.scales[i] = checked_int32(plan.scales[i], "every scale");
  return args;
}

struct PadKernelArgs {
  Mask32 mask;
  int64_t rows;        // B*T
  int32_t channels;    // D
  int32_t num_scales;  // S
};

inline PadKernelArgs make_pad_args(const detail::PadPlan& plan) {
  return PadKernelArgs{mask32(plan.mask, plan.channels), plan.rows, checked_int32(plan.channels, "D"),
                       checked_int32(plan.num_scales, "the number of scales")};
}

// ---------------------------------------------------------------------------
// Vector width (host).
// ---------------------------------------------------------------------------

// gcd of the channel-run boundaries of mix_gather: D and, with mixing, I
// (then 2I is a multiple) and, for continual mixing, every block width I / s;
// for the release's rule every width I >> i, i < s (then the mirrored
// boundaries 2I - (I >> i) are multiples too).
inline int64_t mix_boundaries(const MixKernelArgs& a) {
  auto gcd = [](int64_t p, int64_t q) {
    while (q != 0) {
      const int64_t r = p % q;
      p = q;
      q = r;
    }
    return p;
  };
  int64_t g = a.channels;
  if (a.mixing == Mixing::kNone) return g;
  g = gcd(g, a.mix_channels);
  if (a.mixing == Mixing::kContinual) {
    for (int32_t s = 0; s < a.num_scales; ++s) g = gcd(g, a.mix_channels / a.scales[s]);
  }
  if (a.mixing == Mixing::kOfficial) {
    for (int32_t s = 0; s < a.num_scales; ++s) {
      for (int32_t i = 1; i < a.scales[s]; ++i) g = gcd(g, a.mix_channels >> i);
    }
  }
  return g;
}

// The largest power of two V with V * element_size <= 16 bytes that divides
// `boundaries` (a gcd of every channel-run boundary) and to whose V *
// element_size bytes every non-null pointer is aligned; 1 at worst. At ViT-B/16
// defaults (D = 768, I = 24, scales (1, 2): boundaries 768, 24, 24, 12) that
// is 4 elements for every dtype but float64 (2).
inline int vector_width(int64_t element_size, int64_t boundaries, std::initializer_list<const void*> pointers) {
  int width = static_cast<int>(kMaxVectorBytes / element_size);
  while (width > 1 && boundaries % width != 0) width /= 2;
  for (const void* pointer : pointers) {
    while (width > 1 && pointer != nullptr &&
           reinterpret_cast<std::uintptr_t>(pointer) % (static_cast<std::uintptr_t>(width) * element_size) != 0) {
      width /= 2;
    }
  }
  return width;
}

// ---------------------------------------------------------------------------
// Packs of V elements.
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// mix_gather forward: items are the rows of mixed (S, B*T, 1 + N_keep, D),
// item = (s * rows + row) * (1 + N_keep) + slot.
// ---------------------------------------------------------------------------

struct MixGatherItem {
  int64_t row;            // B*T row of the output
  int32_t frame;          // t = row mod T
  int32_t scale;          // s
  int32_t slot;           // 0: CLS, else 1 + j for kept token j
  int32_t window_origin;  // token of cell 0 of kept token j's window
  int32_t rank;           // j mod (K - m): which kept cell of the window
};

STDD_HOST_DEVICE MixGatherItem mix_gather_item(const MixKernelArgs& a, int64_t item) {
  const int32_t tokens_out = 1 + a.mask.num_kept();
  const int64_t scale_row = item / tokens_out;  // s * rows + row
  MixGatherItem it;
  it.slot = static_cast<int32_t>(item - scale_row * tokens_out);
  it.row = scale_row % a.rows;
  it.frame = static_cast<int32_t>(it.row % a.num_frames);
  it.scale = a.scales[scale_row / a.rows];
  const int32_t j = it.slot - 1;
  const int32_t keep = a.mask.kept_per_window();
  it.window_origin = it.slot == 0 ? 0 : window_origin_token(j / keep, a.mask);
  it.rank = it.slot == 0 ? 0 : j % keep;
  return it;
}

template <typename scalar_t, int V>
STDD_HOST_DEVICE void mix_gather_chunk(const scalar_t* x, const int64_t* phase, scalar_t* mixed,
                                       const MixKernelArgs& a, const MixGatherItem& it, int64_t item, int32_t ch) {
  const int64_t D = a.channels;
  const int64_t tokens_in = a.mask.num_tokens();
  Pack<scalar_t, V> pack;
  if (it.slot == 0) {
    pack = load_pack<scalar_t, V>(x + it.row * tokens_in * D + ch);  // CLS, unmixed
  } else {
    const int32_t delta = channel_run<int32_t>(ch, a.channels, a.mix_channels, it.scale, a.mixing).delta;
    const int32_t source = source_frame<int32_t>(it.frame, delta, a.num_frames, a.mixing);
    if (source < 0) {
      pack = zero_pack<scalar_t, V>();
    } else {
      const int64_t source_row = it.row + (source - it.frame);
      const int32_t phase32 = static_cast<int32_t>(phase[source_row] % a.mask.cells());
      const int32_t token = it.window_origin + cell_offset(kept_cell(phase32, it.rank, a.mask), a.mask);
      pack = load_pack<scalar_t, V>(x + (source_row * tokens_in + token) * D + ch);
    }
  }
  store_pack<scalar_t, V>(mixed + item * D + ch, pack);
}

// ---------------------------------------------------------------------------
// The other three kernels: items are the token rows (B*T, 1 + P*P, D),
// item = row * (1 + P*P) + token.
// ---------------------------------------------------------------------------

struct TokenItem {
  int64_t row;    // B*T row
  int32_t frame;  // t = row mod T (mix_gather backward only)
  int32_t token;  // 0: CLS, else a patch token
  int32_t slot;   // 0 for CLS and masked tokens, else 1 + j for kept token j
  bool masked;    // a patch token this frame's phase masks

  STDD_HOST_DEVICE int64_t mixed_offset(int64_t scale_index, int64_t rows, int32_t tokens_out, int64_t D) const {
    return ((scale_index * rows + row) * tokens_out + slot) * D;  // mixed[s, row, slot, 0]
  }
};

STDD_HOST_DEVICE TokenItem token_item(const Mask32& mask, const int64_t* phase, int32_t num_frames, int64_t item) {
  const int32_t tokens_in = mask.num_tokens();
  TokenItem it;
  it.row = item / tokens_in;
  it.token = static_cast<int32_t>(item - it.row * tokens_in);
  it.frame = static_cast<int32_t>(it.row % num_frames);
  const int32_t phase32 = static_cast<int32_t>(phase[it.row] % mask.cells());
  const int32_t j = it.token == 0 ? 0 : kept_index(phase32, it.token, mask);
  it.masked = j < 0;
  it.slot = it.token == 0 || it.masked ? 0 : 1 + j;
  return it;
}

// grad_x[row, token, ch:ch+V]: sums, over scales and reader frames
// (reader_frames: one, or with the release's rule up to s at the clip
// edges), the grad_mixed elements that read this x element (no atomics). A
// masked token is read by nobody.
template <typename scalar_t, int V>
STDD_HOST_DEVICE void mix_gather_backward_chunk(const scalar_t* grad_mixed, scalar_t* grad_x, const MixKernelArgs& a,
                                                const TokenItem& it, int64_t item, int32_t ch) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t D = a.channels;
  const int32_t tokens_out = 1 + a.mask.num_kept();
  opmath_t sum[V];
STDD_UNROLL
  for (int i = 0; i < V; ++i) sum[i] = opmath_t(0);
  if (!it.masked) {
    for (int32_t s = 0; s < a.num_scales; ++s) {
      ReaderFrames<int32_t> readers{it.frame, it.frame};  // CLS: read by its own frame at every scale
      if (it.slot != 0) {
        const int32_t delta = channel_run<int32_t>(ch, a.channels, a.mix_channels, a.scales[s], a.mixing).delta;
        readers = reader_frames<int32_t>(it.frame, delta, a.num_frames, a.mixing);
      }
      for (int32_t reader = readers.first; reader <= readers.last; ++reader) {
        const int64_t reader_row = it.row + (reader - it.frame);
        const auto pack =
            load_pack<scalar_t, V>(grad_mixed + ((s * a.rows + reader_row) * tokens_out + it.slot) * D + ch);
STDD_UNROLL
        for (int i = 0; i < V; ++i) sum[i] += static_cast<opmath_t>(pack.value[i]);
      }
    }
  }
  Pack<scalar_t, V> out;
STDD_UNROLL
  for (int i = 0; i < V; ++i) out.value[i] = static_cast<scalar_t>(sum[i]);
  store_pack<scalar_t, V>(grad_x + item * D + ch, out);
}

// pad[row, token, ch:ch+V]. Same rounding as the CPU kernel: mean over scales
// rounded to the dtype, then + residual.
template <typename scalar_t, int V>
STDD_HOST_DEVICE void pad_scatter_chunk(const scalar_t* full, const scalar_t* mixed, const scalar_t* residual,
                                        scalar_t* pad, const PadKernelArgs& a, const TokenItem& it, int64_t item,
                                        int32_t ch) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t D = a.channels;
  const int32_t tokens_out = 1 + a.mask.num_kept();
  Pack<scalar_t, V> out;
  if (it.masked) {
    out = load_pack<scalar_t, V>(full + item * D + ch);
  } else {
    opmath_t sum[V];
STDD_UNROLL
    for (int i = 0; i < V; ++i) sum[i] = opmath_t(0);
    for (int32_t s = 0; s < a.num_scales; ++s) {
      const auto pack = load_pack<scalar_t, V>(mixed + it.mixed_offset(s, a.rows, tokens_out, D) + ch);
STDD_UNROLL
      for (int i = 0; i < V; ++i) sum[i] += static_cast<opmath_t>(pack.value[i]);
    }
    const opmath_t count = static_cast<opmath_t>(a.num_scales);
STDD_UNROLL
    for (int i = 0; i < V; ++i) out.value[i] = static_cast<scalar_t>(sum[i] / count);
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
// the token's slot in every scale.
template <typename scalar_t, int V>
STDD_HOST_DEVICE void pad_scatter_backward_chunk(const scalar_t* grad_pad, scalar_t* grad_full, scalar_t* grad_mixed,
                                                 const PadKernelArgs& a, const TokenItem& it, int64_t item,
                                                 int32_t ch) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t D = a.channels;
  const int32_t tokens_out = 1 + a.mask.num_kept();
  const auto grad = load_pack<scalar_t, V>(grad_pad + item * D + ch);
  if (it.masked) {
    store_pack<scalar_t, V>(grad_full + item * D + ch, grad);
    return;
  }
  store_pack<scalar_t, V>(grad_full + item * D + ch, zero_pack<scalar_t, V>());
  Pack<scalar_t, V> share;
  const opmath_t count = static_cast<opmath_t>(a.num_scales);
STDD_UNROLL
  for (int i = 0; i < V; ++i) share.value[i] = static_cast<scalar_t>(static_cast<opmath_t>(grad.value[i]) / count);
  for (int32_t s = 0; s < a.num_scales; ++s) {
    store_pack<scalar_t, V>(grad_mixed + it.mixed_offset(s, a.rows, tokens_out, D) + ch, share);
  }
}

}  // namespace kernels
}  // namespace stdd
