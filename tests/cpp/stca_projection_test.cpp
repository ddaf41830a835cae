// C++ test of the shared projections (docs/stca.md section 6; ops
// stdd::mix_factors / project_mixed, run by ctest): factors worked out by hand;
// the identity they exist for (projecting the mixed tokens equals rescaling
// the full path's projections plus the low-rank product), forward and every
// gradient through autograd from C++, in float64, for every mixing rule;
// argument errors and the refused double backward; and the CUDA kernels'
// per-lane code (csrc/stca_projection_bodies.h) run on the CPU through
// kernels::HostWarp, item by item, against the CPU kernels, in every dtype,
// at every vector width, with out-of-range phases and NaN-filled outputs (no
// GPU is needed for that).
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include "stca_ops.h"
#include "stca_projection_bodies.h"

namespace {

int failures = 0;
int checks = 0;

#define EXPECT(condition)                                                                  \
  do {                                                                                    \
    ++checks;                                                                             \
    if (!(condition)) {                                                                   \
      ++failures;                                                                         \
      std::fprintf(stderr, "%s:%d: EXPECT failed: %s\n", __FILE__, __LINE__, #condition); \
    }                                                                                     \
  } while (0)

// |actual - expected| <= tolerance * max|expected|, elementwise over the tensors (and the same shape, no NaN).
void expect_close(const at::Tensor& actual, const at::Tensor& expected, double tolerance, const std::string& what) {
  ++checks;
  if (actual.sizes() != expected.sizes() || actual.scalar_type() != expected.scalar_type()) {
    ++failures;
    std::fprintf(stderr, "%s: shape or dtype differs\n", what.c_str());
    return;
  }
  const auto a = actual.to(at::kDouble), e = expected.to(at::kDouble);
  if (a.isnan().any().item<bool>()) {
    ++failures;
    std::fprintf(stderr, "%s: %lld elements never written (NaN)\n", what.c_str(),
                 static_cast<long long>(a.isnan().sum().item<int64_t>()));
    return;
  }
  const double scale = e.numel() == 0 ? 0.0 : e.abs().max().item<double>();
  const double error = e.numel() == 0 ? 0.0 : (a - e).abs().max().item<double>();
  if (error > tolerance * std::max(scale, 1e-300)) {
    ++failures;
    std::fprintf(stderr, "%s: max error %.3g, %.3g relative (tolerance %.3g)\n", what.c_str(), error,
                 scale > 0 ? error / scale : error, tolerance);
  }
}

void expect_error(const std::function<void()>& call, const std::string& fragment) {
  ++checks;
  try {
    call();
  } catch (const c10::Error& error) {
    if (std::string(error.what()).find(fragment) == std::string::npos) {
      ++failures;
      std::fprintf(stderr, "error message lacks \"%s\": %s\n", fragment.c_str(), error.what());
    }
    return;
  }
  ++failures;
  std::fprintf(stderr, "expected an error containing \"%s\", none was thrown\n", fragment.c_str());
}

struct Geometry {
  int64_t T, B, D, P;
  std::vector<int64_t> window;
  int64_t masked;
  std::vector<int64_t> scales;
  int64_t fold;
  const char* mixing;

  int64_t rows() const { return B * T; }
  int64_t borrowed() const { return std::string(mixing) == "none" ? 0 : 2 * (D / fold); }
  int64_t tokens_out() const {
    const int64_t K = window[0] * window[1];
    return 1 + (P / window[0]) * (P / window[1]) * (K - masked);
  }
};

// One clip, T = 2, a 2x2 grid (one window, tokens 1-4 at cells 0-3), D = 6, channel_fold 3 (I = 2:
// channels 0-1 read t-1, 2-3 read t+1, 4-5 own), scale 1, phases 0 and 1, eps = 0, g = 1.
// Frame 0 keeps cells 2, 3 (tokens 3, 4), frame 1 keeps cells 0, 3 (tokens 1, 4). Mixed token
// j = 0 of frame 0 has base token x[0, 3] = (1, 2, 3, 4, 5, 6); channels 0-1 read frame -1 (zero),
// channels 2-3 frame 1's kept token 0, x[1, 1] = (., ., 3, 4, ., .): m = (0, 0, 3, 4, 5, 6), d = (-1, -2, 0, 0).
// mu_x = 3.5, var_x = 35/12; mu_m = 3, var_m = 16/3: a = sqrt(35/12 / (16/3)) = sqrt(35)/8,
// k = (3.5 - 3) / (4/sqrt(3)) = sqrt(3)/8, u = d / sd_m = (-sqrt(3)/4, -sqrt(3)/2, 0, 0).
void test_factors_by_hand() {
  auto x = at::zeros({2, 5, 6}, at::kDouble);
  x[0][3] = at::arange(1, 7, at::kDouble);
  x[1][1] = at::tensor({9.0, 9.0, 3.0, 4.0, 9.0, 9.0}, at::kDouble);
  const auto phase = at::arange(2, at::kLong).view({1, 2});
  const auto weight = at::ones({6}, at::kDouble);
  const auto [gain, coefficients, mixed_mean] = stdd::mix_factors(x, weight, phase, 2, {2, 2}, 2, {1}, 3, "continual", 0.0);
  EXPECT(gain.sizes() == at::IntArrayRef({1, 2, 3}) && coefficients.sizes() == at::IntArrayRef({1, 2, 3, 6}));
  const double r3 = std::sqrt(3.0), a = std::sqrt(35.0) / 8;
  expect_close(gain[0][0][1], at::scalar_tensor(a, at::kDouble), 1e-14, "a");
  expect_close(coefficients[0][0][1],
               at::tensor({-r3 / 4, -r3 / 2, 0.0, 0.0, 1 - a, r3 / 8}, at::kDouble), 1e-14, "[u, 1 - a, k]");
  expect_close(mixed_mean[0][1], at::tensor({0.0, 0.0, 3.0, 4.0, 5.0, 6.0}, at::kDouble), 0.0, "mixed_mean");
  // The CLS: a = 1, every coefficient 0, its own channels.
  EXPECT(gain[0][1][0].item<double>() == 1.0 && coefficients[0][1][0].abs().max().item<double>() == 0.0);
}

// The identity of docs/stca.md section 6 in float64: with qkv = W LN(x) + c and the basis
// [W[:, :2I], W b + c, W g], project_mixed(qkv, mix_factors(x)) is W LN(mix_gather(x)) + c, and
// mixed_mean is mix_gather(x).mean(0); so are their gradients, through autograd from C++.
void check_identity(const Geometry& geo, uint64_t seed) {
  auto generator = at::detail::createCPUGenerator(seed);
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const int64_t D = geo.D, R = geo.rows(), B2 = geo.borrowed(), tokens = 1 + geo.P * geo.P;
  auto x0 = at::randn({R, tokens, D}, generator, options) + 0.3;
  x0.select(2, 1).mul_(30);  // an outlier channel
  const auto g0 = 1 + 0.2 * at::randn({D}, generator, options), b0 = 0.1 * at::randn({D}, generator, options);
  const auto w0 = at::randn({3 * D, D}, generator, options) / std::sqrt(static_cast<double>(D));
  const auto c0 = 0.1 * at::randn({3 * D}, generator, options);
  const auto phase = at::randint(-9, 9, {geo.B, geo.T}, generator, at::kLong);  // reduced mod K by every op
  const double eps = 1e-5;
  const int64_t S = static_cast<int64_t>(geo.scales.size());
  const auto grad_out = at::randn({S, R, geo.tokens_out(), 3 * D}, generator, options);
  const auto grad_mean = at::randn({R, geo.tokens_out(), D}, generator, options);

  auto leaves = [&] {
    return std::vector<at::Tensor>{x0.clone().requires_grad_(true), g0.clone().requires_grad_(true),
                                   b0.clone().requires_grad_(true), w0.clone().requires_grad_(true),
                                   c0.clone().requires_grad_(true)};
  };
  // Shared: from the full path's projection.
  auto shared = leaves();
  const auto &x = shared[0], &g = shared[1], &b = shared[2], &w = shared[3], &c = shared[4];
  const auto qkv = at::linear(at::layer_norm(x, {D}, g, b, eps), w, c);
  const auto basis = at::cat({w.narrow(1, 0, B2), (at::mv(w, b) + c).unsqueeze(1), at::mv(w, g).unsqueeze(1)}, 1);
  const auto [gain, coefficients, mixed_mean] =
      stdd::mix_factors(x, g, phase, geo.T, geo.window, geo.masked, geo.scales, geo.fold, geo.mixing, eps);
  const auto out = stdd::project_mixed(qkv, gain, coefficients, basis, phase, geo.T, geo.window, geo.masked);
  // Per path: the mixed tokens projected.
  auto per_path = leaves();
  const auto mixed = stdd::mix_gather(per_path[0], phase, geo.T, geo.window, geo.masked, geo.scales, geo.fold, geo.mixing);
  const auto expected = at::linear(at::layer_norm(mixed, {D}, per_path[1], per_path[2], eps), per_path[3], per_path[4]);
  const std::string name = std::string(geo.mixing) + " T=" + std::to_string(geo.T) + " D=" + std::to_string(D);
  expect_close(out, expected, 1e-12, name + ": qkv_mixed");
  expect_close(mixed_mean, mixed.mean(0), 1e-12, name + ": mixed_mean");
  const auto grads = torch::autograd::grad({out, mixed_mean}, shared, {grad_out, grad_mean});
  const auto expected_grads = torch::autograd::grad({expected, mixed.mean(0)}, per_path, {grad_out, grad_mean});
  const char* names[] = {"x", "ln_weight", "ln_bias", "in_proj_weight", "in_proj_bias"};
  for (size_t i = 0; i < grads.size(); ++i) {
    expect_close(grads[i], expected_grads[i], 1e-12, name + ": grad " + names[i]);
  }
}

void test_identity_and_gradients() {
  check_identity({3, 1, 24, 4, {2, 2}, 2, {1, 2}, 4, "continual"}, 1);
  check_identity({1, 2, 20, 2, {2, 1}, 1, {1}, 4, "continual"}, 2);  // T = 1: no neighbour frame
  check_identity({2, 2, 36, 4, {2, 1}, 1, {2}, 6, "separate"}, 3);
  check_identity({4, 1, 40, 4, {2, 2}, 3, {1, 2, 3}, 4, "official"}, 4);  // I = 10: blocks 10, 5, 2; one kept
  check_identity({3, 1, 24, 2, {2, 2}, 0, {1, 2}, 4, "none"}, 5);
  check_identity({2, 1, 24, 4, {2, 2}, 1, {1, 2}, 2, "continual"}, 6);  // 2I = D: no own channel
  check_identity({1, 2, 20, 2, {2, 1}, 1, {1, 2}, 4, "official"}, 7);   // T = 1: the release's clamp reads nothing
}

void test_errors_and_double_backward() {
  const auto x = at::randn({6, 37, 48});
  const auto phase = at::zeros({2, 3}, at::kLong);
  const auto weight = at::ones({48});
  expect_error([&] { stdd::mix_factors(x, weight.to(at::kDouble), phase, 3, {2, 2}, 2, {1, 2}, 8, "continual", 1e-5); },
               "ln_weight must have the factor dtype of x");
  expect_error([&] { stdd::mix_factors(x, weight, phase, 3, {2, 2}, 2, {1, 2}, 8, "continual", -1.0); },
               "eps must be a number >= 0");
  const auto [gain, coefficients, mixed_mean] = stdd::mix_factors(x, weight, phase, 3, {2, 2}, 2, {1, 2}, 8, "continual", 1e-5);
  const auto qkv = at::randn({6, 37, 144});
  expect_error([&] { stdd::project_mixed(qkv, gain, coefficients, at::zeros({144, 13}), phase, 3, {2, 2}, 2); },
               "basis must have shape (W, 2I + 2) = (144, 14)");
  expect_error([&] { stdd::project_mixed(qkv, gain.narrow(1, 0, 3), coefficients, at::zeros({144, 14}), phase, 3, {2, 2}, 2); },
               "gain must have shape (S, B*T, 1 + N_keep) = (S, 6, 19)");
  // First-order gradients only: differentiating them again raises.
  const auto leaf = x.clone().requires_grad_(true);
  const auto factors = stdd::mix_factors(leaf, weight, phase, 3, {2, 2}, 2, {1, 2}, 8, "continual", 1e-5);
  const auto grad = torch::autograd::grad({std::get<1>(factors).pow(2).sum()}, {leaf}, {}, true, true)[0];
  expect_error([&] { torch::autograd::grad({grad.sum()}, {leaf}); },
               "stdd::mix_factors_backward is not differentiable: double backward");
}

// ---------------------------------------------------------------------------
// The CUDA kernels' per-lane code on the CPU.
// ---------------------------------------------------------------------------

at::Tensor nan_like(const at::Tensor& t) { return at::full_like(t, NAN); }

// A tensor holding `values`, starting `offset` elements into a NaN-filled buffer (base addresses only
// `offset`-element aligned).
at::Tensor shifted(const at::Tensor& values, int64_t offset) {
  auto buffer = at::full({values.numel() + offset}, NAN, values.options());
  auto view = buffer.narrow(0, offset, values.numel()).view(values.sizes());
  view.copy_(values);
  return view;
}

// Tolerances of the bodies (float statistics for float32 factors, as on the GPU) against the CPU
// kernels (double statistics): for the factor-dtype outputs and for those in the tokens' dtype.
double factor_tolerance(at::ScalarType dtype) { return dtype == at::kDouble ? 1e-12 : 2e-5; }
double token_tolerance(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return 1e-12;
    case at::kFloat: return 2e-5;
    case at::kHalf: return 2e-3;
    default: return 1.6e-2;  // bfloat16
  }
}

template <typename scalar_t>
void check_factor_bodies(at::ScalarType dtype, const Geometry& geo, uint64_t seed) {
  namespace k = stdd::kernels;
  using factor_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using stat_t = at::opmath_type<factor_t>;
  const auto factor_dtype = c10::CppTypeToScalarType<factor_t>::value;
  auto generator = at::detail::createCPUGenerator(seed);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t D = geo.D, R = geo.rows(), tokens = 1 + geo.P * geo.P, S = static_cast<int64_t>(geo.scales.size());
  at::Tensor x64 = at::randn({R, tokens, D}, generator, f64) + 0.3;
  x64.select(2, D - 1).mul_(30);
  const at::Tensor x = x64.to(dtype);
  const at::Tensor weight = (1 + 0.2 * at::randn({D}, generator, f64)).to(factor_dtype);
  const int64_t K = geo.window[0] * geo.window[1];
  const at::Tensor phase = at::randint(-3 * K, 3 * K, {geo.B, geo.T}, generator, at::kLong);  // out of [0, K) too
  const at::Tensor residue = at::remainder(phase, K);
  const auto* p = phase.const_data_ptr<int64_t>();
  const double eps = 1e-5;
  const std::string name = std::string(c10::toString(dtype)) + " " + geo.mixing + " T=" + std::to_string(geo.T) +
                           " D=" + std::to_string(D) + " P=" + std::to_string(geo.P);

  // Forward.
  at::Tensor gain, coefficients, mixed_mean;
  std::tie(gain, coefficients, mixed_mean) =
      stdd::mix_factors(x, weight, phase, geo.T, geo.window, geo.masked, geo.scales, geo.fold, geo.mixing, eps);
  const auto from_residue =
      stdd::mix_factors(x, weight, residue, geo.T, geo.window, geo.masked, geo.scales, geo.fold, geo.mixing, eps);
  EXPECT(at::equal(std::get<0>(from_residue), gain) && at::equal(std::get<1>(from_residue), coefficients) &&
         at::equal(std::get<2>(from_residue), mixed_mean));
  const auto plan =
      stdd::detail::check_mix_factors(x, weight, geo.T, geo.window, geo.masked, geo.scales, geo.fold, geo.mixing, eps);
  const auto args = k::make_factor_args(plan);
  at::Tensor gain_body = nan_like(gain), coefficients_body = nan_like(coefficients), mean_body = nan_like(mixed_mean);
  for (int64_t item = 0; item < R * geo.tokens_out(); ++item) {
    k::mix_factors_warp_item<scalar_t, factor_t>(
        k::HostWarp{}, x.const_data_ptr<scalar_t>(), weight.const_data_ptr<factor_t>(), p,
        gain_body.mutable_data_ptr<factor_t>(), coefficients_body.mutable_data_ptr<factor_t>(),
        mean_body.mutable_data_ptr<scalar_t>(), args, item);
  }
  expect_close(gain_body, gain, factor_tolerance(dtype), name + ": gain");
  expect_close(coefficients_body, coefficients, factor_tolerance(dtype), name + ": coefficients");
  expect_close(mean_body, mixed_mean, token_tolerance(dtype), name + ": mixed_mean");

  // Backward, with every upstream gradient, then with grad_coefficients alone.
  const at::Tensor grad_gain = at::randn(gain.sizes(), generator, f64).to(factor_dtype);
  const at::Tensor grad_coefficients = at::randn(coefficients.sizes(), generator, f64).to(factor_dtype);
  const at::Tensor grad_mean = at::randn(mixed_mean.sizes(), generator, f64).to(dtype);
  for (bool all : {true, false}) {
    const std::optional<at::Tensor> g_gain = all ? std::optional<at::Tensor>(grad_gain) : std::nullopt;
    const std::optional<at::Tensor> g_mean = all ? std::optional<at::Tensor>(grad_mean) : std::nullopt;
    at::Tensor grad_x, grad_weight;
    std::tie(grad_x, grad_weight) = stdd::mix_factors_backward(g_gain, grad_coefficients, g_mean, x, weight, phase,
                                                                  geo.T, geo.window, geo.masked, geo.scales, geo.fold,
                                                                  geo.mixing, eps);
    const auto stat_options = at::TensorOptions().dtype(c10::CppTypeToScalarType<stat_t>::value);
    const int64_t B2 = geo.borrowed();
    at::Tensor borrowed_grad = at::full({S, R, geo.tokens_out(), B2}, NAN, stat_options);
    at::Tensor base_grad = at::full({R, geo.tokens_out(), B2}, NAN, stat_options);
    at::Tensor weight_terms = at::full({R * geo.tokens_out(), B2}, NAN, stat_options);
    at::Tensor grad_x_body = nan_like(grad_x);
    for (int64_t item = 0; item < R * geo.tokens_out(); ++item) {
      k::mix_factors_backward_warp_item<scalar_t, factor_t>(
          k::HostWarp{}, all ? grad_gain.const_data_ptr<factor_t>() : nullptr, grad_coefficients.const_data_ptr<factor_t>(),
          all ? grad_mean.const_data_ptr<scalar_t>() : nullptr, x.const_data_ptr<scalar_t>(),
          weight.const_data_ptr<factor_t>(), p, grad_x_body.mutable_data_ptr<scalar_t>(),
          borrowed_grad.mutable_data_ptr<stat_t>(), base_grad.mutable_data_ptr<stat_t>(),
          weight_terms.mutable_data_ptr<stat_t>(), args, item);
    }
    for (int64_t item = 0; item < R * tokens; ++item) {
      const auto it = k::token_item(args.mix.mask, p, args.mix.num_frames, item);
      for (int32_t ch = 0; ch < D; ++ch) {
        k::factor_backward_gather_chunk<scalar_t, stat_t>(borrowed_grad.const_data_ptr<stat_t>(),
                                                          base_grad.const_data_ptr<stat_t>(),
                                                          grad_x_body.mutable_data_ptr<scalar_t>(), args, it, item, ch);
      }
    }
    at::Tensor grad_weight_body = at::zeros_like(weight);
    if (B2 > 0) grad_weight_body.narrow(0, 0, B2).copy_(weight_terms.sum(0));
    const std::string which = name + (all ? ": grad" : ": grad (grad_coefficients only)");
    expect_close(grad_x_body, grad_x, token_tolerance(dtype), which + " x");
    expect_close(grad_weight_body, grad_weight, factor_tolerance(dtype), which + " ln_weight");
  }
}

template <typename scalar_t, typename factor_t, int V>
void check_project_bodies(at::ScalarType dtype, const Geometry& geo, uint64_t seed, int64_t offset = 0) {
  namespace k = stdd::kernels;
  using stat_t = at::opmath_type<factor_t>;
  const auto factor_dtype = c10::CppTypeToScalarType<factor_t>::value;
  auto generator = at::detail::createCPUGenerator(seed);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t R = geo.rows(), tokens = 1 + geo.P * geo.P, S = static_cast<int64_t>(geo.scales.size());
  const int64_t W = 3 * geo.D, C = geo.borrowed() + 2;
  const at::Tensor qkv = shifted(at::randn({R, tokens, W}, generator, f64).to(dtype), offset);
  const at::Tensor gain = (1 + 0.1 * at::randn({S, R, geo.tokens_out()}, generator, f64)).to(factor_dtype);
  const at::Tensor coefficients = at::randn({S, R, geo.tokens_out(), C}, generator, f64).to(factor_dtype);
  const at::Tensor basis = at::randn({W, C}, generator, f64).to(factor_dtype);
  const int64_t K = geo.window[0] * geo.window[1];
  const at::Tensor phase = at::randint(-3 * K, 3 * K, {geo.B, geo.T}, generator, at::kLong);
  const auto* p = phase.const_data_ptr<int64_t>();
  const std::string name = std::string(c10::toString(dtype)) + "/" + c10::toString(factor_dtype) + " V=" +
                           std::to_string(V) + " offset=" + std::to_string(offset) + " W=" + std::to_string(W);

  const at::Tensor out = stdd::project_mixed(qkv, gain, coefficients, basis, phase, geo.T, geo.window, geo.masked);
  EXPECT(at::equal(out, stdd::project_mixed(qkv, gain, coefficients, basis, at::remainder(phase, K), geo.T, geo.window,
                                            geo.masked)));
  const auto plan = stdd::detail::check_project_mixed(qkv, gain, coefficients, basis, geo.T, geo.window, geo.masked);
  const auto args = k::make_project_args(plan);
  const int64_t items = S * R * geo.tokens_out();
  const at::Tensor product = shifted(at::mm(coefficients.reshape({items, C}), basis.t()), offset);
  at::Tensor out_body = shifted(nan_like(out), offset);
  const int64_t size = static_cast<int64_t>(sizeof(scalar_t)), factor_size = static_cast<int64_t>(sizeof(factor_t));
  EXPECT(std::min(k::vector_width(size, W, {qkv.const_data_ptr(), out_body.const_data_ptr()}),
                  k::vector_width(factor_size, W, {product.const_data_ptr()})) >= V);
  for (int64_t item = 0; item < items; ++item) {
    const int64_t source = k::project_source(args, p, item);
    for (int32_t ch = 0; ch < W; ch += V) {
      k::project_mixed_chunk<scalar_t, factor_t, V>(qkv.const_data_ptr<scalar_t>(), gain.const_data_ptr<factor_t>(),
                                                    product.const_data_ptr<factor_t>(),
                                                    out_body.mutable_data_ptr<scalar_t>(), args, item, source, ch);
    }
  }
  EXPECT(at::equal(out_body, out));  // the same GEMM, then the same per-element arithmetic
  if constexpr (std::is_same_v<scalar_t, factor_t>) {  // in place, as the kernels run when the dtypes agree
    at::Tensor in_place = product.clone();
    for (int64_t item = 0; item < items; ++item) {
      const int64_t source = k::project_source(args, p, item);
      for (int32_t ch = 0; ch < W; ch += V) {
        k::project_mixed_chunk<scalar_t, factor_t, V>(
            qkv.const_data_ptr<scalar_t>(), gain.const_data_ptr<factor_t>(), in_place.const_data_ptr<factor_t>(),
            in_place.mutable_data_ptr<scalar_t>(), args, item, source, ch);
      }
    }
    EXPECT(at::equal(in_place.view(out.sizes()), out));
  }

  const at::Tensor grad = at::randn(out.sizes(), generator, f64).to(dtype);
  at::Tensor grad_qkv, grad_gain;
  std::tie(grad_qkv, grad_gain) = stdd::project_mixed_backward(grad, qkv, gain, phase, geo.T, geo.window, geo.masked);
  at::Tensor grad_qkv_body = nan_like(grad_qkv), grad_gain_body = nan_like(grad_gain);
  for (int64_t item = 0; item < R * tokens; ++item) {
    k::project_mixed_backward_warp_item<scalar_t, factor_t>(
        k::HostWarp{}, grad.const_data_ptr<scalar_t>(), qkv.const_data_ptr<scalar_t>(), gain.const_data_ptr<factor_t>(),
        p, grad_qkv_body.mutable_data_ptr<scalar_t>(), grad_gain_body.mutable_data_ptr<factor_t>(), args, item);
  }
  EXPECT(at::equal(grad_qkv_body, grad_qkv));  // the same sum over scales, in the same order
  expect_close(grad_gain_body, grad_gain, std::is_same_v<stat_t, double> ? 1e-12 : 2e-5, name + ": grad gain");
}

void test_cuda_bodies_on_cpu() {
  const std::vector<Geometry> geometries = {
      {3, 1, 24, 4, {2, 2}, 2, {1, 2}, 4, "continual"},
      {1, 2, 20, 2, {2, 1}, 1, {1}, 4, "continual"},
      {3, 2, 36, 4, {2, 1}, 1, {2}, 6, "separate"},
      {4, 1, 40, 4, {2, 2}, 3, {1, 2, 3}, 4, "official"},
      {2, 2, 26, 2, {2, 2}, 1, {3}, 2, "official"},  // I = 13, 2I = D: no own channel
      {2, 1, 24, 2, {2, 2}, 0, {1, 2}, 4, "none"},
      {8, 1, 96, 14, {2, 2}, 2, {1, 2}, 8, "continual"},  // the ViT-B/16 grid
  };
  uint64_t seed = 100;
  for (const auto& geo : geometries) {
    check_factor_bodies<double>(at::kDouble, geo, ++seed);
    check_factor_bodies<float>(at::kFloat, geo, ++seed);
    check_factor_bodies<c10::Half>(at::kHalf, geo, ++seed);
    check_factor_bodies<c10::BFloat16>(at::kBFloat16, geo, ++seed);
  }
  // project_mixed at every vector width the kernels take (16 bytes at most, for the rows and the
  // float32/float64 product alike), on aligned and on misaligned memory, every dtype pairing.
  const Geometry wide{2, 2, 64, 4, {2, 2}, 2, {1, 2}, 4, "continual"};  // W = 192
  const Geometry odd{3, 1, 20, 2, {2, 1}, 1, {1, 2, 3}, 4, "official"};  // W = 60
  check_project_bodies<float, float, 4>(at::kFloat, wide, 1);
  check_project_bodies<float, float, 2>(at::kFloat, wide, 2, 2);
  check_project_bodies<float, float, 1>(at::kFloat, odd, 3, 1);
  check_project_bodies<double, double, 2>(at::kDouble, wide, 4);
  check_project_bodies<double, double, 1>(at::kDouble, odd, 5, 1);
  check_project_bodies<c10::BFloat16, float, 4>(at::kBFloat16, wide, 6);
  check_project_bodies<c10::BFloat16, float, 1>(at::kBFloat16, odd, 7, 1);
  check_project_bodies<c10::Half, float, 2>(at::kHalf, wide, 8, 2);
  check_project_bodies<float, double, 2>(at::kFloat, wide, 9);  // float64 factors, float32 qkv
  check_project_bodies<c10::BFloat16, double, 1>(at::kBFloat16, odd, 10);
}

}  // namespace

int main() {
  test_factors_by_hand();
  test_identity_and_gradients();
  test_errors_and_double_backward();
  test_cuda_bodies_on_cpu();
  std::printf("stca_projection_test: %d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
