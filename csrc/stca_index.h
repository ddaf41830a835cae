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

// kOfficial: the authors' release's rule (docs/stca.md, release-compatible variant).
enum class Mixing : int32_t { kContinual = 0, kSeparate = 1, kNone = 2, kOfficial = 3 };

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

// The release's rule (kOfficial) for scale s, in closed form. The release
// writes, for i = 0 .. s-1 with d_i = I >> i, channels [0, d_i) from frame
// t - (i+1) where t >= i+1 and channels [2I - d_i, 2I) from t + (i+1) where
// t <= T-2-i, later steps overwriting earlier ones. A channel c of [0, I)
// (of [I, 2I): c = 2I-1-ch, the mirror image) is covered by the steps
// i < depth(c), depth(c) = #{i < s : c < I >> i} >= 1 (the widths shrink, so
// these are the first depth(c) steps). The last of them that writes frame t
// is i = min(depth - 1, t - 1), reading t - min(depth, t); none writes t = 0.
// So a channel run carries delta = -depth (or +depth), and source_frame
// clamps it at the clip edge, where continual mixing gives zero instead.
template <typename index_t>
STDD_HOST_DEVICE index_t official_depth(same_t<index_t> c, same_t<index_t> mix_channels, same_t<index_t> scale) {
  index_t depth = 0;
  while (depth < scale && c < (mix_channels >> depth)) ++depth;
  return depth;
}

// For scale s with I = mix_channels: continual mixing (block width h = I/s):
// block q of [0, I) reads t - (s - q), block q of [I, 2I) reads t + q + 1;
// separate: [0, I) reads t - s, [I, 2I) reads t + s; none: all own;
// official: [I >> depth, I >> (depth - 1)) (from 0 when depth = s) reads
// delta = -depth, its mirror image in [I, 2I) +depth, clamped by source_frame.
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
  if (mixing == Mixing::kOfficial) {  // depth >= 1 and I >> (scale - 1) >= 1, validated by the host
    if (channel < I) {
      const index_t depth = official_depth<index_t>(channel, I, scale);
      return Run{-depth, I >> (depth - 1)};
    }
    const index_t depth = official_depth<index_t>(2 * I - 1 - channel, I, scale);
    return Run{depth, 2 * I - (depth < scale ? (I >> depth) : 0)};
  }
  const index_t width = I / scale;  // h, validated > 0 by the host
  if (channel < I) {
    const index_t q = channel / width;
    return Run{-(scale - q), (q + 1) * width};
  }
  const index_t q = (channel - I) / width;
  return Run{q + 1, I + (q + 1) * width};
}

// The frame that frame t's channels of a run with this delta read, or -1
// where they are zero: t + delta when inside the clip (continual, separate);
// official: t + delta clamped into [0, T), zero where the clamp leaves a mixed
// channel (delta != 0) on frame t itself (t = 0 for delta < 0, t = T-1 for
// delta > 0: no step of the release writes those).
template <typename index_t = int64_t>
STDD_HOST_DEVICE index_t source_frame(same_t<index_t> frame, same_t<index_t> delta, same_t<index_t> num_frames,
                                      Mixing mixing) {
  if (mixing == Mixing::kOfficial && delta != 0) {
    const index_t clamped = delta < 0 ? (delta > -frame ? delta : -frame)
                                      : (delta < num_frames - 1 - frame ? delta : num_frames - 1 - frame);
    return clamped == 0 ? -1 : frame + clamped;
  }
  const index_t source = frame + delta;
  return source < 0 || source >= num_frames ? -1 : source;
}

// The frames [first, last] (empty when first > last) whose channels of a run
// with this delta read frame t: the inverse of source_frame, for the
// gradients. One frame, t - delta, except for the release's clamp: frame 0
// is also read, through delta = -depth, by every frame in [1, depth), and
// frame T-1, through +depth, by every frame in (T-1-depth, T-1).
template <typename index_t>
struct ReaderFrames {
  index_t first;
  index_t last;
};

template <typename index_t = int64_t>
STDD_HOST_DEVICE ReaderFrames<index_t> reader_frames(same_t<index_t> frame, same_t<index_t> delta,
                                                     same_t<index_t> num_frames, Mixing mixing) {
  using Readers = ReaderFrames<index_t>;
  if (mixing == Mixing::kOfficial && delta < 0 && frame == 0) {
    const index_t last = -delta < num_frames - 1 ? -delta : num_frames - 1;
    return Readers{1, last};
  }
  if (mixing == Mixing::kOfficial && delta > 0 && frame == num_frames - 1) {
    const index_t first = num_frames - 1 - delta > 0 ? num_frames - 1 - delta : 0;
    return Readers{first, num_frames - 2};
  }
  const index_t reader = frame - delta;
  return reader < 0 || reader >= num_frames ? Readers{1, 0} : Readers{reader, reader};
}

}  // namespace stdd
