// The STCA index maps (docs/stca.md, steps 1, 2 and 4), written once
// for both devices: the CPU kernels (stca_cpu.cpp), the CUDA kernels
// (stca_cuda.cu, through stca_kernel_bodies.h) and the C++ tests include it.
//
// Names follow the spec: P grid side, (w1, w2) window, K = w1*w2 cells per
// window, m masked cells, N_keep kept patch tokens per frame, I = D / F mixed
// channels per direction. Tokens are indexed into 1 + P*P (CLS is token 0).
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define STDD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define STDD_HOST_DEVICE inline
#endif

namespace stdd {

enum class Mixing : int32_t { kContinual = 0, kSeparate = 1, kNone = 2 };

// Geometry of the patch grid and the window-shift mask. Plain integers so it
// can be passed by value to a CUDA kernel.
struct MaskGeometry {
  int64_t grid;         // P
  int64_t window_rows;  // w1
  int64_t window_cols;  // w2
  int64_t masked;       // m, 0 <= m < K

  STDD_HOST_DEVICE int64_t cells() const { return window_rows * window_cols; }              // K
  STDD_HOST_DEVICE int64_t kept_per_window() const { return cells() - masked; }             // K - m
  STDD_HOST_DEVICE int64_t windows_per_row() const { return grid / window_cols; }           // P / w2
  STDD_HOST_DEVICE int64_t num_windows() const { return (grid / window_rows) * windows_per_row(); }
  STDD_HOST_DEVICE int64_t num_kept() const { return num_windows() * kept_per_window(); }   // N_keep
  STDD_HOST_DEVICE int64_t num_tokens() const { return 1 + grid * grid; }                   // 1 + N
};

// A frame with phase o masks the cells o, o+1, ..., o+m-1 (mod K), so its kept
// cells form the cyclic run that starts at first = (o + m) mod K and is K - m
// long. Listed in ascending c (the spec's order), the run's part that wrapped
// past K - 1 comes first: cells [0, wrapped) and then [first, K).
struct KeptRun {
  int64_t first;    // first kept cell of the cyclic run
  int64_t wrapped;  // how many kept cells wrapped around to 0, 1, ...
};

STDD_HOST_DEVICE KeptRun kept_run(int64_t phase, const MaskGeometry& g) {
  const int64_t K = g.cells();
  // Any integer phase is reduced into [0, K): an unchecked out-of-range phase
  // can never index outside the tensors (the Python API rejects it anyway).
  const int64_t o = ((phase % K) + K) % K;
  const int64_t first = (o + g.masked) % K;
  const int64_t end = first + g.kept_per_window();
  return KeptRun{first, end > K ? end - K : 0};
}

// Token (in [1, 1 + P*P)) read by kept token j in [0, N_keep) of a frame with
// this phase: window w = j / (K - m) (row-major), k-th kept cell c, patch at
// grid row (w / (P/w2))*w1 + c / w2, column (w mod (P/w2))*w2 + c mod w2.
STDD_HOST_DEVICE int64_t kept_token(int64_t phase, int64_t j, const MaskGeometry& g) {
  const KeptRun run = kept_run(phase, g);
  const int64_t w = j / g.kept_per_window();
  const int64_t k = j % g.kept_per_window();
  const int64_t c = k < run.wrapped ? k : run.first + (k - run.wrapped);
  const int64_t row = (w / g.windows_per_row()) * g.window_rows + c / g.window_cols;
  const int64_t col = (w % g.windows_per_row()) * g.window_cols + c % g.window_cols;
  return 1 + row * g.grid + col;
}

// Inverse of kept_token for a patch token in [1, 1 + P*P): its kept index j,
// or -1 when this frame masks that token.
STDD_HOST_DEVICE int64_t kept_index(int64_t phase, int64_t token, const MaskGeometry& g) {
  const int64_t patch = token - 1;
  const int64_t row = patch / g.grid;
  const int64_t col = patch % g.grid;
  const int64_t c = (row % g.window_rows) * g.window_cols + col % g.window_cols;
  const int64_t K = g.cells();
  const int64_t o = ((phase % K) + K) % K;
  if ((c - o + K) % K < g.masked) {
    return -1;
  }
  const KeptRun run = kept_run(o, g);
  const int64_t rank = c < run.first ? c : run.wrapped + (c - run.first);
  const int64_t w = (row / g.window_rows) * g.windows_per_row() + col / g.window_cols;
  return w * g.kept_per_window() + rank;
}

// Channels [channel, stop) read frame t + delta (spec step 2). Channel runs
// let the CPU copy contiguous blocks and let a CUDA thread treat a whole
// vector of channels alike (the vector width divides every run boundary).
struct ChannelRun {
  int64_t delta;
  int64_t stop;
};

// For scale s with I = mix_channels: continual mixing (block width h = I/s):
// block q of [0, I) reads t - (s - q), block q of [I, 2I) reads t + q + 1;
// separate: [0, I) reads t - s, [I, 2I) reads t + s; none: all own.
// Channels [2I, D) are always the frame's own.
STDD_HOST_DEVICE ChannelRun channel_run(
    int64_t channel, int64_t channels, int64_t mix_channels, int64_t scale, Mixing mixing) {
  const int64_t I = mix_channels;
  if (mixing == Mixing::kNone || channel >= 2 * I) {
    return ChannelRun{0, channels};
  }
  if (mixing == Mixing::kSeparate) {
    return channel < I ? ChannelRun{-scale, I} : ChannelRun{scale, 2 * I};
  }
  const int64_t width = I / scale;  // h, validated > 0 by the host
  if (channel < I) {
    const int64_t q = channel / width;
    return ChannelRun{-(scale - q), (q + 1) * width};
  }
  const int64_t q = (channel - I) / width;
  return ChannelRun{q + 1, I + (q + 1) * width};
}

}  // namespace stdd
