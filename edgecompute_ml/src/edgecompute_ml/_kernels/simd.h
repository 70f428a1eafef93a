// AVX2 helpers shared by this package's float kernels (linear.cpp, attention.cpp): an exp, a
// horizontal sum, and attention's softmax numerators and weighted values. Included into each library's anonymous namespace; _kernels/build.py hashes this
// file with every source, so a change here rebuilds them all.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace {

// exp as Cephes' expf: range reduction by ln 2, a degree-6 polynomial, the exponent added as bits
constexpr float kExpHi = 88.3762626647949f, kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f,
                kLn2Lo = -2.12194440e-4f;
constexpr float kExp0 = 1.9875691500e-4f, kExp1 = 1.3981999507e-3f, kExp2 = 8.3334519073e-3f,
                kExp3 = 4.1665795894e-2f, kExp4 = 1.6666665459e-1f, kExp5 = 5.0000001201e-1f;

// exp(q) for q <= 0, clamped below at exp's range (-88.4: ~1e-38, not 0)
__attribute__((target("avx2,fma"))) inline __m256 exp256(__m256 q) {
  const __m256 one = _mm256_set1_ps(1.0f);
  q = _mm256_max_ps(q, _mm256_set1_ps(-kExpHi));
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(q, _mm256_set1_ps(kLog2e), _mm256_set1_ps(0.5f)));
  const __m256 f = _mm256_fnmadd_ps(fx, _mm256_set1_ps(kLn2Lo), _mm256_fnmadd_ps(fx, _mm256_set1_ps(kLn2Hi), q));
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kExp0), f, _mm256_set1_ps(kExp1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp5));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(f, f), _mm256_add_ps(f, one));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// Attention's softmax numerators: s[0, n) (n a multiple of 8; -inf where a key is masked or
// padding) -> exp(s - max s) in place, masked entries exactly 0 (exp256 clamps to ~1e-38);
// returns their sum, 0 when every entry is -inf (then s is all zeros).
__attribute__((target("avx2,fma"))) inline float softmax_numerators(float* s, int64_t n) {
  const __m256 minus_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 top = minus_inf;
  for (int64_t j = 0; j < n; j += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(s + j));
  top = _mm256_max_ps(top, _mm256_permute2f128_ps(top, top, 1));
  top = _mm256_max_ps(top, _mm256_shuffle_ps(top, top, 0x4e));
  top = _mm256_max_ps(top, _mm256_shuffle_ps(top, top, 0xb1));
  if (_mm256_cvtss_f32(top) == -std::numeric_limits<float>::infinity()) {
    std::fill_n(s, n, 0.0f);
    return 0.0f;
  }
  __m256 total = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 x = _mm256_loadu_ps(s + j);
    const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(x, minus_inf, _CMP_EQ_OQ), exp256(_mm256_sub_ps(x, top)));
    _mm256_storeu_ps(s + j, e);
    total = _mm256_add_ps(total, e);
  }
  return hsum256(total);
}

// out[0, d) = inv * sum_j p[j] v[j * stride + (0, d)] over n keys: 32 dimensions at a time in
// registers, then 8, then one
__attribute__((target("avx2,fma"))) inline void weighted_values(const float* p, int64_t n, const float* v,
                                                                int64_t stride, int64_t d, float inv, float* out) {
  const __m256 inv8 = _mm256_set1_ps(inv);
  int64_t c = 0;
  for (; c + 32 <= d; c += 32) {
    __m256 o0 = _mm256_setzero_ps(), o1 = _mm256_setzero_ps(), o2 = _mm256_setzero_ps(), o3 = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const __m256 pj = _mm256_set1_ps(p[j]);
      const float* vj = v + j * stride + c;
      o0 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj), o0);
      o1 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8), o1);
      o2 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 16), o2);
      o3 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 24), o3);
    }
    _mm256_storeu_ps(out + c, _mm256_mul_ps(o0, inv8));
    _mm256_storeu_ps(out + c + 8, _mm256_mul_ps(o1, inv8));
    _mm256_storeu_ps(out + c + 16, _mm256_mul_ps(o2, inv8));
    _mm256_storeu_ps(out + c + 24, _mm256_mul_ps(o3, inv8));
  }
  for (; c + 8 <= d; c += 8) {
    __m256 o = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) o = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(v + j * stride + c), o);
    _mm256_storeu_ps(out + c, _mm256_mul_ps(o, inv8));
  }
  for (; c < d; ++c) {
    float o = 0.0f;
    for (int64_t j = 0; j < n; ++j) o += p[j] * v[j * stride + c];
    out[c] = o * inv;
  }
}

}  // namespace
