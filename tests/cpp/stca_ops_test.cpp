// C++ test of the STCA library (CMakeLists.txt, run by ctest): the ops,
// called through the C++ API, against values worked out by hand from
// docs/stca.md (its release-compatible rule too); the closed form of that
// rule against its literal reading; autograd from C++; argument errors; and the CUDA
// kernels' per-thread bodies (csrc/stca_kernel_bodies.h) run on the CPU,
// item by item, against the CPU kernels (no GPU is needed for that).
//
// The inputs encode where each element lives: x[row, token, ch] =
// row * 1e6 + token * 1e3 + ch (exact in float64), so an output value names
// the input element it was copied from.
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include "stca_kernel_bodies.h"
#include "stca_ops.h"

namespace {

int failures = 0;
int checks = 0;

#define EXPECT(condition)                                                              \
  do {                                                                                \
    ++checks;                                                                         \
    if (!(condition)) {                                                               \
      ++failures;                                                                     \
      std::fprintf(stderr, "%s:%d: EXPECT failed: %s\n", __FILE__, __LINE__, #condition); \
    }                                                                                 \
  } while (0)

#define EXPECT_VALUE(actual, expected)                                                          \
  do {                                                                                            \
    ++checks;                                                                                     \
    const double a_ = (actual), e_ = (expected);                                                  \
    if (a_ != e_) {                                                                               \
      ++failures;                                                                                 \
      std::fprintf(stderr, "%s:%d: %s = %.17g, expected %.17g\n", __FILE__, __LINE__, #actual, a_, e_); \
    }                                                                                             \
  } while (0)

double code(int64_t row, int64_t token, int64_t ch) { return row * 1e6 + token * 1e3 + ch; }

at::Tensor encoded(int64_t rows, int64_t tokens, int64_t channels) {
  auto r = at::arange(rows, at::kDouble).view({-1, 1, 1});
  auto t = at::arange(tokens, at::kDouble).view({1, -1, 1});
  auto c = at::arange(channels, at::kDouble).view({1, 1, -1});
  return r * 1e6 + t * 1e3 + c;
}

double at3(const at::Tensor& t, int64_t a, int64_t b, int64_t c) { return t[a][b][c].item<double>(); }
double at4(const at::Tensor& t, int64_t a, int64_t b, int64_t c, int64_t d) {
  return t[a][b][c][d].item<double>();
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

// Spec, step 1, 4x4 grid, window (2, 2), m = 2. Tokens 1..16 are the grid
// row-major; windows (rows 0-1, cols 0-1), (0-1, 2-3), (2-3, 0-1), (2-3, 2-3).
void test_kept_tokens_by_hand() {
  const stdd::MaskGeometry mask{4, 2, 2, 2};
  const int64_t expected[4][8] = {
      {5, 6, 7, 8, 13, 14, 15, 16},   // phase 0 keeps cells 2, 3 (bottom row of each window)
      {1, 6, 3, 8, 9, 14, 11, 16},    // phase 1 keeps cells 0, 3 (diagonal)
      {1, 2, 3, 4, 9, 10, 11, 12},    // phase 2 keeps cells 0, 1 (top row)
      {2, 5, 4, 7, 10, 13, 12, 15},   // phase 3 keeps cells 1, 2 (anti-diagonal)
  };
  EXPECT(mask.num_kept() == 8);
  for (int64_t phase = 0; phase < 4; ++phase) {
    for (int64_t j = 0; j < 8; ++j) {
      EXPECT_VALUE(stdd::kept_token(phase, j, mask), expected[phase][j]);
      EXPECT_VALUE(stdd::kept_index(phase, expected[phase][j], mask), j);
    }
    int64_t masked_tokens = 0;
    for (int64_t token = 1; token <= 16; ++token) masked_tokens += stdd::kept_index(phase, token, mask) < 0;
    EXPECT_VALUE(masked_tokens, 8);
  }
  // Window (2, 1): K = 2, m = 1; phase 0 keeps cell 1 (the lower patch), phase 1 cell 0.
  const stdd::MaskGeometry column{2, 2, 1, 1};
  EXPECT_VALUE(stdd::kept_token(0, 0, column), 1 + 1 * 2 + 0);
  EXPECT_VALUE(stdd::kept_token(1, 1, column), 1 + 0 * 2 + 1);
  // mask_ratio 0: every cell kept, in grid order within each window.
  const stdd::MaskGeometry all{2, 2, 2, 0};
  for (int64_t phase = 0; phase < 4; ++phase) {
    for (int64_t j = 0; j < 4; ++j) EXPECT_VALUE(stdd::kept_token(phase, j, all), 1 + (j / 2) * 2 + j % 2);
  }
}

void test_channel_runs_by_hand() {
  using stdd::ChannelRun;
  using stdd::Mixing;
  // D = 64, I = 8, scale 2 (h = 4): [0,4) t-2, [4,8) t-1, [8,12) t+1, [12,16) t+2, rest own.
  const int64_t starts[] = {0, 4, 8, 12, 16};
  const int64_t deltas[] = {-2, -1, 1, 2, 0};
  const int64_t stops[] = {4, 8, 12, 16, 64};
  for (int i = 0; i < 5; ++i) {
    const ChannelRun run = stdd::channel_run(starts[i], 64, 8, 2, Mixing::kContinual);
    EXPECT_VALUE(run.delta, deltas[i]);
    EXPECT_VALUE(run.stop, stops[i]);
  }
  EXPECT_VALUE(stdd::channel_run(3, 64, 8, 2, Mixing::kSeparate).delta, -2);
  EXPECT_VALUE(stdd::channel_run(9, 64, 8, 2, Mixing::kSeparate).delta, 2);
  EXPECT_VALUE(stdd::channel_run(9, 64, 8, 2, Mixing::kNone).delta, 0);
}

// T = 4 frames, one clip, 4x4 grid, D = 8, channel_fold 4 -> I = 2; phases 0..3.
void test_mix_gather_by_hand() {
  const auto x = encoded(4, 17, 8);
  const auto phase = at::arange(4, at::kLong).view({1, 4});
  const auto mixed = stdd::mix_gather(x, phase, 4, {2, 2}, 2, {1, 2}, 4, "continual");
  EXPECT(mixed.sizes() == at::IntArrayRef({2, 4, 9, 8}));
  // CLS is the frame's own, every channel, every scale.
  EXPECT_VALUE(at4(mixed, 0, 2, 0, 5), code(2, 0, 5));
  EXPECT_VALUE(at4(mixed, 1, 3, 0, 0), code(3, 0, 0));
  // Scale 1: channels [0, 2) from t-1, [2, 4) from t+1, [4, 8) own.
  // Frame 1, kept token 0, ch 0 reads frame 0's kept token 0 (phase 0: token 5).
  EXPECT_VALUE(at4(mixed, 0, 1, 1, 0), code(0, 5, 0));
  // ... ch 2 reads frame 2's kept token 0 (phase 2: token 1).
  EXPECT_VALUE(at4(mixed, 0, 1, 1, 2), code(2, 1, 2));
  // ... ch 5 is frame 1's own kept token 0 (phase 1: token 1).
  EXPECT_VALUE(at4(mixed, 0, 1, 1, 5), code(1, 1, 5));
  // Frame 0 has no t-1, frame 3 no t+1: zeros.
  EXPECT_VALUE(at4(mixed, 0, 0, 3, 1), 0.0);
  EXPECT_VALUE(at4(mixed, 0, 3, 3, 3), 0.0);
  // Scale 2, h = 1: ch 0 from t-2, ch 1 from t-1, ch 2 from t+1, ch 3 from t+2.
  // Frame 2, kept token 3, ch 0 reads frame 0's kept token 3 (phase 0: token 8).
  EXPECT_VALUE(at4(mixed, 1, 2, 4, 0), code(0, 8, 0));
  // Frame 1, kept token 7, ch 3 reads frame 3's kept token 7 (phase 3: token 15).
  EXPECT_VALUE(at4(mixed, 1, 1, 8, 3), code(3, 15, 3));
  EXPECT_VALUE(at4(mixed, 1, 1, 8, 0), 0.0);  // frame -1
  // Separate mixing, scale 2: [0, 2) from t-2, [2, 4) from t+2.
  const auto separate = stdd::mix_gather(x, phase, 4, {2, 2}, 2, {2}, 4, "separate");
  EXPECT_VALUE(at4(separate, 0, 2, 1, 1), code(0, 5, 1));
  EXPECT_VALUE(at4(separate, 0, 1, 2, 3), code(3, 5, 3));  // phase 3, kept token 1: token 5
  // No mixing, no masking: mixed is x itself.
  const auto plain = stdd::mix_gather(x, phase, 4, {2, 2}, 0, {1}, 4, "none");
  for (int64_t t = 0; t < 4; ++t) {
    // kept token j of a fully kept 4x4 grid: window j/4, cell j%4.
    EXPECT_VALUE(at4(plain, 0, t, 1 + 5, 7), code(t, 1 + 0 * 4 + 3, 7));  // window 1 (cols 2-3), cell 1
  }
}

// The release's rule (docs/stca.md), literally: table[t][ch] for ch < 2I, -1 = zero.
std::vector<std::vector<int64_t>> literal_official_table(int64_t T, int64_t I, int64_t s) {
  std::vector<std::vector<int64_t>> table(T, std::vector<int64_t>(2 * I, -1));
  for (int64_t i = 0; i < s; ++i) {
    const int64_t d = I >> i;
    for (int64_t t = 0; t < T; ++t) {
      if (t >= i + 1) {
        for (int64_t ch = 0; ch < d; ++ch) table[t][ch] = t - (i + 1);
      }
      if (t <= T - 2 - i) {
        for (int64_t ch = 2 * I - d; ch < 2 * I; ++ch) table[t][ch] = t + (i + 1);
      }
    }
  }
  return table;
}

// channel_run + source_frame (the forward) and reader_frames (the backward), the closed
// form every kernel evaluates, against the literal rule: exhaustive over I <= 40, every
// scale with a non-empty last block (2^(s-1) <= I), T <= 10, three own channels after 2I.
void test_official_closed_form_equals_the_literal_rule() {
  using stdd::Mixing;
  int64_t mismatches = 0;
  for (int64_t I = 1; I <= 40; ++I) {
    for (int64_t s = 1; (I >> (s - 1)) >= 1; ++s) {
      for (int64_t T = 1; T <= 10; ++T) {
        const auto table = literal_official_table(T, I, s);
        const int64_t D = 2 * I + 3;
        for (int64_t t = 0; t < T; ++t) {
          for (int64_t ch = 0; ch < D;) {
            const stdd::ChannelRun run = stdd::channel_run(ch, D, I, s, Mixing::kOfficial);
            mismatches += run.stop <= ch || run.stop > D;
            for (int64_t c = ch; c < run.stop && c < D; ++c) {
              const int64_t want = c < 2 * I ? table[t][c] : t;
              mismatches += stdd::source_frame(t, run.delta, T, Mixing::kOfficial) != want;
              // Readers of frame t through channel c: exactly the frames whose table entry is t.
              const auto readers = stdd::reader_frames(t, run.delta, T, Mixing::kOfficial);
              for (int64_t r = 0; r < T; ++r) {
                const bool reads = (c < 2 * I ? table[r][c] : r) == t;
                mismatches += reads != (readers.first <= r && r <= readers.last);
              }
            }
            ch = std::max(run.stop, ch + 1);
          }
        }
      }
    }
  }
  EXPECT_VALUE(mismatches, 0);
}

// T = 4 frames, one clip, 4x4 grid, D = 12, channel_fold 3 -> I = 4 (blocks 4, 2, 1); phases 0..3.
// The release's table for scale 3 (left half | right half; '-': zero), worked out by hand:
//   t=0: - - - - | 1 1 2 3    t=1: 0 0 0 0 | 2 2 3 3    t=2: 0 0 1 1 | 3 3 3 3    t=3: 0 1 2 2 | - - - -
void test_official_mix_gather_by_hand() {
  const auto x = encoded(4, 17, 12).requires_grad_(true);
  const auto phase = at::arange(4, at::kLong).view({1, 4});
  const auto mixed = stdd::mix_gather(x, phase, 4, {2, 2}, 2, {3}, 3, "official");
  // Kept token 0 of phase 0, 1, 2, 3: token 5, 1, 1, 2.
  EXPECT_VALUE(at4(mixed, 0, 0, 1, 0), 0.0);             // frame 0, left half: zero
  EXPECT_VALUE(at4(mixed, 0, 0, 1, 6), code(2, 1, 6));  // frame 0, ch 6 <- frame 2
  EXPECT_VALUE(at4(mixed, 0, 0, 1, 7), code(3, 2, 7));  // frame 0, ch 7 <- frame 3
  EXPECT_VALUE(at4(mixed, 0, 1, 1, 3), code(0, 5, 3));  // frame 1, ch 3 <- frame 0 (continual: t-1 too)
  EXPECT_VALUE(at4(mixed, 0, 1, 1, 0), code(0, 5, 0));  // frame 1, ch 0 <- frame 0 (clamped t-3)
  EXPECT_VALUE(at4(mixed, 0, 2, 1, 1), code(0, 5, 1));  // frame 2, ch 1 <- frame 0
  EXPECT_VALUE(at4(mixed, 0, 2, 1, 7), code(3, 2, 7));  // frame 2, ch 7 <- frame 3 (clamped t+3)
  EXPECT_VALUE(at4(mixed, 0, 3, 1, 1), code(1, 1, 1));  // frame 3, ch 1 <- frame 1
  EXPECT_VALUE(at4(mixed, 0, 3, 1, 2), code(2, 1, 2));  // frame 3, ch 2 <- frame 2
  EXPECT_VALUE(at4(mixed, 0, 3, 1, 4), 0.0);             // frame 3, right half: zero
  EXPECT_VALUE(at4(mixed, 0, 3, 1, 9), code(3, 2, 9));  // own channel
  mixed.sum().backward();
  // Frame 0's kept token 0 (token 5): ch 0 is read by frames 1, 2, 3; ch 1 by frames 1, 2; ch 2 by
  // frame 1; ch 4 by nobody.
  EXPECT_VALUE(at3(x.grad(), 0, 5, 0), 3.0);
  EXPECT_VALUE(at3(x.grad(), 0, 5, 1), 2.0);
  EXPECT_VALUE(at3(x.grad(), 0, 5, 2), 1.0);
  EXPECT_VALUE(at3(x.grad(), 0, 5, 4), 0.0);
  // Frame 3's kept token 0 (token 2): ch 7 is read by frames 0, 1, 2; ch 0 by nobody.
  EXPECT_VALUE(at3(x.grad(), 3, 2, 7), 3.0);
  EXPECT_VALUE(at3(x.grad(), 3, 2, 0), 0.0);
}

void test_pad_scatter_by_hand() {
  const auto full = encoded(4, 17, 8);
  const auto phase = at::arange(4, at::kLong).view({1, 4});
  // Scale s holds the constant s + 1: the mean of 2 scales is 1.5.
  auto mixed = at::empty({2, 4, 9, 8}, at::kDouble);
  mixed[0].fill_(1.0);
  mixed[1].fill_(2.0);
  const auto residual = at::full({4, 17, 8}, 10.0, at::kDouble);
  const auto pad = stdd::pad_scatter(full, mixed, phase, 4, {2, 2}, 2);
  const auto pad_res = stdd::pad_scatter(full, mixed, phase, 4, {2, 2}, 2, residual);
  EXPECT_VALUE(at3(pad, 0, 0, 3), 1.5);             // CLS from the mixed path
  EXPECT_VALUE(at3(pad, 0, 5, 0), 1.5);             // phase 0 keeps token 5
  EXPECT_VALUE(at3(pad, 0, 1, 0), code(0, 1, 0));   // ... and masks token 1
  EXPECT_VALUE(at3(pad, 1, 1, 7), 1.5);             // phase 1 keeps token 1
  EXPECT_VALUE(at3(pad, 1, 2, 7), code(1, 2, 7));   // ... and masks token 2
  EXPECT_VALUE(at3(pad_res, 1, 1, 7), 11.5);
  EXPECT_VALUE(at3(pad_res, 1, 2, 7), code(1, 2, 7) + 10.0);
}

// Autograd from C++: each x element's gradient counts the outputs that read it.
void test_autograd_by_hand() {
  const auto x = encoded(4, 17, 8).requires_grad_(true);
  const auto phase = at::arange(4, at::kLong).view({1, 4});
  stdd::mix_gather(x, phase, 4, {2, 2}, 2, {1}, 4, "continual").sum().backward();
  const auto grad = x.grad();
  // Frame 0 keeps token 5: ch 0 (read by frame t+1 = 1) -> 1; ch 2 (read by t-1 = -1) -> 0; own ch -> 1.
  EXPECT_VALUE(at3(grad, 0, 5, 0), 1.0);
  EXPECT_VALUE(at3(grad, 0, 5, 2), 0.0);
  EXPECT_VALUE(at3(grad, 0, 5, 6), 1.0);
  EXPECT_VALUE(at3(grad, 3, 2, 0), 0.0);  // frame 3 has no t+1 reader
  EXPECT_VALUE(at3(grad, 3, 2, 3), 1.0);  // phase 3 keeps token 2; frame 2 reads ch 3 from t+1
  EXPECT_VALUE(at3(grad, 0, 1, 6), 0.0);  // masked in frame 0: read by nobody
  EXPECT_VALUE(at3(grad, 2, 0, 4), 1.0);  // CLS, one scale
  EXPECT_VALUE(grad.sum().item<double>(), 4 * 9 * 8 - 2 * 8 * 2);  // every read, minus 2 frames x 8 kept x 2 channels of zeros

  const auto full = encoded(4, 17, 8).requires_grad_(true);
  const auto mixed = at::zeros({2, 4, 9, 8}, at::kDouble).requires_grad_(true);
  const auto residual = at::zeros({4, 17, 8}, at::kDouble).requires_grad_(true);
  stdd::pad_scatter(full, mixed, phase, 4, {2, 2}, 2, residual).sum().backward();
  EXPECT_VALUE(at3(full.grad(), 0, 1, 0), 1.0);  // masked: the full path's token
  EXPECT_VALUE(at3(full.grad(), 0, 5, 0), 0.0);  // kept: replaced
  EXPECT_VALUE(at3(full.grad(), 0, 0, 0), 0.0);  // CLS: replaced
  EXPECT(at::equal(mixed.grad(), at::full_like(mixed, 0.5)));  // mean of 2 scales
  EXPECT(at::equal(residual.grad(), at::ones_like(residual)));
}

void test_errors_name_the_argument() {
  const auto x = at::randn({6, 37, 48});
  const auto phase = at::zeros({2, 3}, at::kLong);
  expect_error([&] { stdd::mix_gather(x, phase, 3, {4, 4}, 2, {1, 2}, 8, "continual"); }, "must tile the 6x6");
  expect_error([&] { stdd::mix_gather(x, phase, 3, {2, 2}, 4, {1, 2}, 8, "continual"); }, "masked must be in [0, K)");
  expect_error([&] { stdd::mix_gather(x, phase, 3, {2, 2}, 2, {1, 4}, 8, "continual"); }, "scale 4");
  expect_error([&] { stdd::mix_gather(x, phase, 3, {2, 2}, 2, {1, 2}, 8, "sideways"); }, "mixing must be one of");
  expect_error([&] { stdd::mix_gather(x, phase, 4, {2, 2}, 2, {1, 2}, 8, "continual"); }, "num_frames=4");
  expect_error([&] { stdd::mix_gather(x, phase.t(), 3, {2, 2}, 2, {1, 2}, 8, "continual"); }, "phase must have shape");
  expect_error([&] { stdd::mix_gather(x.to(at::kInt), phase, 3, {2, 2}, 2, {1, 2}, 8, "continual"); },
               "x must be float32");
  EXPECT_VALUE(stdd::masked_cells({2, 2}, 0.5), 2);
  EXPECT_VALUE(stdd::masked_cells({2, 1}, 0.25), 0);  // round(0.5) = 0: half to even, as Python
  EXPECT_VALUE(stdd::masked_cells({2, 2}, 0.75), 3);
  expect_error([&] { stdd::masked_cells({2, 1}, 0.8); }, "at least one cell must be kept");
  // The release's floor: the same where mask_ratio * K is whole or below one half past it.
  EXPECT_VALUE(stdd::masked_cells({2, 2}, 0.5, "floor"), 2);
  EXPECT_VALUE(stdd::masked_cells({2, 2}, 0.6, "floor"), 2);  // 2.4
  EXPECT_VALUE(stdd::masked_cells({2, 2}, 0.4, "nearest"), 2);  // 1.6
  EXPECT_VALUE(stdd::masked_cells({2, 2}, 0.4, "floor"), 1);
  EXPECT_VALUE(stdd::masked_cells({3, 3}, 0.4), 4);  // 3.6
  EXPECT_VALUE(stdd::masked_cells({3, 3}, 0.4, "floor"), 3);
  EXPECT_VALUE(stdd::masked_cells({2, 1}, 0.8, "floor"), 1);  // 1.6: one cell kept
  expect_error([&] { stdd::masked_cells({2, 2}, 0.5, "ceil"); }, "mask_rounding must be 'nearest' or 'floor'");
  // The release's rule halves the blocks: I = 6 has blocks 6, 3, 1, so scales up to 3.
  expect_error([&] { stdd::mix_gather(x, phase, 3, {2, 2}, 2, {1, 4}, 8, "official"); },
               "scale 4 in scales=[1, 4] with I = D // channel_fold = 6 has empty blocks and would equal scale 3");
  // I = 48 // 5 = 9 need not be divisible by the scales (continual mixing rejects 2).
  EXPECT(stdd::mix_gather(x, phase, 3, {2, 2}, 2, {1, 2}, 5, "official").size(0) == 2);
  expect_error([&] { stdd::mix_gather(x, phase, 3, {2, 2}, 2, {1, 2}, 5, "continual"); }, "scale 2");
}

// The CUDA kernels' per-thread bodies, run on the CPU over every (item, chunk)
// as a kernel's threads do (the item's shared index math once, then its
// chunks), must give exactly what the CPU kernels give. `offset` elements of
// slack in front of every input and output shift their base addresses, so
// width V is also run on memory that is only V-element aligned (the
// misaligned-pointer fallback of vector_width); the width that vector_width
// picks for these tensors must be V.
template <typename scalar_t, int V>
void check_kernel_bodies(at::ScalarType dtype, int64_t T, int64_t B, int64_t D, int64_t P,
                         std::vector<int64_t> window, int64_t masked, std::vector<int64_t> scales, int64_t fold,
                         const char* mixing, int64_t offset = 0) {
  namespace k = stdd::kernels;
  const int64_t R = B * T;
  auto generator = at::detail::createCPUGenerator(1234 + D + P + V);
  // A tensor of `shape` that starts `offset` elements into a larger buffer.
  auto shifted = [&](const at::Tensor& values) -> at::Tensor {
    auto buffer = at::full({values.numel() + offset}, NAN, values.options());
    auto view = buffer.narrow(0, offset, values.numel()).view(values.sizes());
    view.copy_(values);
    return view;
  };
  const at::Tensor x = shifted(at::randn({R, 1 + P * P, D}, generator, at::TensorOptions().dtype(at::kDouble)).to(dtype));
  // Also out of [0, K), negative too: every kernel reduces a phase mod K (Python's validate=False
  // skips the range check), so they must give what the phases' residues give.
  const int64_t K = window[0] * window[1];
  const auto phase = at::randint(-3 * K, 3 * K, {B, T}, generator, at::kLong);
  const auto residue = at::remainder(phase, K);
  const auto plan = stdd::detail::plan_mix(R, P, D, T, window, masked, scales, fold, mixing);
  const auto args = k::make_mix_args(plan);
  const int64_t S = static_cast<int64_t>(scales.size());
  const int64_t tokens_in = plan.mask.num_tokens(), tokens_out = 1 + plan.mask.num_kept();
  const auto* p = phase.const_data_ptr<int64_t>();
  const int64_t size = static_cast<int64_t>(sizeof(scalar_t));

  const auto mixed = stdd::mix_gather(x, phase, T, window, masked, scales, fold, mixing);
  EXPECT(at::equal(mixed, stdd::mix_gather(x, residue, T, window, masked, scales, fold, mixing)));
  at::Tensor mixed_body = shifted(at::full_like(mixed, NAN));
  EXPECT_VALUE(k::vector_width(size, k::mix_boundaries(args), {x.const_data_ptr(), mixed_body.const_data_ptr()}), V);
  for (int64_t item = 0; item < S * R * tokens_out; ++item) {
    const auto it = k::mix_gather_item(args, item);
    for (int32_t ch = 0; ch < D; ch += V)
      k::mix_gather_chunk<scalar_t, V>(x.const_data_ptr<scalar_t>(), p, mixed_body.mutable_data_ptr<scalar_t>(), args,
                                       it, item, ch);
  }
  EXPECT(at::equal(mixed_body, mixed));

  const at::Tensor grad_mixed = shifted(at::randn_like(mixed));
  const auto grad_x = stdd::mix_gather_backward(grad_mixed, phase, T, P, window, masked, scales, fold, mixing);
  EXPECT(at::equal(grad_x, stdd::mix_gather_backward(grad_mixed, residue, T, P, window, masked, scales, fold, mixing)));
  at::Tensor grad_x_body = shifted(at::full_like(x, NAN));
  for (int64_t item = 0; item < R * tokens_in; ++item) {
    const auto it = k::token_item(args.mask, p, args.num_frames, item);
    for (int32_t ch = 0; ch < D; ch += V)
      k::mix_gather_backward_chunk<scalar_t, V>(grad_mixed.const_data_ptr<scalar_t>(),
                                                grad_x_body.mutable_data_ptr<scalar_t>(), args, it, item, ch);
  }
  EXPECT(at::equal(grad_x_body, grad_x));

  const at::Tensor full = shifted(at::randn_like(x));
  const at::Tensor residual = shifted(at::randn_like(x));
  const auto pad_plan = stdd::detail::check_pad_scatter(full, mixed, T, window, masked, residual);
  const auto pad_args = k::make_pad_args(pad_plan);
  EXPECT_VALUE(k::vector_width(size, D, {full.const_data_ptr(), mixed.const_data_ptr(), residual.const_data_ptr()}),
               offset == 0 ? 16 / size : V);
  for (bool with_residual : {false, true}) {
    const auto pad = stdd::pad_scatter(full, mixed, phase, T, window, masked,
                                       with_residual ? std::optional<at::Tensor>(residual) : std::nullopt);
    EXPECT(at::equal(pad, stdd::pad_scatter(full, mixed, residue, T, window, masked,
                                            with_residual ? std::optional<at::Tensor>(residual) : std::nullopt)));
    at::Tensor pad_body = shifted(at::full_like(x, NAN));
    for (int64_t item = 0; item < R * tokens_in; ++item) {
      const auto it = k::token_item(pad_args.mask, p, 1, item);
      for (int32_t ch = 0; ch < D; ch += V)
        k::pad_scatter_chunk<scalar_t, V>(full.const_data_ptr<scalar_t>(), mixed.const_data_ptr<scalar_t>(),
                                          with_residual ? residual.const_data_ptr<scalar_t>() : nullptr,
                                          pad_body.mutable_data_ptr<scalar_t>(), pad_args, it, item, ch);
    }
    EXPECT(at::equal(pad_body, pad));
  }

  const auto [grad_full, grad_mixed_pad] = stdd::pad_scatter_backward(full, phase, T, window, masked, S);
  const auto [grad_full_residue, grad_mixed_residue] = stdd::pad_scatter_backward(full, residue, T, window, masked, S);
  EXPECT(at::equal(grad_full, grad_full_residue) && at::equal(grad_mixed_pad, grad_mixed_residue));
  at::Tensor grad_full_body = shifted(at::full_like(x, NAN));
  at::Tensor grad_mixed_body = shifted(at::full_like(mixed, NAN));
  for (int64_t item = 0; item < R * tokens_in; ++item) {
    const auto it = k::token_item(pad_args.mask, p, 1, item);
    for (int32_t ch = 0; ch < D; ch += V)
      k::pad_scatter_backward_chunk<scalar_t, V>(full.const_data_ptr<scalar_t>(),
                                                 grad_full_body.mutable_data_ptr<scalar_t>(),
                                                 grad_mixed_body.mutable_data_ptr<scalar_t>(), pad_args, it, item, ch);
  }
  EXPECT(at::equal(grad_full_body, grad_full));
  EXPECT(at::equal(grad_mixed_body, grad_mixed_pad));
}

// vector_width by hand: boundaries and alignment.
void test_vector_width_rule() {
  namespace k = stdd::kernels;
  alignas(16) static char memory[64];
  const void* aligned = memory;
  // ViT-B/16 defaults, D = 768, I = 24, scales (1, 2): boundaries 768, 24, 24, 12 -> gcd 12.
  const auto plan = stdd::detail::plan_mix(8, 14, 768, 8, {2, 2}, 2, {1, 2}, 32, "continual");
  const auto args = k::make_mix_args(plan);
  EXPECT_VALUE(k::mix_boundaries(args), 12);
  EXPECT_VALUE(k::vector_width(2, 12, {aligned}), 4);  // bf16 / fp16: 4 x 2 bytes
  EXPECT_VALUE(k::vector_width(4, 12, {aligned}), 4);  // fp32: 16 bytes
  EXPECT_VALUE(k::vector_width(8, 12, {aligned}), 2);  // fp64: 16 bytes
  EXPECT_VALUE(k::vector_width(2, 768, {aligned}), 8);  // pad_scatter at D = 768: 16 bytes of bf16
  // Separate mixing and no mixing drop the I / s boundaries.
  EXPECT_VALUE(k::mix_boundaries(k::make_mix_args(stdd::detail::plan_mix(8, 14, 768, 8, {2, 2}, 2, {1, 2}, 32, "separate"))), 24);
  EXPECT_VALUE(k::mix_boundaries(k::make_mix_args(stdd::detail::plan_mix(8, 14, 768, 8, {2, 2}, 2, {1, 2}, 32, "none"))), 768);
  // I = 6, scale 2 -> width 3: odd, one element per thread.
  EXPECT_VALUE(k::mix_boundaries(k::make_mix_args(stdd::detail::plan_mix(2, 4, 24, 2, {2, 2}, 2, {1, 2}, 4, "continual"))), 3);
  EXPECT_VALUE(k::vector_width(2, 3, {aligned}), 1);
  // Alignment: every pointer must be aligned to V elements; the worst one decides.
  EXPECT_VALUE(k::vector_width(2, 768, {aligned, memory + 2}), 1);
  EXPECT_VALUE(k::vector_width(2, 768, {memory + 4, aligned}), 2);
  EXPECT_VALUE(k::vector_width(2, 768, {memory + 8}), 4);
  EXPECT_VALUE(k::vector_width(4, 768, {memory + 8}), 2);
  EXPECT_VALUE(k::vector_width(2, 768, {aligned, nullptr}), 8);  // an absent residual does not count
  // The release's rule: every block width I >> i, i < s, is a boundary.
  auto official = [](std::vector<int64_t> scales, int64_t D) {
    return k::mix_boundaries(k::make_mix_args(stdd::detail::plan_mix(8, 14, D, 8, {2, 2}, 2, scales, 32, "official")));
  };
  EXPECT_VALUE(official({1, 2}, 768), 12);     // I = 24: 24, 12 (as continual)
  EXPECT_VALUE(official({1, 2, 3}, 768), 6);   // 24, 12, 6 (continual would reject 3)
  EXPECT_VALUE(official({3}, 640), 5);         // I = 20: 20, 10, 5
  EXPECT_VALUE(official({1}, 1024), 32);       // I = 32
  EXPECT_VALUE(k::vector_width(2, official({1, 2, 3}, 768), {aligned}), 2);
  EXPECT_VALUE(k::vector_width(2, official({3}, 640), {aligned}), 1);
  // The int32 index math of the CUDA kernels refuses sizes that do not fit.
  expect_error([] { k::make_mix_args(stdd::detail::plan_mix(2, 4, int64_t{1} << 31, 2, {2, 2}, 2, {1}, 4, "none")); },
               "D < 2**31");
}

void test_cuda_kernel_bodies_on_cpu() {
  // Every vector width of every dtype, each boundary that limits it (D, I, I/s),
  // and each width again on base addresses misaligned for the next wider one.
  check_kernel_bodies<float, 1>(at::kFloat, 3, 2, 24, 4, {2, 2}, 2, {1, 2}, 4, "continual");      // I/s = 3
  check_kernel_bodies<float, 2>(at::kFloat, 8, 1, 40, 6, {2, 2}, 2, {1}, 4, "continual");         // I = 10
  check_kernel_bodies<float, 4>(at::kFloat, 8, 1, 64, 6, {2, 2}, 2, {1, 2}, 8, "continual");      // I/2 = 4
  check_kernel_bodies<float, 2>(at::kFloat, 3, 2, 64, 4, {2, 1}, 1, {1, 2}, 8, "continual", 2);    // misaligned for 4
  check_kernel_bodies<float, 1>(at::kFloat, 3, 1, 64, 4, {2, 2}, 1, {1, 2}, 8, "continual", 1);    // misaligned for 2
  check_kernel_bodies<double, 1>(at::kDouble, 3, 1, 40, 6, {2, 1}, 1, {1, 2, 4}, 8, "separate");   // I = 5
  check_kernel_bodies<double, 2>(at::kDouble, 3, 1, 40, 6, {2, 1}, 1, {1, 2, 4}, 4, "separate");   // I = 10
  check_kernel_bodies<double, 1>(at::kDouble, 2, 2, 64, 4, {2, 2}, 2, {1, 2}, 8, "continual", 1);  // misaligned for 2
  check_kernel_bodies<c10::Half, 8>(at::kHalf, 2, 3, 64, 4, {2, 2}, 1, {1, 2}, 4, "continual");    // I/2 = 8
  check_kernel_bodies<c10::Half, 4>(at::kHalf, 8, 1, 96, 14, {2, 2}, 2, {1, 2}, 12, "continual");  // I/2 = 4
  check_kernel_bodies<c10::Half, 2>(at::kHalf, 3, 1, 96, 6, {2, 2}, 2, {1, 2}, 8, "continual");    // I/2 = 6
  check_kernel_bodies<c10::Half, 1>(at::kHalf, 3, 1, 40, 4, {2, 1}, 1, {1}, 8, "separate");        // I = 5
  check_kernel_bodies<c10::Half, 4>(at::kHalf, 3, 1, 64, 4, {2, 2}, 2, {1, 2}, 4, "continual", 4); // misaligned for 8
  check_kernel_bodies<c10::Half, 1>(at::kHalf, 3, 1, 64, 4, {2, 2}, 2, {1, 2}, 4, "continual", 1); // misaligned for 2
  check_kernel_bodies<c10::BFloat16, 8>(at::kBFloat16, 3, 1, 96, 6, {2, 2}, 0, {1}, 32, "none");   // D = 96
  check_kernel_bodies<c10::BFloat16, 4>(at::kBFloat16, 8, 1, 768, 4, {2, 2}, 2, {1, 2}, 32, "continual");  // ViT-B
  check_kernel_bodies<c10::BFloat16, 2>(at::kBFloat16, 3, 2, 48, 4, {2, 2}, 2, {1, 2}, 4, "continual");    // I/2 = 6
  check_kernel_bodies<c10::BFloat16, 1>(at::kBFloat16, 1, 2, 40, 4, {2, 1}, 1, {2}, 4, "continual");       // I/2 = 5
  check_kernel_bodies<c10::BFloat16, 2>(at::kBFloat16, 3, 1, 64, 4, {2, 2}, 2, {1, 2}, 4, "continual", 2); // misaligned for 4
  // The release's rule: T = 1, 2, 3, 4, 8; widths set by I >> i.
  check_kernel_bodies<float, 4>(at::kFloat, 1, 3, 64, 4, {2, 2}, 2, {1, 2, 3}, 4, "official");      // I = 16: 16, 8, 4
  check_kernel_bodies<float, 2>(at::kFloat, 4, 2, 48, 6, {2, 1}, 1, {1, 2}, 4, "official");         // I = 12: 12, 6
  check_kernel_bodies<float, 1>(at::kFloat, 3, 1, 64, 4, {2, 2}, 2, {1, 2, 3}, 4, "official", 1);   // misaligned for 2
  check_kernel_bodies<double, 1>(at::kDouble, 8, 1, 26, 4, {2, 2}, 1, {3}, 2, "official");          // I = 13
  check_kernel_bodies<double, 2>(at::kDouble, 2, 2, 64, 4, {2, 2}, 2, {1, 2}, 8, "official");       // I = 8: 8, 4
  check_kernel_bodies<c10::Half, 8>(at::kHalf, 8, 1, 128, 4, {2, 2}, 2, {1, 2, 3}, 4, "official");  // I = 32: 32, 16, 8
  check_kernel_bodies<c10::Half, 4>(at::kHalf, 3, 2, 128, 4, {2, 2}, 2, {1, 3}, 4, "official", 4);  // misaligned for 8
  check_kernel_bodies<c10::BFloat16, 4>(at::kBFloat16, 8, 1, 768, 4, {2, 2}, 2, {1, 2}, 32, "official");  // ViT-B
  check_kernel_bodies<c10::BFloat16, 2>(at::kBFloat16, 2, 3, 768, 4, {2, 1}, 1, {1, 2, 3}, 32, "official");  // 24, 12, 6
  check_kernel_bodies<c10::BFloat16, 1>(at::kBFloat16, 4, 1, 40, 4, {2, 2}, 2, {3}, 2, "official");  // I = 20: 20, 10, 5
}

}  // namespace

int main() {
  test_kept_tokens_by_hand();
  test_channel_runs_by_hand();
  test_mix_gather_by_hand();
  test_official_closed_form_equals_the_literal_rule();
  test_official_mix_gather_by_hand();
  test_pad_scatter_by_hand();
  test_autograd_by_hand();
  test_errors_name_the_argument();
  test_vector_width_rule();
  test_cuda_kernel_bodies_on_cpu();
  std::printf("stca_ops_test: %d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
