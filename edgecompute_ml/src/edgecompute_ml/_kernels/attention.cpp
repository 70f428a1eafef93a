// One query's attention, a decoder's step (_architectures/llama.py):
//   out[b, h] = softmax_j(q[b, h] . k[b, g, j] * scale) v[b, g, j],  g = h / (H / KV)
// over the keys a step may see, and no others.
//
// Why not scaled_dot_product_attention: a captured step (_runtime/capture.py) must keep its
// shapes fixed, so it passed the whole cache (128+ positions) under a mask, and every key past the
// position was still scored; and for one query torch's CPU attention makes small MKL calls of ~2 us
// each (SmolLM2: 30 layers x 3 key/value heads a token). Here the position is read from its tensor
// inside the op: the captured graph stays static while only keys [start, position] are touched,
// and a head is two passes over its keys in registers (docs/ml.md, "Quantized weights").
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

namespace {

int64_t detect_isa() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
}

const int64_t kIsa = detect_isa();

// multiply-adds a thread must have before a step's heads are split across threads (a fork and
// join costs a few microseconds; a 100-key head of 64 dimensions is ~13K)
constexpr int64_t kForkWork = int64_t{1} << 18;

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

__attribute__((target("avx2,fma"))) inline float dot(const float* a, const float* b, int64_t d) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= d; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float sum = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < d; ++i) sum += a[i] * b[i];
  return sum;
}

// out[0, d) += p * v[0, d)
__attribute__((target("avx2,fma"))) inline void axpy(float* out, float p, const float* v, int64_t d) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
  for (; i < d; ++i) out[i] += p * v[i];
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

__attribute__((target("avx2,fma"))) void attend(const Heads& a, int64_t bh, std::vector<float>& scores) {
  const int64_t b = bh / a.heads, h = bh % a.heads, g = h / a.group, d = a.d;
  const float* q = a.q + bh * d;
  const float* k = a.k + b * a.kb + g * a.kg;
  const float* v = a.v + b * a.vb + g * a.vg;
  float* out = a.out + bh * d;
  const int64_t n = a.end - a.start;
  scores.resize(static_cast<size_t>(n));
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = dot(q, k + (a.start + j) * a.kt, d) * a.scale;
    top = std::max(top, scores[j]);
  }
  float total = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = std::exp(scores[j] - top);
    total += scores[j];
  }
  std::fill_n(out, d, 0.0f);
  for (int64_t j = 0; j < n; ++j) axpy(out, scores[j], v + (a.start + j) * a.vt, d);
  const float inv = 1.0f / total;
  for (int64_t i = 0; i < d; ++i) out[i] *= inv;
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
