// The float32 linear of edgecompute_ml's encoders (_architectures/dense.py):
//   y[m, n] = sum_k x[m, k] * w[n, k] + bias[n], then + residual[m, n], or gelu(...)
// for the few rows of one short input (a sentence: ~10 rows) as well as for many.
//
// Why not oneDNN's packed inner product (the fallback): for a sentence, a MiniLM forward's 24
// linears stream 42 MB of weights, and oneDNN spends ~15 us a call building its primitive
// descriptor before it starts. Here every row of the input passes each block of columns of the
// weight in one sweep (up to 12 rows: one accumulator per row and vector of columns, one
// broadcast and FMA per row and weight vector), so the weight is read once for a sentence and the
// call costs a few microseconds beyond its arithmetic (docs/ml.md).
//
// Weight layout (built by dense.py): float32 [ceil(N/L), K, L], L = 16 for AVX-512, 8 for AVX2
// (one vector): block b holds columns Lb..Lb+L-1, k-major, zero-padded past N. Row sums run in k order in one float32 accumulator
// per output (not oneDNN's order: equal to float32 rounding). The bias, then the residual, are
// added on the way out, as oneDNN's "add" post-op does; or GELU (erf) is applied there, with the
// erf of torch's own vectorised kernels (Abramowitz-Stegun 7.1.26, |error| <= 1.5e-7) and a
// Cephes exp: a pass over the output less, and on AVX2 ~5x faster than torch's GELU here.
//
// AVX-512F, else AVX2 with FMA, chosen once at load (per-function target attributes: the library
// is compiled without -march); a CPU with neither: linear_isa reports 0 and dense.py keeps oneDNN.
// Threads: ATen's intra-op pool.

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "simd.h"

namespace {

constexpr int64_t kLanes = 16;  // columns of one weight block for AVX-512
constexpr int64_t kNarrow = 8;  // for AVX2

enum Isa : int64_t { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

int64_t detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kNone;
}

const int64_t kBestIsa = detect_isa();
int64_t g_isa = kBestIsa;

// rows a sweep: one accumulator register per row and block, of 32 zmm (AVX-512) or 16 ymm (AVX2:
// 12 rows on one block, 6 on two); more rows spill
constexpr int kRows512 = 12;
constexpr int kRows256 = 12;
constexpr int kRows256x2 = 6;
// input bytes of a chunk of rows: a chunk stays in L2 while a thread's blocks pass it, so every
// block streams from memory once a chunk, not the whole input once a block (at 768 rows the
// whole input is 1.2-4.7 MB)
constexpr int64_t kChunkBytes = 128 * 1024;
// weight steps read ahead (1 KB): the hardware prefetcher alone leaves a sweep ~15-30% slower on
// this VM's Zen 3 (a 336x384x1536 product at one thread: 66-74 against 74-86 GFLOPS); a prefetch
// past the block's end is a hint, never a fault
constexpr int64_t kPrefetch = 16;
// the same for AVX2's 8-column blocks, 4 KB ahead: 1 KB left MiniLM's linears ~5% slower
constexpr int64_t kPrefetchNarrow = 128;

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
  bool gelu;
};

// GELU constants: erf(z) = sign(z) (1 - t r(t) exp(-z^2)), t = 1 / (1 + p |z|); exp: simd.h's
constexpr float kErfP = 0.3275911f, kErf1 = 0.254829592f, kErf2 = -0.284496736f, kErf3 = 1.421413741f,
                kErf4 = -1.453152027f, kErf5 = 1.061405429f;
constexpr float kRsqrt2 = 0.70710678118654752f;

__attribute__((target("avx2,fma"))) inline __m256 gelu256(__m256 v) {
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  const __m256 z = _mm256_mul_ps(v, _mm256_set1_ps(kRsqrt2));
  const __m256 az = _mm256_andnot_ps(sign, z);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(kErfP), az, one));
  __m256 r = _mm256_fmadd_ps(_mm256_set1_ps(kErf5), t, _mm256_set1_ps(kErf4));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(kErf3));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(kErf2));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(kErf1));
  const __m256 e = exp256(_mm256_xor_ps(sign, _mm256_mul_ps(z, z)));  // exp(-z^2)
  const __m256 erf_abs = _mm256_fnmadd_ps(_mm256_mul_ps(t, r), e, one);
  const __m256 erf = _mm256_or_ps(erf_abs, _mm256_and_ps(sign, z));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v), _mm256_add_ps(one, erf));
}

__attribute__((target("avx512f"))) inline __m512 gelu512(__m512 v) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512 z = _mm512_mul_ps(v, _mm512_set1_ps(kRsqrt2));
  const __m512 az = _mm512_castsi512_ps(_mm512_andnot_si512(sign, _mm512_castps_si512(z)));
  const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(kErfP), az, one));
  __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(kErf5), t, _mm512_set1_ps(kErf4));
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(kErf3));
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(kErf2));
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(kErf1));
  const __m512 q = _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, z)), _mm512_set1_ps(-kExpHi));
  const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(q, _mm512_set1_ps(kLog2e), _mm512_set1_ps(0.5f)),
                                         _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_fnmadd_ps(fx, _mm512_set1_ps(kLn2Lo), _mm512_fnmadd_ps(fx, _mm512_set1_ps(kLn2Hi), q));
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kExp0), f, _mm512_set1_ps(kExp1));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp3));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp4));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp5));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, one));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
  const __m512 e = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
  const __m512 erf_abs = _mm512_fnmadd_ps(_mm512_mul_ps(t, r), e, one);
  const __m512 erf = _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_castps_si512(erf_abs), _mm512_and_si512(sign, _mm512_castps_si512(z))));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), _mm512_add_ps(one, erf));
}

// Row r of a sweep's x at step i: rows as they are ([R, K], row-major: one row, or a few) or a
// packed panel ([K, R]: the R values a step broadcasts share one cache line, one stream, not R)
template <int R, bool Packed>
inline const float* at_step(const float* x, int64_t k, int64_t i, int r) {
  return Packed ? x + i * R + r : x + r * k + i;
}

// Rows m0..m0+R-1 (their values at x) against block b, AVX-512F.
template <int R, bool Packed>
__attribute__((target("avx512f"))) void sweep512(const Args& a, const float* x, int64_t m0, int64_t b) {
  const int64_t k = a.k;
  const float* w = a.w + b * k * kLanes;
  __m512 acc[R];
  UNROLL for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(w + (i + kPrefetch) * kLanes), _MM_HINT_T0);
    const __m512 wv = _mm512_load_ps(w + i * kLanes);
    UNROLL for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(*at_step<R, Packed>(x, k, i, r)), wv, acc[r]);
    }
  }
  const int64_t n0 = b * kLanes;
  const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(kLanes, a.n - n0)) - 1u);
  const __m512 bias = a.bias != nullptr ? _mm512_maskz_loadu_ps(mask, a.bias + n0) : _mm512_setzero_ps();
  UNROLL for (int r = 0; r < R; ++r) {
    const int64_t at = (m0 + r) * a.n + n0;
    __m512 v = _mm512_add_ps(acc[r], bias);
    if (a.residual != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, a.residual + at));
    if (a.gelu) v = gelu512(v);
    _mm512_mask_storeu_ps(a.out + at, mask, v);
  }
}

// AVX2 with FMA, over 8-column blocks ([ceil(N/8), K, 8]: one register a step). Why not 16
// columns as with AVX-512: 16 ymm hold 6 rows of 16 accumulators, so a sentence's 10 rows took two
// sweeps of each block, and the second read it from cache while memory idled (MiniLM's 24 linears,
// one sentence: 0.91x the time of that 16-column form here). Up to 12 rows pass an 8-column block
// in one sweep; more rows go 6 at a time through two blocks at once (two streams, 12
// accumulators), the 16-column form's arithmetic with half the broadcasts of 12 rows on one block.
__attribute__((target("avx2,fma"))) inline void finish256(const Args& a, __m256 v, int64_t row, int64_t b) {
  const int64_t n0 = b * kNarrow;
  const int64_t at = row * a.n + n0;
  if (a.n - n0 >= kNarrow) {
    if (a.bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(a.bias + n0));
    if (a.residual != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(a.residual + at));
    if (a.gelu) v = gelu256(v);
    _mm256_storeu_ps(a.out + at, v);
    return;
  }
  // a tail block: its columns under a lane mask, never read or written past the row
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(a.n - n0)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  if (a.bias != nullptr) v = _mm256_add_ps(v, _mm256_maskload_ps(a.bias + n0, mask));
  if (a.residual != nullptr) v = _mm256_add_ps(v, _mm256_maskload_ps(a.residual + at, mask));
  if (a.gelu) v = gelu256(v);
  _mm256_maskstore_ps(a.out + at, mask, v);
}

// Rows m0..m0+R-1 against the 8-column block b (R <= 12).
template <int R, bool Packed>
__attribute__((target("avx2,fma"))) void sweep256(const Args& a, const float* x, int64_t m0, int64_t b) {
  const int64_t k = a.k;
  const float* w = a.w + b * k * kNarrow;
  __m256 acc[R];
  UNROLL for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(w + (i + kPrefetchNarrow) * kNarrow), _MM_HINT_T0);
    const __m256 wv = _mm256_load_ps(w + i * kNarrow);
    UNROLL for (int r = 0; r < R; ++r) {
      acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(at_step<R, Packed>(x, k, i, r)), wv, acc[r]);
    }
  }
  UNROLL for (int r = 0; r < R; ++r) finish256(a, acc[r], m0 + r, b);
}

// Rows m0..m0+R-1 against the 8-column blocks b and b + 1 (R <= 6).
template <int R, bool Packed>
__attribute__((target("avx2,fma"))) void sweep256x2(const Args& a, const float* x, int64_t m0, int64_t b) {
  const int64_t k = a.k;
  const float* w0 = a.w + b * k * kNarrow;
  const float* w1 = w0 + k * kNarrow;
  __m256 lo[R], hi[R];
  UNROLL for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(w0 + (i + kPrefetchNarrow) * kNarrow), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w1 + (i + kPrefetchNarrow) * kNarrow), _MM_HINT_T0);
    const __m256 v0 = _mm256_load_ps(w0 + i * kNarrow), v1 = _mm256_load_ps(w1 + i * kNarrow);
    UNROLL for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(at_step<R, Packed>(x, k, i, r));
      lo[r] = _mm256_fmadd_ps(xv, v0, lo[r]);
      hi[r] = _mm256_fmadd_ps(xv, v1, hi[r]);
    }
  }
  UNROLL for (int r = 0; r < R; ++r) {
    finish256(a, lo[r], m0 + r, b);
    finish256(a, hi[r], m0 + r, b + 1);
  }
}

using SweepFn = void (*)(const Args&, const float*, int64_t, int64_t);

template <bool Packed, int... R>
constexpr SweepFn pick512(int rows, std::integer_sequence<int, R...>) {
  SweepFn fn = nullptr;
  ((rows == R + 1 ? (fn = &sweep512<R + 1, Packed>, 0) : 0), ...);
  return fn;
}

template <bool Packed, int... R>
constexpr SweepFn pick256(int rows, std::integer_sequence<int, R...>) {
  SweepFn fn = nullptr;
  ((rows == R + 1 ? (fn = &sweep256<R + 1, Packed>, 0) : 0), ...);
  return fn;
}

template <bool Packed, int... R>
constexpr SweepFn pick256x2(int rows, std::integer_sequence<int, R...>) {
  SweepFn fn = nullptr;
  ((rows == R + 1 ? (fn = &sweep256x2<R + 1, Packed>, 0) : 0), ...);
  return fn;
}

enum Sweep { kOne512, kOne256, kTwo256 };  // a sweep's instructions, and the blocks it passes

SweepFn sweep_for(Sweep kind, int rows, bool packed) {
  switch (kind) {
    case kOne512:
      return packed ? pick512<true>(rows, std::make_integer_sequence<int, kRows512>{})
                    : pick512<false>(rows, std::make_integer_sequence<int, kRows512>{});
    case kOne256:
      return packed ? pick256<true>(rows, std::make_integer_sequence<int, kRows256>{})
                    : pick256<false>(rows, std::make_integer_sequence<int, kRows256>{});
    case kTwo256:
      return packed ? pick256x2<true>(rows, std::make_integer_sequence<int, kRows256x2>{})
                    : pick256x2<false>(rows, std::make_integer_sequence<int, kRows256x2>{});
  }
  return nullptr;
}

at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& residual, int64_t n, bool gelu) {
  TORCH_CHECK(kBestIsa != kNone, "edgecompute_ml::f32_linear: this CPU has neither AVX-512F nor AVX2 with FMA");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.dim() >= 1,
              "f32_linear: x must be a float32 CPU tensor [..., K]");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 3 && (w.size(2) == kLanes || w.size(2) == kNarrow) &&
                  w.is_contiguous(),
              "f32_linear: the weight must be packed float32 [ceil(N/L), K, L], L = 8 (AVX2) or 16 (AVX-512)");
  // the layout says which instructions run it
  const int64_t lanes = w.size(2);
  const bool wide = lanes == kLanes;
  TORCH_CHECK(!wide || kBestIsa == kAvx512, "f32_linear: a weight in 16-column blocks needs AVX-512F, which this "
              "CPU lacks (pack it for AVX2: 8 columns)");
  const int64_t k = x.size(-1);
  TORCH_CHECK(w.size(1) == k, "f32_linear: x has ", k, " features, the weight ", w.size(1));
  TORCH_CHECK(k > 0, "f32_linear: no input features (K = 0)");
  TORCH_CHECK(n > 0 && (n + lanes - 1) / lanes == w.size(0), "f32_linear: n=", n, " does not fit a weight of ",
              w.size(0), " blocks");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr<float>()) % 64 == 0,
              "f32_linear: the weight must be 64-byte aligned");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous(),
                "f32_linear: bias must be contiguous float32 [", n, "]");
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.numel() / k;
  at::Tensor res;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(!gelu, "f32_linear: a residual or gelu, not both");
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->sizes() == at::IntArrayRef(shape),
                "f32_linear: the residual must be float32 shaped like the output");
    res = residual->contiguous();
  }
  at::Tensor out = at::empty(shape, x.options());
  if (m == 0) return out;
  const Args a{xc.data_ptr<float>(), w.data_ptr<float>(), has_bias ? bias->data_ptr<float>() : nullptr,
               res.defined() ? res.data_ptr<float>() : nullptr, out.data_ptr<float>(), k, n, gelu};
  const int64_t blocks = w.size(0);
  // more rows than one sweep of one block takes: each group of rows packed as a [K, rows] panel, a
  // chunk at a time (every thread packs the chunk it sweeps: K * rows copies against
  // K * rows * 16 * blocks multiply-adds); with AVX2, then 6 rows pass two blocks at once
  const bool pack = m > (wide ? kRows512 : kRows256);
  const Sweep kind = wide ? kOne512 : pack ? kTwo256 : kOne256;
  const int64_t most = kind == kOne512 ? kRows512 : kind == kOne256 ? kRows256 : kRows256x2;
  const int64_t unit = kind == kTwo256 ? 2 : 1;  // blocks a sweep passes
  const int64_t chunk = std::max<int64_t>(most, kChunkBytes / (k * 4) / most * most);
  auto run = [&](int64_t u0, int64_t u1) {  // a thread's run of units
    const int64_t b0 = u0 * unit, b1 = std::min(blocks, u1 * unit);
    std::vector<float> panel(pack ? static_cast<size_t>(std::min(m, chunk) * k) : 0);
    for (int64_t c0 = 0; c0 < m; c0 += chunk) {
      const int64_t c1 = std::min(m, c0 + chunk);
      if (pack) {
        for (int64_t m0 = c0; m0 < c1; m0 += most) {
          const int64_t rows = std::min(most, c1 - m0);
          float* dst = panel.data() + (m0 - c0) * k;
          for (int64_t i = 0; i < k; ++i) {
            for (int64_t r = 0; r < rows; ++r) dst[i * rows + r] = a.x[(m0 + r) * k + i];
          }
        }
      }
      for (int64_t b = b0; b < b1; b += unit) {
        const Sweep sweep = b + unit <= b1 ? kind : kOne256;  // an odd last block: alone
        for (int64_t m0 = c0; m0 < c1; m0 += most) {
          const int rows = static_cast<int>(std::min<int64_t>(most, c1 - m0));
          sweep_for(sweep, rows, pack)(a, pack ? panel.data() + (m0 - c0) * k : a.x + m0 * k, m0, b);
        }
      }
    }
  };
  // a fork is worth ~64K multiply-adds a thread
  const int64_t per_unit = m * k * lanes * unit;
  at::parallel_for(0, (blocks + unit - 1) / unit, std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, per_unit)),
                   run);
  return out;
}

at::Tensor f32_linear_meta(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual, int64_t n, bool gelu) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  TORCH_CHECK(!shape.empty(), "f32_linear: x must be [..., K]");
  shape.back() = n;
  return at::empty(shape, x.options());
}

// An encoder layer's self-attention over its fused q/k/v projection (bert.py's packed forward):
//   qkv [B, T, 3 H D] (queries, then keys, then values; head h at h D) -> out [B, T, H D],
//   out[b, i, h] = softmax_j(q[b, i, h] . k[b, j, h] / sqrt(D), keys j where key_mask[b, j]) v[b, j, h]
// written straight in the layout the output projection reads (no transposes, no copies).
//
// Why not scaled_dot_product_attention: torch's CPU (flash) attention costs ~1.5-2.6 ms a MiniLM
// layer for 32 sentences of 12 tokens, ~3.5M multiply-adds, its fixed cost per head and block
// dwarfing the arithmetic; a batch of sentences spent ~15% of its forward there. Here a head's
// keys are transposed once into [D, T] so that every query's scores are 8 keys a vector (no
// horizontal sums), the softmax runs 8 scores a vector with the exp above, and the weighted sum of
// values 8 dimensions a vector. Scores, sums and the softmax in float32, its maximum subtracted
// first: torch's result to float32 rounding. A query whose keys are all masked gets zeros.
// AVX2 with FMA (every CPU this library runs on has it); D a multiple of 8.
struct Attention {
  const float* qkv;
  const bool* mask;  // [B, T] or null: every key
  float* out;
  int64_t t, heads, d, padded;  // padded: T rounded up to 8
  float scale;
};

// V vectors of a query's scores (keys n..n + 8V) summed in registers from their mask's bias.
template <int V>
__attribute__((target("avx2,fma"))) inline void score_keys(const float* qi, float scale, const float* keys,
                                                               int64_t tp, int64_t n, int64_t d, const float* bias,
                                                               float* scores) {
  __m256 acc[V];
  UNROLL for (int u = 0; u < V; ++u) acc[u] = _mm256_loadu_ps(bias + n + 8 * u);
  for (int64_t c = 0; c < d; ++c) {
    const __m256 qc = _mm256_set1_ps(qi[c] * scale);
    const float* kc = keys + c * tp + n;
    UNROLL for (int u = 0; u < V; ++u) acc[u] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kc + 8 * u), acc[u]);
  }
  UNROLL for (int u = 0; u < V; ++u) {
    _mm256_storeu_ps(scores + n + 8 * u, acc[u]);
  }
}

// A query's scores are summed up to 32 keys at a time in registers (keys padded to 8: the padding
// is masked), its output 32 dimensions at a time, then 8: sums kept in memory instead wait on
// store-to-load forwarding at every step (measured ~4x slower for 12-token sentences). The keys'
// padding is zeroed once a call (`keys` starts zeroed; only keys < T are written).
__attribute__((target("avx2,fma"))) void attend_head(const Attention& a, int64_t bh, std::vector<float>& keys,
                                                     std::vector<float>& scores, std::vector<float>& bias) {
  const int64_t b = bh / a.heads, h = bh % a.heads, t = a.t, d = a.d, tp = a.padded;
  const int64_t width = 3 * a.heads * d;
  const float* q = a.qkv + b * t * width + h * d;
  const float* k = q + a.heads * d;
  const float* v = k + a.heads * d;
  float* out = a.out + b * t * a.heads * d + h * d;
  const float minus_inf = -std::numeric_limits<float>::infinity();
  // keys transposed [D, tp], zero past T; bias: 0 for a key attended, -inf for one masked
  for (int64_t j = 0; j < tp; ++j) bias[j] = j < t && (a.mask == nullptr || a.mask[b * t + j]) ? 0.0f : minus_inf;
  for (int64_t j = 0; j < t; ++j) {
    const float* kj = k + j * width;
    for (int64_t c = 0; c < d; ++c) keys[c * tp + j] = kj[c];
  }
  for (int64_t i = 0; i < t; ++i) {
    const float* qi = q + i * width;
    for (int64_t n = 0; n < tp;) {
      const int64_t left = (tp - n) / 8;
      if (left >= 4) {
        score_keys<4>(qi, a.scale, keys.data(), tp, n, d, bias.data(), scores.data());
        n += 32;
      } else if (left >= 2) {
        score_keys<2>(qi, a.scale, keys.data(), tp, n, d, bias.data(), scores.data());
        n += 16;
      } else {
        score_keys<1>(qi, a.scale, keys.data(), tp, n, d, bias.data(), scores.data());
        n += 8;
      }
    }
    float* oi = out + i * a.heads * d;
    const float total = softmax_numerators(scores.data(), tp);
    if (total == 0.0f) {  // every key masked
      std::fill_n(oi, d, 0.0f);
      continue;
    }
    weighted_values(scores.data(), t, v, width, d, 1.0f / total, oi);
  }
}

at::Tensor encoder_attention(const at::Tensor& qkv, const std::optional<at::Tensor>& key_mask, int64_t heads) {
  TORCH_CHECK(kBestIsa != kNone, "edgecompute_ml::encoder_attention: this CPU lacks AVX2 with FMA");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && qkv.device().is_cpu() && qkv.dim() == 3,
              "encoder_attention: qkv must be a float32 CPU tensor [B, T, 3 * hidden]");
  const int64_t batch = qkv.size(0), t = qkv.size(1);
  TORCH_CHECK(heads > 0 && qkv.size(2) % (3 * heads) == 0 && qkv.size(2) / (3 * heads) % 8 == 0,
              "encoder_attention: ", qkv.size(2), " columns are not q, k and v of ", heads,
              " heads whose size is a multiple of 8");
  const int64_t d = qkv.size(2) / (3 * heads);
  at::Tensor mask;
  if (key_mask.has_value() && key_mask->defined()) {
    TORCH_CHECK(key_mask->scalar_type() == at::kBool && key_mask->numel() == batch * t,
                "encoder_attention: key_mask must be bool with one entry a key [B, T]");
    mask = key_mask->reshape({batch, t}).contiguous();
  }
  const at::Tensor x = qkv.contiguous();
  at::Tensor out = at::empty({batch, t, heads * d}, qkv.options());
  if (batch == 0 || t == 0) return out;
  const int64_t padded = (t + 7) / 8 * 8;
  const Attention a{x.data_ptr<float>(), mask.defined() ? mask.data_ptr<bool>() : nullptr, out.data_ptr<float>(),
                    t, heads, d, padded, static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)))};
  const int64_t per_head = 2 * t * t * d;  // multiply-adds
  at::parallel_for(0, batch * heads, std::max<int64_t>(1, (int64_t{1} << 16) / per_head), [&](int64_t h0, int64_t h1) {
    std::vector<float> keys(static_cast<size_t>(d * padded)), scores(static_cast<size_t>(padded)),
        bias(static_cast<size_t>(padded));
    for (int64_t bh = h0; bh < h1; ++bh) attend_head(a, bh, keys, scores, bias);
  });
  return out;
}

at::Tensor encoder_attention_meta(const at::Tensor& qkv, const std::optional<at::Tensor>& key_mask, int64_t heads) {
  return at::empty({qkv.size(0), qkv.size(1), qkv.size(2) / 3}, qkv.options());
}

int64_t linear_isa(int64_t want) {
  // the instruction set weights are packed for (dense.py asks): want < 0: report; otherwise use
  // min(want, what the CPU has) (tests run the AVX2 path too)
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
  m.impl("encoder_attention", &encoder_attention);
}

TORCH_LIBRARY_IMPL(edgecompute_ml, Meta, m) {
  m.impl("f32_linear", &f32_linear_meta);
  m.impl("encoder_attention", &encoder_attention_meta);
}
