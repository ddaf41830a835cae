// Operator registration for the STCA ops: schemas (TORCH_LIBRARY(stdd)),
// argument checks shared by every device, the C++ API of stca_ops.h,
// autograd (C++ autograd::Function, so it works from C++ and Python alike)
// and meta kernels (shape-only, used by FakeTensor / torch.compile tracing).
// Device kernels: stca_cpu.cpp (CPU) and stca_cuda.cu (CUDA).
#include "stca_ops.h"

#include <cmath>
#include <sstream>
#include <string>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace stdd {
namespace detail {

Mixing parse_mixing(std::string_view mixing) {
  if (mixing == "continual") return Mixing::kContinual;
  if (mixing == "separate") return Mixing::kSeparate;
  if (mixing == "none") return Mixing::kNone;
  if (mixing == "official") return Mixing::kOfficial;
  TORCH_CHECK(false, "mixing must be one of 'continual', 'separate', 'none', 'official', got '", std::string(mixing),
              "'");
}

MaskGeometry check_mask(int64_t grid, at::IntArrayRef window, int64_t masked) {
  TORCH_CHECK(window.size() == 2 && window[0] >= 1 && window[1] >= 1,
              "window must be a pair of positive ints (w1, w2), got ", window);
  TORCH_CHECK(grid >= 1, "the patch grid side P must be positive, got ", grid);
  TORCH_CHECK(grid % window[0] == 0 && grid % window[1] == 0, "window ", window, " must tile the ", grid, "x",
              grid, " patch grid: ", grid, " is not divisible by both window sides");
  const int64_t cells = window[0] * window[1];
  TORCH_CHECK(masked >= 0 && masked < cells, "masked must be in [0, K) = [0, ", cells, ") for window ", window,
              " (at least one cell of each window is kept), got ", masked);
  return MaskGeometry{grid, window[0], window[1], masked};
}

int64_t grid_from_tokens(int64_t tokens, const char* tensor_name) {
  const int64_t patches = tokens - 1;
  int64_t side = patches > 0 ? static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(patches)))) : 0;
  while (side > 0 && side * side > patches) --side;
  while ((side + 1) * (side + 1) <= patches) ++side;
  TORCH_CHECK(patches >= 1 && side * side == patches, tensor_name,
              ".shape[1] must be 1 + P*P tokens (CLS then a square P x P patch grid), got ", tokens);
  return side;
}

void check_rows(int64_t rows, int64_t num_frames, const char* tensor_name) {
  TORCH_CHECK(num_frames >= 1, "num_frames must be a positive int, got ", num_frames);
  TORCH_CHECK(rows % num_frames == 0, tensor_name, " rows (B*T = ", rows, ") must be divisible by num_frames=",
              num_frames);
}

void check_float(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.defined(), name, " must be a defined tensor");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, name,
              " must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sym_sizes());
}

void check_same(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", like_name,
              " has ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but ", like_name, " is on ",
              like.device());
}

MixPlan plan_mix(int64_t rows, int64_t grid, int64_t channels, int64_t num_frames, at::IntArrayRef window,
                 int64_t masked, at::IntArrayRef scales, int64_t channel_fold, std::string_view mixing) {
  TORCH_CHECK(num_frames >= 1, "num_frames must be a positive int, got ", num_frames);
  MixPlan plan{check_mask(grid, window, masked), rows, num_frames, channels, 0, parse_mixing(mixing), {}};
  TORCH_CHECK(!scales.empty(), "scales must be a non-empty list of positive ints");
  for (size_t i = 0; i < scales.size(); ++i) {
    TORCH_CHECK(scales[i] >= 1, "scales must hold positive ints, got ", scales);
    for (size_t k = 0; k < i; ++k) TORCH_CHECK(scales[k] != scales[i], "scales must be distinct, got ", scales);
  }
  plan.scales = scales.vec();
  TORCH_CHECK(channel_fold >= 1, "channel_fold must be a positive int, got ", channel_fold);
  plan.mix_channels = channels / channel_fold;
  if (plan.mixing != Mixing::kNone) {
    TORCH_CHECK(plan.mix_channels >= 1, "channel_fold=", channel_fold, " leaves I = D // F = 0 mixed channels for D=",
                channels, "; use channel_fold <= D (or mixing='none')");
    TORCH_CHECK(2 * plan.mix_channels <= channels, "channel_fold=", channel_fold, " gives I=", plan.mix_channels,
                ", but 2*I must fit in D=", channels);
  }
  if (plan.mixing == Mixing::kContinual) {
    for (int64_t s : plan.scales) {
      TORCH_CHECK(plan.mix_channels % s == 0, "continual mixing needs I = D // channel_fold = ", plan.mix_channels,
                  " divisible by every scale; scale ", s, " in scales=", scales, " does not divide it");
    }
  }
  if (plan.mixing == Mixing::kOfficial) {
    int64_t deepest = 0;  // bit length of I: the last scale whose last block is not empty
    while ((plan.mix_channels >> deepest) > 0) ++deepest;
    for (int64_t s : plan.scales) {
      TORCH_CHECK(s <= deepest, "official mixing halves the channel blocks (d_i = I >> i for i < s): scale ", s,
                  " in scales=", scales, " with I = D // channel_fold = ", plan.mix_channels,
                  " has empty blocks and would equal scale ", deepest, "; use scales <= ", deepest,
                  " or a smaller channel_fold");
    }
  }
  return plan;
}

at::Tensor phase_as_int64(const at::Tensor& phase, int64_t rows, int64_t num_frames, const at::Tensor& like) {
  TORCH_CHECK(phase.defined(), "phase must be an integer tensor of shape (B, T)");
  TORCH_CHECK(at::isIntegralType(phase.scalar_type(), /*includeBool=*/false), "phase must have an integer dtype, got ",
              phase.scalar_type());
  const int64_t batch = rows / num_frames;
  TORCH_CHECK(phase.dim() == 2 && phase.size(0) == batch && phase.size(1) == num_frames,
              "phase must have shape (B, T) = (", batch, ", ", num_frames, "), got ", phase.sizes());
  TORCH_CHECK(phase.device() == like.device(), "phase is on ", phase.device(), " but the tokens are on ",
              like.device());
  return phase.to(at::kLong).contiguous();
}

MixPlan check_mix_gather(const at::Tensor& x, int64_t num_frames, at::IntArrayRef window, int64_t masked,
                         at::IntArrayRef scales, int64_t channel_fold, std::string_view mixing) {
  check_float(x, "x", 3);
  auto plan = plan_mix(x.size(0), grid_from_tokens(x.size(1), "x"), x.size(2), num_frames, window, masked, scales,
                       channel_fold, mixing);
  check_rows(plan.rows, num_frames, "x");
  return plan;
}

MixPlan check_mix_gather_backward(const at::Tensor& grad_mixed, int64_t num_frames, int64_t grid,
                                  at::IntArrayRef window, int64_t masked, at::IntArrayRef scales,
                                  int64_t channel_fold, std::string_view mixing) {
  check_float(grad_mixed, "grad_mixed", 4);
  auto plan = plan_mix(grad_mixed.size(1), grid, grad_mixed.size(3), num_frames, window, masked, scales, channel_fold,
                       mixing);
  TORCH_CHECK(grad_mixed.size(0) == static_cast<int64_t>(plan.scales.size()) &&
                  grad_mixed.size(2) == 1 + plan.mask.num_kept(),
              "grad_mixed must have shape (S, B*T, 1 + N_keep, D) with S = ", plan.scales.size(), " and 1 + N_keep = ",
              1 + plan.mask.num_kept(), ", got ", grad_mixed.sizes());
  check_rows(plan.rows, num_frames, "grad_mixed");
  return plan;
}

PadPlan check_pad_scatter(const at::Tensor& full, const at::Tensor& mixed, int64_t num_frames, at::IntArrayRef window,
                          int64_t masked, const std::optional<at::Tensor>& residual) {
  check_float(full, "full", 3);
  check_float(mixed, "mixed", 4);
  check_same(mixed, "mixed", full, "full");
  const auto mask = check_mask(grid_from_tokens(full.size(1), "full"), window, masked);
  const int64_t R = full.size(0), D = full.size(2);
  TORCH_CHECK(mixed.size(0) >= 1 && mixed.size(1) == R && mixed.size(2) == 1 + mask.num_kept() && mixed.size(3) == D,
              "mixed must have shape (S, B*T, 1 + N_keep, D) = (S, ", R, ", ", 1 + mask.num_kept(), ", ", D, "), got ",
              mixed.sizes());
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) {
    check_float(*residual, "residual", 3);
    check_same(*residual, "residual", full, "full");
    TORCH_CHECK(residual->sizes() == full.sizes(), "residual must have the shape of full ", full.sizes(), ", got ",
                residual->sizes());
  }
  check_rows(R, num_frames, "full");
  return PadPlan{mask, R, D, mixed.size(0), has_residual};
}

PadPlan check_pad_scatter_backward(const at::Tensor& grad_pad, int64_t num_frames, at::IntArrayRef window,
                                   int64_t masked, int64_t num_scales) {
  check_float(grad_pad, "grad_pad", 3);
  const auto mask = check_mask(grid_from_tokens(grad_pad.size(1), "grad_pad"), window, masked);
  TORCH_CHECK(num_scales >= 1, "num_scales must be a positive int, got ", num_scales);
  const int64_t R = grad_pad.size(0), D = grad_pad.size(2);
  check_rows(R, num_frames, "grad_pad");
  return PadPlan{mask, R, D, num_scales, /*has_residual=*/false};
}

}  // namespace detail

int64_t masked_cells(at::IntArrayRef window, double mask_ratio, std::string_view mask_rounding) {
  TORCH_CHECK(mask_rounding == "nearest" || mask_rounding == "floor",
              "mask_rounding must be 'nearest' or 'floor', got '", std::string(mask_rounding), "'");
  TORCH_CHECK(window.size() == 2 && window[0] >= 1 && window[1] >= 1,
              "window must be a pair of positive ints (w1, w2), got ", window);
  TORCH_CHECK(mask_ratio >= 0.0 && mask_ratio < 1.0, "mask_ratio must be in [0, 1), got ", mask_ratio);
  const int64_t cells = window[0] * window[1];
  const double product = mask_ratio * static_cast<double>(cells);
  // std::nearbyint rounds half to even in the default rounding mode, like Python's round();
  // "floor" is the release's int(mask_ratio * K).
  const int64_t masked =
      static_cast<int64_t>(mask_rounding == "nearest" ? std::nearbyint(product) : std::floor(product));
  TORCH_CHECK(masked < cells, "mask_ratio=", mask_ratio, " masks all ", cells, " cells of a window ", window,
              "; at least one cell must be kept");
  return masked;
}

// ---------------------------------------------------------------------------
// C++ API: calls through the dispatcher (autograd, device choice, tracing).
// ---------------------------------------------------------------------------

namespace {

using MixGatherSig = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, at::IntArrayRef, int64_t,
                                at::IntArrayRef, int64_t, std::string_view);
using MixGatherBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, at::IntArrayRef,
                                        int64_t, at::IntArrayRef, int64_t, std::string_view);
using PadScatterSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, at::IntArrayRef,
                                 int64_t, const std::optional<at::Tensor>&);
using PadScatterBackwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t,
                                                                 at::IntArrayRef, int64_t, int64_t);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace

at::Tensor mix_gather(const at::Tensor& x, const at::Tensor& phase, int64_t num_frames, at::IntArrayRef window,
                      int64_t masked, at::IntArrayRef scales, int64_t channel_fold, std::string_view mixing) {
  static auto op = op_handle<MixGatherSig>("stdd::mix_gather");
  return op.call(x, phase, num_frames, window, masked, scales, channel_fold, mixing);
}

at::Tensor mix_gather_backward(const at::Tensor& grad_mixed, const at::Tensor& phase, int64_t num_frames,
                               int64_t grid, at::IntArrayRef window, int64_t masked, at::IntArrayRef scales,
                               int64_t channel_fold, std::string_view mixing) {
  static auto op = op_handle<MixGatherBackwardSig>("stdd::mix_gather_backward");
  return op.call(grad_mixed, phase, num_frames, grid, window, masked, scales, channel_fold, mixing);
}

at::Tensor pad_scatter(const at::Tensor& full, const at::Tensor& mixed, const at::Tensor& phase, int64_t num_frames,
                       at::IntArrayRef window, int64_t masked, const std::optional<at::Tensor>& residual) {
  static auto op = op_handle<PadScatterSig>("stdd::pad_scatter");
  return op.call(full, mixed, phase, num_frames, window, masked, residual);
}

std::tuple<at::Tensor, at::Tensor> pad_scatter_backward(const at::Tensor& grad_pad, const at::Tensor& phase,
                                                        int64_t num_frames, at::IntArrayRef window, int64_t masked,
                                                        int64_t num_scales) {
  static auto op = op_handle<PadScatterBackwardSig>("stdd::pad_scatter_backward");
  return op.call(grad_pad, phase, num_frames, window, masked, num_scales);
}

namespace {

// ---------------------------------------------------------------------------
// Meta kernels: output shapes only. Rows (B*T) may be symbolic under
// torch.compile(dynamic=True); tokens and channels decide the geometry and are
// specialized (guard_int), as they are fixed by the model.
// ---------------------------------------------------------------------------

int64_t concrete(const c10::SymInt& size) { return size.guard_int(__FILE__, __LINE__); }

void check_phase_meta(const at::Tensor& phase, const c10::SymInt& rows, int64_t num_frames, const at::Tensor& like) {
  if (auto known = rows.maybe_as_int()) {
    detail::check_rows(*known, num_frames, "the tokens'");
    detail::phase_as_int64(phase, *known, num_frames, like);  // shape/dtype checks only on meta
  }
}

at::Tensor mix_gather_meta(const at::Tensor& x, const at::Tensor& phase, int64_t num_frames, at::IntArrayRef window,
                           int64_t masked, at::IntArrayRef scales, int64_t channel_fold, std::string_view mixing) {
  detail::check_float(x, "x", 3);
  const int64_t grid = detail::grid_from_tokens(concrete(x.sym_size(1)), "x");
  const auto plan = detail::plan_mix(0, grid, concrete(x.sym_size(2)), num_frames, window, masked, scales,
                                     channel_fold, mixing);
  check_phase_meta(phase, x.sym_size(0), num_frames, x);
  return at::empty_symint({c10::SymInt(static_cast<int64_t>(plan.scales.size())), x.sym_size(0),
                           c10::SymInt(1 + plan.mask.num_kept()), x.sym_size(2)},
                          x.options());
}

at::Tensor mix_gather_backward_meta(const at::Tensor& grad_mixed, const at::Tensor& phase, int64_t num_frames,
                                    int64_t grid, at::IntArrayRef window, int64_t masked, at::IntArrayRef scales,
                                    int64_t channel_fold, std::string_view mixing) {
  detail::check_float(grad_mixed, "grad_mixed", 4);
  const auto plan = detail::plan_mix(0, grid, concrete(grad_mixed.sym_size(3)), num_frames, window, masked, scales,
                                     channel_fold, mixing);
  TORCH_CHECK(concrete(grad_mixed.sym_size(0)) == static_cast<int64_t>(plan.scales.size()) &&
                  concrete(grad_mixed.sym_size(2)) == 1 + plan.mask.num_kept(),
              "grad_mixed must have shape (S, B*T, 1 + N_keep, D) with S = ", plan.scales.size(),
              " and 1 + N_keep = ", 1 + plan.mask.num_kept(), ", got ", grad_mixed.sym_sizes());
  check_phase_meta(phase, grad_mixed.sym_size(1), num_frames, grad_mixed);
  return at::empty_symint({grad_mixed.sym_size(1), c10::SymInt(plan.mask.num_tokens()), grad_mixed.sym_size(3)},
                          grad_mixed.options());
}

void check_pad_shapes_meta(const at::Tensor& full, const at::Tensor& mixed, const MaskGeometry& mask) {
  detail::check_float(mixed, "mixed", 4);
  detail::check_same(mixed, "mixed", full, "full");
  TORCH_CHECK(concrete(mixed.sym_size(0)) >= 1 && concrete(mixed.sym_size(2)) == 1 + mask.num_kept() &&
                  concrete(mixed.sym_size(3)) == concrete(full.sym_size(2)),
              "mixed must have shape (S, B*T, 1 + N_keep, D) = (S, ", full.sym_size(0), ", ", 1 + mask.num_kept(),
              ", ", full.sym_size(2), "), got ", mixed.sym_sizes());
}

at::Tensor pad_scatter_meta(const at::Tensor& full, const at::Tensor& mixed, const at::Tensor& phase,
                            int64_t num_frames, at::IntArrayRef window, int64_t masked,
                            const std::optional<at::Tensor>& residual) {
  detail::check_float(full, "full", 3);
  const auto mask = detail::check_mask(detail::grid_from_tokens(concrete(full.sym_size(1)), "full"), window, masked);
  check_pad_shapes_meta(full, mixed, mask);
  if (residual.has_value() && residual->defined()) {
    detail::check_float(*residual, "residual", 3);
    detail::check_same(*residual, "residual", full, "full");
  }
  check_phase_meta(phase, full.sym_size(0), num_frames, full);
  return at::empty_symint(full.sym_sizes(), full.options());
}

std::tuple<at::Tensor, at::Tensor> pad_scatter_backward_meta(const at::Tensor& grad_pad, const at::Tensor& phase,
                                                             int64_t num_frames, at::IntArrayRef window,
                                                             int64_t masked, int64_t num_scales) {
  detail::check_float(grad_pad, "grad_pad", 3);
  const auto mask =
      detail::check_mask(detail::grid_from_tokens(concrete(grad_pad.sym_size(1)), "grad_pad"), window, masked);
  TORCH_CHECK(num_scales >= 1, "num_scales must be a positive int, got ", num_scales);
  check_phase_meta(phase, grad_pad.sym_size(0), num_frames, grad_pad);
  auto grad_full = at::empty_symint(grad_pad.sym_sizes(), grad_pad.options());
  auto grad_mixed = at::empty_symint(
      {c10::SymInt(num_scales), grad_pad.sym_size(0), c10::SymInt(1 + mask.num_kept()), grad_pad.sym_size(2)},
      grad_pad.options());
  return {grad_full, grad_mixed};
}

// ---------------------------------------------------------------------------
// Autograd. Every op is linear in its tensor inputs, so each backward is
// another op of the family: mix_gather <-> mix_gather_backward and
// pad_scatter <-> pad_scatter_backward are adjoint pairs, which also gives
// double backward (gradgradcheck) for free.
// ---------------------------------------------------------------------------

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct MixArgs {
  int64_t num_frames, grid, masked, channel_fold;
  std::vector<int64_t> window, scales;
  std::string mixing;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["num_frames"] = num_frames;
    ctx->saved_data["grid"] = grid;
    ctx->saved_data["masked"] = masked;
    ctx->saved_data["channel_fold"] = channel_fold;
    ctx->saved_data["window"] = window;
    ctx->saved_data["scales"] = scales;
    ctx->saved_data["mixing"] = mixing;
  }
  static MixArgs load(AutogradContext* ctx) {
    return MixArgs{ctx->saved_data["num_frames"].toInt(),  ctx->saved_data["grid"].toInt(),
                   ctx->saved_data["masked"].toInt(),      ctx->saved_data["channel_fold"].toInt(),
                   ctx->saved_data["window"].toIntVector(), ctx->saved_data["scales"].toIntVector(),
                   ctx->saved_data["mixing"].toStringRef()};
  }
};

class MixGatherFunction : public torch::autograd::Function<MixGatherFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& phase, int64_t num_frames,
                            at::IntArrayRef window, int64_t masked, at::IntArrayRef scales, int64_t channel_fold,
                            std::string_view mixing) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const int64_t grid = detail::grid_from_tokens(concrete(x.sym_size(1)), "x");
    MixArgs{num_frames, grid, masked, channel_fold, window.vec(), scales.vec(), std::string(mixing)}.save(ctx);
    ctx->save_for_backward({phase});
    return mix_gather(x, phase, num_frames, window, masked, scales, channel_fold, mixing);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto a = MixArgs::load(ctx);
    const auto phase = ctx->get_saved_variables()[0];
    at::Tensor grad_x;
    if (grads[0].defined()) {
      grad_x = mix_gather_backward(grads[0], phase, a.num_frames, a.grid, a.window, a.masked, a.scales,
                                   a.channel_fold, a.mixing);
    }
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class MixGatherBackwardFunction : public torch::autograd::Function<MixGatherBackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_mixed, const at::Tensor& phase,
                            int64_t num_frames, int64_t grid, at::IntArrayRef window, int64_t masked,
                            at::IntArrayRef scales, int64_t channel_fold, std::string_view mixing) {
    at::AutoDispatchBelowADInplaceOrView guard;
    MixArgs{num_frames, grid, masked, channel_fold, window.vec(), scales.vec(), std::string(mixing)}.save(ctx);
    ctx->save_for_backward({phase});
    return mix_gather_backward(grad_mixed, phase, num_frames, grid, window, masked, scales, channel_fold, mixing);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto a = MixArgs::load(ctx);
    const auto phase = ctx->get_saved_variables()[0];
    at::Tensor grad_grad_mixed;
    if (grads[0].defined()) {
      grad_grad_mixed = mix_gather(grads[0], phase, a.num_frames, a.window, a.masked, a.scales, a.channel_fold, a.mixing);
    }
    return {grad_grad_mixed, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(),    at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class PadScatterFunction : public torch::autograd::Function<PadScatterFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& full, const at::Tensor& mixed,
                            const at::Tensor& phase, int64_t num_frames, at::IntArrayRef window, int64_t masked,
                            const std::optional<at::Tensor>& residual) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["num_frames"] = num_frames;
    ctx->saved_data["window"] = window.vec();
    ctx->saved_data["masked"] = masked;
    ctx->saved_data["num_scales"] = concrete(mixed.sym_size(0));
    ctx->saved_data["has_residual"] = residual.has_value() && residual->defined();
    ctx->save_for_backward({phase});
    return pad_scatter(full, mixed, phase, num_frames, window, masked, residual);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto phase = ctx->get_saved_variables()[0];
    const auto& grad = grads[0];
    at::Tensor grad_full, grad_mixed, grad_residual;
    if (grad.defined()) {
      std::tie(grad_full, grad_mixed) =
          pad_scatter_backward(grad, phase, ctx->saved_data["num_frames"].toInt(),
                               ctx->saved_data["window"].toIntVector(), ctx->saved_data["masked"].toInt(),
                               ctx->saved_data["num_scales"].toInt());
      if (ctx->saved_data["has_residual"].toBool()) grad_residual = grad;  // d(pad + residual)/d residual = 1
    }
    return {grad_full, grad_mixed, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), grad_residual};
  }
};

class PadScatterBackwardFunction : public torch::autograd::Function<PadScatterBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_pad, const at::Tensor& phase,
                               int64_t num_frames, at::IntArrayRef window, int64_t masked, int64_t num_scales) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["num_frames"] = num_frames;
    ctx->saved_data["window"] = window.vec();
    ctx->saved_data["masked"] = masked;
    ctx->saved_data["num_scales"] = num_scales;
    ctx->saved_data["num_tokens"] = concrete(grad_pad.sym_size(1));
    ctx->save_for_backward({phase});
    auto [grad_full, grad_mixed] = pad_scatter_backward(grad_pad, phase, num_frames, window, masked, num_scales);
    return {grad_full, grad_mixed};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto phase = ctx->get_saved_variables()[0];
    at::Tensor grad_grad_full = grads[0], grad_grad_mixed = grads[1];
    at::Tensor grad_grad_pad;
    if (grad_grad_full.defined() || grad_grad_mixed.defined()) {
      const auto window = ctx->saved_data["window"].toIntVector();
      const int64_t masked = ctx->saved_data["masked"].toInt();
      const int64_t num_tokens = ctx->saved_data["num_tokens"].toInt();
      // An undefined incoming gradient is zero; build it from the other one's sizes.
      if (!grad_grad_full.defined()) {
        grad_grad_full = grad_grad_mixed.new_zeros_symint(
            {grad_grad_mixed.sym_size(1), c10::SymInt(num_tokens), grad_grad_mixed.sym_size(3)});
      }
      if (!grad_grad_mixed.defined()) {
        const auto mask = detail::check_mask(detail::grid_from_tokens(num_tokens, "grad_pad"), window, masked);
        grad_grad_mixed = grad_grad_full.new_zeros_symint({c10::SymInt(ctx->saved_data["num_scales"].toInt()),
                                                           grad_grad_full.sym_size(0),
                                                           c10::SymInt(1 + mask.num_kept()), grad_grad_full.sym_size(2)});
      }
      grad_grad_pad = pad_scatter(grad_grad_full, grad_grad_mixed, phase, ctx->saved_data["num_frames"].toInt(),
                                  window, masked, std::nullopt);
    }
    return {grad_grad_pad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor mix_gather_autograd(const at::Tensor& x, const at::Tensor& phase, int64_t num_frames,
                               at::IntArrayRef window, int64_t masked, at::IntArrayRef scales, int64_t channel_fold,
                               std::string_view mixing) {
  return MixGatherFunction::apply(x, phase, num_frames, window, masked, scales, channel_fold, mixing);
}

at::Tensor mix_gather_backward_autograd(const at::Tensor& grad_mixed, const at::Tensor& phase, int64_t num_frames,
                                        int64_t grid, at::IntArrayRef window, int64_t masked,
                                        at::IntArrayRef scales, int64_t channel_fold, std::string_view mixing) {
  return MixGatherBackwardFunction::apply(grad_mixed, phase, num_frames, grid, window, masked, scales, channel_fold,
                                          mixing);
}

at::Tensor pad_scatter_autograd(const at::Tensor& full, const at::Tensor& mixed, const at::Tensor& phase,
                                int64_t num_frames, at::IntArrayRef window, int64_t masked,
                                const std::optional<at::Tensor>& residual) {
  return PadScatterFunction::apply(full, mixed, phase, num_frames, window, masked, residual);
}

std::tuple<at::Tensor, at::Tensor> pad_scatter_backward_autograd(const at::Tensor& grad_pad,
                                                                 const at::Tensor& phase, int64_t num_frames,
                                                                 at::IntArrayRef window, int64_t masked,
                                                                 int64_t num_scales) {
  auto grads = PadScatterBackwardFunction::apply(grad_pad, phase, num_frames, window, masked, num_scales);
  return {grads[0], grads[1]};
}

}  // namespace
}  // namespace stdd

TORCH_LIBRARY(stdd, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def(
      "mix_gather(Tensor x, Tensor phase, int num_frames, int[2] window, int masked, int[] scales, "
      "int channel_fold, str mixing) -> Tensor",
      tags);
  m.def(
      "mix_gather_backward(Tensor grad_mixed, Tensor phase, int num_frames, int grid, int[2] window, int masked, "
      "int[] scales, int channel_fold, str mixing) -> Tensor",
      tags);
  m.def(
      "pad_scatter(Tensor full, Tensor mixed, Tensor phase, int num_frames, int[2] window, int masked, "
      "Tensor? residual=None) -> Tensor",
      tags);
  m.def(
      "pad_scatter_backward(Tensor grad_pad, Tensor phase, int num_frames, int[2] window, int masked, "
      "int num_scales) -> (Tensor, Tensor)",
      tags);
}

TORCH_LIBRARY_IMPL(stdd, Meta, m) {
  m.impl("mix_gather", &stdd::mix_gather_meta);
  m.impl("mix_gather_backward", &stdd::mix_gather_backward_meta);
  m.impl("pad_scatter", &stdd::pad_scatter_meta);
  m.impl("pad_scatter_backward", &stdd::pad_scatter_backward_meta);
}

TORCH_LIBRARY_IMPL(stdd, Autograd, m) {
  m.impl("mix_gather", &stdd::mix_gather_autograd);
  m.impl("mix_gather_backward", &stdd::mix_gather_backward_autograd);
  m.impl("pad_scatter", &stdd::pad_scatter_autograd);
  m.impl("pad_scatter_backward", &stdd::pad_scatter_backward_autograd);
}
