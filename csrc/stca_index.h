// The STCA index maps (docs/stca.md, steps 1, 2 and 4), written once
// for both devices: the CPU kernels (stca_cpu.cpp), the CUDA kernels
// (stca_cuda.cu, through stca_kernel_bodies.h) and the C++ tests include it.
//
// Names follow the spec: P grid side, (w1, w2) window, K = w1*w2 cells per
// window, m masked cells, N_keep kept patch tokens per frame, I = D / F mixed
// channels per direction. Tokens are indexed into 1 + P*P (CLS is token 0).
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define STDD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define STDD_HOST_DEVICE inline
#endif

namespace stdd {

enum class Mixing : int32_t { kContinual = 0, kSeparate = 1, kNone = 2 };

// Geometry of the patch grid and the window-shift mask. Plain integers so it
// can be passed by value to a CUDA kernel. The index type is int64_t on the
// CPU; the CUDA kernels use an int32_t copy (BasicMaskGeometry::as<int32_t>,
// range-checked by the host), as 32-bit integer division is several times
// cheaper on a GPU than 64-bit.
template <typename index_t>
struct BasicMaskGeometry {
  index_t grid;         // P
  index_t window_rows;  // w1
  index_t window_cols;  // w2
  index_t masked;       // m, 0 <= m < K

  STDD_HOST_DEVICE index_t cells() const { return window_rows * window_cols; }              // K
  STDD_HOST_DEVICE index_t kept_per_window() const { return cells() - masked; }             // K - m
  STDD_HOST_DEVICE index_t windows_per_row() const { return grid / window_cols; }           // P / w2
  STDD_HOST_DEVICE index_t num_windows() const { return (grid / window_rows) * windows_per_row(); }
  STDD_HOST_DEVICE index_t num_kept() const { return num_windows() * kept_per_window(); }   // N_keep
  STDD_HOST_DEVICE index_t num_tokens() const { return 1 + grid * grid; }                   // 1 + N

  template <typename other_t>
  BasicMaskGeometry<other_t> as() const {
    return {static_cast<other_t>(grid), static_cast<other_t>(window_rows), static_cast<other_t>(window_cols),
            static_cast<other_t>(masked)};
  }
};
using MaskGeometry = BasicMaskGeometry<int64_t>;

// The index functions below take their integer arguments in the geometry's
// index type (std::type_identity_t: deduced from the geometry alone).
template <typename index_t>
using same_t = std::type_identity_t<index_t>;

// A frame with phase o masks the cells o, o+1, ..., o+m-1 (mod K), so its kept
// cells form the cyclic run that starts at first = (o + m) mod K and is K - m
// long. Listed in ascending c (the spec's order), the run's part that wrapped
// past K - 1 comes first: cells [0, wrapped) and then [first, K).
template <typename index_t>
struct KeptRun {
  index_t first;    // first kept cell of the cyclic run
  index_t wrapped;  // how many kept cells wrapped around to 0, 1, ...
};

template <typename index_t>
STDD_HOST_DEVICE KeptRun<index_t> kept_run(same_t<index_t> phase, const BasicMaskGeometry<index_t>& g) {
  const index_t K = g.cells();
  // Any integer phase is reduced into [0, K): an unchecked out-of-range phase
  // can never index outside the tensors (the Python API rejects it anyway).
  const index_t o = ((phase % K) + K) % K;
  const index_t first = (o + g.masked) % K;
  const index_t end = first + g.kept_per_window();
  return KeptRun<index_t>{first, end > K ? end - K : 0};
}

// The k-th kept cell (k in [0, K - m)), ascending, of a frame with this phase.
template <typename index_t>
STDD_HOST_DEVICE index_t kept_cell(same_t<index_t> phase, same_t<index_t> k, const BasicMaskGeometry<index_t>& g) {
  const KeptRun<index_t> run = kept_run(phase, g);
  return k < run.wrapped ? k : run.first + (k - run.wrapped);
}

// Token (in [1, 1 + P*P)) of cell 0 of window w (windows row-major): grid row
// (w / (P/w2))*w1, column (w mod (P/w2))*w2.
template <typename index_t>
STDD_HOST_DEVICE index_t window_origin_token(same_t<index_t> w, const BasicMaskGeometry<index_t>& g) {
  return 1 + (w / g.windows_per_row()) * g.window_rows * g.grid + (w % g.windows_per_row()) * g.window_cols;
}

// Token offset of cell c from its window's cell 0: row c / w2, column c mod w2.
template <typename index_t>
STDD_HOST_DEVICE index_t cell_offset(same_t<index_t> c, const BasicMaskGeometry<index_t>& g) {
  return (c / g.window_cols) * g.grid + c % g.window_cols;
}

// Token (in [1, 1 + P*P)) read by kept token j in [0, N_keep) of a frame with
// this phase: window w = j / (K - m), its (j mod (K - m))-th kept cell.
template <typename index_t>
STDD_HOST_DEVICE index_t kept_token(same_t<index_t> phase, same_t<index_t> j, const BasicMaskGeometry<index_t>& g) {
  const index_t w = j / g.kept_per_window();
  return window_origin_token(w, g) + cell_offset(kept_cell(phase, j % g.kept_per_window(), g), g);
}

// Inverse of kept_token for a patch token in [1, 1 + P*P): its kept index j,
// or -1 when this frame masks that token.
template <typename index_t>
STDD_HOST_DEVICE index_t kept_index(same_t<index_t> phase, same_t<index_t> token, const BasicMaskGeometry<index_t>& g) {
  const index_t patch = token - 1;
  const index_t row = patch / g.grid;
  const index_t col = patch % g.grid;
  const index_t c = (row % g.window_rows) * g.window_cols + col % g.window_cols;
  const index_t K = g.cells();
  const index_t o = ((phase % K) + K) % K;
  if ((c - o + K) % K < g.masked) {
    return -1;
  }
  const KeptRun<index_t> run = kept_run(o, g);
  const index_t rank = c < run.first ? c : run.wrapped + (c - run.first);
  const index_t w = (row / g.window_rows) * g.windows_per_row() + col / g.window_cols;
  return w * g.kept_per_window() + rank;
}

// Channels [channel, stop) read frame t + delta (spec step 2). Channel runs
// let the CPU copy contiguous blocks and let a CUDA thread treat a whole
// vector of channels alike (the vector width divides every run boundary).
template <typename index_t>
struct BasicChannelRun {
  index_t delta;
  index_t stop;
};
using ChannelRun = BasicChannelRun<int64_t>;

// For scale s with I = mix_channels: continual mixing (block width h = I/s):
// block q of [0, I) reads t - (s - q), block q of [I, 2I) reads t + q + 1;
// separate: [0, I) reads t - s, [I, 2I) reads t + s; none: all own.
// Channels [2I, D) are always the frame's own.
template <typename index_t = int64_t>
STDD_HOST_DEVICE BasicChannelRun<index_t> channel_run(same_t<index_t> channel, same_t<index_t> channels,
                                                      same_t<index_t> mix_channels, same_t<index_t> scale,
                                                      Mixing mixing) {
  using Run = BasicChannelRun<index_t>;
  const index_t I = mix_channels;
  if (mixing == Mixing::kNone || channel >= 2 * I) {
    return Run{0, channels};
  }
  if (mixing == Mixing::kSeparate) {
    return channel < I ? Run{-scale, I} : Run{scale, 2 * I};
  }
  const index_t width = I / scale;  // h, validated > 0 by the host
  if (channel < I) {
    const index_t q = channel / width;
    return Run{-(scale - q), (q + 1) * width};
  }
  const index_t q = (channel - I) / width;
  return Run{q + 1, I + (q + 1) * width};
}

}  // namespace stdd
