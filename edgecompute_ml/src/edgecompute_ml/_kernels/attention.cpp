// One query's attention, a decoder's step (_architectures/llama.py):
//   out[b, h] = softmax_j(q[b, h] . k[b, g, j] * scale) v[b, g, j],  g = h / (H / KV)
// over the keys a step may see, and no others.
//
// Why not scaled_dot_product_attention: a captured step (_runtime/capture.py) must keep its
// shapes fixed, so it passed the whole cache (128+ positions) under a mask, and every key past the
// position was still scored; and for one query torch's CPU attention makes small MKL calls of ~2 us
// each (SmolLM2: 30 layers x 3 key/value heads a token). Here the position is read from its tensor
// inside the op: the captured graph stays static while only keys [start, position] are touched
// (docs/ml.md, "One query's attention").
//
// q [B, H, 1, D]; k, v [B, KV, T, D] (any strides but D's: a cache or a slice of one); position
// an int64 tensor of one element, the query's index among the T keys, or none: the query follows
// all T keys. window > 0: only the last `window` keys up to the query (sliding-window layers).
// Scores and sums in float32 (the softmax's maximum subtracted first), as torch's CPU attention
// computes them: the same result to float32 rounding.
//
// AVX2 with FMA (a per-function target: the library is compiled without -march); a CPU without:
// attention_isa reports 0 and llama.py keeps torch's attention. Threads: ATen's intra-op pool,
// over heads, once a step's heads are worth a fork.

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "simd.h"

namespace {

int64_t detect_isa() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
}

const int64_t kIsa = detect_isa();

// multiply-adds a thread must have before a step's heads are split across threads (a fork and
// join costs a few microseconds; a 100-key head of 64 dimensions is ~13K)
constexpr int64_t kForkWork = int64_t{1} << 18;

__attribute__((target("avx2,fma"))) inline float dot(const float* a, const float* b, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float sum = hsum256(acc);
  for (; i < d; ++i) sum += a[i] * b[i];
  return sum;
}

// q . k for four keys at once: one horizontal reduction for the four
__attribute__((target("avx2,fma"))) inline __m128 dot4(const float* q, const float* k, int64_t stride, int64_t d) {
  const float* k1 = k + stride;
  const float* k2 = k1 + stride;
  const float* k3 = k2 + stride;
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    s0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + i), s0);
    s1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + i), s1);
    s2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + i), s2);
    s3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + i), s3);
  }
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3));
  __m128 four = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  if (i < d) {
    alignas(16) float tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (; i < d; ++i) {
      tail[0] += q[i] * k[i];
      tail[1] += q[i] * k1[i];
      tail[2] += q[i] * k2[i];
      tail[3] += q[i] * k3[i];
    }
    four = _mm_add_ps(four, _mm_load_ps(tail));
  }
  return four;
}

struct Heads {
  const float* q;  // [B, H, D], contiguous
  const float* k;
  const float* v;
  float* out;      // [B, H, D]
  int64_t heads, group, d;     // H, H / KV, D
  int64_t kb, kg, kt;          // k's strides over B, KV, T
  int64_t vb, vg, vt;          // v's
  int64_t start, end;          // the keys attended: [start, end)
  float scale;
};

// Scores four keys at a time, then simd.h's softmax numerators (8 scores a vector) and weighted
// values (32 dimensions at a time in registers).
__attribute__((target("avx2,fma"))) void attend(const Heads& a, int64_t bh, std::vector<float>& scores) {
  const int64_t b = bh / a.heads, h = bh % a.heads, g = h / a.group, d = a.d;
  const float* q = a.q + bh * d;
  const float* k = a.k + b * a.kb + g * a.kg + a.start * a.kt;
  const float* v = a.v + b * a.vb + g * a.vg + a.start * a.vt;
  float* out = a.out + bh * d;
  const int64_t n = a.end - a.start, padded = (n + 7) / 8 * 8;
  scores.resize(static_cast<size_t>(padded));
  float* s = scores.data();
  const __m128 scale = _mm_set1_ps(a.scale);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) _mm_storeu_ps(s + j, _mm_mul_ps(dot4(q, k + j * a.kt, a.kt, d), scale));
  for (; j < n; ++j) s[j] = dot(q, k + j * a.kt, d) * a.scale;
  std::fill(s + n, s + padded, -std::numeric_limits<float>::infinity());
  const float inv = 1.0f / softmax_numerators(s, padded);
  weighted_values(s, n, v, a.vt, d, inv, out);
}

at::Tensor one_query_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& position, int64_t window, double scale) {
  TORCH_CHECK(kIsa != 0, "edgecompute_ml::one_query_attention: this CPU lacks AVX2 with FMA");
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->dim() == 4,
                "one_query_attention: q, k and v must be float32 CPU tensors [B, heads, T, D]");
  }
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(3), kv = k.size(1), t = k.size(2);
  TORCH_CHECK(q.size(2) == 1, "one_query_attention: one query a sequence, not ", q.size(2));
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == batch && k.size(3) == d,
              "one_query_attention: k and v must be [", batch, ", KV, T, ", d, "] alike");
  TORCH_CHECK(kv > 0 && heads % kv == 0, "one_query_attention: ", heads, " query heads over ", kv, " key heads");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "one_query_attention: k and v need contiguous rows");
  int64_t end = t;
  if (position.has_value() && position->defined()) {
    TORCH_CHECK(position->scalar_type() == at::kLong && position->numel() == 1,
                "one_query_attention: position must be one int64");
    end = position->item<int64_t>() + 1;
    TORCH_CHECK(end >= 1 && end <= t, "one_query_attention: position ", end - 1, " outside the ", t, " keys");
  }
  TORCH_CHECK(t > 0, "one_query_attention: no keys");
  const int64_t start = window > 0 ? std::max<int64_t>(0, end - window) : 0;
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty({batch, heads, 1, d}, q.options());
  const Heads a{qc.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(),
                heads, heads / kv, d, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                start, end, static_cast<float>(scale)};
  const int64_t per_head = 2 * (end - start) * d;
  at::parallel_for(0, batch * heads, std::max<int64_t>(1, kForkWork / per_head), [&](int64_t h0, int64_t h1) {
    std::vector<float> scores;
    for (int64_t bh = h0; bh < h1; ++bh) attend(a, bh, scores);
  });
  return out;
}

at::Tensor one_query_attention_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const std::optional<at::Tensor>& position, int64_t window, double scale) {
  return at::empty({q.size(0), q.size(1), 1, q.size(3)}, q.options());
}

int64_t attention_isa() { return kIsa; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(edgecompute_ml, m) {
  m.def("one_query_attention(Tensor q, Tensor k, Tensor v, Tensor? position, int window, float scale) -> Tensor");
  m.def("attention_isa() -> int", &attention_isa);
}

TORCH_LIBRARY_IMPL(edgecompute_ml, CPU, m) {
  m.impl("one_query_attention", &one_query_attention);
}

TORCH_LIBRARY_IMPL(edgecompute_ml, Meta, m) {
  m.impl("one_query_attention", &one_query_attention_meta);
}
