// Shared projections (docs/stca.md section 6): the arithmetic of one mixed
// token of mix_factors and of its gradient, written once for the CPU kernels
// (stca_projection_cpu.cpp) and the CUDA kernels (stca_projection_cuda.cu),
// and what one CUDA warp or thread does in the latter (the *_lanes / *_chunk
// functions), kept in this header of host+device functions so that the C++
// tests (tests/cpp/) run the very code of the CUDA kernels on the CPU and
// compare it with the CPU kernels, as stca_kernel_bodies.h does for
// mix_gather / pad_scatter.
//
// Names: a mixed token m (scale s, row r = b*T + t, slot i) and its base token
// xb = x[r, base(r, i)] (i = 0: the CLS; i = 1 + j: kept token j) differ only
// in the 2I borrowed channels [0, 2I); the n = D - 2I others are the base
// token's own. Their LayerNorm statistics over all D channels are mu_x,
// sd_x = sqrt(var_x + eps) and mu_m, sd_m. Forward:
//   d_c = m_c - xb_c (c < 2I);  dmu = sum_c d_c / D = mu_m - mu_x
//   a = sd_x / sd_m;  k = -dmu / sd_m;  u_c = d_c g_c / sd_m
//   1 - a = (sd_m^2 - sd_x^2) / (sd_m (sd_m + sd_x)),
//   sd_m^2 - sd_x^2 = (1/D) sum_c d_c (d_c + 2 (xb_c - mu_x)) - dmu^2
// The difference of the variances comes from the 2I changed channels, so a
// small change (the usual case) is not lost to the cancellation of
// var_m - var_x, nor 1 - a to that of 1 - a. var_m itself is a sum of
// non-negative terms, exact to rounding however much the borrowed channels
// change it (a borrowed outlier channel, or zeros at a clip edge, can change
// it many times over, where sd_x^2 + the change would cancel): with the own
// channels' mean mu_o and their squared deviations Q_o = sum_{c >= 2I} (xb_c - mu_o)^2,
//   D var_m = sum_{c < 2I} (m_c - mu_m)^2 + Q_o + n (mu_o - mu_m)^2,
// and D var_x the same with xb. The statistics of a base token are taken
// once for all its mixed tokens; each of these then costs O(2I), not O(D).
// Sums are accumulated in stat_t: double on the CPU (as ATen's own CPU
// reductions of float32), float on CUDA for float32 factors; double for
// float64 x everywhere.
#pragma once

#include <cmath>
#include <cstdint>

#include "stca_index.h"
#include "stca_kernel_bodies.h"

namespace stdd {
namespace kernels {

STDD_HOST_DEVICE float square_root(float value) { return sqrtf(value); }
STDD_HOST_DEVICE double square_root(double value) { return sqrt(value); }

// ---------------------------------------------------------------------------
// Forward: the statistics of a base token and of its mixed tokens.
// ---------------------------------------------------------------------------

template <typename stat_t>
struct BaseMeans {
  stat_t mean;      // mu_x
  stat_t own_mean;  // mu_o, the mean of the own channels [2I, D) (0 when 2I = D)
};

// From the sums of xb over the borrowed channels [0, 2I) and over the own channels.
template <typename stat_t>
STDD_HOST_DEVICE BaseMeans<stat_t> base_means(stat_t borrowed_sum, stat_t own_sum, int64_t borrowed,
                                              int64_t channels) {
  const int64_t own = channels - borrowed;
  return BaseMeans<stat_t>{(borrowed_sum + own_sum) / static_cast<stat_t>(channels),
                           own > 0 ? own_sum / static_cast<stat_t>(own) : stat_t(0)};
}

template <typename stat_t>
struct BaseStats {
  stat_t mean;         // mu_x
  stat_t var_eps;      // sd_x^2 = var_x + eps (biased variance)
  stat_t sd;           // sd_x
  stat_t own_mean;     // mu_o
  stat_t own_squares;  // Q_o = sum_{c >= 2I} (xb_c - mu_o)^2
};

// From base_means and the squared deviations: borrowed_squares = sum_{c < 2I} (xb_c - mu_x)^2,
// own_squares = Q_o.
template <typename stat_t>
STDD_HOST_DEVICE BaseStats<stat_t> base_stats(const BaseMeans<stat_t>& means, stat_t borrowed_squares,
                                              stat_t own_squares, int64_t borrowed, int64_t channels, stat_t eps) {
  const stat_t own_shift = means.own_mean - means.mean;
  const stat_t squares = borrowed_squares + own_squares + static_cast<stat_t>(channels - borrowed) * own_shift * own_shift;
  const stat_t var_eps = squares / static_cast<stat_t>(channels) + eps;
  return BaseStats<stat_t>{means.mean, var_eps, square_root(var_eps), means.own_mean, own_squares};
}

// One borrowed channel's share of the change of the variance: d_c (d_c + 2 (xb_c - mu_x)).
template <typename stat_t>
STDD_HOST_DEVICE stat_t spread_term(stat_t difference, stat_t base_centered) {
  return difference * (difference + 2 * base_centered);
}

// Sums over a mixed token's borrowed channels c < 2I, first pass: sum_c d_c and
// sum_c spread_term(d_c, xb_c - mu_x); then mixed_mean gives mu_m for the second
// pass, sum_c (m_c - mu_m)^2.
template <typename stat_t>
struct BorrowedSums {
  stat_t difference = 0;  // sum_c d_c
  stat_t spread = 0;      // sum_c d_c (d_c + 2 (xb_c - mu_x))

  STDD_HOST_DEVICE void add(stat_t m, stat_t xb, stat_t mean) {
    const stat_t d = m - xb;
    difference += d;
    spread += spread_term(d, xb - mean);
  }
  STDD_HOST_DEVICE void add(const BorrowedSums& other) {
    difference += other.difference;
    spread += other.spread;
  }
};

// mu_m = mu_x + sum_c d_c / D.
template <typename stat_t>
STDD_HOST_DEVICE stat_t mixed_mean(const BaseStats<stat_t>& base, stat_t difference, int64_t channels) {
  return base.mean + difference / static_cast<stat_t>(channels);
}

template <typename stat_t>
struct MixedStats {
  stat_t mean;            // mu_m
  stat_t shift;           // dmu = mu_m - mu_x
  stat_t sd;              // sd_m
  stat_t gain;            // a = sd_x / sd_m
  stat_t one_minus_gain;  // 1 - a
  stat_t offset;          // k = (mu_x - mu_m) / sd_m
};

// sums: the first pass; mixed_squares = sum_{c < 2I} (m_c - mu_m)^2, mu_m = mixed_mean(...).
template <typename stat_t>
STDD_HOST_DEVICE MixedStats<stat_t> mixed_stats(const BaseStats<stat_t>& base, const BorrowedSums<stat_t>& sums,
                                                stat_t mixed_squares, int64_t borrowed, int64_t channels, stat_t eps) {
  const stat_t D = static_cast<stat_t>(channels);
  const stat_t shift = sums.difference / D;
  const stat_t mean = base.mean + shift;
  const stat_t own_shift = base.own_mean - mean;
  const stat_t squares =
      mixed_squares + base.own_squares + static_cast<stat_t>(channels - borrowed) * own_shift * own_shift;
  const stat_t sd = square_root(squares / D + eps);
  const stat_t change = sums.spread / D - shift * shift;  // sd_m^2 - sd_x^2
  return MixedStats<stat_t>{mean, shift, sd, base.sd / sd, change / (sd * (sd + base.sd)), -shift / sd};
}

// u_c = d_c g_c / sd_m.
template <typename stat_t>
STDD_HOST_DEVICE stat_t borrowed_coefficient(stat_t difference, stat_t weight, const MixedStats<stat_t>& mixed) {
  return difference * weight / mixed.sd;
}

// ---------------------------------------------------------------------------
// Backward of one mixed token (s, r, i). With the gradients of its outputs
//   ga = G_gain - G_coef[2I]  (a appears as gain and, negated, as 1 - a),
//   gk = G_coef[2I + 1],  gu_c = G_coef[c]  (c < 2I),
// the chain rule through a = sd_x / sd_m, k = (mu_x - mu_m) / sd_m and
// u_c = (m_c - xb_c) g_c / sd_m gives
//   dL = ga/sd_m dsd_x + gk/sd_m (dmu_x - dmu_m) + sum_c gu_c g_c/sd_m (dm_c - dxb_c)
//        + sum_c gu_c d_c/sd_m dg_c + Gm dsd_m,   Gm = -(ga a + gk k + sum_c gu_c u_c) / sd_m,
// and with dsd/dv_c = (v_c - mu_v) / (D sd_v), dmu/dv_c = 1/D (v = xb or m),
// Gx = ga / sd_m:
//   dL/dm_c  (c < 2I) = gu_c g_c / sd_m + Gm (m_c - mu_m) / (D sd_m) - gk / (D sd_m)
//   dL/dxb_c (c < 2I) = -gu_c g_c / sd_m + Gx (xb_c - mu_x) / (D sd_x) + gk / (D sd_m)
//   dL/dxb_c (c >= 2I, where m_c = xb_c) = Gm (xb_c - mu_m) / (D sd_m) + Gx (xb_c - mu_x) / (D sd_x)
//                                       = (Gm/(D sd_m) + Gx/(D sd_x)) (xb_c - mu_x) - Gm/(D sd_m) dmu
//   dL/dg_c  (c < 2I) = gu_c d_c / sd_m  (zero for c >= 2I: g enters through u only)
// mixed_mean = mean_s m_s adds G_mean_c / S to every dL/dm_c and, summed over
// the scales, G_mean_c to dL/dxb_c for c >= 2I. For the CLS (m = xb: d = 0,
// a = 1, k = 0, u = 0, Gm = -Gx) the terms cancel exactly and dL/dx = G_mean.
// ---------------------------------------------------------------------------

template <typename stat_t>
struct MixedAdjoint {
  stat_t inv_sd;       // 1 / sd_m
  stat_t mixed_slope;  // Gm / (D sd_m)
  stat_t base_slope;   // Gx / (D sd_x)
  stat_t offset;       // gk / (D sd_m)
};

// grad_gain = ga, grad_offset = gk, grad_dot = sum_c gu_c u_c.
template <typename stat_t>
STDD_HOST_DEVICE MixedAdjoint<stat_t> mixed_adjoint(const BaseStats<stat_t>& base, const MixedStats<stat_t>& mixed,
                                                    stat_t grad_gain, stat_t grad_offset, stat_t grad_dot,
                                                    int64_t channels) {
  const stat_t D = static_cast<stat_t>(channels);
  const stat_t grad_sd_m = -(grad_gain * mixed.gain + grad_offset * mixed.offset + grad_dot) / mixed.sd;  // Gm
  const stat_t grad_sd_x = grad_gain / mixed.sd;                                                        // Gx
  return MixedAdjoint<stat_t>{stat_t(1) / mixed.sd, grad_sd_m / (D * mixed.sd), grad_sd_x / (D * base.sd),
                              grad_offset / (D * mixed.sd)};
}

// dL/dm_c of a borrowed channel (without G_mean_c / S): weighted = gu_c g_c, centered = m_c - mu_m.
template <typename stat_t>
STDD_HOST_DEVICE stat_t borrowed_adjoint(const MixedAdjoint<stat_t>& adjoint, stat_t weighted, stat_t centered) {
  return weighted * adjoint.inv_sd + adjoint.mixed_slope * centered - adjoint.offset;
}

// This scale's share of dL/dxb_c of a borrowed channel: weighted = gu_c g_c, centered = xb_c - mu_x.
template <typename stat_t>
STDD_HOST_DEVICE stat_t base_borrowed_adjoint(const MixedAdjoint<stat_t>& adjoint, stat_t weighted, stat_t centered) {
  return adjoint.base_slope * centered - weighted * adjoint.inv_sd + adjoint.offset;
}

// dL/dxb_c of the own channels c >= 2I, summed over the scales, is
// slope * (xb_c - mu_x) - intercept (+ G_mean_c): two numbers per base token.
template <typename stat_t>
struct OwnAdjoint {
  stat_t slope = 0;      // sum_s Gm_s / (D sd_m,s) + Gx_s / (D sd_x)
  stat_t intercept = 0;  // sum_s Gm_s / (D sd_m,s) dmu_s

  STDD_HOST_DEVICE void add(const MixedAdjoint<stat_t>& adjoint, const MixedStats<stat_t>& mixed) {
    slope += adjoint.mixed_slope + adjoint.base_slope;
    intercept += adjoint.mixed_slope * mixed.shift;
  }
};

// ---------------------------------------------------------------------------
// The CUDA kernels' per-lane code. A mix_factors kernel gives one warp (32
// lanes) to a base token; lane l takes channels l, l + 32, ... (consecutive
// lanes, consecutive addresses: coalesced), and the warp adds the lanes'
// partial sums (a butterfly of shuffles) between the steps. The walk over one
// item (mix_factors_warp_item, mix_factors_backward_warp_item,
// project_mixed_backward_warp_item) is written once, for any `Warp` with
//   warp.sum(f):  f(lane, lanes) summed over the lanes, the same total in every lane;
//   warp.each(f): f(lane, lanes) for this lane (lanes write disjoint elements);
// the CUDA kernels pass their warp (shuffles), the C++ tests HostWarp below,
// which runs every lane in turn and adds in the butterfly's order, so that the
// tests run the kernels' very code and arithmetic on the CPU. A lane
// recomputes a borrowed value (borrowed_value) where it needs it rather than
// keeping 2I of them per scale in registers: the reads hit the cache.
// ---------------------------------------------------------------------------

// total += value, for the partial sums a warp adds: numbers, or structs of them with add().
template <typename T>
STDD_HOST_DEVICE void accumulate(T& total, const T& value) {
  total.add(value);
}
STDD_HOST_DEVICE void accumulate(float& total, float value) { total += value; }
STDD_HOST_DEVICE void accumulate(double& total, double value) { total += value; }

constexpr int kWarpLanes = 32;

// The CPU's stand-in for a warp: sum() evaluates every lane and adds them as the CUDA
// kernels' xor-shuffle butterfly does (lane l + lane l ^ 16, then ^ 8, ^ 4, ^ 2, ^ 1), which
// gives every lane the same, bit-identical total; each() runs every lane in turn.
struct HostWarp {
  template <typename F>
  auto sum(const F& f) const {
    using T = decltype(f(0, kWarpLanes));
    T values[kWarpLanes];
    for (int lane = 0; lane < kWarpLanes; ++lane) values[lane] = f(lane, kWarpLanes);
    for (int offset = kWarpLanes / 2; offset > 0; offset /= 2) {
      T next[kWarpLanes];
      for (int lane = 0; lane < kWarpLanes; ++lane) {
        next[lane] = values[lane];
        accumulate(next[lane], values[lane ^ offset]);
      }
      for (int lane = 0; lane < kWarpLanes; ++lane) values[lane] = next[lane];
    }
    return values[0];
  }
  template <typename F>
  void each(const F& f) const {
    for (int lane = 0; lane < kWarpLanes; ++lane) f(lane, kWarpLanes);
  }
};

struct FactorKernelArgs {
  MixKernelArgs mix;
  int32_t borrowed;  // 2I (0 without mixing)
  double eps;

  STDD_HOST_DEVICE int32_t rank() const { return borrowed + 2; }
  STDD_HOST_DEVICE int32_t tokens_out() const { return 1 + mix.mask.num_kept(); }
  STDD_HOST_DEVICE int64_t per_scale() const { return mix.rows * tokens_out(); }  // mixed tokens of one scale
};

inline FactorKernelArgs make_factor_args(const detail::FactorPlan& plan) {
  return FactorKernelArgs{make_mix_args(plan.mix), checked_int32(plan.borrowed, "2I"), plan.eps};
}

// Item = a base token: row * (1 + N_keep) + slot.
struct FactorItem {
  int64_t row;   // B*T row
  int32_t frame;  // t = row mod T
  int32_t slot;   // 0: CLS, else 1 + j for kept token j
  int64_t base;   // offset of the base token's channel 0 in x (and grad_x)
};

STDD_HOST_DEVICE FactorItem factor_item(const FactorKernelArgs& a, const int64_t* phase, int64_t item) {
  const int32_t tokens_out = a.tokens_out();
  FactorItem it;
  it.row = item / tokens_out;
  it.slot = static_cast<int32_t>(item - it.row * tokens_out);
  it.frame = static_cast<int32_t>(it.row % a.mix.num_frames);
  const int32_t token =
      it.slot == 0 ? 0
                   : kept_token(static_cast<int32_t>(phase[it.row] % a.mix.mask.cells()), it.slot - 1, a.mix.mask);
  it.base = (it.row * a.mix.mask.num_tokens() + token) * a.mix.channels;
  return it;
}

// m_c (c < 2I) of mixed token `it.slot` at scale `scale`: what mix_gather reads, 0 outside the clip.
template <typename scalar_t, typename stat_t>
STDD_HOST_DEVICE stat_t borrowed_value(const scalar_t* x, const int64_t* phase, const FactorKernelArgs& a,
                                       const FactorItem& it, int32_t scale, int32_t c) {
  const MixKernelArgs& m = a.mix;
  const int32_t delta = channel_run<int32_t>(c, m.channels, m.mix_channels, scale, m.mixing).delta;
  const int32_t source = source_frame<int32_t>(it.frame, delta, m.num_frames, m.mixing);
  if (source < 0) return stat_t(0);
  const int64_t source_row = it.row + (source - it.frame);
  const int32_t token = kept_token(static_cast<int32_t>(phase[source_row] % m.mask.cells()), it.slot - 1, m.mask);
  return static_cast<stat_t>(x[(source_row * m.mask.num_tokens() + token) * m.channels + c]);
}

template <typename stat_t>
struct BaseSums {
  stat_t borrowed = 0;  // over [0, 2I)
  stat_t own = 0;       // over [2I, D)

  STDD_HOST_DEVICE void add(const BaseSums& other) {
    borrowed += other.borrowed;
    own += other.own;
  }
};

// This lane's share of base_means' sums.
template <typename scalar_t, typename stat_t>
STDD_HOST_DEVICE BaseSums<stat_t> base_sums_lane(const scalar_t* x, const FactorKernelArgs& a, const FactorItem& it,
                                                 int32_t lane, int32_t lanes) {
  BaseSums<stat_t> sums;
  for (int32_t c = lane; c < a.mix.channels; c += lanes) {
    const stat_t v = static_cast<stat_t>(x[it.base + c]);
    if (c < a.borrowed) {
      sums.borrowed += v;
    } else {
      sums.own += v;
    }
  }
  return sums;
}

// This lane's share of base_stats' squared deviations (borrowed about mu_x, own about mu_o).
template <typename scalar_t, typename stat_t>
STDD_HOST_DEVICE BaseSums<stat_t> base_squares_lane(const scalar_t* x, const FactorKernelArgs& a,
                                                    const FactorItem& it, const BaseMeans<stat_t>& means,
                                                    int32_t lane, int32_t lanes) {
  BaseSums<stat_t> squares;
  for (int32_t c = lane; c < a.mix.channels; c += lanes) {
    const stat_t v = static_cast<stat_t>(x[it.base + c]);
    if (c < a.borrowed) {
      squares.borrowed += (v - means.mean) * (v - means.mean);
    } else {
      squares.own += (v - means.own_mean) * (v - means.own_mean);
    }
  }
  return squares;
}

template <typename scalar_t, typename stat_t>
STDD_HOST_DEVICE BorrowedSums<stat_t> borrowed_sums_lane(const scalar_t* x, const int64_t* phase,
                                                         const FactorKernelArgs& a, const FactorItem& it,
                                                         const BaseStats<stat_t>& base, int32_t scale, int32_t lane,
                                                         int32_t lanes) {
  BorrowedSums<stat_t> sums;
  for (int32_t c = lane; c < a.borrowed; c += lanes) {
    sums.add(borrowed_value<scalar_t, stat_t>(x, phase, a, it, scale, c), static_cast<stat_t>(x[it.base + c]),
             base.mean);
  }
  return sums;
}

// sum_{c < 2I} (m_c - mu_m)^2, this lane's share.
template <typename scalar_t, typename stat_t>
STDD_HOST_DEVICE stat_t mixed_squares_lane(const scalar_t* x, const int64_t* phase, const FactorKernelArgs& a,
                                           const FactorItem& it, stat_t mixed_mean_value, int32_t scale, int32_t lane,
                                           int32_t lanes) {
  stat_t squares = 0;
  for (int32_t c = lane; c < a.borrowed; c += lanes) {
    const stat_t centered = borrowed_value<scalar_t, stat_t>(x, phase, a, it, scale, c) - mixed_mean_value;
    squares += centered * centered;
  }
  return squares;
}

// gain and coefficients of mixed token (scale_index, item): u_c for this lane's channels, and
// (lane 0) a, 1 - a, k.
template <typename scalar_t, typename factor_t, typename stat_t>
STDD_HOST_DEVICE void write_factors_lane(const scalar_t* x, const int64_t* phase, const factor_t* weight,
                                         factor_t* gain, factor_t* coefficients, const FactorKernelArgs& a,
                                         const FactorItem& it, int64_t item, int32_t scale_index,
                                         const MixedStats<stat_t>& mixed, int32_t lane, int32_t lanes) {
  const int64_t mixed_token = scale_index * a.per_scale() + item;
  factor_t* coefficient = coefficients + mixed_token * a.rank();
  const int32_t scale = a.mix.scales[scale_index];
  for (int32_t c = lane; c < a.borrowed; c += lanes) {
    const stat_t d = borrowed_value<scalar_t, stat_t>(x, phase, a, it, scale, c) - static_cast<stat_t>(x[it.base + c]);
    coefficient[c] = static_cast<factor_t>(borrowed_coefficient(d, static_cast<stat_t>(weight[c]), mixed));
  }
  if (lane == 0) {
    coefficient[a.borrowed] = static_cast<factor_t>(mixed.one_minus_gain);
    coefficient[a.borrowed + 1] = static_cast<factor_t>(mixed.offset);
    gain[mixed_token] = static_cast<factor_t>(mixed.gain);
  }
}

// mixed_mean[item]: the mean over scales of m_c for c < 2I, the base token's own channels past 2I.
template <typename scalar_t, typename stat_t>
STDD_HOST_DEVICE void write_mixed_mean_lane(const scalar_t* x, const int64_t* phase, scalar_t* mixed_mean,
                                            const FactorKernelArgs& a, const FactorItem& it, int64_t item,
                                            int32_t lane, int32_t lanes) {
  scalar_t* out = mixed_mean + item * a.mix.channels;
  for (int32_t c = lane; c < a.mix.channels; c += lanes) {
    if (c < a.borrowed) {
      stat_t sum = 0;
      for (int32_t s = 0; s < a.mix.num_scales; ++s) sum += borrowed_value<scalar_t, stat_t>(x, phase, a, it, a.mix.scales[s], c);
      out[c] = static_cast<scalar_t>(sum / static_cast<stat_t>(a.mix.num_scales));
    } else {
      out[c] = x[it.base + c];
    }
  }
}

// The CLS (slot 0): every scale's own token, a = 1, u = 0, 1 - a = 0, k = 0.
template <typename scalar_t, typename factor_t>
STDD_HOST_DEVICE void write_cls_lane(const scalar_t* x, factor_t* gain, factor_t* coefficients,
                                     scalar_t* mixed_mean, const FactorKernelArgs& a, const FactorItem& it,
                                     int64_t item, int32_t lane, int32_t lanes) {
  for (int32_t c = lane; c < a.mix.channels; c += lanes) mixed_mean[item * a.mix.channels + c] = x[it.base + c];
  for (int32_t s = 0; s < a.mix.num_scales; ++s) {
    const int64_t mixed_token = s * a.per_scale() + item;
    for (int32_t c = lane; c < a.rank(); c += lanes) coefficients[mixed_token * a.rank() + c] = factor_t(0);
    if (lane == 0) gain[mixed_token] = factor_t(1);
  }
}

// ---- backward, first pass (a warp per base token) ----

// ga = G_gain - G_coef[2I] and gk = G_coef[2I + 1] of mixed token (scale_index, item); absent gradients are zero.
template <typename factor_t, typename stat_t>
STDD_HOST_DEVICE void upstream_scalars(const factor_t* grad_gain, const factor_t* grad_coefficients,
                                       const FactorKernelArgs& a, int64_t item, int32_t scale_index, stat_t& grad_a,
                                       stat_t& grad_k) {
  const int64_t mixed_token = scale_index * a.per_scale() + item;
  grad_a = grad_gain == nullptr ? stat_t(0) : static_cast<stat_t>(grad_gain[mixed_token]);
  grad_k = 0;
  if (grad_coefficients != nullptr) {
    grad_a -= static_cast<stat_t>(grad_coefficients[mixed_token * a.rank() + a.borrowed]);
    grad_k = static_cast<stat_t>(grad_coefficients[mixed_token * a.rank() + a.borrowed + 1]);
  }
}

// sum_c gu_c u_c of mixed token (scale_index, item), this lane's share.
template <typename scalar_t, typename factor_t, typename stat_t>
STDD_HOST_DEVICE stat_t grad_dot_lane(const scalar_t* x, const int64_t* phase, const factor_t* weight,
                                      const factor_t* grad_coefficients, const FactorKernelArgs& a,
                                      const FactorItem& it, int64_t item, int32_t scale_index,
                                      const MixedStats<stat_t>& mixed, int32_t lane, int32_t lanes) {
  if (grad_coefficients == nullptr) return stat_t(0);
  const factor_t* gu = grad_coefficients + (scale_index * a.per_scale() + item) * a.rank();
  const int32_t scale = a.mix.scales[scale_index];
  stat_t dot = 0;
  for (int32_t c = lane; c < a.borrowed; c += lanes) {
    const stat_t d = borrowed_value<scalar_t, stat_t>(x, phase, a, it, scale, c) - static_cast<stat_t>(x[it.base + c]);
    dot += static_cast<stat_t>(gu[c]) * borrowed_coefficient(d, static_cast<stat_t>(weight[c]), mixed);
  }
  return dot;
}

// For this lane's borrowed channels c < 2I: dL/dm_c of every scale (+ G_mean_c / S) to
// borrowed_grad (S, B*T, 1+N_keep, 2I), the base token's own share summed over the scales to
// base_grad (B*T, 1+N_keep, 2I), and sum_s gu_c d_c / sd_m to weight_terms (same shape).
template <typename scalar_t, typename factor_t, typename stat_t>
STDD_HOST_DEVICE void factor_backward_borrowed_lane(
    const scalar_t* x, const int64_t* phase, const factor_t* weight, const factor_t* grad_coefficients,
    const scalar_t* grad_mean, stat_t* borrowed_grad, stat_t* base_grad, stat_t* weight_terms,
    const FactorKernelArgs& a, const FactorItem& it, int64_t item, const BaseStats<stat_t>& base,
    const MixedStats<stat_t>* mixed, const MixedAdjoint<stat_t>* adjoint, int32_t lane, int32_t lanes) {
  const int32_t S = a.mix.num_scales;
  for (int32_t c = lane; c < a.borrowed; c += lanes) {
    const stat_t xb = static_cast<stat_t>(x[it.base + c]), g = static_cast<stat_t>(weight[c]);
    const stat_t mean_term = grad_mean == nullptr ? stat_t(0)
                                                  : static_cast<stat_t>(grad_mean[item * a.mix.channels + c]) /
                                                        static_cast<stat_t>(S);
    stat_t base_term = 0, weight_term = 0;
    for (int32_t s = 0; s < S; ++s) {
      const int64_t mixed_token = s * a.per_scale() + item;
      const stat_t gu = grad_coefficients == nullptr
                            ? stat_t(0)
                            : static_cast<stat_t>(grad_coefficients[mixed_token * a.rank() + c]);
      const stat_t m = borrowed_value<scalar_t, stat_t>(x, phase, a, it, a.mix.scales[s], c);
      borrowed_grad[mixed_token * a.borrowed + c] = borrowed_adjoint(adjoint[s], gu * g, m - mixed[s].mean) + mean_term;
      base_term += base_borrowed_adjoint(adjoint[s], gu * g, xb - base.mean);
      weight_term += gu * (m - xb) * adjoint[s].inv_sd;
    }
    base_grad[item * a.borrowed + c] = base_term;
    weight_terms[item * a.borrowed + c] = weight_term;
  }
}

// grad_x of the base token's own channels [2I, D): final.
template <typename scalar_t, typename stat_t>
STDD_HOST_DEVICE void factor_backward_own_lane(const scalar_t* x, const scalar_t* grad_mean, scalar_t* grad_x,
                                               const FactorKernelArgs& a, const FactorItem& it, int64_t item,
                                               const BaseStats<stat_t>& base, const OwnAdjoint<stat_t>& own,
                                               int32_t lane, int32_t lanes) {
  for (int32_t c = a.borrowed + lane; c < a.mix.channels; c += lanes) {
    stat_t value = own.slope * (static_cast<stat_t>(x[it.base + c]) - base.mean) - own.intercept;
    if (grad_mean != nullptr) value += static_cast<stat_t>(grad_mean[item * a.mix.channels + c]);
    grad_x[it.base + c] = static_cast<scalar_t>(value);
  }
}

// The CLS row of grad_x: G_mean (every other term cancels), or zero; its weight_terms: zero (u = 0).
template <typename scalar_t, typename stat_t>
STDD_HOST_DEVICE void factor_backward_cls_lane(const scalar_t* grad_mean, scalar_t* grad_x, stat_t* weight_terms,
                                               const FactorKernelArgs& a, const FactorItem& it, int64_t item,
                                               int32_t lane, int32_t lanes) {
  for (int32_t c = lane; c < a.mix.channels; c += lanes) {
    grad_x[it.base + c] = grad_mean == nullptr ? scalar_t(0.0f) : grad_mean[item * a.mix.channels + c];
  }
  for (int32_t c = lane; c < a.borrowed; c += lanes) weight_terms[item * a.borrowed + c] = stat_t(0);
}

// ---- backward, second pass: a thread per channel of a token of x (TokenItem) ----

// grad_x[row, token, ch] for channels the first pass did not write: zero for a masked token; for
// ch < 2I of kept token j, base_grad + the dL/dm_c of every mixed token that read it (slot 1 + j
// of the reader frames, reader_frames), rounded once.
template <typename scalar_t, typename stat_t>
STDD_HOST_DEVICE void factor_backward_gather_chunk(const stat_t* borrowed_grad, const stat_t* base_grad,
                                                   scalar_t* grad_x, const FactorKernelArgs& a, const TokenItem& it,
                                                   int64_t item, int32_t ch) {
  const MixKernelArgs& m = a.mix;
  if (it.token == 0) return;  // the CLS row: first pass
  if (it.masked) {
    grad_x[item * m.channels + ch] = scalar_t(0.0f);
    return;
  }
  if (ch >= a.borrowed) return;  // own channels: first pass
  const int32_t tokens_out = a.tokens_out();
  stat_t sum = base_grad[(it.row * tokens_out + it.slot) * a.borrowed + ch];
  for (int32_t s = 0; s < m.num_scales; ++s) {
    const int32_t delta = channel_run<int32_t>(ch, m.channels, m.mix_channels, m.scales[s], m.mixing).delta;
    const ReaderFrames<int32_t> readers = reader_frames<int32_t>(it.frame, delta, m.num_frames, m.mixing);
    for (int32_t reader = readers.first; reader <= readers.last; ++reader) {
      const int64_t reader_row = it.row + (reader - it.frame);
      sum += borrowed_grad[((s * m.rows + reader_row) * tokens_out + it.slot) * a.borrowed + ch];
    }
  }
  grad_x[item * m.channels + ch] = static_cast<scalar_t>(sum);
}

// ---- the walks over one item ----

// The statistics of a base token: two warp-wide passes over its D channels.
template <typename stat_t, typename scalar_t, typename Warp>
STDD_HOST_DEVICE BaseStats<stat_t> warp_base_stats(const Warp& warp, const scalar_t* x, const FactorKernelArgs& a,
                                                   const FactorItem& it) {
  const auto sums = warp.sum([&](int32_t lane, int32_t lanes) { return base_sums_lane<scalar_t, stat_t>(x, a, it, lane, lanes); });
  const auto means = base_means<stat_t>(sums.borrowed, sums.own, a.borrowed, a.mix.channels);
  const auto squares =
      warp.sum([&](int32_t lane, int32_t lanes) { return base_squares_lane<scalar_t, stat_t>(x, a, it, means, lane, lanes); });
  return base_stats<stat_t>(means, squares.borrowed, squares.own, a.borrowed, a.mix.channels, static_cast<stat_t>(a.eps));
}

// One mixed token's statistics: two warp-wide passes over the 2I borrowed channels.
template <typename stat_t, typename scalar_t, typename Warp>
STDD_HOST_DEVICE MixedStats<stat_t> warp_mixed_stats(const Warp& warp, const scalar_t* x, const int64_t* phase,
                                                     const FactorKernelArgs& a, const FactorItem& it,
                                                     const BaseStats<stat_t>& base, int32_t scale) {
  const auto sums = warp.sum([&](int32_t lane, int32_t lanes) {
    return borrowed_sums_lane<scalar_t, stat_t>(x, phase, a, it, base, scale, lane, lanes);
  });
  const stat_t mean = mixed_mean(base, sums.difference, a.mix.channels);
  const stat_t squares = warp.sum([&](int32_t lane, int32_t lanes) {
    return mixed_squares_lane<scalar_t, stat_t>(x, phase, a, it, mean, scale, lane, lanes);
  });
  return mixed_stats(base, sums, squares, a.borrowed, a.mix.channels, static_cast<stat_t>(a.eps));
}

// mix_factors of base token `item` (row * (1 + N_keep) + slot), every scale.
template <typename scalar_t, typename factor_t, typename Warp>
STDD_HOST_DEVICE void mix_factors_warp_item(const Warp& warp, const scalar_t* x, const factor_t* weight,
                                            const int64_t* phase, factor_t* gain, factor_t* coefficients,
                                            scalar_t* mixed_mean_out, const FactorKernelArgs& a, int64_t item) {
  using stat_t = at::opmath_type<factor_t>;
  const FactorItem it = factor_item(a, phase, item);
  if (it.slot == 0) {
    warp.each([&](int32_t lane, int32_t lanes) {
      write_cls_lane<scalar_t, factor_t>(x, gain, coefficients, mixed_mean_out, a, it, item, lane, lanes);
    });
    return;
  }
  const BaseStats<stat_t> base = warp_base_stats<stat_t>(warp, x, a, it);
  for (int32_t s = 0; s < a.mix.num_scales; ++s) {
    const MixedStats<stat_t> mixed = warp_mixed_stats<stat_t>(warp, x, phase, a, it, base, a.mix.scales[s]);
    warp.each([&](int32_t lane, int32_t lanes) {
      write_factors_lane<scalar_t, factor_t, stat_t>(x, phase, weight, gain, coefficients, a, it, item, s, mixed, lane,
                                                     lanes);
    });
  }
  warp.each([&](int32_t lane, int32_t lanes) {
    write_mixed_mean_lane<scalar_t, stat_t>(x, phase, mixed_mean_out, a, it, item, lane, lanes);
  });
}

// The first pass of mix_factors' backward for base token `item` (see factor_backward_borrowed_lane).
template <typename scalar_t, typename factor_t, typename Warp>
STDD_HOST_DEVICE void mix_factors_backward_warp_item(
    const Warp& warp, const factor_t* grad_gain, const factor_t* grad_coefficients, const scalar_t* grad_mean,
    const scalar_t* x, const factor_t* weight, const int64_t* phase, scalar_t* grad_x,
    at::opmath_type<factor_t>* borrowed_grad, at::opmath_type<factor_t>* base_grad,
    at::opmath_type<factor_t>* weight_terms, const FactorKernelArgs& a, int64_t item) {
  using stat_t = at::opmath_type<factor_t>;
  const FactorItem it = factor_item(a, phase, item);
  if (it.slot == 0) {
    warp.each([&](int32_t lane, int32_t lanes) {
      factor_backward_cls_lane<scalar_t, stat_t>(grad_mean, grad_x, weight_terms, a, it, item, lane, lanes);
    });
    return;
  }
  const BaseStats<stat_t> base = warp_base_stats<stat_t>(warp, x, a, it);
  MixedStats<stat_t> mixed[kMaxScales];
  MixedAdjoint<stat_t> adjoint[kMaxScales];
  OwnAdjoint<stat_t> own;
  for (int32_t s = 0; s < a.mix.num_scales; ++s) {
    mixed[s] = warp_mixed_stats<stat_t>(warp, x, phase, a, it, base, a.mix.scales[s]);
    stat_t grad_a, grad_k;
    upstream_scalars<factor_t, stat_t>(grad_gain, grad_coefficients, a, item, s, grad_a, grad_k);
    const stat_t grad_dot = warp.sum([&](int32_t lane, int32_t lanes) {
      return grad_dot_lane<scalar_t, factor_t, stat_t>(x, phase, weight, grad_coefficients, a, it, item, s, mixed[s],
                                                       lane, lanes);
    });
    adjoint[s] = mixed_adjoint(base, mixed[s], grad_a, grad_k, grad_dot, a.mix.channels);
    own.add(adjoint[s], mixed[s]);
  }
  warp.each([&](int32_t lane, int32_t lanes) {
    factor_backward_borrowed_lane<scalar_t, factor_t, stat_t>(x, phase, weight, grad_coefficients, grad_mean,
                                                              borrowed_grad, base_grad, weight_terms, a, it, item, base,
                                                              mixed, adjoint, lane, lanes);
    factor_backward_own_lane<scalar_t, stat_t>(x, grad_mean, grad_x, a, it, item, base, own, lane, lanes);
  });
}

// ---------------------------------------------------------------------------
// project_mixed: after the GEMM product = coefficients @ basis^T (factor
// dtype, possibly the output itself), a thread per V channels of an output row:
// out = product + gain * qkv[base], rounded once. Its backward: a warp per
// token of qkv, dot products G_s . qkv (project_dot_lane, then a warp sum) and
// grad_qkv = sum_s gain_s G_s (project_backward_row_lane).
// ---------------------------------------------------------------------------

struct ProjectKernelArgs {
  Mask32 mask;
  int64_t rows;        // B*T
  int32_t width;       // W
  int32_t num_scales;  // S

  STDD_HOST_DEVICE int32_t tokens_out() const { return 1 + mask.num_kept(); }
  STDD_HOST_DEVICE int64_t per_scale() const { return rows * tokens_out(); }
};

inline ProjectKernelArgs make_project_args(const detail::ProjectPlan& plan) {
  return ProjectKernelArgs{mask32(plan.mask, plan.width), plan.rows, checked_int32(plan.width, "W"),
                           checked_int32(plan.num_scales, "the number of scales")};
}

// Offset in qkv of the base token row of output row `item` = (s * B*T + row) * (1 + N_keep) + slot.
STDD_HOST_DEVICE int64_t project_source(const ProjectKernelArgs& a, const int64_t* phase, int64_t item) {
  const int32_t tokens_out = a.tokens_out();
  const int64_t mixed = item % a.per_scale();
  const int64_t row = mixed / tokens_out;
  const int32_t slot = static_cast<int32_t>(mixed - row * tokens_out);
  const int32_t token =
      slot == 0 ? 0 : kept_token(static_cast<int32_t>(phase[row] % a.mask.cells()), slot - 1, a.mask);
  return (row * a.mask.num_tokens() + token) * a.width;
}

// out[item, ch:ch+V] = product[item, ch:ch+V] + gain[item] * qkv[source + ch : +V]. product may be
// out itself (same dtype): each element is read before this thread writes it.
template <typename scalar_t, typename factor_t, int V>
STDD_HOST_DEVICE void project_mixed_chunk(const scalar_t* qkv, const factor_t* gain, const factor_t* product,
                                          scalar_t* out, const ProjectKernelArgs& a, int64_t item, int64_t source,
                                          int32_t ch) {
  const auto values = load_pack<scalar_t, V>(qkv + source + ch);
  const auto low_rank = load_pack<factor_t, V>(product + item * a.width + ch);
  const factor_t scale = gain[item];
  Pack<scalar_t, V> result;
STDD_UNROLL
  for (int i = 0; i < V; ++i) {
    result.value[i] = static_cast<scalar_t>(low_rank.value[i] + scale * static_cast<factor_t>(values.value[i]));
  }
  store_pack<scalar_t, V>(out + item * a.width + ch, result);
}

// G_s . qkv[row, token] for the token of `it` (a base token), this lane's share.
template <typename scalar_t, typename stat_t>
STDD_HOST_DEVICE stat_t project_dot_lane(const scalar_t* grad, const scalar_t* qkv, const ProjectKernelArgs& a,
                                         const TokenItem& it, int64_t item, int32_t scale_index, int32_t lane,
                                         int32_t lanes) {
  const scalar_t* g = grad + ((scale_index * a.rows + it.row) * a.tokens_out() + it.slot) * a.width;
  const scalar_t* values = qkv + item * a.width;
  stat_t dot = 0;
  for (int32_t c = lane; c < a.width; c += lanes) dot += static_cast<stat_t>(g[c]) * static_cast<stat_t>(values[c]);
  return dot;
}

// grad_qkv[row, token] = sum_s gain_s G_s at a base token, zero at a masked one.
template <typename scalar_t, typename factor_t>
STDD_HOST_DEVICE void project_backward_row_lane(const scalar_t* grad, const factor_t* gain, scalar_t* grad_qkv,
                                                const ProjectKernelArgs& a, const TokenItem& it, int64_t item,
                                                int32_t lane, int32_t lanes) {
  scalar_t* out = grad_qkv + item * a.width;
  if (it.masked) {
    for (int32_t c = lane; c < a.width; c += lanes) out[c] = scalar_t(0.0f);
    return;
  }
  const int64_t mixed = it.row * a.tokens_out() + it.slot;
  for (int32_t c = lane; c < a.width; c += lanes) {
    factor_t sum = 0;
    for (int32_t s = 0; s < a.num_scales; ++s) {
      sum += gain[s * a.per_scale() + mixed] * static_cast<factor_t>(grad[(s * a.per_scale() + mixed) * a.width + c]);
    }
    out[c] = static_cast<scalar_t>(sum);
  }
}

// project_mixed's backward for token `item` = row * (1 + P*P) + token of qkv.
template <typename scalar_t, typename factor_t, typename Warp>
STDD_HOST_DEVICE void project_mixed_backward_warp_item(const Warp& warp, const scalar_t* grad, const scalar_t* qkv,
                                                       const factor_t* gain, const int64_t* phase, scalar_t* grad_qkv,
                                                       factor_t* grad_gain, const ProjectKernelArgs& a, int64_t item) {
  using stat_t = at::opmath_type<factor_t>;
  const TokenItem it = token_item(a.mask, phase, 1, item);
  if (!it.masked) {
    for (int32_t s = 0; s < a.num_scales; ++s) {
      const stat_t dot = warp.sum([&](int32_t lane, int32_t lanes) {
        return project_dot_lane<scalar_t, stat_t>(grad, qkv, a, it, item, s, lane, lanes);
      });
      warp.each([&](int32_t lane, int32_t) {
        if (lane == 0) grad_gain[s * a.per_scale() + it.row * a.tokens_out() + it.slot] = static_cast<factor_t>(dot);
      });
    }
  }
  warp.each([&](int32_t lane, int32_t lanes) {
    project_backward_row_lane<scalar_t, factor_t>(grad, gain, grad_qkv, a, it, item, lane, lanes);
  });
}

}  // namespace kernels
}  // namespace stdd
