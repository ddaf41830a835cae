// Operator registration for the shared projections (docs/stca.md section 6):
// schemas (a fragment of the stdd library that stca_ops.cpp defines),
// argument checks shared by every device, the C++ API of stca_ops.h,
// autograd and meta kernels. Device kernels: stca_projection_cpu.cpp (CPU)
// and stca_projection_cuda.cu (CUDA).
//
// Autograd: mix_factors -> mix_factors_backward (grad of x and ln_weight);
// project_mixed -> project_mixed_backward (grad of qkv and gain) plus two
// plain GEMMs for coefficients and basis. The backward ops are not linear in
// the saved inputs, so unlike mix_gather / pad_scatter they have no adjoint
// in the family: they are first order only, and a double backward through
// them raises (their autograd kernels below record a node that refuses).
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "stca_ops.h"

namespace stdd {
namespace detail {

at::ScalarType factor_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

namespace {

// ln_weight: (D,) in the factor dtype of x, on x's device.
void check_ln_weight(const at::Tensor& ln_weight, const at::Tensor& x, int64_t channels) {
  TORCH_CHECK(ln_weight.defined(), "ln_weight must be a defined tensor");
  const auto wanted = factor_dtype(x.scalar_type());
  TORCH_CHECK(ln_weight.scalar_type() == wanted, "ln_weight must have the factor dtype of x (", wanted, " for x of ",
              x.scalar_type(), "), got ", ln_weight.scalar_type());
  TORCH_CHECK(ln_weight.dim() == 1 && ln_weight.sym_size(0) == channels, "ln_weight must have shape (D,) = (",
              channels, ",), got ", ln_weight.sym_sizes());
  TORCH_CHECK(ln_weight.device() == x.device(), "ln_weight is on ", ln_weight.device(), " but x is on ", x.device());
}

void check_eps(double eps) { TORCH_CHECK(eps >= 0.0, "eps must be a number >= 0, got ", eps); }

int64_t borrowed_channels(const MixPlan& mix) { return mix.mixing == Mixing::kNone ? 0 : 2 * mix.mix_channels; }

// An optional gradient: absent, or `sizes` with `dtype` on `like`'s device.
void check_optional_grad(const std::optional<at::Tensor>& grad, const char* name, at::IntArrayRef sizes,
                         at::ScalarType dtype, const at::Tensor& like) {
  if (!grad.has_value() || !grad->defined()) return;
  TORCH_CHECK(grad->scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", grad->scalar_type());
  TORCH_CHECK(grad->sizes() == sizes, name, " must have shape ", sizes, ", got ", grad->sizes());
  TORCH_CHECK(grad->device() == like.device(), name, " is on ", grad->device(), " but x is on ", like.device());
}

// gain (S, B*T, 1 + N_keep) in float32 / float64 on qkv's device; returns S.
int64_t check_gain(const at::Tensor& gain, const at::Tensor& qkv, int64_t rows, const MaskGeometry& mask) {
  TORCH_CHECK(gain.defined(), "gain must be a defined tensor");
  TORCH_CHECK(gain.scalar_type() == at::kFloat || gain.scalar_type() == at::kDouble,
              "gain must be float32 or float64 (the factor dtype), got ", gain.scalar_type());
  TORCH_CHECK(gain.dim() == 3 && gain.size(0) >= 1 && gain.size(1) == rows && gain.size(2) == 1 + mask.num_kept(),
              "gain must have shape (S, B*T, 1 + N_keep) = (S, ", rows, ", ", 1 + mask.num_kept(), "), got ",
              gain.sizes());
  TORCH_CHECK(gain.device() == qkv.device(), "gain is on ", gain.device(), " but qkv is on ", qkv.device());
  return gain.size(0);
}

}  // namespace

FactorPlan check_mix_factors(const at::Tensor& x, const at::Tensor& ln_weight, int64_t num_frames,
                             at::IntArrayRef window, int64_t masked, at::IntArrayRef scales, int64_t channel_fold,
                             std::string_view mixing, double eps) {
  auto mix = check_mix_gather(x, num_frames, window, masked, scales, channel_fold, mixing);
  check_ln_weight(ln_weight, x, mix.channels);
  check_eps(eps);
  const int64_t borrowed = borrowed_channels(mix);
  return FactorPlan{std::move(mix), borrowed, eps};
}

FactorPlan check_mix_factors_backward(const std::optional<at::Tensor>& grad_gain,
                                      const std::optional<at::Tensor>& grad_coefficients,
                                      const std::optional<at::Tensor>& grad_mixed_mean, const at::Tensor& x,
                                      const at::Tensor& ln_weight, int64_t num_frames, at::IntArrayRef window,
                                      int64_t masked, at::IntArrayRef scales, int64_t channel_fold,
                                      std::string_view mixing, double eps) {
  auto plan = check_mix_factors(x, ln_weight, num_frames, window, masked, scales, channel_fold, mixing, eps);
  const int64_t S = static_cast<int64_t>(plan.mix.scales.size()), R = plan.mix.rows;
  const int64_t tokens_out = 1 + plan.mix.mask.num_kept();
  const auto dtype = ln_weight.scalar_type();
  check_optional_grad(grad_gain, "grad_gain", {S, R, tokens_out}, dtype, x);
  check_optional_grad(grad_coefficients, "grad_coefficients", {S, R, tokens_out, plan.rank()}, dtype, x);
  check_optional_grad(grad_mixed_mean, "grad_mixed_mean", {R, tokens_out, plan.mix.channels}, x.scalar_type(), x);
  return plan;
}

ProjectPlan check_project_mixed(const at::Tensor& qkv, const at::Tensor& gain, const at::Tensor& coefficients,
                                const at::Tensor& basis, int64_t num_frames, at::IntArrayRef window, int64_t masked) {
  check_float(qkv, "qkv", 3);
  const auto mask = check_mask(grid_from_tokens(qkv.size(1), "qkv"), window, masked);
  const int64_t R = qkv.size(0), W = qkv.size(2);
  const int64_t S = check_gain(gain, qkv, R, mask);
  TORCH_CHECK(coefficients.defined() && coefficients.dim() == 4, "coefficients must be a 4-D tensor, got shape ",
              coefficients.defined() ? coefficients.sizes() : at::IntArrayRef());
  const int64_t C = coefficients.size(3);
  TORCH_CHECK(coefficients.sizes() == at::IntArrayRef({S, R, 1 + mask.num_kept(), C}),
              "coefficients must have shape (S, B*T, 1 + N_keep, 2I + 2) = (", S, ", ", R, ", ", 1 + mask.num_kept(),
              ", 2I + 2), got ", coefficients.sizes());
  check_same(coefficients, "coefficients", gain, "gain");
  TORCH_CHECK(basis.defined() && basis.dim() == 2 && basis.size(0) == W && basis.size(1) == C,
              "basis must have shape (W, 2I + 2) = (", W, ", ", C, ") for qkv of width W = ", W, ", got ",
              basis.defined() ? basis.sizes() : at::IntArrayRef());
  check_same(basis, "basis", gain, "gain");
  check_rows(R, num_frames, "qkv");
  return ProjectPlan{mask, R, S, W, C};
}

ProjectPlan check_project_mixed_backward(const at::Tensor& grad_qkv_mixed, const at::Tensor& qkv,
                                         const at::Tensor& gain, int64_t num_frames, at::IntArrayRef window,
                                         int64_t masked) {
  check_float(qkv, "qkv", 3);
  const auto mask = check_mask(grid_from_tokens(qkv.size(1), "qkv"), window, masked);
  const int64_t R = qkv.size(0), W = qkv.size(2);
  const int64_t S = check_gain(gain, qkv, R, mask);
  check_float(grad_qkv_mixed, "grad_qkv_mixed", 4);
  check_same(grad_qkv_mixed, "grad_qkv_mixed", qkv, "qkv");
  TORCH_CHECK(grad_qkv_mixed.sizes() == at::IntArrayRef({S, R, 1 + mask.num_kept(), W}),
              "grad_qkv_mixed must have shape (S, B*T, 1 + N_keep, W) = (", S, ", ", R, ", ", 1 + mask.num_kept(),
              ", ", W, "), got ", grad_qkv_mixed.sizes());
  check_rows(R, num_frames, "qkv");
  return ProjectPlan{mask, R, S, W, 0};
}

}  // namespace detail

// ---------------------------------------------------------------------------
// C++ API: calls through the dispatcher (autograd, device choice, tracing).
// ---------------------------------------------------------------------------

namespace {

using MixFactorsSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, int64_t, at::IntArrayRef,
                                                                    int64_t, at::IntArrayRef, int64_t,
                                                                    std::string_view, double);
using MixFactorsBackwardSig = std::tuple<at::Tensor, at::Tensor>(
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, at::IntArrayRef, int64_t, at::IntArrayRef,
    int64_t, std::string_view, double);
using ProjectMixedSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, int64_t, at::IntArrayRef, int64_t);
using ProjectMixedBackwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, const at::Tensor&, int64_t,
                                                                   at::IntArrayRef, int64_t);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mix_factors(const at::Tensor& x, const at::Tensor& ln_weight,
                                                          const at::Tensor& phase, int64_t num_frames,
                                                          at::IntArrayRef window, int64_t masked,
                                                          at::IntArrayRef scales, int64_t channel_fold,
                                                          std::string_view mixing, double eps) {
  static auto op = op_handle<MixFactorsSig>("stdd::mix_factors");
  return op.call(x, ln_weight, phase, num_frames, window, masked, scales, channel_fold, mixing, eps);
}

std::tuple<at::Tensor, at::Tensor> mix_factors_backward(
    const std::optional<at::Tensor>& grad_gain, const std::optional<at::Tensor>& grad_coefficients,
    const std::optional<at::Tensor>& grad_mixed_mean, const at::Tensor& x, const at::Tensor& ln_weight,
    const at::Tensor& phase, int64_t num_frames, at::IntArrayRef window, int64_t masked, at::IntArrayRef scales,
    int64_t channel_fold, std::string_view mixing, double eps) {
  static auto op = op_handle<MixFactorsBackwardSig>("stdd::mix_factors_backward");
  return op.call(grad_gain, grad_coefficients, grad_mixed_mean, x, ln_weight, phase, num_frames, window, masked,
                 scales, channel_fold, mixing, eps);
}

at::Tensor project_mixed(const at::Tensor& qkv, const at::Tensor& gain, const at::Tensor& coefficients,
                         const at::Tensor& basis, const at::Tensor& phase, int64_t num_frames, at::IntArrayRef window,
                         int64_t masked) {
  static auto op = op_handle<ProjectMixedSig>("stdd::project_mixed");
  return op.call(qkv, gain, coefficients, basis, phase, num_frames, window, masked);
}

std::tuple<at::Tensor, at::Tensor> project_mixed_backward(const at::Tensor& grad_qkv_mixed, const at::Tensor& qkv,
                                                          const at::Tensor& gain, const at::Tensor& phase,
                                                          int64_t num_frames, at::IntArrayRef window, int64_t masked) {
  static auto op = op_handle<ProjectMixedBackwardSig>("stdd::project_mixed_backward");
  return op.call(grad_qkv_mixed, qkv, gain, phase, num_frames, window, masked);
}

namespace {

// ---------------------------------------------------------------------------
// Meta kernels: output shapes only. Rows (B*T) may be symbolic under
// torch.compile(dynamic=True); tokens, channels and the number of scales
// decide the geometry and are specialized (guard_int).
// ---------------------------------------------------------------------------

int64_t concrete(const c10::SymInt& size) { return size.guard_int(__FILE__, __LINE__); }

void check_phase_meta(const at::Tensor& phase, const c10::SymInt& rows, int64_t num_frames, const at::Tensor& like) {
  if (auto known = rows.maybe_as_int()) {
    detail::check_rows(*known, num_frames, "the tokens'");
    detail::phase_as_int64(phase, *known, num_frames, like);  // shape/dtype checks only on meta
  }
}

detail::FactorPlan plan_factors_meta(const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& phase,
                                     int64_t num_frames, at::IntArrayRef window, int64_t masked,
                                     at::IntArrayRef scales, int64_t channel_fold, std::string_view mixing,
                                     double eps) {
  detail::check_float(x, "x", 3);
  const int64_t grid = detail::grid_from_tokens(concrete(x.sym_size(1)), "x");
  auto mix = detail::plan_mix(0, grid, concrete(x.sym_size(2)), num_frames, window, masked, scales, channel_fold,
                              mixing);
  detail::check_ln_weight(ln_weight, x, mix.channels);
  detail::check_eps(eps);
  check_phase_meta(phase, x.sym_size(0), num_frames, x);
  const int64_t borrowed = detail::borrowed_channels(mix);
  return detail::FactorPlan{std::move(mix), borrowed, eps};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mix_factors_meta(const at::Tensor& x, const at::Tensor& ln_weight,
                                                               const at::Tensor& phase, int64_t num_frames,
                                                               at::IntArrayRef window, int64_t masked,
                                                               at::IntArrayRef scales, int64_t channel_fold,
                                                               std::string_view mixing, double eps) {
  const auto plan = plan_factors_meta(x, ln_weight, phase, num_frames, window, masked, scales, channel_fold, mixing, eps);
  const c10::SymInt S(static_cast<int64_t>(plan.mix.scales.size()));
  const c10::SymInt tokens_out(1 + plan.mix.mask.num_kept());
  return {at::empty_symint({S, x.sym_size(0), tokens_out}, ln_weight.options()),
          at::empty_symint({S, x.sym_size(0), tokens_out, c10::SymInt(plan.rank())}, ln_weight.options()),
          at::empty_symint({x.sym_size(0), tokens_out, x.sym_size(2)}, x.options())};
}

std::tuple<at::Tensor, at::Tensor> mix_factors_backward_meta(
    const std::optional<at::Tensor>& grad_gain, const std::optional<at::Tensor>& grad_coefficients,
    const std::optional<at::Tensor>& grad_mixed_mean, const at::Tensor& x, const at::Tensor& ln_weight,
    const at::Tensor& phase, int64_t num_frames, at::IntArrayRef window, int64_t masked, at::IntArrayRef scales,
    int64_t channel_fold, std::string_view mixing, double eps) {
  plan_factors_meta(x, ln_weight, phase, num_frames, window, masked, scales, channel_fold, mixing, eps);
  for (const auto* grad : {&grad_gain, &grad_coefficients}) {
    if (grad->has_value() && (*grad)->defined()) {
      detail::check_same(**grad, "a factor's gradient", ln_weight, "ln_weight");
    }
  }
  if (grad_mixed_mean.has_value() && grad_mixed_mean->defined()) {
    detail::check_same(*grad_mixed_mean, "grad_mixed_mean", x, "x");
  }
  return {at::empty_symint(x.sym_sizes(), x.options()), at::empty_symint(ln_weight.sym_sizes(), ln_weight.options())};
}

// qkv, gain: dtypes, dims and the fixed sizes; returns the mask geometry.
MaskGeometry check_projection_meta(const at::Tensor& qkv, const at::Tensor& gain, at::IntArrayRef window,
                                   int64_t masked) {
  detail::check_float(qkv, "qkv", 3);
  const auto mask = detail::check_mask(detail::grid_from_tokens(concrete(qkv.sym_size(1)), "qkv"), window, masked);
  TORCH_CHECK(gain.scalar_type() == at::kFloat || gain.scalar_type() == at::kDouble,
              "gain must be float32 or float64 (the factor dtype), got ", gain.scalar_type());
  TORCH_CHECK(gain.dim() == 3 && concrete(gain.sym_size(2)) == 1 + mask.num_kept(),
              "gain must have shape (S, B*T, 1 + N_keep) with 1 + N_keep = ", 1 + mask.num_kept(), ", got ",
              gain.sym_sizes());
  return mask;
}

at::Tensor project_mixed_meta(const at::Tensor& qkv, const at::Tensor& gain, const at::Tensor& coefficients,
                              const at::Tensor& basis, const at::Tensor& phase, int64_t num_frames,
                              at::IntArrayRef window, int64_t masked) {
  const auto mask = check_projection_meta(qkv, gain, window, masked);
  TORCH_CHECK(coefficients.dim() == 4 && basis.dim() == 2, "coefficients must be 4-D and basis 2-D, got shapes ",
              coefficients.sym_sizes(), " and ", basis.sym_sizes());
  detail::check_same(coefficients, "coefficients", gain, "gain");
  detail::check_same(basis, "basis", gain, "gain");
  check_phase_meta(phase, qkv.sym_size(0), num_frames, qkv);
  return at::empty_symint({gain.sym_size(0), qkv.sym_size(0), c10::SymInt(1 + mask.num_kept()), qkv.sym_size(2)},
                          qkv.options());
}

std::tuple<at::Tensor, at::Tensor> project_mixed_backward_meta(const at::Tensor& grad_qkv_mixed, const at::Tensor& qkv,
                                                               const at::Tensor& gain, const at::Tensor& phase,
                                                               int64_t num_frames, at::IntArrayRef window,
                                                               int64_t masked) {
  check_projection_meta(qkv, gain, window, masked);
  detail::check_float(grad_qkv_mixed, "grad_qkv_mixed", 4);
  detail::check_same(grad_qkv_mixed, "grad_qkv_mixed", qkv, "qkv");
  check_phase_meta(phase, qkv.sym_size(0), num_frames, qkv);
  return {at::empty_symint(qkv.sym_sizes(), qkv.options()), at::empty_symint(gain.sym_sizes(), gain.options())};
}

// ---------------------------------------------------------------------------
// Autograd.
// ---------------------------------------------------------------------------

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct FactorArgs {
  int64_t num_frames, masked, channel_fold;
  std::vector<int64_t> window, scales;
  std::string mixing;
  double eps;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["num_frames"] = num_frames;
    ctx->saved_data["masked"] = masked;
    ctx->saved_data["channel_fold"] = channel_fold;
    ctx->saved_data["window"] = window;
    ctx->saved_data["scales"] = scales;
    ctx->saved_data["mixing"] = mixing;
    ctx->saved_data["eps"] = eps;
  }
  static FactorArgs load(AutogradContext* ctx) {
    return FactorArgs{ctx->saved_data["num_frames"].toInt(),     ctx->saved_data["masked"].toInt(),
                      ctx->saved_data["channel_fold"].toInt(),   ctx->saved_data["window"].toIntVector(),
                      ctx->saved_data["scales"].toIntVector(),   ctx->saved_data["mixing"].toStringRef(),
                      ctx->saved_data["eps"].toDouble()};
  }
};

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class MixFactorsFunction : public torch::autograd::Function<MixFactorsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& ln_weight,
                               const at::Tensor& phase, int64_t num_frames, at::IntArrayRef window, int64_t masked,
                               at::IntArrayRef scales, int64_t channel_fold, std::string_view mixing, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    FactorArgs{num_frames, masked, channel_fold, window.vec(), scales.vec(), std::string(mixing), eps}.save(ctx);
    ctx->save_for_backward({x, ln_weight, phase});
    ctx->set_materialize_grads(false);  // an unused output's gradient stays absent (zero)
    auto [gain, coefficients, mixed_mean] =
        mix_factors(x, ln_weight, phase, num_frames, window, masked, scales, channel_fold, mixing, eps);
    return {gain, coefficients, mixed_mean};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(10);
    if (!(grads[0].defined() || grads[1].defined() || grads[2].defined())) return result;
    const auto a = FactorArgs::load(ctx);
    const auto saved = ctx->get_saved_variables();
    auto [grad_x, grad_weight] =
        mix_factors_backward(defined_or_none(grads[0]), defined_or_none(grads[1]), defined_or_none(grads[2]),
                             saved[0], saved[1], saved[2], a.num_frames, a.window, a.masked, a.scales,
                             a.channel_fold, a.mixing, a.eps);
    if (ctx->needs_input_grad(0)) result[0] = grad_x;
    if (ctx->needs_input_grad(1)) result[1] = grad_weight;
    return result;
  }
};

// out[s, r, i] = gain[s, r, i] qkv[r, base(r, i)] + coefficients[s, r, i] @ basis^T, so with G the
// gradient of out: grad_qkv[r, base(r, i)] = sum_s gain[s, r, i] G[s, r, i] (zero at masked tokens:
// no mixed token reads them; each base token is one slot's), grad_gain[s, r, i] = G[s, r, i] .
// qkv[r, base(r, i)], grad_coefficients = G @ basis, grad_basis = G^T @ coefficients over all
// mixed tokens (in the factor dtype: the forward computes in it and rounds once to qkv's).
class ProjectMixedFunction : public torch::autograd::Function<ProjectMixedFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& qkv, const at::Tensor& gain,
                            const at::Tensor& coefficients, const at::Tensor& basis, const at::Tensor& phase,
                            int64_t num_frames, at::IntArrayRef window, int64_t masked) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["num_frames"] = num_frames;
    ctx->saved_data["window"] = window.vec();
    ctx->saved_data["masked"] = masked;
    ctx->save_for_backward({qkv, gain, coefficients, basis, phase});
    ctx->set_materialize_grads(false);
    return project_mixed(qkv, gain, coefficients, basis, phase, num_frames, window, masked);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(8);
    const auto& grad = grads[0];
    if (!grad.defined()) return result;
    const auto saved = ctx->get_saved_variables();
    const auto &qkv = saved[0], &gain = saved[1], &coefficients = saved[2], &basis = saved[3], &phase = saved[4];
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(1)) {
      auto [grad_qkv, grad_gain] =
          project_mixed_backward(grad, qkv, gain, phase, ctx->saved_data["num_frames"].toInt(),
                                 ctx->saved_data["window"].toIntVector(), ctx->saved_data["masked"].toInt());
      if (ctx->needs_input_grad(0)) result[0] = grad_qkv;
      if (ctx->needs_input_grad(1)) result[1] = grad_gain;
    }
    if (ctx->needs_input_grad(2) || ctx->needs_input_grad(3)) {
      // The rank-(2I+2) product's gradients are GEMMs in the factor dtype: (S*B*T*(1+N_keep), W) rows.
      const auto rows = grad.flatten(0, 2).to(basis.scalar_type());
      if (ctx->needs_input_grad(2)) result[2] = at::mm(rows, basis).view_symint(coefficients.sym_sizes());
      if (ctx->needs_input_grad(3)) result[3] = at::mm(rows.t(), coefficients.flatten(0, 2));
    }
    return result;
  }
};

// The backward ops compute first-order gradients only. Their autograd kernels
// run them below autograd and, when an input requires grad (a backward with
// create_graph=True), give the outputs a node that raises if anything
// differentiates through it.
constexpr const char* kNoDoubleBackward =
    " is not differentiable: double backward through the shared projections (stdd::mix_factors, "
    "stdd::project_mixed) is not supported";

class MixFactorsBackwardFunction : public torch::autograd::Function<MixFactorsBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const std::optional<at::Tensor>& grad_gain,
                               const std::optional<at::Tensor>& grad_coefficients,
                               const std::optional<at::Tensor>& grad_mixed_mean, const at::Tensor& x,
                               const at::Tensor& ln_weight, const at::Tensor& phase, int64_t num_frames,
                               at::IntArrayRef window, int64_t masked, at::IntArrayRef scales, int64_t channel_fold,
                               std::string_view mixing, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_x, grad_weight] = mix_factors_backward(grad_gain, grad_coefficients, grad_mixed_mean, x, ln_weight,
                                                      phase, num_frames, window, masked, scales, channel_fold, mixing,
                                                      eps);
    return {grad_x, grad_weight};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "stdd::mix_factors_backward", kNoDoubleBackward);
  }
};

class ProjectMixedBackwardFunction : public torch::autograd::Function<ProjectMixedBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_qkv_mixed, const at::Tensor& qkv,
                               const at::Tensor& gain, const at::Tensor& phase, int64_t num_frames,
                               at::IntArrayRef window, int64_t masked) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_qkv, grad_gain] = project_mixed_backward(grad_qkv_mixed, qkv, gain, phase, num_frames, window, masked);
    return {grad_qkv, grad_gain};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "stdd::project_mixed_backward", kNoDoubleBackward);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> mix_factors_autograd(const at::Tensor& x, const at::Tensor& ln_weight,
                                                                   const at::Tensor& phase, int64_t num_frames,
                                                                   at::IntArrayRef window, int64_t masked,
                                                                   at::IntArrayRef scales, int64_t channel_fold,
                                                                   std::string_view mixing, double eps) {
  auto outputs =
      MixFactorsFunction::apply(x, ln_weight, phase, num_frames, window, masked, scales, channel_fold, mixing, eps);
  return {outputs[0], outputs[1], outputs[2]};
}

std::tuple<at::Tensor, at::Tensor> mix_factors_backward_autograd(
    const std::optional<at::Tensor>& grad_gain, const std::optional<at::Tensor>& grad_coefficients,
    const std::optional<at::Tensor>& grad_mixed_mean, const at::Tensor& x, const at::Tensor& ln_weight,
    const at::Tensor& phase, int64_t num_frames, at::IntArrayRef window, int64_t masked, at::IntArrayRef scales,
    int64_t channel_fold, std::string_view mixing, double eps) {
  auto outputs = MixFactorsBackwardFunction::apply(grad_gain, grad_coefficients, grad_mixed_mean, x, ln_weight, phase,
                                                   num_frames, window, masked, scales, channel_fold, mixing, eps);
  return {outputs[0], outputs[1]};
}

at::Tensor project_mixed_autograd(const at::Tensor& qkv, const at::Tensor& gain, const at::Tensor& coefficients,
                                  const at::Tensor& basis, const at::Tensor& phase, int64_t num_frames,
                                  at::IntArrayRef window, int64_t masked) {
  return ProjectMixedFunction::apply(qkv, gain, coefficients, basis, phase, num_frames, window, masked);
}

std::tuple<at::Tensor, at::Tensor> project_mixed_backward_autograd(const at::Tensor& grad_qkv_mixed,
                                                                   const at::Tensor& qkv, const at::Tensor& gain,
                                                                   const at::Tensor& phase, int64_t num_frames,
                                                                   at::IntArrayRef window, int64_t masked) {
  auto outputs = ProjectMixedBackwardFunction::apply(grad_qkv_mixed, qkv, gain, phase, num_frames, window, masked);
  return {outputs[0], outputs[1]};
}

}  // namespace
}  // namespace stdd

TORCH_LIBRARY_FRAGMENT(stdd, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def(
      "mix_factors(Tensor x, Tensor ln_weight, Tensor phase, int num_frames, int[2] window, int masked, "
      "int[] scales, int channel_fold, str mixing, float eps) -> (Tensor, Tensor, Tensor)",
      tags);
  m.def(
      "mix_factors_backward(Tensor? grad_gain, Tensor? grad_coefficients, Tensor? grad_mixed_mean, Tensor x, "
      "Tensor ln_weight, Tensor phase, int num_frames, int[2] window, int masked, int[] scales, int channel_fold, "
      "str mixing, float eps) -> (Tensor, Tensor)",
      tags);
  m.def(
      "project_mixed(Tensor qkv, Tensor gain, Tensor coefficients, Tensor basis, Tensor phase, int num_frames, "
      "int[2] window, int masked) -> Tensor",
      tags);
  m.def(
      "project_mixed_backward(Tensor grad_qkv_mixed, Tensor qkv, Tensor gain, Tensor phase, int num_frames, "
      "int[2] window, int masked) -> (Tensor, Tensor)",
      tags);
}

TORCH_LIBRARY_IMPL(stdd, Meta, m) {
  m.impl("mix_factors", &stdd::mix_factors_meta);
  m.impl("mix_factors_backward", &stdd::mix_factors_backward_meta);
  m.impl("project_mixed", &stdd::project_mixed_meta);
  m.impl("project_mixed_backward", &stdd::project_mixed_backward_meta);
}

TORCH_LIBRARY_IMPL(stdd, Autograd, m) {
  m.impl("mix_factors", &stdd::mix_factors_autograd);
  m.impl("mix_factors_backward", &stdd::mix_factors_backward_autograd);
  m.impl("project_mixed", &stdd::project_mixed_autograd);
  m.impl("project_mixed_backward", &stdd::project_mixed_backward_autograd);
}
