// C++ API of the STCA operators (docs/stca.md). Link against the
// library built by CMakeLists.txt (or the Python extension) and call these
// like any ATen op: they go through the dispatcher, so CPU/CUDA selection,
// autograd and torch.compile tracing work the same as from Python, where the
// ops are torch.ops.stdd.mix_gather / pad_scatter / mix_factors /
// project_mixed / *_backward.
//
// Shapes, for B clips of T = num_frames frames and D channels:
//   x, full, residual, pad  (B*T, 1 + P*P, D)   frames of a clip contiguous, CLS first
//   mixed                   (S, B*T, 1 + N_keep, D), S = number of scales
//   phase                   (B, T) integer, values in [0, K), K = window[0]*window[1]
// and for the shared projections (docs/stca.md section 6), with 2I borrowed
// channels (0 for mixing "none") and W = 3D projection channels:
//   gain                    (S, B*T, 1 + N_keep)          float32, float64 for float64 x
//   coefficients            (S, B*T, 1 + N_keep, 2I + 2)  the dtype of gain
//   mixed_mean              (B*T, 1 + N_keep, D)          x's dtype
//   qkv                     (B*T, 1 + P*P, W)             any float dtype
//   basis                   (W, 2I + 2)                   the dtype of gain
//   qkv_mixed               (S, B*T, 1 + N_keep, W)       qkv's dtype
// The mask is given as `masked` = m cells per window (the Python API computes
// it from mask_ratio * K, rounded to nearest or floored; see masked_cells below).
#pragma once

#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

#include "stca_index.h"

namespace stdd {

// Window-shift masking + multi-scale channel mixing (spec steps 1-2):
// x (B*T, 1+P*P, D) -> mixed (S, B*T, 1+N_keep, D). mixing: "continual" |
// "separate" | "none" | "official" (the authors' release, docs/stca.md);
// I = D / channel_fold channels are mixed per direction.
at::Tensor mix_gather(
    const at::Tensor& x, const at::Tensor& phase, int64_t num_frames, at::IntArrayRef window,
    int64_t masked, at::IntArrayRef scales, int64_t channel_fold, std::string_view mixing);

// Padding (spec step 4): full with CLS and the kept tokens replaced by the
// mean of mixed over scales, plus residual when given.
at::Tensor pad_scatter(
    const at::Tensor& full, const at::Tensor& mixed, const at::Tensor& phase, int64_t num_frames,
    at::IntArrayRef window, int64_t masked, const std::optional<at::Tensor>& residual = std::nullopt);

// Gradient of mix_gather with respect to x: (S, B*T, 1+N_keep, D) -> (B*T, 1+P*P, D).
at::Tensor mix_gather_backward(
    const at::Tensor& grad_mixed, const at::Tensor& phase, int64_t num_frames, int64_t grid,
    at::IntArrayRef window, int64_t masked, at::IntArrayRef scales, int64_t channel_fold,
    std::string_view mixing);

// Gradients of pad_scatter with respect to full and mixed (that of residual
// is grad_pad itself).
std::tuple<at::Tensor, at::Tensor> pad_scatter_backward(
    const at::Tensor& grad_pad, const at::Tensor& phase, int64_t num_frames, at::IntArrayRef window,
    int64_t masked, int64_t num_scales);

// Shared projections, step one (docs/stca.md section 6): per mixed token the
// factors that turn its base token's projection into its own, without
// forming the mixed tokens. x (B*T, 1+P*P, D) any float dtype, ln_weight (D,)
// the LayerNorm's weight g in the factor dtype (float64 for float64 x, else
// float32), eps its epsilon. Returns (gain, coefficients, mixed_mean):
// gain a = sd_x / sd_m, coefficients [(m - x)[:2I] * g[:2I] / sd_m, 1 - a,
// (mu_x - mu_m) / sd_m] and mixed_mean = mix_gather(x).mean(0).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mix_factors(
    const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& phase, int64_t num_frames,
    at::IntArrayRef window, int64_t masked, at::IntArrayRef scales, int64_t channel_fold, std::string_view mixing,
    double eps);

// Gradients of mix_factors with respect to x and ln_weight, given those of its
// three outputs (an absent one is zero). Not differentiable itself: a double
// backward through mix_factors raises.
std::tuple<at::Tensor, at::Tensor> mix_factors_backward(
    const std::optional<at::Tensor>& grad_gain, const std::optional<at::Tensor>& grad_coefficients,
    const std::optional<at::Tensor>& grad_mixed_mean, const at::Tensor& x, const at::Tensor& ln_weight,
    const at::Tensor& phase, int64_t num_frames, at::IntArrayRef window, int64_t masked, at::IntArrayRef scales,
    int64_t channel_fold, std::string_view mixing, double eps);

// Shared projections, step two: qkv_mixed[s, r, i] = gain[s, r, i] * qkv[r, base(r, i)]
// + coefficients[s, r, i] @ basis^T, computed in the dtype of gain and rounded
// once to qkv's; base(r, 0) is the CLS, base(r, 1 + j) kept token j.
at::Tensor project_mixed(const at::Tensor& qkv, const at::Tensor& gain, const at::Tensor& coefficients,
                         const at::Tensor& basis, const at::Tensor& phase, int64_t num_frames, at::IntArrayRef window,
                         int64_t masked);

// The gradients of project_mixed with respect to qkv (the sum over scales of
// gain * grad at each base token, zero at masked tokens; qkv's dtype) and gain
// (grad . qkv[base], gain's dtype). Those of coefficients and basis are
// GEMMs (grad @ basis and grad^T @ coefficients), which the autograd formula
// of project_mixed calls directly. Not differentiable itself.
std::tuple<at::Tensor, at::Tensor> project_mixed_backward(const at::Tensor& grad_qkv_mixed, const at::Tensor& qkv,
                                                          const at::Tensor& gain, const at::Tensor& phase,
                                                          int64_t num_frames, at::IntArrayRef window, int64_t masked);

// m masked cells per window of K = w1*w2, as the Python API computes it:
// mask_rounding "nearest": round(mask_ratio * K) with Python's rounding (half
// to even); "floor": floor(mask_ratio * K), the authors' release. Throws
// unless 0 <= mask_ratio < 1 and m < K.
int64_t masked_cells(at::IntArrayRef window, double mask_ratio, std::string_view mask_rounding = "nearest");

namespace detail {

// Everything a mix_gather kernel needs besides the tensors; validated.
struct MixPlan {
  MaskGeometry mask;
  int64_t rows;          // B*T
  int64_t num_frames;    // T
  int64_t channels;      // D
  int64_t mix_channels;  // I
  Mixing mixing;
  std::vector<int64_t> scales;
};

Mixing parse_mixing(std::string_view mixing);
MaskGeometry check_mask(int64_t grid, at::IntArrayRef window, int64_t masked);
// Checks the geometry arguments of mix_gather / mix_gather_backward (every
// error names the argument); rows may be symbolic in meta kernels, so it is
// checked by check_rows.
MixPlan plan_mix(
    int64_t rows, int64_t grid, int64_t channels, int64_t num_frames, at::IntArrayRef window,
    int64_t masked, at::IntArrayRef scales, int64_t channel_fold, std::string_view mixing);
void check_rows(int64_t rows, int64_t num_frames, const char* tensor_name);
int64_t grid_from_tokens(int64_t tokens, const char* tensor_name);
void check_float(const at::Tensor& t, const char* name, int64_t dim);
// (B, T) integer phase on `device` with B*T = rows; returns it as contiguous int64.
at::Tensor phase_as_int64(const at::Tensor& phase, int64_t rows, int64_t num_frames, const at::Tensor& like);
void check_same(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name);

// Everything a pad_scatter kernel needs besides the tensors; validated.
struct PadPlan {
  MaskGeometry mask;
  int64_t rows;        // B*T
  int64_t channels;    // D
  int64_t num_scales;  // S
  bool has_residual;   // pad_scatter only: residual given (and defined)
};

// Argument checks of the device entry points (stca_cpu.cpp, stca_cuda.cu),
// one per op, so that every device accepts and rejects exactly the same calls
// with the same messages: dtypes, dims, shapes and devices of the tensors and
// the geometry, in that order. The phase tensor is checked (and converted) by
// phase_as_int64 afterwards, inside the caller's device guard. The meta
// kernels (stca_ops.cpp) keep their own checks: their rows may be symbolic.
MixPlan check_mix_gather(const at::Tensor& x, int64_t num_frames, at::IntArrayRef window, int64_t masked,
                         at::IntArrayRef scales, int64_t channel_fold, std::string_view mixing);
MixPlan check_mix_gather_backward(const at::Tensor& grad_mixed, int64_t num_frames, int64_t grid,
                                  at::IntArrayRef window, int64_t masked, at::IntArrayRef scales,
                                  int64_t channel_fold, std::string_view mixing);
PadPlan check_pad_scatter(const at::Tensor& full, const at::Tensor& mixed, int64_t num_frames, at::IntArrayRef window,
                          int64_t masked, const std::optional<at::Tensor>& residual);
PadPlan check_pad_scatter_backward(const at::Tensor& grad_pad, int64_t num_frames, at::IntArrayRef window,
                                   int64_t masked, int64_t num_scales);

// The factor dtype of tokens of this dtype: float64 for float64, else float32.
at::ScalarType factor_dtype(at::ScalarType dtype);

// Everything a mix_factors kernel needs besides the tensors; validated.
struct FactorPlan {
  MixPlan mix;
  int64_t borrowed;  // 2I: channels a mixed token may take from other frames (0 without mixing)
  double eps;        // the LayerNorm's epsilon
  int64_t rank() const { return borrowed + 2; }  // coefficients per mixed token: [u, 1 - a, k]
};

// Everything a project_mixed kernel needs besides the tensors; validated.
struct ProjectPlan {
  MaskGeometry mask;
  int64_t rows;        // B*T
  int64_t num_scales;  // S
  int64_t width;       // W, channels of qkv (3D)
  int64_t rank;        // 2I + 2, columns of coefficients and basis
};

FactorPlan check_mix_factors(const at::Tensor& x, const at::Tensor& ln_weight, int64_t num_frames,
                             at::IntArrayRef window, int64_t masked, at::IntArrayRef scales, int64_t channel_fold,
                             std::string_view mixing, double eps);
FactorPlan check_mix_factors_backward(const std::optional<at::Tensor>& grad_gain,
                                      const std::optional<at::Tensor>& grad_coefficients,
                                      const std::optional<at::Tensor>& grad_mixed_mean, const at::Tensor& x,
                                      const at::Tensor& ln_weight, int64_t num_frames, at::IntArrayRef window,
                                      int64_t masked, at::IntArrayRef scales, int64_t channel_fold,
                                      std::string_view mixing, double eps);
ProjectPlan check_project_mixed(const at::Tensor& qkv, const at::Tensor& gain, const at::Tensor& coefficients,
                                const at::Tensor& basis, int64_t num_frames, at::IntArrayRef window, int64_t masked);
ProjectPlan check_project_mixed_backward(const at::Tensor& grad_qkv_mixed, const at::Tensor& qkv,
                                         const at::Tensor& gain, int64_t num_frames, at::IntArrayRef window,
                                         int64_t masked);

}  // namespace detail
}  // namespace stdd
