// CPU kernels of the shared projections (docs/stca.md section 6):
// mix_factors, project_mixed and their gradients. mix_factors takes one base
// token per work item, every scale of it, so that the base token's statistics
// are taken once and each mixed token costs O(2I); project_mixed is one BLAS
// GEMM (the rank-(2I+2) product) and one pass over the output rows. Items are
// spread by at::parallel_for; inside an item the channel loops are contiguous,
// sums run in independent partial sums (lane_sum) that the compiler
// vectorizes without reassociating, and the float32 loops are also compiled
// for AVX2 / AVX-512 (STDD_CPU_VERSIONS). The per-token arithmetic is
// stca_projection_bodies.h's, shared with the CUDA kernels. Every output
// element is written exactly once, by the item that owns it: gradients that
// several items contribute to are gathered, never scattered.
#include <algorithm>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "stca_index.h"
#include "stca_ops.h"
#include "stca_projection_bodies.h"

namespace stdd {
namespace {

using kernels::BaseStats;
using kernels::MixedAdjoint;
using kernels::MixedStats;
using kernels::OwnAdjoint;

// The statistics' accumulation type on the CPU, for float32 and float64 factors alike (ATen's
// CPU reductions of float32 accumulate in double too).
using stat_t = double;

template <typename scalar_t>
using factor_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Items per task: about GRAIN_SIZE elements of work per task, as ATen's own element-wise kernels.
int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(work_per_item, 1));
}

// sum_{c < n} term(c) in kLanes independent partial sums (no single loop-carried accumulator, so
// the compiler vectorizes the loop without reassociating floating-point adds, and the adds of
// several vectors overlap), added pairwise.
constexpr int kLanes = 16;

template <typename Term>
C10_ALWAYS_INLINE stat_t lane_sum(int64_t n, const Term& term) {
  stat_t part[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int k = 0; k < kLanes; ++k) part[k] += term(c + k);
  }
  for (int k = 0; c < n; ++c, ++k) part[k] += term(c);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) part[k] += part[k + width];
  }
  return part[0];
}

// The float32 path's channel loops (float32 is the inference dtype on the CPU) are also compiled
// for AVX2 and AVX-512 and chosen when the library loads (GCC function multiversioning; the
// extension itself is built for the baseline x86-64, SSE2). Every version does the same
// arithmetic: the same partial sums, no contraction into fused multiply-adds, so results do
// not depend on the CPU. Other compilers and dtypes take the generic loops.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define STDD_CPU_VERSIONS \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), optimize("fp-contract=off")))
#else
#define STDD_CPU_VERSIONS
#endif

STDD_CPU_VERSIONS stat_t sum_f32(const float* values, int64_t n) {
  return lane_sum(n, [&](int64_t c) { return static_cast<stat_t>(values[c]); });
}

STDD_CPU_VERSIONS stat_t centered_squares_f32(const float* values, int64_t n, stat_t center) {
  return lane_sum(n, [&](int64_t c) {
    const stat_t centered = static_cast<stat_t>(values[c]) - center;
    return centered * centered;
  });
}

STDD_CPU_VERSIONS stat_t dot_f32(const float* a, const float* b, int64_t n) {
  return lane_sum(n, [&](int64_t c) { return static_cast<stat_t>(a[c]) * static_cast<stat_t>(b[c]); });
}

// out[c] = low_rank[c] + scale * source[c]; out may be low_rank itself.
STDD_CPU_VERSIONS void rescale_add_f32(float* out, const float* low_rank, const float* source, float scale,
                                       int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = low_rank[c] + scale * source[c];
}

// sum[c] += scale * values[c].
STDD_CPU_VERSIONS void scaled_add_f32(float* sum, float scale, const float* values, int64_t n) {
  for (int64_t c = 0; c < n; ++c) sum[c] += scale * values[c];
}

// out[c] = slope * (base[c] - mean) - intercept (+ extra[c]), the own channels' gradient.
STDD_CPU_VERSIONS void own_gradient_f32(float* out, const float* base, const float* extra, stat_t slope, stat_t mean,
                                        stat_t intercept, int64_t n) {
  if (extra == nullptr) {
    for (int64_t c = 0; c < n; ++c) out[c] = static_cast<float>(slope * (static_cast<stat_t>(base[c]) - mean) - intercept);
  } else {
    for (int64_t c = 0; c < n; ++c) {
      out[c] = static_cast<float>(slope * (static_cast<stat_t>(base[c]) - mean) - intercept + static_cast<stat_t>(extra[c]));
    }
  }
}

template <typename scalar_t>
stat_t sum_of(const scalar_t* values, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return sum_f32(values, n);
  } else {
    return lane_sum(n, [&](int64_t c) { return static_cast<stat_t>(values[c]); });
  }
}

template <typename scalar_t>
stat_t centered_squares(const scalar_t* values, int64_t n, stat_t center) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return centered_squares_f32(values, n, center);
  } else {
    return lane_sum(n, [&](int64_t c) {
      const stat_t centered = static_cast<stat_t>(values[c]) - center;
      return centered * centered;
    });
  }
}

// Where a mixed token's inputs live: row r = b*T + t, slot i (0: CLS, 1 + j: kept token j) and
// its base token (the CLS, or the token kept token j reads in this frame).
struct TokenPlace {
  int64_t row, slot, token;
};

TokenPlace place_of(int64_t item, const int64_t* phase, const MaskGeometry& mask) {
  const int64_t tokens_out = 1 + mask.num_kept();
  const int64_t row = item / tokens_out, slot = item % tokens_out;
  return TokenPlace{row, slot, slot == 0 ? 0 : kept_token(phase[row], slot - 1, mask)};
}

// The index maps of stca_index.h evaluated once per call rather than per token and channel run:
// the token of every kept token of every row, and each scale's channel runs over [0, 2I).
struct BorrowedRun {
  int64_t start, stop, delta;
};

struct MixTables {
  std::vector<int64_t> kept;                    // (B*T, N_keep): kept_token(phase[row], j)
  std::vector<std::vector<BorrowedRun>> runs;  // per scale: the channel runs of [0, 2I) (channel_run)

  MixTables(const int64_t* phase, const detail::FactorPlan& plan) {
    const auto& mix = plan.mix;
    const int64_t num_kept = mix.mask.num_kept();
    kept.resize(mix.rows * num_kept);
    for (int64_t row = 0; row < mix.rows; ++row) {
      for (int64_t j = 0; j < num_kept; ++j) kept[row * num_kept + j] = kept_token(phase[row], j, mix.mask);
    }
    for (const int64_t scale : mix.scales) {
      auto& scale_runs = runs.emplace_back();
      for (int64_t ch = 0; ch < plan.borrowed;) {
        const ChannelRun run = channel_run(ch, mix.channels, mix.mix_channels, scale, mix.mixing);
        const int64_t stop = std::min(run.stop, plan.borrowed);
        scale_runs.push_back(BorrowedRun{ch, stop, run.delta});
        ch = stop;
      }
    }
  }

  // The base token of mixed token `item` = row * (1 + N_keep) + slot.
  TokenPlace place(int64_t item, int64_t num_kept) const {
    const int64_t row = item / (1 + num_kept), slot = item % (1 + num_kept);
    return TokenPlace{row, slot, slot == 0 ? 0 : kept[row * num_kept + slot - 1]};
  }
};

// A base token's statistics (stca_projection_bodies.h): sums over the borrowed and the own
// channels, then their squared deviations (two passes over the D channels, both in cache).
template <typename scalar_t>
BaseStats<stat_t> statistics_of(const scalar_t* base, int64_t borrowed, int64_t D, double eps) {
  const scalar_t* own = base + borrowed;
  const int64_t n = D - borrowed;
  const auto means = kernels::base_means<stat_t>(sum_of(base, borrowed), sum_of(own, n), borrowed, D);
  return kernels::base_stats<stat_t>(means, centered_squares(base, borrowed, means.mean),
                                     centered_squares(own, n, means.own_mean), borrowed, D, static_cast<stat_t>(eps));
}

// m_c for c < 2I of mixed token 1 + j of `row` at scale number `s`: mix_gather's borrowed channels,
// read run by run (source_frame), zero where the source frame is outside the clip.
template <typename scalar_t>
void gather_borrowed(const scalar_t* x, const MixTables& tables, int64_t row, int64_t j, int64_t s,
                     const detail::FactorPlan& plan, stat_t* borrowed) {
  const auto& mix = plan.mix;
  const int64_t D = mix.channels, T = mix.num_frames, t = row % T, num_kept = mix.mask.num_kept();
  for (const BorrowedRun& run : tables.runs[s]) {
    const int64_t source = source_frame(t, run.delta, T, mix.mixing);
    if (source < 0) {
      std::fill(borrowed + run.start, borrowed + run.stop, stat_t(0));
    } else {
      const int64_t source_row = row + (source - t);
      const scalar_t* values = x + (source_row * mix.mask.num_tokens() + tables.kept[source_row * num_kept + j]) * D;
      for (int64_t c = run.start; c < run.stop; ++c) borrowed[c] = static_cast<stat_t>(values[c]);
    }
  }
}

// One mixed token's statistics at one scale from its borrowed channels m (passes over 2I).
template <typename scalar_t>
MixedStats<stat_t> mixed_statistics(const scalar_t* base, const stat_t* m, const BaseStats<stat_t>& stats,
                                    int64_t borrowed, int64_t D, double eps) {
  kernels::BorrowedSums<stat_t> sums;
  sums.difference = lane_sum(borrowed, [&](int64_t c) { return m[c] - static_cast<stat_t>(base[c]); });
  sums.spread = lane_sum(borrowed, [&](int64_t c) {
    return kernels::spread_term(m[c] - static_cast<stat_t>(base[c]), static_cast<stat_t>(base[c]) - stats.mean);
  });
  const stat_t mean = kernels::mixed_mean(stats, sums.difference, D);
  const stat_t squares = lane_sum(borrowed, [&](int64_t c) { return (m[c] - mean) * (m[c] - mean); });
  return kernels::mixed_stats(stats, sums, squares, borrowed, D, static_cast<stat_t>(eps));
}

// ---------------------------------------------------------------------------
// mix_factors: one item per base token (row, slot), every scale.
// ---------------------------------------------------------------------------

template <typename scalar_t, typename factor_t>
void mix_factors_kernel(const scalar_t* x, const factor_t* weight, const int64_t* phase, factor_t* gain,
                        factor_t* coefficients, scalar_t* mixed_mean, const detail::FactorPlan& plan) {
  const auto& mix = plan.mix;
  const int64_t D = mix.channels, R = mix.rows, B2 = plan.borrowed, C = plan.rank();
  const int64_t tokens_in = mix.mask.num_tokens(), tokens_out = 1 + mix.mask.num_kept();
  const int64_t S = static_cast<int64_t>(mix.scales.size());
  const int64_t per_scale = R * tokens_out;  // gain[s] and coefficients[s] are per_scale mixed tokens apart
  const MixTables tables(phase, plan);
  at::parallel_for(0, R * tokens_out, grain_for(2 * D + S * B2), [&](int64_t begin, int64_t end) {
    std::vector<stat_t> borrowed(S * B2);  // m_c, c < 2I, of every scale
    for (int64_t item = begin; item < end; ++item) {
      const TokenPlace at = tables.place(item, tokens_out - 1);
      const scalar_t* base = x + (at.row * tokens_in + at.token) * D;
      scalar_t* mean_out = mixed_mean + item * D;
      if (at.slot == 0) {  // the CLS is every scale's own: a = 1, u = 0, 1 - a = 0, k = 0
        std::copy_n(base, D, mean_out);
        for (int64_t s = 0; s < S; ++s) {
          gain[s * per_scale + item] = factor_t(1);
          std::fill_n(coefficients + (s * per_scale + item) * C, C, factor_t(0));
        }
        continue;
      }
      const BaseStats<stat_t> stats = statistics_of(base, B2, D, plan.eps);
      for (int64_t s = 0; s < S; ++s) {
        stat_t* m = borrowed.data() + s * B2;
        gather_borrowed(x, tables, at.row, at.slot - 1, s, plan, m);
        const MixedStats<stat_t> mixed = mixed_statistics(base, m, stats, B2, D, plan.eps);
        factor_t* coefficient = coefficients + (s * per_scale + item) * C;
        for (int64_t c = 0; c < B2; ++c) {
          coefficient[c] = static_cast<factor_t>(kernels::borrowed_coefficient(
              m[c] - static_cast<stat_t>(base[c]), static_cast<stat_t>(weight[c]), mixed));
        }
        coefficient[B2] = static_cast<factor_t>(mixed.one_minus_gain);
        coefficient[B2 + 1] = static_cast<factor_t>(mixed.offset);
        gain[s * per_scale + item] = static_cast<factor_t>(mixed.gain);
      }
      for (int64_t c = 0; c < B2; ++c) {
        stat_t sum = 0;
        for (int64_t s = 0; s < S; ++s) sum += borrowed[s * B2 + c];
        mean_out[c] = static_cast<scalar_t>(sum / static_cast<stat_t>(S));
      }
      std::copy(base + B2, base + D, mean_out + B2);  // own channels: every scale's m_c = xb_c
    }
  });
}

// ---------------------------------------------------------------------------
// mix_factors backward. Per mixed token, with ga = G_gain - G_coef[2I] (a is
// both the gain and, negated, 1 - a), gk = G_coef[2I + 1], gu_c = G_coef[c],
// the chain rule through a = sd_x/sd_m, k = (mu_x - mu_m)/sd_m and
// u_c = (m_c - xb_c) g_c/sd_m, with dsd_v/dv_c = (v_c - mu_v)/(D sd_v) and
// dmu_v/dv_c = 1/D, gives (derived step by step in stca_projection_bodies.h,
// above mixed_adjoint; Gm = -(ga a + gk k + sum_c gu_c u_c)/sd_m, Gx = ga/sd_m):
//   dL/dm_c  (c < 2I) = gu_c g_c/sd_m + Gm (m_c - mu_m)/(D sd_m) - gk/(D sd_m) + G_mean_c/S
//   dL/dxb_c (c < 2I) = -gu_c g_c/sd_m + Gx (xb_c - mu_x)/(D sd_x) + gk/(D sd_m)
//   dL/dxb_c (c >= 2I) = Gm (xb_c - mu_m)/(D sd_m) + Gx (xb_c - mu_x)/(D sd_x) (+ G_mean_c once)
//   dL/dg_c  (c < 2I) = gu_c d_c/sd_m,  zero for c >= 2I;  the CLS: dL/dx = G_mean.
// grad_x adds, at every element of x, the base-token terms of the mixed tokens
// it is the base of (every scale) and the dL/dm_c of those that read it. Two
// passes, each writing what it owns:
//   A, one item per base token (row, slot), every scale: recomputes the
//      forward's statistics, writes dL/dm_c (c < 2I) of every scale to
//      `borrowed_grad` (S, B*T, 1+N_keep, 2I), the base token's own share of
//      its borrowed channels to `base_grad` (B*T, 1+N_keep, 2I), its own
//      channels [2I, D) of grad_x, the CLS rows of grad_x (= G_mean), and
//      sum_s gu_c d_c / sd_m to `weight_terms` (B*T, 1+N_keep, 2I);
//   B, one item per token of x: zero for masked tokens, else channels
//      [0, 2I) of kept token j = base_grad + the dL/dm_c of every mixed
//      token that read it (the adjoint of mix_gather: slot 1 + j of the
//      reader frames, reader_frames), rounded once to x's dtype.
// grad_ln_weight[:2I] is the sum of weight_terms over the tokens, in a fixed
// order (the same numbers whatever the thread count); [2I, D) is zero.
// ---------------------------------------------------------------------------

template <typename scalar_t, typename factor_t>
void mix_factors_backward_kernel(const factor_t* grad_gain, const factor_t* grad_coefficients,
                                 const scalar_t* grad_mean, const scalar_t* x, const factor_t* weight,
                                 const int64_t* phase, scalar_t* grad_x, factor_t* grad_weight,
                                 const detail::FactorPlan& plan) {
  const auto& mix = plan.mix;
  const int64_t D = mix.channels, R = mix.rows, T = mix.num_frames, B2 = plan.borrowed, C = plan.rank();
  const int64_t tokens_in = mix.mask.num_tokens(), tokens_out = 1 + mix.mask.num_kept();
  const int64_t S = static_cast<int64_t>(mix.scales.size());
  const int64_t per_scale = R * tokens_out;
  const stat_t mean_share = stat_t(1) / static_cast<stat_t>(S);
  std::vector<stat_t> borrowed_grad(S * per_scale * B2), base_grad(per_scale * B2), weight_terms(per_scale * B2);
  const MixTables tables(phase, plan);

  at::parallel_for(0, per_scale, grain_for(2 * D + 2 * S * B2), [&](int64_t begin, int64_t end) {
    std::vector<stat_t> borrowed(S * B2);
    std::vector<MixedStats<stat_t>> mixed(S);
    std::vector<MixedAdjoint<stat_t>> adjoint(S);
    for (int64_t item = begin; item < end; ++item) {
      const TokenPlace at = tables.place(item, tokens_out - 1);
      const scalar_t* base = x + (at.row * tokens_in + at.token) * D;
      const scalar_t* mean_grad = grad_mean == nullptr ? nullptr : grad_mean + item * D;
      scalar_t* out = grad_x + (at.row * tokens_in + at.token) * D;
      if (at.slot == 0) {  // the CLS: every term but G_mean's cancels
        if (mean_grad == nullptr) {
          std::fill_n(out, D, scalar_t(0));
        } else {
          std::copy_n(mean_grad, D, out);
        }
        continue;
      }
      const BaseStats<stat_t> stats = statistics_of(base, B2, D, plan.eps);
      OwnAdjoint<stat_t> own;
      for (int64_t s = 0; s < S; ++s) {
        stat_t* m = borrowed.data() + s * B2;
        gather_borrowed(x, tables, at.row, at.slot - 1, s, plan, m);
        mixed[s] = mixed_statistics(base, m, stats, B2, D, plan.eps);
        const factor_t* gu = grad_coefficients == nullptr ? nullptr : grad_coefficients + (s * per_scale + item) * C;
        stat_t grad_a = grad_gain == nullptr ? stat_t(0) : static_cast<stat_t>(grad_gain[s * per_scale + item]);
        stat_t grad_k = 0, grad_dot = 0;
        if (gu != nullptr) {
          grad_a -= static_cast<stat_t>(gu[B2]);
          grad_k = static_cast<stat_t>(gu[B2 + 1]);
          for (int64_t c = 0; c < B2; ++c) {
            grad_dot += static_cast<stat_t>(gu[c]) *
                        kernels::borrowed_coefficient(m[c] - static_cast<stat_t>(base[c]),
                                                      static_cast<stat_t>(weight[c]), mixed[s]);
          }
        }
        adjoint[s] = kernels::mixed_adjoint(stats, mixed[s], grad_a, grad_k, grad_dot, D);
        own.add(adjoint[s], mixed[s]);
      }
      for (int64_t c = 0; c < B2; ++c) {
        const stat_t xb = static_cast<stat_t>(base[c]), g = static_cast<stat_t>(weight[c]);
        const stat_t mean_term = mean_grad == nullptr ? stat_t(0) : static_cast<stat_t>(mean_grad[c]) * mean_share;
        stat_t base_term = 0, weight_term = 0;
        for (int64_t s = 0; s < S; ++s) {
          const stat_t gu_c =
              grad_coefficients == nullptr ? stat_t(0)
                                           : static_cast<stat_t>(grad_coefficients[(s * per_scale + item) * C + c]);
          const stat_t m = borrowed[s * B2 + c];
          borrowed_grad[(s * per_scale + item) * B2 + c] =
              kernels::borrowed_adjoint(adjoint[s], gu_c * g, m - mixed[s].mean) + mean_term;
          base_term += kernels::base_borrowed_adjoint(adjoint[s], gu_c * g, xb - stats.mean);
          weight_term += gu_c * (m - xb) * adjoint[s].inv_sd;
        }
        base_grad[item * B2 + c] = base_term;
        weight_terms[item * B2 + c] = weight_term;
      }
      if constexpr (std::is_same_v<scalar_t, float>) {
        own_gradient_f32(out + B2, base + B2, mean_grad == nullptr ? nullptr : mean_grad + B2, own.slope, stats.mean,
                         own.intercept, D - B2);
      } else {
        for (int64_t c = B2; c < D; ++c) {
          const stat_t value = own.slope * (static_cast<stat_t>(base[c]) - stats.mean) - own.intercept;
          out[c] = static_cast<scalar_t>(mean_grad == nullptr ? value : value + static_cast<stat_t>(mean_grad[c]));
        }
      }
    }
  });

  at::parallel_for(0, R * tokens_in, grain_for(B2 * S + 1), [&](int64_t begin, int64_t end) {
    std::vector<stat_t> sum(B2);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / tokens_in, token = item % tokens_in;
      if (token == 0) continue;  // the CLS row: pass A
      scalar_t* out = grad_x + item * D;
      const int64_t j = kept_index(phase[row], token, mix.mask);
      if (j < 0) {  // masked in this frame: neither a base token nor read by a mixed one
        std::fill_n(out, D, scalar_t(0));
        continue;
      }
      const int64_t slot = 1 + j, t = row % T;
      std::copy_n(base_grad.data() + (row * tokens_out + slot) * B2, B2, sum.data());
      for (int64_t s = 0; s < S; ++s) {
        for (const BorrowedRun& run : tables.runs[s]) {
          const auto readers = reader_frames(t, run.delta, T, mix.mixing);
          for (int64_t reader = readers.first; reader <= readers.last; ++reader) {
            const stat_t* g = borrowed_grad.data() + (s * per_scale + (row + reader - t) * tokens_out + slot) * B2;
            for (int64_t c = run.start; c < run.stop; ++c) sum[c] += g[c];
          }
        }
      }
      for (int64_t c = 0; c < B2; ++c) out[c] = static_cast<scalar_t>(sum[c]);
    }
  });

  std::fill_n(grad_weight, D, factor_t(0));
  for (int64_t c = 0; c < B2; ++c) {
    stat_t sum = 0;
    for (int64_t item = 0; item < per_scale; ++item) sum += weight_terms[item * B2 + c];
    grad_weight[c] = static_cast<factor_t>(sum);
  }
}

// ---------------------------------------------------------------------------
// project_mixed: the rank-(2I+2) product coefficients @ basis^T is one BLAS
// GEMM (multi-threaded by BLAS itself) written straight into the output when
// qkv's dtype is the factors' (float32, float64), else into a scratch tensor
// in the factor dtype; then one parallel pass over the output rows adds the
// gathered, rescaled rows gain * qkv[base] and rounds once to qkv's dtype.
// ---------------------------------------------------------------------------

template <typename scalar_t, typename factor_t>
void project_mixed_kernel(const scalar_t* qkv, const factor_t* gain, const factor_t* product, const int64_t* phase,
                          scalar_t* out, const detail::ProjectPlan& plan) {
  const int64_t W = plan.width, R = plan.rows;
  const int64_t tokens_in = plan.mask.num_tokens(), tokens_out = 1 + plan.mask.num_kept();
  const int64_t per_scale = R * tokens_out;
  at::parallel_for(0, plan.num_scales * per_scale, grain_for(W), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const TokenPlace at = place_of(item % per_scale, phase, plan.mask);
      const scalar_t* source = qkv + (at.row * tokens_in + at.token) * W;
      const factor_t* low_rank = product + item * W;  // may be this row of out itself
      const factor_t a = gain[item];
      scalar_t* row = out + item * W;
      if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<factor_t, float>) {
        rescale_add_f32(row, low_rank, source, a, W);
      } else {
        for (int64_t c = 0; c < W; ++c) row[c] = static_cast<scalar_t>(low_rank[c] + a * static_cast<factor_t>(source[c]));
      }
    }
  });
}

// grad_qkv and grad_gain of project_mixed: one item per token of qkv. A masked token's gradient
// is zero; a base token (CLS, kept token j) gathers its slot of every scale:
// grad_qkv = sum_s gain_s * G_s (in the factor dtype, rounded once), grad_gain_s = G_s . qkv.
template <typename scalar_t, typename factor_t>
void project_mixed_backward_kernel(const scalar_t* grad, const scalar_t* qkv, const factor_t* gain,
                                   const int64_t* phase, scalar_t* grad_qkv, factor_t* grad_gain,
                                   const detail::ProjectPlan& plan) {
  const int64_t W = plan.width, R = plan.rows, S = plan.num_scales;
  const int64_t tokens_in = plan.mask.num_tokens(), tokens_out = 1 + plan.mask.num_kept();
  const int64_t per_scale = R * tokens_out;
  at::parallel_for(0, R * tokens_in, grain_for(2 * S * W), [&](int64_t begin, int64_t end) {
    std::vector<factor_t> sum(W);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / tokens_in, token = item % tokens_in;
      scalar_t* out = grad_qkv + item * W;
      const int64_t j = token == 0 ? 0 : kept_index(phase[row], token, plan.mask);
      if (j < 0) {
        std::fill_n(out, W, scalar_t(0));
        continue;
      }
      const int64_t mixed_token = row * tokens_out + (token == 0 ? 0 : 1 + j);
      const scalar_t* values = qkv + item * W;
      std::fill(sum.begin(), sum.end(), factor_t(0));
      for (int64_t s = 0; s < S; ++s) {
        const scalar_t* g = grad + (s * per_scale + mixed_token) * W;
        const factor_t a = gain[s * per_scale + mixed_token];
        if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<factor_t, float>) {
          grad_gain[s * per_scale + mixed_token] = static_cast<factor_t>(dot_f32(g, values, W));
          scaled_add_f32(sum.data(), a, g, W);
        } else {
          grad_gain[s * per_scale + mixed_token] = static_cast<factor_t>(
              lane_sum(W, [&](int64_t c) { return static_cast<stat_t>(g[c]) * static_cast<stat_t>(values[c]); }));
          for (int64_t c = 0; c < W; ++c) sum[c] += a * static_cast<factor_t>(g[c]);
        }
      }
      for (int64_t c = 0; c < W; ++c) out[c] = static_cast<scalar_t>(sum[c]);
    }
  });
}

// Calls body.template operator()<factor_t>() for the factor dtype of these factors (float, double).
template <typename Body>
void with_factor_type(at::ScalarType dtype, Body&& body) {
  if (dtype == at::kDouble) {
    body.template operator()<double>();
  } else {
    body.template operator()<float>();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mix_factors_cpu(const at::Tensor& x, const at::Tensor& ln_weight,
                                                              const at::Tensor& phase, int64_t num_frames,
                                                              at::IntArrayRef window, int64_t masked,
                                                              at::IntArrayRef scales, int64_t channel_fold,
                                                              std::string_view mixing, double eps) {
  const auto plan = detail::check_mix_factors(x, ln_weight, num_frames, window, masked, scales, channel_fold, mixing, eps);
  const auto phase64 = detail::phase_as_int64(phase, plan.mix.rows, num_frames, x);
  const auto input = x.contiguous();
  const auto weight = ln_weight.contiguous();
  const int64_t S = static_cast<int64_t>(plan.mix.scales.size()), tokens_out = 1 + plan.mix.mask.num_kept();
  auto gain = at::empty({S, plan.mix.rows, tokens_out}, ln_weight.options());
  auto coefficients = at::empty({S, plan.mix.rows, tokens_out, plan.rank()}, ln_weight.options());
  auto mixed_mean = at::empty({plan.mix.rows, tokens_out, plan.mix.channels}, x.options());
  if (mixed_mean.numel() == 0) return {gain, coefficients, mixed_mean};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stdd::mix_factors (CPU)", [&] {
    using factor_t = factor_type<scalar_t>;
    mix_factors_kernel<scalar_t, factor_t>(input.const_data_ptr<scalar_t>(), weight.const_data_ptr<factor_t>(),
                                           phase64.const_data_ptr<int64_t>(), gain.mutable_data_ptr<factor_t>(),
                                           coefficients.mutable_data_ptr<factor_t>(),
                                           mixed_mean.mutable_data_ptr<scalar_t>(), plan);
  });
  return {gain, coefficients, mixed_mean};
}

template <typename scalar_t>
const scalar_t* pointer_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor> mix_factors_backward_cpu(
    const std::optional<at::Tensor>& grad_gain, const std::optional<at::Tensor>& grad_coefficients,
    const std::optional<at::Tensor>& grad_mixed_mean, const at::Tensor& x, const at::Tensor& ln_weight,
    const at::Tensor& phase, int64_t num_frames, at::IntArrayRef window, int64_t masked, at::IntArrayRef scales,
    int64_t channel_fold, std::string_view mixing, double eps) {
  const auto plan = detail::check_mix_factors_backward(grad_gain, grad_coefficients, grad_mixed_mean, x, ln_weight,
                                                       num_frames, window, masked, scales, channel_fold, mixing, eps);
  const auto phase64 = detail::phase_as_int64(phase, plan.mix.rows, num_frames, x);
  const auto input = x.contiguous();
  const auto weight = ln_weight.contiguous();
  const auto g_gain = contiguous_or_undefined(grad_gain);
  const auto g_coefficients = contiguous_or_undefined(grad_coefficients);
  const auto g_mean = contiguous_or_undefined(grad_mixed_mean);
  auto grad_x = at::empty(x.sizes(), x.options());
  auto grad_weight = at::empty(ln_weight.sizes(), ln_weight.options());
  if (grad_x.numel() == 0) return {grad_x, grad_weight.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stdd::mix_factors_backward (CPU)", [&] {
    using factor_t = factor_type<scalar_t>;
    mix_factors_backward_kernel<scalar_t, factor_t>(
        pointer_or_null<factor_t>(g_gain), pointer_or_null<factor_t>(g_coefficients), pointer_or_null<scalar_t>(g_mean),
        input.const_data_ptr<scalar_t>(), weight.const_data_ptr<factor_t>(), phase64.const_data_ptr<int64_t>(),
        grad_x.mutable_data_ptr<scalar_t>(), grad_weight.mutable_data_ptr<factor_t>(), plan);
  });
  return {grad_x, grad_weight};
}

at::Tensor project_mixed_cpu(const at::Tensor& qkv, const at::Tensor& gain, const at::Tensor& coefficients,
                             const at::Tensor& basis, const at::Tensor& phase, int64_t num_frames,
                             at::IntArrayRef window, int64_t masked) {
  const auto plan = detail::check_project_mixed(qkv, gain, coefficients, basis, num_frames, window, masked);
  const auto phase64 = detail::phase_as_int64(phase, plan.rows, num_frames, qkv);
  const auto values = qkv.contiguous();
  const auto gain_c = gain.contiguous();
  auto out = at::empty({plan.num_scales, plan.rows, 1 + plan.mask.num_kept(), plan.width}, qkv.options());
  if (out.numel() == 0) return out;
  // The low-rank product, (S*B*T*(1+N_keep), W) in the factor dtype: the output itself when the dtypes agree.
  const bool in_place = qkv.scalar_type() == gain.scalar_type();
  auto product = in_place ? out.view({-1, plan.width}) : at::empty({out.numel() / plan.width, plan.width}, gain.options());
  at::mm_out(product, coefficients.reshape({-1, plan.rank}), basis.t());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "stdd::project_mixed (CPU)", [&] {
    with_factor_type(gain.scalar_type(), [&]<typename factor_t>() {
      project_mixed_kernel<scalar_t, factor_t>(values.const_data_ptr<scalar_t>(), gain_c.const_data_ptr<factor_t>(),
                                               product.const_data_ptr<factor_t>(), phase64.const_data_ptr<int64_t>(),
                                               out.mutable_data_ptr<scalar_t>(), plan);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> project_mixed_backward_cpu(const at::Tensor& grad_qkv_mixed, const at::Tensor& qkv,
                                                              const at::Tensor& gain, const at::Tensor& phase,
                                                              int64_t num_frames, at::IntArrayRef window,
                                                              int64_t masked) {
  const auto plan = detail::check_project_mixed_backward(grad_qkv_mixed, qkv, gain, num_frames, window, masked);
  const auto phase64 = detail::phase_as_int64(phase, plan.rows, num_frames, qkv);
  const auto grad = grad_qkv_mixed.contiguous();
  const auto values = qkv.contiguous();
  const auto gain_c = gain.contiguous();
  auto grad_qkv = at::empty(qkv.sizes(), qkv.options());
  auto grad_gain = at::empty(gain.sizes(), gain.options());
  if (grad_qkv.numel() == 0) return {grad_qkv, grad_gain.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "stdd::project_mixed_backward (CPU)", [&] {
    with_factor_type(gain.scalar_type(), [&]<typename factor_t>() {
      project_mixed_backward_kernel<scalar_t, factor_t>(
          grad.const_data_ptr<scalar_t>(), values.const_data_ptr<scalar_t>(), gain_c.const_data_ptr<factor_t>(),
          phase64.const_data_ptr<int64_t>(), grad_qkv.mutable_data_ptr<scalar_t>(),
          grad_gain.mutable_data_ptr<factor_t>(), plan);
    });
  });
  return {grad_qkv, grad_gain};
}

}  // namespace
}  // namespace stdd

TORCH_LIBRARY_IMPL(stdd, CPU, m) {
  m.impl("mix_factors", &stdd::mix_factors_cpu);
  m.impl("mix_factors_backward", &stdd::mix_factors_backward_cpu);
  m.impl("project_mixed", &stdd::project_mixed_cpu);
  m.impl("project_mixed_backward", &stdd::project_mixed_backward_cpu);
}
