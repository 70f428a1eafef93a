// The q4 weight-only matmul of edgecompute_ml (_formats/quant.py, form "q4"):
//   y[m, n] = sum_k x[m, k] * w[n, k],  w[n, 32g + i] = q * scale[n, g] + low[n, g],  q in 0..15
// with each activation row quantized per block of 32 (one float32 scale a block, as llama.cpp's Q8
// activations, but two int8 terms a value: see quantize_row), the integer dot of codes and
// activations exact in int32 (AVX-512 VNNI vpdpbusd, or AVX2 vpmaddubsw), then scaled in float32.
//
// Weight layout (built by quant.py): codes uint8 [N, K/2], group g of row n at bytes 16g..16g+15,
// byte j holding value j (low nibble) and value 16 + j (high nibble): GGUF Q4_0/Q4_1's own order.
// scale and low are float16 [N, K/32]; low may be absent (undefined tensor): then low = -8 * scale
// (GGUF Q4_0).
//
// The instruction set is chosen once at load from the CPU (per-function target attributes: the
// library is compiled without -march, so loading it on an older CPU is safe). Threads: ATen's
// intra-op pool (at::parallel_for, OpenMP in torch's CPU wheels).

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kRowsAtOnce = 4;  // activation rows sharing one pass over a weight row

enum Isa : int64_t { kNone = 0, kAvx2 = 1, kAvx512Vnni = 2 };

int64_t detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma")) {
    return kAvx512Vnni;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return kAvx2;
  }
  return kNone;
}

const int64_t kBestIsa = detect_isa();
int64_t g_isa = kBestIsa;

// One activation row quantized, padded with zero groups to a multiple of 16 groups. Each value is
// two int8 terms of its group's step d = max|x| / 127: x ~ d * (q1 + q2 / 256), q1 = round(x / d),
// q2 = round(256 * (x / d - q1)) (about 16 bits a value: one int8 term alone moved SmolLM2's
// greedy text off the float path on near ties; docs/ml.md). The dot with the codes is then the
// exact integer 256 * sum(w q1) + sum(w q2), scaled by d / 256.
// Per chunk of 4 groups, 256 bytes: q1 of the groups' first 16 values (64 bytes, the order of the
// codes' low nibbles), q1 of their last 16 (the high nibbles), then q2 likewise. Per group the
// scale d / 256 and d / 256 * sum(256 q1 + q2), the sum of the values (the low term).
struct Act {
  const int8_t* q;
  const float* scale;
  const float* sums;
};

constexpr int64_t kPadGroups = 16;    // groups of one block (one int32 lane each)
constexpr int64_t kStepBytes = 256;   // activation bytes of one step: q1 low, q1 high, q2 low, q2 high
constexpr int64_t kBlockBytes = 1024; // activation bytes of one block of 16 groups (4 steps)

int64_t padded_groups(int64_t groups) { return (groups + kPadGroups - 1) / kPadGroups * kPadGroups; }

// round half to even of |t| < 2^22 in the default rounding mode (as torch.round), without libm:
// inlined and vectorizable in every target
inline float round_even(float t) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (t + kMagic) - kMagic;
}

// seg and step: the bytes from one part of a step to the next (q1 low, q1 high, q2 low, q2 high)
// and from one step to the next: 64 and 256, or in a compact tail block (AVX2, at most 8 groups
// left: see kTailLanes) 16 * left and 4 * left
inline void quantize_group(const float* v, int8_t* q1, float* scale, float* sums, int64_t seg, int64_t step) {
  float amax = 0.0f;
  for (int i = 0; i < kGroup; ++i) amax = std::max(amax, std::fabs(v[i]));
  const float d = amax / 127.0f;
  const float id = d > 0.0f ? 1.0f / d : 0.0f;
  int32_t total = 0;
  for (int half = 0; half < 2; ++half) {  // first 16 values, then the last 16 (one part on)
    int8_t* out = q1 + seg * half;
    for (int i = 0; i < 16; ++i) {
      const float t = v[16 * half + i] * id;
      const float a = round_even(t);
      const float b = std::min(127.0f, std::max(-127.0f, round_even((t - a) * 256.0f)));
      out[i / 4 * step + i % 4] = static_cast<int8_t>(a);
      out[i / 4 * step + i % 4 + 2 * seg] = static_cast<int8_t>(b);
      total += 256 * static_cast<int32_t>(a) + static_cast<int32_t>(b);
    }
  }
  *scale = d / 256.0f;
  *sums = *scale * static_cast<float>(total);
}

#define EC_TARGET_512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))

EC_TARGET_512 void quantize_group_512(const float* v, int8_t* q1, float* scale, float* sums) {
  const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  const float d = amax / 127.0f;
  const __m512 id = _mm512_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
  const __m512 lim = _mm512_set1_ps(127.0f), nlim = _mm512_set1_ps(-127.0f), k256 = _mm512_set1_ps(256.0f);
  __m512i total = _mm512_setzero_si512();
  const __m512 halves[2] = {v0, v1};
  for (int half = 0; half < 2; ++half) {
    const __m512 t = _mm512_mul_ps(halves[half], id);
    const __m512 a = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 b = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(t, a), k256),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    b = _mm512_min_ps(lim, _mm512_max_ps(nlim, b));
    const __m512i ia = _mm512_cvtps_epi32(a), ib = _mm512_cvtps_epi32(b);
    alignas(16) int32_t qa[4], qb[4];  // values 4j..4j+3 of this half go to step j
    _mm_store_si128(reinterpret_cast<__m128i*>(qa), _mm512_cvtepi32_epi8(ia));
    _mm_store_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtepi32_epi8(ib));
    for (int j = 0; j < 4; ++j) {
      std::memcpy(q1 + 64 * half + j * kStepBytes, qa + j, 4);
      std::memcpy(q1 + 64 * half + j * kStepBytes + 128, qb + j, 4);
    }
    total = _mm512_add_epi32(total, _mm512_add_epi32(_mm512_slli_epi32(ia, 8), ib));
  }
  *scale = d / 256.0f;
  *sums = *scale * static_cast<float>(_mm512_reduce_add_epi32(total));
}

// A last block of at most this many groups is compact for the AVX2 path (see rows_256)
constexpr int64_t kCompactTail = 8;

void quantize_row(const float* x, int64_t groups, int8_t* q, float* scale, float* sums, bool avx512) {
  const int64_t padded = padded_groups(groups);
  std::memset(q, 0, static_cast<size_t>(padded / kPadGroups * kBlockBytes));
  std::fill(scale + groups, scale + padded, 0.0f);
  std::fill(sums + groups, sums + padded, 0.0f);
  const int64_t left = groups % kPadGroups;  // groups of a short last block (0: none)
  for (int64_t g = 0; g < groups; ++g) {
    int8_t* q1 = q + g / kPadGroups * kBlockBytes + g % kPadGroups * 4;
    if (avx512) {
      quantize_group_512(x + g * kGroup, q1, scale + g, sums + g);
    } else if (left != 0 && left <= kCompactTail && g >= groups - left) {
      quantize_group(x + g * kGroup, q1, scale + g, sums + g, 16 * left, 4 * left);
    } else {
      quantize_group(x + g * kGroup, q1, scale + g, sums + g, 64, kStepBytes);
    }
  }
}

// A compact tail block (AVX2): its 4 steps of 4 * left bytes read as consecutive lanes, lane L
// holding step L / left of group L % left, in weights (as stored) and activations (quantize_row),
// so a tail of 2 groups (576-wide rows: 18 groups) is one vector, not 4 steps of a quarter-used
// one. kTailLanes[left][v]: the group of each lane of vector v.
struct TailLanes {
  alignas(32) int32_t group[kCompactTail + 1][4][8];
};

const TailLanes kTailLanes = [] {
  TailLanes t{};
  for (int left = 1; left <= kCompactTail; ++left) {
    for (int v = 0; v < 4; ++v) {
      for (int i = 0; i < 8; ++i) t.group[left][v][i] = (8 * v + i) % left;
    }
  }
  return t;
}();

// ---------------------------------------------------------------- AVX-512 VNNI


// One dot step: 64 bytes of one weight row's codes (8 values of each of a block's 16 groups, one
// int32 lane a group) against R activation rows; the lanes' integer sums accumulate over the
// block's 4 steps (q1 and q2 apart: 256 * q1 would not fit int8).
template <int R>
EC_TARGET_512 __attribute__((always_inline)) inline void step_512(__m512i w, const Act* act, int64_t at,
                                                                 __m512i* d1, __m512i* d2) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i lo = _mm512_and_si512(w, nibble);
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nibble);
  for (int r = 0; r < R; ++r) {
    const int8_t* q = act[r].q + at;
    d1[r] = _mm512_dpbusd_epi32(d1[r], lo, _mm512_loadu_si512(q));
    d2[r] = _mm512_dpbusd_epi32(d2[r], lo, _mm512_loadu_si512(q + 128));
    d1[r] = _mm512_dpbusd_epi32(d1[r], hi, _mm512_loadu_si512(q + 64));
    d2[r] = _mm512_dpbusd_epi32(d2[r], hi, _mm512_loadu_si512(q + 192));
  }
}

// W weight rows (consecutive) against R activation rows, a block of 16 groups at a time: lane i
// of every step belongs to group i, so a block's integer sums are scaled once (weight scale times
// activation scale, no shuffles); the low term in the same pass. Two weight rows against one
// activation row share its loads (decode).
template <int R, int W>
EC_TARGET_512 void rows_512(const uint8_t* codes, int64_t code_stride, const uint16_t* scale, const uint16_t* low,
                            int64_t groups, const Act* act, float* out, int64_t out_stride) {
  __m512 acc[W * R], z[W * R], s[W * R];
  for (int i = 0; i < W * R; ++i) acc[i] = z[i] = _mm512_setzero_ps();
  for (int64_t g0 = 0; g0 < groups; g0 += kPadGroups) {
    const int64_t left = std::min<int64_t>(kPadGroups, groups - g0);
    const __mmask16 kg = static_cast<__mmask16>((1u << left) - 1);
    for (int w = 0; w < W; ++w) {
      const __m512 ws = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(kg, scale + w * groups + g0));
      const __m512 lw = low != nullptr ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(kg, low + w * groups + g0)) : ws;
      for (int r = 0; r < R; ++r) {
        s[w * R + r] = _mm512_mul_ps(ws, _mm512_loadu_ps(act[r].scale + g0));
        z[w * R + r] = _mm512_fmadd_ps(lw, _mm512_loadu_ps(act[r].sums + g0), z[w * R + r]);
      }
    }
    __m512i d1[W * R], d2[W * R];
    for (int i = 0; i < W * R; ++i) d1[i] = d2[i] = _mm512_setzero_si512();
    const int64_t at = g0 / kPadGroups * kBlockBytes;
    if (left == kPadGroups) {
      for (int j = 0; j < 4; ++j) {
        for (int w = 0; w < W; ++w) {
          step_512<R>(_mm512_loadu_si512(codes + w * code_stride + g0 * 16 + 64 * j), act, at + j * kStepBytes,
                      d1 + w * R, d2 + w * R);
        }
      }
    } else {  // the last block, of fewer groups: 4 * left bytes a step (the activations are zero-padded)
      const __mmask64 kb = (~0ULL) >> (64 - 4 * left);
      for (int j = 0; j < 4; ++j) {
        for (int w = 0; w < W; ++w) {
          step_512<R>(_mm512_maskz_loadu_epi8(kb, codes + w * code_stride + g0 * 16 + 4 * left * j), act,
                      at + j * kStepBytes, d1 + w * R, d2 + w * R);
        }
      }
    }
    for (int i = 0; i < W * R; ++i) {
      // |256 * d1 + d2| < 2^24 (32 products of 15 * 127 a lane): exact in float32
      const __m512i d = _mm512_add_epi32(_mm512_slli_epi32(d1[i], 8), d2[i]);
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s[i], acc[i]);
    }
  }
  const __m512 z_factor = _mm512_set1_ps(low != nullptr ? 1.0f : -8.0f);  // Q4_0: low = -8 * scale
  for (int w = 0; w < W; ++w) {
    for (int r = 0; r < R; ++r) {
      const int i = w * R + r;
      out[r * out_stride + w] = _mm512_reduce_add_ps(_mm512_fmadd_ps(z[i], z_factor, acc[i]));
    }
  }
}

// ---------------------------------------------------------------- AVX2

// count (1..8) float16 values at p as floats, the other lanes 0, reading no byte past p[count - 1]
// (a row's last scales may end its tensor): a pair of values a 32-bit lane under a mask, an odd
// last one alone. Copying them into a zeroed buffer instead cost a stalled store-to-load forward
// per row (a 576-wide row's 2-group tail took ~30 ns, most of it there).
__attribute__((target("avx2,fma,f16c"))) inline __m256 load_halves(const uint16_t* p, int64_t count) {
  if (count >= 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m128i pairs = _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int>(count / 2)), _mm_setr_epi32(0, 1, 2, 3));
  __m256 v = _mm256_cvtph_ps(_mm_maskload_epi32(reinterpret_cast<const int*>(p), pairs));
  if (count % 2 != 0) {
    const __m256i at = _mm256_cmpeq_epi32(_mm256_set1_epi32(static_cast<int>(count - 1)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    v = _mm256_blendv_ps(v, _mm256_set1_ps(_cvtsh_ss(p[count - 1])), _mm256_castsi256_ps(at));
  }
  return v;
}

// W weight rows (consecutive: W = 2 for a decode step's narrow rows) against R activation rows.
template <int R, int W>
__attribute__((target("avx2,fma,f16c")))
void rows_256(const uint8_t* codes, int64_t code_stride, const uint16_t* scale, const uint16_t* low, int64_t groups,
              const Act* act, float* out, int64_t out_stride) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  // acc: the scaled integer dots; z: the low (zero-point) term, sum_g low[g] * sums[g], in the
  // same pass (low absent: -8 * scale, applied at the end); index w * R + r
  __m256 acc[W * R], z[W * R];
  for (int i = 0; i < W * R; ++i) acc[i] = z[i] = _mm256_setzero_ps();
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  // the integer dots of one step: 32 bytes of codes of each weight row against R activation rows
  // (|15 * 127 * 2| * 2 fits int16: no saturation in maddubs or the adds)
  auto dot = [&](const __m256i* lo, const __m256i* hi, const int8_t* const* q, int64_t part, __m256i* d1,
                 __m256i* d2) __attribute__((always_inline, target("avx2,fma,f16c"))) {
    for (int r = 0; r < R; ++r) {
      const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r]));
      const __m256i a2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r] + part));
      const __m256i a3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r] + 2 * part));
      const __m256i a4 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r] + 3 * part));
      for (int w = 0; w < W; ++w) {
        const __m256i p1 = _mm256_add_epi16(_mm256_maddubs_epi16(lo[w], a1), _mm256_maddubs_epi16(hi[w], a2));
        const __m256i p2 = _mm256_add_epi16(_mm256_maddubs_epi16(lo[w], a3), _mm256_maddubs_epi16(hi[w], a4));
        d1[w * R + r] = _mm256_add_epi32(d1[w * R + r], _mm256_madd_epi16(p1, ones));
        d2[w * R + r] = _mm256_add_epi32(d2[w * R + r], _mm256_madd_epi16(p2, ones));
      }
    }
  };
  for (int64_t g0 = 0; g0 < groups; g0 += kPadGroups) {
    // the last block may hold fewer groups (SmolLM2's 576 columns: 18 groups, a block and 2): its
    // steps are 4 * left bytes apart, its codes and scales read under lane masks (no copy)
    const int64_t left = std::min<int64_t>(kPadGroups, groups - g0);
    const uint8_t* wp = codes + g0 * 16;
    const uint16_t* sc = scale + g0;
    const uint16_t* lw = low != nullptr ? low + g0 : sc;
    const int64_t at = g0 / kPadGroups * kBlockBytes;
    if (left <= kCompactTail) {  // the compact tail: lanes are (step, group) pairs
      __m256 ws[W];
      for (int w = 0; w < W; ++w) {
        ws[w] = load_halves(sc + w * groups, left);
        const __m256 ls = load_halves(lw + w * groups, left);
        for (int r = 0; r < R; ++r) {
          z[w * R + r] = _mm256_fmadd_ps(ls, _mm256_loadu_ps(act[r].sums + g0), z[w * R + r]);
        }
      }
      const int64_t part = 16 * left, lanes = 4 * left;
      for (int64_t v = 0; 8 * v < lanes; ++v) {
        const __m256i group = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTailLanes.group[left][v]));
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(lanes - 8 * v)), iota);
        __m256i lo[W], hi[W], d1[W * R], d2[W * R];
        for (int w = 0; w < W; ++w) {
          const __m256i wv = _mm256_maskload_epi32(reinterpret_cast<const int*>(wp + w * code_stride + 32 * v), mask);
          lo[w] = _mm256_and_si256(wv, nibble);
          hi[w] = _mm256_and_si256(_mm256_srli_epi16(wv, 4), nibble);
        }
        for (int i = 0; i < W * R; ++i) d1[i] = d2[i] = _mm256_setzero_si256();
        // reads past the tail's 16 * left bytes a part meet lanes of zero codes, inside the block
        const int8_t* q[R];
        for (int r = 0; r < R; ++r) q[r] = act[r].q + at + 32 * v;
        dot(lo, hi, q, part, d1, d2);
        for (int r = 0; r < R; ++r) {
          const __m256 asl = _mm256_permutevar8x32_ps(_mm256_loadu_ps(act[r].scale + g0), group);
          for (int w = 0; w < W; ++w) {
            const int i = w * R + r;
            const __m256i d = _mm256_add_epi32(_mm256_slli_epi32(d1[i], 8), d2[i]);
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(_mm256_permutevar8x32_ps(ws[w], group), asl),
                                     acc[i]);
          }
        }
      }
      continue;
    }
    // a whole block, or a short one past kCompactTail groups under lane masks: two loops, so that
    // whole blocks (all of a 1536-wide row) carry no mask and no select (~5-10% at one thread)
    auto halves = [&](auto masked) __attribute__((always_inline, target("avx2,fma,f16c"))) {
      constexpr bool kMasked = decltype(masked)::value;
      for (int h = 0; h < 2; ++h) {  // lanes (groups) 8h .. 8h + 7
        const int64_t lanes = kMasked ? std::min<int64_t>(8, left - 8 * h) : 8;
        if (lanes <= 0) break;
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(lanes)), iota);
        __m256 ws[W];
        for (int w = 0; w < W; ++w) {
          ws[w] = load_halves(sc + w * groups + 8 * h, lanes);
          const __m256 ls = load_halves(lw + w * groups + 8 * h, lanes);
          for (int r = 0; r < R; ++r) {
            z[w * R + r] = _mm256_fmadd_ps(ls, _mm256_loadu_ps(act[r].sums + g0 + 8 * h), z[w * R + r]);
          }
        }
        __m256i d1[W * R], d2[W * R];
        for (int i = 0; i < W * R; ++i) d1[i] = d2[i] = _mm256_setzero_si256();
        for (int j = 0; j < 4; ++j) {
          __m256i lo[W], hi[W];
          for (int w = 0; w < W; ++w) {
            const uint8_t* wj = wp + w * code_stride + (kMasked ? 4 * left : 64) * j + 32 * h;
            __m256i wv;
            if constexpr (kMasked) {
              wv = _mm256_maskload_epi32(reinterpret_cast<const int*>(wj), mask);
            } else {
              wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wj));
            }
            lo[w] = _mm256_and_si256(wv, nibble);
            hi[w] = _mm256_and_si256(_mm256_srli_epi16(wv, 4), nibble);
          }
          const int8_t* q[R];
          for (int r = 0; r < R; ++r) q[r] = act[r].q + at + j * kStepBytes + 32 * h;
          dot(lo, hi, q, 64, d1, d2);
        }
        for (int r = 0; r < R; ++r) {
          const __m256 as = _mm256_loadu_ps(act[r].scale + g0 + 8 * h);
          for (int w = 0; w < W; ++w) {
            const int i = w * R + r;
            const __m256i d = _mm256_add_epi32(_mm256_slli_epi32(d1[i], 8), d2[i]);
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(ws[w], as), acc[i]);
          }
        }
      }
    };
    if (left == kPadGroups) {
      halves(std::false_type{});
    } else {
      halves(std::true_type{});
    }
  }
  const __m256 z_factor = _mm256_set1_ps(low != nullptr ? 1.0f : -8.0f);  // Q4_0: low = -8 * scale
  for (int w = 0; w < W; ++w) {
    for (int r = 0; r < R; ++r) {
      const __m256 t = _mm256_fmadd_ps(z[w * R + r], z_factor, acc[w * R + r]);
      const __m128 s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
      alignas(16) float f[4];
      _mm_store_ps(f, s);
      out[r * out_stride + w] = (f[0] + f[1]) + (f[2] + f[3]);
    }
  }
}

// ---------------------------------------------------------------- the op

using RowsFn = void (*)(const uint8_t*, int64_t, const uint16_t*, const uint16_t*, int64_t, const Act*, float*,
                        int64_t);

constexpr int64_t kPairRows = 2;  // weight rows a pass over cached weights (AVX-512: a prompt's rows)
// AVX2, decode: rows of at most this many bytes of codes (1024 inputs) go in pairs, sharing the
// activation loads and the per-row setup and sums; a pair of such rows is one short stream
constexpr int64_t kPairedRowBytes = 512;

RowsFn rows_fn(int64_t isa, int64_t r, bool pair) {
  if (isa == kAvx512Vnni) {
    switch (r) {
      case 1: return pair ? rows_512<1, kPairRows> : rows_512<1, 1>;
      case 2: return pair ? rows_512<2, kPairRows> : rows_512<2, 1>;
      case 3: return rows_512<3, 1>;
      default: return rows_512<4, 1>;
    }
  }
  switch (r) {
    case 1: return pair ? rows_256<1, kPairRows> : rows_256<1, 1>;
    case 2: return rows_256<2, 1>;
    case 3: return rows_256<3, 1>;
    default: return rows_256<4, 1>;
  }
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                     const std::optional<at::Tensor>& low) {
  TORCH_CHECK(g_isa != kNone, "edgecompute_ml::q4_linear: this CPU has neither AVX2 nor AVX-512 VNNI");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "q4_linear: x must be float32 [M, K]");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte, "q4_linear: codes must be uint8 [N, K/2]");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.dim() == 2, "q4_linear: scale must be float16 [N, K/32]");
  const int64_t m = x.size(0), k = x.size(1), n = codes.size(0);
  TORCH_CHECK(k % kGroup == 0 && codes.size(1) * 2 == k, "q4_linear: K must be a multiple of 32 and codes [N, K/2]");
  const int64_t groups = k / kGroup;
  TORCH_CHECK(scale.size(0) == n && scale.size(1) == groups, "q4_linear: scale must be [N, K/32]");
  const bool has_low = low.has_value() && low->defined();
  if (has_low) {
    TORCH_CHECK(low->scalar_type() == at::kHalf && low->sizes() == scale.sizes(), "q4_linear: low must be like scale");
    TORCH_CHECK(low->is_contiguous(), "q4_linear: low must be contiguous");
  }
  TORCH_CHECK(codes.is_contiguous() && scale.is_contiguous(), "q4_linear: codes and scale must be contiguous");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;

  const int64_t s_len = padded_groups(groups), q_len = s_len / kPadGroups * kBlockBytes;
  std::vector<int8_t> q(static_cast<size_t>(m * q_len));
  std::vector<float> act_scale(static_cast<size_t>(m * s_len));
  std::vector<float> sums(static_cast<size_t>(m * s_len));
  const float* xp = xc.data_ptr<float>();
  const int64_t isa = g_isa;
  auto quantize = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      quantize_row(xp + r * k, groups, q.data() + r * q_len, act_scale.data() + r * s_len, sums.data() + r * s_len,
                   isa == kAvx512Vnni);
    }
  };
  if (m * k >= (1 << 16)) {
    at::parallel_for(0, m, 1, quantize);
  } else {
    quantize(0, m);
  }
  std::vector<Act> acts(static_cast<size_t>(m));
  for (int64_t r = 0; r < m; ++r) {
    acts[static_cast<size_t>(r)] = {q.data() + r * q_len, act_scale.data() + r * s_len, sums.data() + r * s_len};
  }

  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const uint16_t* lp = has_low ? reinterpret_cast<const uint16_t*>(low->data_ptr<at::Half>()) : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t half_k = k / 2;
  // a task holds at least ~64K weights (a fork costs microseconds; a 576-wide row is 0.2 us)
  constexpr int64_t kTile = 16;  // weight rows kept in cache while every activation row passes
  auto tile = [&](int64_t n0) {
    const int64_t n1 = std::min(n, n0 + kTile);
    // AVX-512, a prompt (m > 1): two activation rows a pass against pairs of weight rows, the
    // tile's rows staying in cache between passes (each unpacked weight step serves two rows, each
    // activation load two weight rows; 3 or 4 rows a pass spill registers: measured slower).
    // Decode (m = 1): one weight row at a time. The weights stream from memory once, and two rows
    // read side by side are two interleaved streams 1 KB apart that the hardware prefetcher
    // follows badly: one thread reads a 128256x2048 weight at 11-12 GB/s in pairs, 13-17 alone
    // (docs/ml.md); sharing the activation loads gained 9% only on weights already in cache.
    const int64_t at_once = isa == kAvx512Vnni ? std::min<int64_t>(2, m) : kRowsAtOnce;
    for (int64_t m0 = 0; m0 < m; m0 += at_once) {
      const int64_t r = std::min(at_once, m - m0);
      const bool pairs = isa == kAvx512Vnni ? m > 1 : (m == 1 && half_k <= kPairedRowBytes);
      const int64_t step = pairs ? kPairRows : 1;
      int64_t row = n0;
      for (const RowsFn fn = rows_fn(isa, r, step > 1); row + step <= n1; row += step) {
        fn(cp + row * half_k, half_k, sp + row * groups, lp != nullptr ? lp + row * groups : nullptr, groups,
           acts.data() + m0, op + m0 * n + row, n);
      }
      for (const RowsFn fn = rows_fn(isa, r, false); row < n1; ++row) {  // an odd last row
        fn(cp + row * half_k, half_k, sp + row * groups, lp != nullptr ? lp + row * groups : nullptr, groups,
           acts.data() + m0, op + m0 * n + row, n);
      }
    }
  };
  // Threads take units of consecutive tiles (about 256 KB of codes: each thread streams long
  // sequential runs, which the hardware prefetcher needs) from a shared counter rather than a
  // fixed half each: on a shared machine a thread whose core is busy elsewhere would hold up the
  // whole op under a static split. Small products (a fork costs microseconds) run on the calling
  // thread.
  // A small weight (SmolLM2's 576-wide rows: a whole matrix under 256 KB) is cut finer, into at
  // least 4 units a thread, or it would run on one thread.
  const int64_t tiles = (n + kTile - 1) / kTile;
  const int64_t pool = at::get_num_threads();
  const int64_t unit = std::max<int64_t>(
      1, std::min((int64_t{1} << 18) / std::max<int64_t>(1, kTile * half_k), tiles / (4 * pool)));
  const int64_t units = (tiles + unit - 1) / unit;
  const int64_t work = n * k * m;
  const int64_t threads = std::min<int64_t>({pool, std::max<int64_t>(1, work >> 17), units});
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t t = 0; t < tiles; ++t) tile(t * kTile);
    return out;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t u = next.fetch_add(1, std::memory_order_relaxed); u < units;
         u = next.fetch_add(1, std::memory_order_relaxed)) {
      for (int64_t t = u * unit; t < std::min(tiles, (u + 1) * unit); ++t) tile(t * kTile);
    }
  });
  return out;
}

at::Tensor q4_linear_meta(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                          const std::optional<at::Tensor>& low) {
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 2, "q4_linear: x [M, K] and codes [N, K/2]");
  return at::empty({x.size(0), codes.size(0)}, x.options());
}

int64_t q4_isa(int64_t want) {
  // want < 0: report; otherwise use min(want, what the CPU has) (tests run the AVX2 path too)
  if (want >= 0) g_isa = std::min<int64_t>(want, kBestIsa);
  return g_isa;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(edgecompute_ml, m) {
  m.def("q4_linear(Tensor x, Tensor codes, Tensor scale, Tensor? low) -> Tensor");
  m.def("q4_isa(int want) -> int", &q4_isa);
}

TORCH_LIBRARY_IMPL(edgecompute_ml, CPU, m) {
  m.impl("q4_linear", &q4_linear);
}

TORCH_LIBRARY_IMPL(edgecompute_ml, Meta, m) {
  m.impl("q4_linear", &q4_linear_meta);
}
