// The float32 linear of edgecompute_ml's encoders (_architectures/dense.py):
//   y[m, n] = sum_k x[m, k] * w[n, k] + bias[n] (+ residual[m, n])
// for the few rows of one short input (a sentence: ~10 rows) as well as for many.
//
// Why not oneDNN's packed inner product (the fallback): for a sentence, a MiniLM forward's 24
// linears stream 42 MB of weights, and oneDNN spends ~15 us a call building its primitive
// descriptor before it starts; its kernels also block rows for large M. Here every row of the
// input passes each 16-column block of the weight in one sweep (up to 12 rows with AVX-512, 6
// with AVX2: one accumulator per row and vector of columns, one broadcast and FMA per row and
// weight vector), so the weight is read once for a sentence and the call costs a few
// microseconds beyond its arithmetic (docs/ml.md).
//
// Weight layout (built by dense.py): float32 [ceil(N/16), K, 16]: block b holds columns
// 16b..16b+15, k-major, zero-padded past N. Row sums run in k order in one float32 accumulator
// per output (not oneDNN's order: equal to float32 rounding). The bias, then the residual, are
// added on the way out, as oneDNN's "add" post-op does.
//
// AVX-512F, else AVX2 with FMA, chosen once at load (per-function target attributes: the library
// is compiled without -march); a CPU with neither: linear_isa reports 0 and dense.py keeps oneDNN.
// Threads: ATen's intra-op pool.

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace {

constexpr int64_t kLanes = 16;  // columns of one weight block

enum Isa : int64_t { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

int64_t detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kNone;
}

const int64_t kBestIsa = detect_isa();
int64_t g_isa = kBestIsa;

// rows a sweep: one accumulator register per row and 16 columns, of 32 zmm (AVX-512) or 16 ymm
// (AVX2: two a row); more rows spill
constexpr int kRows512 = 12;
constexpr int kRows256 = 6;

// every loop over a sweep's rows unrolled, so that the accumulators live in registers (rolled,
// GCC stores them to the stack on every step of k: measured 2x slower)
#if defined(__clang__)
#define UNROLL _Pragma("clang loop unroll(full)")
#else
#define UNROLL _Pragma("GCC unroll 16")
#endif

struct Args {
  const float* x;         // [M, K]
  const float* w;         // [NB, K, 16]
  const float* bias;      // [N] or null
  const float* residual;  // [M, N] or null
  float* out;             // [M, N]
  int64_t k, n;
};

// Rows m0..m0+R-1 against block b, AVX-512F.
template <int R>
__attribute__((target("avx512f"))) void sweep512(const Args& a, int64_t m0, int64_t b) {
  const int64_t k = a.k;
  const float* w = a.w + b * k * kLanes;
  const float* x = a.x + m0 * k;
  __m512 acc[R];
  UNROLL for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    const __m512 wv = _mm512_load_ps(w + i * kLanes);
    UNROLL for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * k + i]), wv, acc[r]);
  }
  const int64_t n0 = b * kLanes;
  const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(kLanes, a.n - n0)) - 1u);
  const __m512 bias = a.bias != nullptr ? _mm512_maskz_loadu_ps(mask, a.bias + n0) : _mm512_setzero_ps();
  UNROLL for (int r = 0; r < R; ++r) {
    __m512 v = _mm512_add_ps(acc[r], bias);
    const int64_t at = (m0 + r) * a.n + n0;
    if (a.residual != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, a.residual + at));
    _mm512_mask_storeu_ps(a.out + at, mask, v);
  }
}

// The same with AVX2 and FMA: each row's 16 columns in two registers.
template <int R>
__attribute__((target("avx2,fma"))) void sweep256(const Args& a, int64_t m0, int64_t b) {
  const int64_t k = a.k;
  const float* w = a.w + b * k * kLanes;
  const float* x = a.x + m0 * k;
  __m256 lo[R], hi[R];
  UNROLL for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    const __m256 w0 = _mm256_load_ps(w + i * kLanes), w1 = _mm256_load_ps(w + i * kLanes + 8);
    UNROLL for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * k + i);
      lo[r] = _mm256_fmadd_ps(xv, w0, lo[r]);
      hi[r] = _mm256_fmadd_ps(xv, w1, hi[r]);
    }
  }
  const int64_t n0 = b * kLanes;
  const int64_t cols = std::min<int64_t>(kLanes, a.n - n0);
  alignas(32) float row[kLanes];
  UNROLL for (int r = 0; r < R; ++r) {
    _mm256_store_ps(row, lo[r]);
    _mm256_store_ps(row + 8, hi[r]);
    const int64_t at = (m0 + r) * a.n + n0;
    // the epilogue is 16 values a row against K multiply-adds each: scalar, and exact for a tail
    for (int64_t c = 0; c < cols; ++c) {
      float v = row[c] + (a.bias != nullptr ? a.bias[n0 + c] : 0.0f);
      if (a.residual != nullptr) v += a.residual[at + c];
      a.out[at + c] = v;
    }
  }
}

using SweepFn = void (*)(const Args&, int64_t, int64_t);

template <int... R>
constexpr SweepFn pick512(int rows, std::integer_sequence<int, R...>) {
  SweepFn fn = nullptr;
  ((rows == R + 1 ? (fn = &sweep512<R + 1>, 0) : 0), ...);
  return fn;
}

template <int... R>
constexpr SweepFn pick256(int rows, std::integer_sequence<int, R...>) {
  SweepFn fn = nullptr;
  ((rows == R + 1 ? (fn = &sweep256<R + 1>, 0) : 0), ...);
  return fn;
}

SweepFn sweep_for(int64_t isa, int rows) {
  return isa == kAvx512 ? pick512(rows, std::make_integer_sequence<int, kRows512>{})
                        : pick256(rows, std::make_integer_sequence<int, kRows256>{});
}

at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& residual, int64_t n) {
  const int64_t isa = g_isa;
  TORCH_CHECK(isa != kNone, "edgecompute_ml::f32_linear: this CPU has neither AVX-512F nor AVX2 with FMA");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.dim() >= 1,
              "f32_linear: x must be a float32 CPU tensor [..., K]");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 3 && w.size(2) == kLanes && w.is_contiguous(),
              "f32_linear: the weight must be packed float32 [ceil(N/16), K, 16]");
  const int64_t k = x.size(-1);
  TORCH_CHECK(w.size(1) == k, "f32_linear: x has ", k, " features, the weight ", w.size(1));
  TORCH_CHECK(n > 0 && (n + kLanes - 1) / kLanes == w.size(0), "f32_linear: n=", n, " does not fit a weight of ",
              w.size(0), " blocks");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr<float>()) % 64 == 0, "f32_linear: the weight must be 64-byte aligned");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous(),
                "f32_linear: bias must be contiguous float32 [", n, "]");
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  const at::Tensor xc = x.contiguous();
  const int64_t m = k == 0 ? 0 : xc.numel() / k;
  at::Tensor res;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->sizes() == at::IntArrayRef(shape),
                "f32_linear: the residual must be float32 shaped like the output");
    res = residual->contiguous();
  }
  at::Tensor out = at::empty(shape, x.options());
  if (m == 0) return out;
  const Args a{xc.data_ptr<float>(), w.data_ptr<float>(), has_bias ? bias->data_ptr<float>() : nullptr,
               res.defined() ? res.data_ptr<float>() : nullptr, out.data_ptr<float>(), k, n};
  const int64_t blocks = w.size(0);
  // every row group against a run of blocks: a block's weights (K * 64 bytes) stay in cache while
  // the row groups pass; a run starts once the work is worth a fork (~64K multiply-adds a task)
  const int64_t most = isa == kAvx512 ? kRows512 : kRows256;
  auto run = [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t m0 = 0; m0 < m; m0 += most) {
        const int rows = static_cast<int>(std::min<int64_t>(most, m - m0));
        sweep_for(isa, rows)(a, m0, b);
      }
    }
  };
  const int64_t per_block = m * k * kLanes;
  at::parallel_for(0, blocks, std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, per_block)), run);
  return out;
}

at::Tensor f32_linear_meta(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  TORCH_CHECK(!shape.empty(), "f32_linear: x must be [..., K]");
  shape.back() = n;
  return at::empty(shape, x.options());
}

int64_t linear_isa(int64_t want) {
  // want < 0: report; otherwise use min(want, what the CPU has) (tests run the AVX2 path too)
  if (want >= 0) g_isa = std::min<int64_t>(want, kBestIsa);
  return g_isa;
}

}  // namespace

// f32_linear's schema is declared from Python (_kernels/build.py, declare_linear): TorchScript
// functions naming it compile whether or not this library loads
TORCH_LIBRARY_FRAGMENT(edgecompute_ml, m) {
  m.def("linear_isa(int want) -> int", &linear_isa);
}

TORCH_LIBRARY_IMPL(edgecompute_ml, CPU, m) {
  m.impl("f32_linear", &f32_linear);
}

TORCH_LIBRARY_IMPL(edgecompute_ml, Meta, m) {
  m.impl("f32_linear", &f32_linear_meta);
}
