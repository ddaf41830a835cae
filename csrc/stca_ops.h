// C++ API of the STCA operators (docs/stca.md). Link against the
// library built by CMakeLists.txt (or the Python extension) and call these
// like any ATen op: they go through the dispatcher, so CPU/CUDA selection,
// autograd and torch.compile tracing work the same as from Python, where the
// ops are torch.ops.stdd.mix_gather / pad_scatter / *_backward.
//
// Shapes, for B clips of T = num_frames frames and D channels:
//   x, full, residual, pad  (B*T, 1 + P*P, D)   frames of a clip contiguous, CLS first
//   mixed                   (S, B*T, 1 + N_keep, D), S = number of scales
//   phase                   (B, T) integer, values in [0, K), K = window[0]*window[1]
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

}  // namespace detail
}  // namespace stdd
