// The bundled plugin's fast Fourier transform (algorithm "fft"); builtin.cpp lists it.
#include "algorithms.hpp"

#include <algorithm>
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#define RESTRICT __restrict__

namespace {

using ec::Error;
using ec::invalid;
using cd = std::complex<double>;

// ================================ FFT =========================================================
//
// Mixed-radix Stockham autosort FFT on split (separate real / imaginary) arrays.
//   * A length is factored into radix-8/4/2 stages, then 5 and 3, then any other prime up to
//     kMaxGenericRadix (a generic odd-radix butterfly). A stage of radix r with sub-length N = r m
//     and stride s reads x[q + s (p + j m)] and writes y[q + s (r p + k)] = DFT_r(x)_k w_N^(p k);
//     the innermost loop runs over q (contiguous, vectorised), twiddles are precomputed per stage.
//     The arrays a stage streams through are kPad doubles apart modulo 4 KiB (no L1 set conflicts).
//   * Several transforms laid out [i][b] (b innermost) are one transform with stride starting at
//     the batch size: the four-step path below runs its sub-transforms 8 at a time that way.
//   * Lengths above kDirectMax use the four-step split n = n1 n2: n2 column FFTs of length n1
//     (8 columns a batch), twiddle w_n^(j2 k1), n1 row FFTs of length n2, every sub-transform in
//     cache and the whole array read and written twice (prefetched, in huge pages); the first
//     pass reads the caller's input itself (Source). Below kDirectMax the plain Stockham passes
//     measured faster (2^19 real-packed, 2^20 complex points).
//   * Lengths with a prime factor above kMaxGenericRadix use Bluestein's chirp-z algorithm with an
//     inner length of the form 2^a 3^b 5^c >= 2n - 1.
//   * Real input (run_fft): an even length n goes through one transform of n / 2 (two samples a
//     point, see RealPost); rows of an odd length go two to a transform (see pair_spectra).
// Every twiddle is computed from an exactly reduced angle (integer arithmetic, then a reduction to
// the first octant), which keeps the accuracy of large transforms at numpy's level.

constexpr int kMaxGenericRadix = 61;
constexpr int kGenericLanes = 8;  // the generic butterfly runs 8 columns (or points) at a time
constexpr int64_t kDirectMax = int64_t{1} << 20;
constexpr int64_t kBatch = 8;  // columns per four-step sub-transform batch
// arrays that stages stream through together start kPad doubles (1 KiB) apart modulo 4 KiB, so
// power-of-two strides do not map them all onto the same L1 sets
constexpr int64_t kPad = 128;
constexpr int64_t kAhead = 16;  // rows a four-step gather prefetches ahead

// exp(-2 pi i t / N) for 0 <= t, computed in the first octant
cd unit_root(int64_t t, int64_t N) {
    t %= N;
    int64_t u = 8 * t;  // the angle is 2 pi u / (8 N): pi / 4 <-> u = N
    bool neg_sin = false, neg_cos = false, swap = false;
    if (u > 4 * N) { u = 8 * N - u; neg_sin = true; }
    if (u > 2 * N) { u = 4 * N - u; neg_cos = true; }
    if (u > N) { u = 2 * N - u; swap = true; }
    const double a = (M_PI / 4) * static_cast<double>(u) / static_cast<double>(N);
    double c = std::cos(a), s = std::sin(a);
    if (swap) std::swap(c, s);
    if (neg_cos) c = -c;
    if (neg_sin) s = -s;
    return cd(c, -s);
}

// ---- butterflies: in place on ar[0..R), ai[0..R), natural order out ----------------------------

template <int R> struct Butterfly;

template <> struct Butterfly<2> {
    static inline void run(double* ar, double* ai) {
        const double r0 = ar[0], i0 = ai[0];
        ar[0] = r0 + ar[1]; ai[0] = i0 + ai[1];
        ar[1] = r0 - ar[1]; ai[1] = i0 - ai[1];
    }
};

template <> struct Butterfly<3> {
    static inline void run(double* ar, double* ai) {
        constexpr double h = 0.86602540378443864676;  // sin(2 pi / 3)
        const double tr = ar[1] + ar[2], ti = ai[1] + ai[2];
        const double dr = ar[1] - ar[2], di = ai[1] - ai[2];
        const double mr = ar[0] - 0.5 * tr, mi = ai[0] - 0.5 * ti;
        ar[0] += tr; ai[0] += ti;
        ar[1] = mr + h * di; ai[1] = mi - h * dr;
        ar[2] = mr - h * di; ai[2] = mi + h * dr;
    }
};

template <> struct Butterfly<4> {
    static inline void run(double* ar, double* ai) {
        const double t0r = ar[0] + ar[2], t0i = ai[0] + ai[2];
        const double t1r = ar[0] - ar[2], t1i = ai[0] - ai[2];
        const double t2r = ar[1] + ar[3], t2i = ai[1] + ai[3];
        const double t3r = ar[1] - ar[3], t3i = ai[1] - ai[3];
        ar[0] = t0r + t2r; ai[0] = t0i + t2i;
        ar[2] = t0r - t2r; ai[2] = t0i - t2i;
        ar[1] = t1r + t3i; ai[1] = t1i - t3r;
        ar[3] = t1r - t3i; ai[3] = t1i + t3r;
    }
};

template <> struct Butterfly<5> {
    static inline void run(double* ar, double* ai) {
        constexpr double c1 = 0.30901699437494742410, c2 = -0.80901699437494742410;  // cos(2 pi k / 5)
        constexpr double s1 = 0.95105651629515357212, s2 = 0.58778525229247312917;   // sin(2 pi k / 5)
        const double u1r = ar[1] + ar[4], u1i = ai[1] + ai[4], v1r = ar[1] - ar[4], v1i = ai[1] - ai[4];
        const double u2r = ar[2] + ar[3], u2i = ai[2] + ai[3], v2r = ar[2] - ar[3], v2i = ai[2] - ai[3];
        const double a1r = ar[0] + c1 * u1r + c2 * u2r, a1i = ai[0] + c1 * u1i + c2 * u2i;
        const double a2r = ar[0] + c2 * u1r + c1 * u2r, a2i = ai[0] + c2 * u1i + c1 * u2i;
        // -i (s1 v1 + s2 v2) and -i (s2 v1 - s1 v2)
        const double b1r = s1 * v1i + s2 * v2i, b1i = -(s1 * v1r + s2 * v2r);
        const double b2r = s2 * v1i - s1 * v2i, b2i = -(s2 * v1r - s1 * v2r);
        ar[0] += u1r + u2r; ai[0] += u1i + u2i;
        ar[1] = a1r + b1r; ai[1] = a1i + b1i;
        ar[4] = a1r - b1r; ai[4] = a1i - b1i;
        ar[2] = a2r + b2r; ai[2] = a2i + b2i;
        ar[3] = a2r - b2r; ai[3] = a2i - b2i;
    }
};

template <> struct Butterfly<8> {
    static inline void run(double* ar, double* ai) {
        constexpr double h = 0.70710678118654752440;  // 1 / sqrt 2
        double er[4] = {ar[0], ar[2], ar[4], ar[6]}, ei[4] = {ai[0], ai[2], ai[4], ai[6]};
        double odr[4] = {ar[1], ar[3], ar[5], ar[7]}, odi[4] = {ai[1], ai[3], ai[5], ai[7]};
        Butterfly<4>::run(er, ei);
        Butterfly<4>::run(odr, odi);
        // odd part times w8^k: 1, (1 - i) / sqrt 2, -i, -(1 + i) / sqrt 2
        const double o1r = h * (odr[1] + odi[1]), o1i = h * (odi[1] - odr[1]);
        const double o2r = odi[2], o2i = -odr[2];
        const double o3r = h * (odi[3] - odr[3]), o3i = -h * (odr[3] + odi[3]);
        ar[0] = er[0] + odr[0]; ai[0] = ei[0] + odi[0];
        ar[4] = er[0] - odr[0]; ai[4] = ei[0] - odi[0];
        ar[1] = er[1] + o1r; ai[1] = ei[1] + o1i;
        ar[5] = er[1] - o1r; ai[5] = ei[1] - o1i;
        ar[2] = er[2] + o2r; ai[2] = ei[2] + o2i;
        ar[6] = er[2] - o2r; ai[6] = ei[2] - o2i;
        ar[3] = er[3] + o3r; ai[3] = ei[3] + o3i;
        ar[7] = er[3] - o3r; ai[7] = ei[3] - o3i;
    }
};

// one stage of a fixed radix; TW: whether twiddles apply (m > 1)
template <int R, bool TW>
void stage(const double* RESTRICT xr, const double* RESTRICT xi, double* RESTRICT yr, double* RESTRICT yi,
           int64_t m, int64_t s, const double* RESTRICT wr, const double* RESTRICT wi) {
    const int64_t sm = s * m;
    if (s == 1) {  // first stage of a single transform: vectorise over p instead
        for (int64_t p = 0; p < m; ++p) {
            double ar[R], ai[R];
            for (int j = 0; j < R; ++j) { ar[j] = xr[p + j * m]; ai[j] = xi[p + j * m]; }
            Butterfly<R>::run(ar, ai);
            yr[R * p] = ar[0]; yi[R * p] = ai[0];
            for (int k = 1; k < R; ++k) {
                if constexpr (TW) {
                    const double cr = wr[(k - 1) * m + p], ci = wi[(k - 1) * m + p];
                    yr[R * p + k] = ar[k] * cr - ai[k] * ci;
                    yi[R * p + k] = ar[k] * ci + ai[k] * cr;
                } else {
                    yr[R * p + k] = ar[k]; yi[R * p + k] = ai[k];
                }
            }
        }
        return;
    }
    for (int64_t p = 0; p < m; ++p) {
        double cr[R], ci[R];
        if constexpr (TW)
            for (int k = 1; k < R; ++k) { cr[k] = wr[(k - 1) * m + p]; ci[k] = wi[(k - 1) * m + p]; }
        const double* RESTRICT xrp = xr + s * p;
        const double* RESTRICT xip = xi + s * p;
        double* RESTRICT yrp = yr + s * R * p;
        double* RESTRICT yip = yi + s * R * p;
        for (int64_t q = 0; q < s; ++q) {
            double ar[R], ai[R];
            for (int j = 0; j < R; ++j) { ar[j] = xrp[j * sm + q]; ai[j] = xip[j * sm + q]; }
            Butterfly<R>::run(ar, ai);
            yrp[q] = ar[0]; yip[q] = ai[0];
            for (int k = 1; k < R; ++k) {
                if constexpr (TW) {
                    yrp[k * s + q] = ar[k] * cr[k] - ai[k] * ci[k];
                    yip[k * s + q] = ar[k] * ci[k] + ai[k] * cr[k];
                } else {
                    yrp[k * s + q] = ar[k]; yip[k * s + q] = ai[k];
                }
            }
        }
    }
}

// one stage of an odd prime radix r <= kMaxGenericRadix, for q0 <= q < q0 + qn (QN: qn when known
// at compile time); cs, sn: cos / sin(2 pi t / r), t < r
template <int QN>
inline __attribute__((always_inline)) void generic_block(const double* RESTRICT xr, const double* RESTRICT xi,
                                                         double* RESTRICT yr, double* RESTRICT yi, int r, int64_t m,
                                                         int64_t s, int64_t p, int64_t q0, int64_t qn_,
                                                         const double* RESTRICT wr, const double* RESTRICT wi,
                                                         const double* RESTRICT cs, const double* RESTRICT sn) {
    constexpr int Q = kGenericLanes;
    const int64_t qn = QN ? QN : qn_;
    const int h = (r - 1) / 2;
    const int64_t sm = s * m;
    double ur[kMaxGenericRadix / 2 + 1][Q], ui[kMaxGenericRadix / 2 + 1][Q];
    double vr[kMaxGenericRadix / 2 + 1][Q], vi[kMaxGenericRadix / 2 + 1][Q];
    double a0r[Q], a0i[Q], sr[Q], si[Q];
    const double* RESTRICT xrp = xr + s * p + q0;
    const double* RESTRICT xip = xi + s * p + q0;
    double* RESTRICT yrp = yr + s * r * p + q0;
    double* RESTRICT yip = yi + s * r * p + q0;
    for (int64_t q = 0; q < qn; ++q) { a0r[q] = sr[q] = xrp[q]; a0i[q] = si[q] = xip[q]; }
    for (int j = 1; j <= h; ++j)
        for (int64_t q = 0; q < qn; ++q) {
            const double pr = xrp[j * sm + q], pi = xip[j * sm + q];
            const double nr = xrp[(r - j) * sm + q], ni = xip[(r - j) * sm + q];
            ur[j][q] = pr + nr; ui[j][q] = pi + ni; vr[j][q] = pr - nr; vi[j][q] = pi - ni;
            sr[q] += ur[j][q]; si[q] += ui[j][q];
        }
    for (int64_t q = 0; q < qn; ++q) { yrp[q] = sr[q]; yip[q] = si[q]; }
    for (int k = 1; k <= h; ++k) {
        double acr[Q], aci[Q], bcr[Q], bci[Q];
        for (int64_t q = 0; q < qn; ++q) { acr[q] = a0r[q]; aci[q] = a0i[q]; bcr[q] = 0; bci[q] = 0; }
        int t = 0;
        for (int j = 1; j <= h; ++j) {
            t += k;
            if (t >= r) t -= r;
            const double c = cs[t], sv = sn[t];
            for (int64_t q = 0; q < qn; ++q) {
                acr[q] += ur[j][q] * c; aci[q] += ui[j][q] * c;
                bcr[q] += vi[j][q] * sv; bci[q] -= vr[j][q] * sv;
            }
        }
        double w1r = 1, w1i = 0, w2r = 1, w2i = 0;  // twiddles of outputs k and r - k
        if (m > 1) {
            w1r = wr[(k - 1) * m + p]; w1i = wi[(k - 1) * m + p];
            w2r = wr[(r - k - 1) * m + p]; w2i = wi[(r - k - 1) * m + p];
        }
        for (int64_t q = 0; q < qn; ++q) {
            const double b1r = acr[q] + bcr[q], b1i = aci[q] + bci[q];
            const double b2r = acr[q] - bcr[q], b2i = aci[q] - bci[q];
            yrp[k * s + q] = b1r * w1r - b1i * w1i;
            yip[k * s + q] = b1r * w1i + b1i * w1r;
            yrp[(r - k) * s + q] = b2r * w2r - b2i * w2i;
            yip[(r - k) * s + q] = b2r * w2i + b2i * w2r;
        }
    }
}

// columns q_begin <= q < s of one p of a stage of odd prime radix (scalar; for short columns)
void generic_scalar(const double* RESTRICT xr, const double* RESTRICT xi, double* RESTRICT yr, double* RESTRICT yi,
                   int r, int64_t m, int64_t s, const double* RESTRICT wr, const double* RESTRICT wi,
                   const double* RESTRICT cs, const double* RESTRICT sn, int64_t p, int64_t q_begin) {
    const int h = (r - 1) / 2;
    const int64_t sm = s * m;
    double ur[kMaxGenericRadix], ui[kMaxGenericRadix], vr[kMaxGenericRadix], vi[kMaxGenericRadix];
    double br[kMaxGenericRadix], bi[kMaxGenericRadix];
    {
        for (int64_t q = q_begin; q < s; ++q) {
            const double* RESTRICT xrp = xr + s * p + q;
            const double* RESTRICT xip = xi + s * p + q;
            const double a0r = xrp[0], a0i = xip[0];
            double sr = a0r, si = a0i;
            for (int j = 1; j <= h; ++j) {
                const double pr = xrp[j * sm], pi = xip[j * sm], nr = xrp[(r - j) * sm], ni = xip[(r - j) * sm];
                ur[j] = pr + nr; ui[j] = pi + ni; vr[j] = pr - nr; vi[j] = pi - ni;
                sr += ur[j]; si += ui[j];
            }
            br[0] = sr; bi[0] = si;
            for (int k = 1; k <= h; ++k) {
                double acr = a0r, aci = a0i, bcr = 0, bci = 0;
                int t = 0;
                for (int j = 1; j <= h; ++j) {
                    t += k;
                    if (t >= r) t -= r;
                    acr += ur[j] * cs[t]; aci += ui[j] * cs[t];
                    bcr += vi[j] * sn[t]; bci -= vr[j] * sn[t];
                }
                br[k] = acr + bcr; bi[k] = aci + bci;
                br[r - k] = acr - bcr; bi[r - k] = aci - bci;
            }
            double* RESTRICT yrp = yr + s * r * p + q;
            double* RESTRICT yip = yi + s * r * p + q;
            yrp[0] = br[0]; yip[0] = bi[0];
            for (int k = 1; k < r; ++k) {
                if (m > 1) {
                    const double cr = wr[(k - 1) * m + p], ci = wi[(k - 1) * m + p];
                    yrp[k * s] = br[k] * cr - bi[k] * ci;
                    yip[k * s] = br[k] * ci + bi[k] * cr;
                } else {
                    yrp[k * s] = br[k]; yip[k * s] = bi[k];
                }
            }
        }
    }
}

// a stage of odd prime radix r with short columns (s < kGenericLanes): the points c = q + s p,
// c0 <= c < c0 + kGenericLanes, at once (their inputs x[c + j s m] are contiguous; twiddles and
// outputs are gathered / scattered per lane)
inline void generic_block_c(const double* RESTRICT xr, const double* RESTRICT xi, double* RESTRICT yr,
                            double* RESTRICT yi, int r, int64_t m, int64_t s, int64_t c0, const double* RESTRICT wr,
                            const double* RESTRICT wi, const double* RESTRICT cs, const double* RESTRICT sn) {
    constexpr int Q = kGenericLanes;
    const int h = (r - 1) / 2;
    const int64_t sm = s * m;
    double ur[kMaxGenericRadix / 2 + 1][Q], ui[kMaxGenericRadix / 2 + 1][Q];
    double vr[kMaxGenericRadix / 2 + 1][Q], vi[kMaxGenericRadix / 2 + 1][Q];
    double a0r[Q], a0i[Q], sr[Q], si[Q];
    int64_t pl[Q], out[Q];  // p of each lane; its output offset (k = 0)
    for (int q = 0; q < Q; ++q) {
        const int64_t c = c0 + q, p = c / s;
        pl[q] = p;
        out[q] = c - s * p + s * r * p;
    }
    const double* RESTRICT xrp = xr + c0;
    const double* RESTRICT xip = xi + c0;
    for (int q = 0; q < Q; ++q) { a0r[q] = sr[q] = xrp[q]; a0i[q] = si[q] = xip[q]; }
    for (int j = 1; j <= h; ++j)
        for (int q = 0; q < Q; ++q) {
            const double pr = xrp[j * sm + q], pi = xip[j * sm + q];
            const double nr = xrp[(r - j) * sm + q], ni = xip[(r - j) * sm + q];
            ur[j][q] = pr + nr; ui[j][q] = pi + ni; vr[j][q] = pr - nr; vi[j][q] = pi - ni;
            sr[q] += ur[j][q]; si[q] += ui[j][q];
        }
    for (int q = 0; q < Q; ++q) { yr[out[q]] = sr[q]; yi[out[q]] = si[q]; }
    for (int k = 1; k <= h; ++k) {
        double acr[Q], aci[Q], bcr[Q], bci[Q];
        for (int q = 0; q < Q; ++q) { acr[q] = a0r[q]; aci[q] = a0i[q]; bcr[q] = 0; bci[q] = 0; }
        int t = 0;
        for (int j = 1; j <= h; ++j) {
            t += k;
            if (t >= r) t -= r;
            const double c = cs[t], sv = sn[t];
            for (int q = 0; q < Q; ++q) {
                acr[q] += ur[j][q] * c; aci[q] += ui[j][q] * c;
                bcr[q] += vi[j][q] * sv; bci[q] -= vr[j][q] * sv;
            }
        }
        for (int q = 0; q < Q; ++q) {
            double b1r = acr[q] + bcr[q], b1i = aci[q] + bci[q];
            double b2r = acr[q] - bcr[q], b2i = aci[q] - bci[q];
            if (m > 1) {
                const int64_t t1 = (k - 1) * m + pl[q], t2 = (r - k - 1) * m + pl[q];
                const double c1r = b1r * wr[t1] - b1i * wi[t1], c1i = b1r * wi[t1] + b1i * wr[t1];
                const double c2r = b2r * wr[t2] - b2i * wi[t2], c2i = b2r * wi[t2] + b2i * wr[t2];
                b1r = c1r; b1i = c1i; b2r = c2r; b2i = c2i;
            }
            yr[out[q] + k * s] = b1r; yi[out[q] + k * s] = b1i;
            yr[out[q] + (r - k) * s] = b2r; yi[out[q] + (r - k) * s] = b2i;
        }
    }
}

void stage_generic(const double* RESTRICT xr, const double* RESTRICT xi, double* RESTRICT yr, double* RESTRICT yi,
                   int r, int64_t m, int64_t s, const double* RESTRICT wr, const double* RESTRICT wi,
                   const double* RESTRICT cs, const double* RESTRICT sn) {
    if (s < kGenericLanes) {
        const int64_t points = s * m;
        int64_t c0 = 0;
        for (; c0 + kGenericLanes <= points; c0 += kGenericLanes)
            generic_block_c(xr, xi, yr, yi, r, m, s, c0, wr, wi, cs, sn);
        for (int64_t p = c0 / s; p < m; ++p) generic_scalar(xr, xi, yr, yi, r, m, s, wr, wi, cs, sn, p, p == c0 / s ? c0 % s : 0);
        return;
    }
    for (int64_t p = 0; p < m; ++p) {
        int64_t q0 = 0;
        for (; q0 + kGenericLanes <= s; q0 += kGenericLanes)
            generic_block<kGenericLanes>(xr, xi, yr, yi, r, m, s, p, q0, kGenericLanes, wr, wi, cs, sn);
        if (q0 < s) generic_scalar(xr, xi, yr, yi, r, m, s, wr, wi, cs, sn, p, q0);
    }
}

template <int R>
void run_stage(const double* xr, const double* xi, double* yr, double* yi, int64_t m, int64_t s,
               const double* wr, const double* wi) {
    if (m > 1) stage<R, true>(xr, xi, yr, yi, m, s, wr, wi);
    else stage<R, false>(xr, xi, yr, yi, m, s, wr, wi);
}

// the prime factors of n, ascending
std::vector<int64_t> prime_factors(int64_t n) {
    std::vector<int64_t> f;
    for (int64_t p = 2; p * p <= n; p += (p == 2 ? 1 : 2))
        while (n % p == 0) { f.push_back(p); n /= p; }
    if (n > 1) f.push_back(n);
    return f;
}

bool smooth(int64_t n) {  // every prime factor has a butterfly
    for (int64_t p : prime_factors(n))
        if (p > kMaxGenericRadix) return false;
    return true;
}

// mixed-radix Stockham transform of one length, run on batches laid out [i][b]
struct Stockham {
    struct Stage { int r; int64_t m; size_t tw; size_t gen; };
    int64_t n = 0;
    std::vector<Stage> stages;
    std::vector<double> tw_re, tw_im;  // per stage: w_N^(p k) at tw + (k - 1) m + p
    std::vector<double> gen_cos, gen_sin;  // per generic stage: cos / sin(2 pi t / r)

    explicit Stockham(int64_t n_) : n(n_) {
        std::vector<int64_t> f = prime_factors(n);
        int twos = static_cast<int>(std::count(f.begin(), f.end(), 2));
        std::vector<int> radices;
        for (; twos >= 3; twos -= 3) radices.push_back(8);  // fewest passes
        for (; twos >= 2; twos -= 2) radices.push_back(4);
        if (twos == 1) radices.push_back(2);
        for (int64_t p : f)
            if (p == 5) radices.push_back(5);
        for (int64_t p : f)
            if (p == 3) radices.push_back(3);
        for (int64_t p : f)
            if (p > 5) radices.push_back(static_cast<int>(p));
        int64_t len = n;  // N of the stage
        for (int r : radices) {
            const int64_t m = len / r;
            Stage st{r, m, tw_re.size(), gen_cos.size()};
            for (int k = 1; k < r; ++k)
                for (int64_t p = 0; p < m; ++p) {
                    const cd w = unit_root(p * k, len);
                    tw_re.push_back(w.real());
                    tw_im.push_back(w.imag());
                }
            if (r != 2 && r != 3 && r != 4 && r != 5 && r != 8)
                for (int t = 0; t < r; ++t) {
                    const cd w = unit_root(t, r);
                    gen_cos.push_back(w.real());
                    gen_sin.push_back(-w.imag());
                }
            stages.push_back(st);
            len = m;
        }
    }

    // transforms `batch` signals stored at re / im ([i][b]); returns true when the result ends in
    // wre / wim instead (the stages alternate between the two)
    bool run(double* re, double* im, double* wre, double* wim, int64_t batch) const {
        double *xr = re, *xi = im, *yr = wre, *yi = wim;
        int64_t s = batch;
        for (const Stage& st : stages) {
            const double* wr = tw_re.data() + st.tw;
            const double* wi = tw_im.data() + st.tw;
            switch (st.r) {
                case 2: run_stage<2>(xr, xi, yr, yi, st.m, s, wr, wi); break;
                case 3: run_stage<3>(xr, xi, yr, yi, st.m, s, wr, wi); break;
                case 4: run_stage<4>(xr, xi, yr, yi, st.m, s, wr, wi); break;
                case 5: run_stage<5>(xr, xi, yr, yi, st.m, s, wr, wi); break;
                case 8: run_stage<8>(xr, xi, yr, yi, st.m, s, wr, wi); break;
                default:
                    stage_generic(xr, xi, yr, yi, st.r, st.m, s, wr, wi, gen_cos.data() + st.gen,
                                  gen_sin.data() + st.gen);
            }
            std::swap(xr, yr);
            std::swap(xi, yi);
            s *= st.r;
        }
        return xr != re;
    }
};

struct Spectrum {
    const double* re;
    const double* im;
};

// the input of a transform read straight from the caller's array (four-step plans only): point e
// is (p[2e], sign p[2e+1]) when pairs (complex input, or real input packed two samples a point),
// else (p[e], 0); T = float or double
struct Source {
    const void* data = nullptr;
    bool single = false, pairs = false;
    double sign = 1.0;
};

struct Plan {
    enum Kind { kDirect, kFourStep, kBluestein };
    int64_t n = 0;
    Kind kind = kDirect;
    size_t scratch = 0;  // doubles of scratch that transform() needs
    std::unique_ptr<Stockham> direct;
    // four-step: n = n1 n2
    int64_t n1 = 0, n2 = 0;
    std::unique_ptr<Stockham> cols, rows;
    std::vector<double> cb_re, cb_im;  // w_n^(b k1) at k1 kBatch + b
    int64_t lo_bits = 0;
    std::vector<double> lo_re, lo_im, hi_re, hi_im;  // w_n^t = hi[t >> lo_bits] lo[t & mask]
    // Bluestein
    int64_t m = 0;
    std::shared_ptr<const Plan> inner;
    std::vector<double> chirp_re, chirp_im;    // exp(-pi i k^2 / n)
    std::vector<double> filter_re, filter_im;  // FFT of the conjugate chirp filter, divided by m

    // forward DFT of re / im [0, n): the result stays in re / im or, for a direct plan with an odd
    // number of stages, lands in the scratch (no copy back); the return value says where
    Spectrum transform(double* re, double* im, double* scratch_buf) const;
    // the same, a four-step plan reading its input from src (re / im: where the result goes)
    Spectrum transform(const Source& src, double* re, double* im, double* scratch_buf) const;
};

std::shared_ptr<const Plan> fft_plan(int64_t n);

// smallest 2^a 3^b 5^c >= n
int64_t fast_length(int64_t n) {
    int64_t best = int64_t{1} << 62;
    for (int64_t p5 = 1; p5 < best; p5 *= 5)
        for (int64_t p35 = p5; p35 < best; p35 *= 3) {
            int64_t v = p35;
            while (v < n) v *= 2;
            best = std::min(best, v);
        }
    return best;
}

std::shared_ptr<const Plan> make_plan(int64_t n) {
    auto plan = std::make_shared<Plan>();
    plan->n = n;
    if (!smooth(n)) {
        plan->kind = Plan::kBluestein;
        const int64_t m = fast_length(2 * n - 1);
        plan->m = m;
        plan->inner = fft_plan(m);
        plan->chirp_re.resize(n);
        plan->chirp_im.resize(n);
        for (int64_t k = 0; k < n; ++k) {
            const cd c = unit_root((k * k) % (2 * n), 2 * n);  // exact angle reduction
            plan->chirp_re[k] = c.real();
            plan->chirp_im[k] = c.imag();
        }
        plan->filter_re.assign(m, 0.0);
        plan->filter_im.assign(m, 0.0);
        const double scale = 1.0 / static_cast<double>(m);
        plan->filter_re[0] = plan->chirp_re[0] * scale;
        plan->filter_im[0] = -plan->chirp_im[0] * scale;
        for (int64_t k = 1; k < n; ++k) {
            plan->filter_re[k] = plan->filter_re[m - k] = plan->chirp_re[k] * scale;
            plan->filter_im[k] = plan->filter_im[m - k] = -plan->chirp_im[k] * scale;
        }
        std::vector<double> buf(plan->inner->scratch);
        const Spectrum z = plan->inner->transform(plan->filter_re.data(), plan->filter_im.data(), buf.data());
        if (z.re != plan->filter_re.data()) {
            std::copy_n(z.re, m, plan->filter_re.data());
            std::copy_n(z.im, m, plan->filter_im.data());
        }
        plan->scratch = 2 * m + 2 * kPad + plan->inner->scratch;
    } else if (n <= kDirectMax) {
        plan->kind = Plan::kDirect;
        plan->direct = std::make_unique<Stockham>(n);
        plan->scratch = 2 * n + 2 * kPad;
    } else {
        plan->kind = Plan::kFourStep;
        std::vector<int64_t> f = prime_factors(n);
        int64_t a = 1, b = 1;
        for (auto it = f.rbegin(); it != f.rend(); ++it) (a <= b ? a : b) *= *it;
        plan->n1 = a;
        plan->n2 = b;
        plan->cols = std::make_unique<Stockham>(a);
        plan->rows = std::make_unique<Stockham>(b);
        plan->cb_re.resize(a * kBatch);
        plan->cb_im.resize(a * kBatch);
        for (int64_t k1 = 0; k1 < a; ++k1)
            for (int64_t j = 0; j < kBatch; ++j) {
                const cd w = unit_root(j * k1, n);
                plan->cb_re[k1 * kBatch + j] = w.real();
                plan->cb_im[k1 * kBatch + j] = w.imag();
            }
        int64_t bits = 0;
        while ((int64_t{1} << (2 * bits)) < n) ++bits;
        plan->lo_bits = bits;
        const int64_t lo = int64_t{1} << bits, hi = (n >> bits) + 1;
        plan->lo_re.resize(lo); plan->lo_im.resize(lo);
        plan->hi_re.resize(hi); plan->hi_im.resize(hi);
        for (int64_t t = 0; t < lo; ++t) {
            const cd w = unit_root(t, n);
            plan->lo_re[t] = w.real(); plan->lo_im[t] = w.imag();
        }
        for (int64_t t = 0; t < hi; ++t) {
            const cd w = unit_root(t << bits, n);
            plan->hi_re[t] = w.real(); plan->hi_im[t] = w.imag();
        }
        const int64_t big = std::max(a, b);
        plan->scratch = 2 * n + 4 * kBatch * big + 2 * a + 8 * kPad;
    }
    return plan;
}

// four-step helpers; NB: the batch width when known at compile time (else nb)
// d[r nb + b] = s[r ld + b] for r < rows, b < nb, prefetching kAhead rows ahead
template <int64_t NB>
inline __attribute__((always_inline)) void gather_block(double* RESTRICT dr, double* RESTRICT di, const double* RESTRICT sr,
                                                        const double* RESTRICT si, int64_t rows, int64_t ld, int64_t nb_) {
    const int64_t nb = NB ? NB : nb_;
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t ahead = std::min(r + kAhead, rows - 1) * ld;
        __builtin_prefetch(sr + ahead);
        __builtin_prefetch(si + ahead);
        for (int64_t b = 0; b < nb; ++b) {
            dr[r * nb + b] = sr[r * ld + b];
            di[r * nb + b] = si[r * ld + b];
        }
    }
}

// d[r nb + b] = point r ld + b of src for r < rows, b < nb
template <int64_t NB, bool Pairs, class T>
inline __attribute__((always_inline)) void gather_source(double* RESTRICT dr, double* RESTRICT di, const T* RESTRICT p,
                                                         double sign, int64_t rows, int64_t ld, int64_t nb_) {
    const int64_t nb = NB ? NB : nb_;
    constexpr int64_t width = Pairs ? 2 : 1;
    for (int64_t r = 0; r < rows; ++r) {
        const T* RESTRICT a = p + width * std::min(r + kAhead, rows - 1) * ld;
        __builtin_prefetch(a);
        if (width * nb * sizeof(T) > 64) __builtin_prefetch(a + 64 / sizeof(T));
        const T* RESTRICT q = p + width * r * ld;
        for (int64_t b = 0; b < nb; ++b) {
            if constexpr (Pairs) {
                dr[r * nb + b] = static_cast<double>(q[2 * b]);
                di[r * nb + b] = sign * static_cast<double>(q[2 * b + 1]);
            } else {
                dr[r * nb + b] = static_cast<double>(q[b]);
                di[r * nb + b] = 0.0;
            }
        }
    }
}

template <int64_t NB, class T>
inline __attribute__((always_inline)) void gather_source(double* dr, double* di, const Source& src, int64_t offset,
                                                         int64_t rows, int64_t ld, int64_t nb) {
    const T* p = static_cast<const T*>(src.data);
    if (src.pairs) gather_source<NB, true>(dr, di, p + 2 * offset, src.sign, rows, ld, nb);
    else gather_source<NB, false>(dr, di, p + offset, src.sign, rows, ld, nb);
}

// d[r ld + b] = s[r nb + b]
template <int64_t NB>
inline __attribute__((always_inline)) void scatter_block(double* RESTRICT dr, double* RESTRICT di, const double* RESTRICT sr,
                                                         const double* RESTRICT si, int64_t rows, int64_t ld, int64_t nb_) {
    const int64_t nb = NB ? NB : nb_;
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t ahead = std::min(r + kAhead, rows - 1) * ld;
        __builtin_prefetch(dr + ahead, 1);
        __builtin_prefetch(di + ahead, 1);
        for (int64_t b = 0; b < nb; ++b) {
            dr[r * ld + b] = sr[r * nb + b];
            di[r * ld + b] = si[r * nb + b];
        }
    }
}

// z[k nb + b] *= d[k] c[k kBatch + b]
template <int64_t NB>
inline __attribute__((always_inline)) void twiddle_block(double* RESTRICT zr, double* RESTRICT zi, const double* RESTRICT dr,
                                                         const double* RESTRICT di, const double* RESTRICT cr,
                                                         const double* RESTRICT ci, int64_t rows, int64_t nb_) {
    const int64_t nb = NB ? NB : nb_;
    for (int64_t k = 0; k < rows; ++k) {
        const double ar = dr[k], ai = di[k];
        for (int64_t b = 0; b < nb; ++b) {
            const double tr = ar * cr[k * kBatch + b] - ai * ci[k * kBatch + b];
            const double ti = ar * ci[k * kBatch + b] + ai * cr[k * kBatch + b];
            const double xr = zr[k * nb + b], xi = zi[k * nb + b];
            zr[k * nb + b] = xr * tr - xi * ti;
            zi[k * nb + b] = xr * ti + xi * tr;
        }
    }
}

Spectrum Plan::transform(double* re, double* im, double* buf) const {
    Source none;
    return transform(none, re, im, buf);
}

Spectrum Plan::transform(const Source& src, double* re, double* im, double* buf) const {
    if (n <= 1) return {re, im};
    if (kind == kDirect) {
        if (direct->run(re, im, buf, buf + n + kPad, 1)) return {buf, buf + n + kPad};
        return {re, im};
    }
    if (kind == kBluestein) {
        double* wr = buf;  // (the inner transforms' results may land here or in their scratch)
        double* wi = buf + m + kPad;
        const double* RESTRICT cr = chirp_re.data();
        const double* RESTRICT ci = chirp_im.data();
        for (int64_t k = 0; k < n; ++k) {
            wr[k] = re[k] * cr[k] - im[k] * ci[k];
            wi[k] = re[k] * ci[k] + im[k] * cr[k];
        }
        std::fill(wr + n, wr + m, 0.0);
        std::fill(wi + n, wi + m, 0.0);
        const Spectrum z = inner->transform(wr, wi, wi + m + kPad);
        const double* RESTRICT fr = filter_re.data();
        const double* RESTRICT fi = filter_im.data();
        for (int64_t k = 0; k < m; ++k) {  // times the filter, then conjugated (inverse by conjugation)
            const double xr = z.re[k], xi = z.im[k];
            wr[k] = xr * fr[k] - xi * fi[k];
            wi[k] = -(xr * fi[k] + xi * fr[k]);
        }
        const Spectrum y = inner->transform(wr, wi, wi + m + kPad);
        const double* RESTRICT yr = y.re;
        const double* RESTRICT yi = y.im;
        for (int64_t k = 0; k < n; ++k) {  // conj(y) chirp
            re[k] = yr[k] * cr[k] + yi[k] * ci[k];
            im[k] = yr[k] * ci[k] - yi[k] * cr[k];
        }
        return {re, im};
    }
    // four-step
    double* RESTRICT yr = buf;  // Y[j2 n1 + k1]
    double* RESTRICT yi = buf + n + kPad;
    const int64_t big = kBatch * std::max(n1, n2) + kPad;
    double* b0r = yi + n + kPad;
    double* b0i = b0r + big;
    double* b1r = b0i + big;
    double* b1i = b1r + big;
    double* RESTRICT dr = b1i + big;
    double* RESTRICT di = dr + n1;
    const int64_t mask = (int64_t{1} << lo_bits) - 1;
    for (int64_t j2 = 0; j2 < n2; j2 += kBatch) {  // columns j2 .. j2 + nb: FFT over j1, twiddle
        const int64_t nb = std::min(kBatch, n2 - j2);
        if (!src.data) {
            if (nb == kBatch) gather_block<kBatch>(b0r, b0i, re + j2, im + j2, n1, n2, nb);
            else gather_block<0>(b0r, b0i, re + j2, im + j2, n1, n2, nb);
        } else if (src.single) {
            if (nb == kBatch) gather_source<kBatch, float>(b0r, b0i, src, j2, n1, n2, nb);
            else gather_source<0, float>(b0r, b0i, src, j2, n1, n2, nb);
        } else {
            if (nb == kBatch) gather_source<kBatch, double>(b0r, b0i, src, j2, n1, n2, nb);
            else gather_source<0, double>(b0r, b0i, src, j2, n1, n2, nb);
        }
        const bool other = cols->run(b0r, b0i, b1r, b1i, nb);
        double* RESTRICT zr = other ? b1r : b0r;
        double* RESTRICT zi = other ? b1i : b0i;
        for (int64_t k1 = 0; k1 < n1; ++k1) {  // w_n^(j2 k1), j2 k1 < n
            const int64_t t = j2 * k1;
            const double hr = hi_re[t >> lo_bits], hi_ = hi_im[t >> lo_bits];
            const double lr = lo_re[t & mask], li = lo_im[t & mask];
            dr[k1] = hr * lr - hi_ * li;
            di[k1] = hr * li + hi_ * lr;
        }
        if (nb == kBatch) twiddle_block<kBatch>(zr, zi, dr, di, cb_re.data(), cb_im.data(), n1, nb);
        else twiddle_block<0>(zr, zi, dr, di, cb_re.data(), cb_im.data(), n1, nb);
        int64_t k1 = 0;
        if (nb == kBatch)  // whole 8 x 8 tiles
            for (; k1 + kBatch <= n1; k1 += kBatch)
                for (int64_t b = 0; b < kBatch; ++b)
                    for (int64_t kk = 0; kk < kBatch; ++kk) {
                        yr[(j2 + b) * n1 + k1 + kk] = zr[(k1 + kk) * kBatch + b];
                        yi[(j2 + b) * n1 + k1 + kk] = zi[(k1 + kk) * kBatch + b];
                    }
        for (int64_t b = 0; b < nb; ++b)
            for (int64_t k = k1; k < n1; ++k) {
                yr[(j2 + b) * n1 + k] = zr[k * nb + b];
                yi[(j2 + b) * n1 + k] = zi[k * nb + b];
            }
    }
    for (int64_t k1 = 0; k1 < n1; k1 += kBatch) {  // rows k1 .. k1 + nb of Y^T: FFT over j2
        const int64_t nb = std::min(kBatch, n1 - k1);
        if (nb == kBatch) gather_block<kBatch>(b0r, b0i, yr + k1, yi + k1, n2, n1, nb);
        else gather_block<0>(b0r, b0i, yr + k1, yi + k1, n2, n1, nb);
        const bool other = rows->run(b0r, b0i, b1r, b1i, nb);
        const double* zr = other ? b1r : b0r;
        const double* zi = other ? b1i : b0i;
        if (nb == kBatch) scatter_block<kBatch>(re + k1, im + k1, zr, zi, n2, n1, nb);
        else scatter_block<0>(re + k1, im + k1, zr, zi, n2, n1, nb);
    }
    return {re, im};
}

std::mutex plans_lock;
std::unordered_map<int64_t, std::shared_ptr<const Plan>> plans;
// The caches hold tables of a few doubles per point. Bounded by points, not only by count: a
// request per length could otherwise keep 64 tables of 2^24 points (GBs) alive after it ended.
// Lengths above kCachePoints are planned per call; the caches are emptied once they hold more.
constexpr int64_t kCachePoints = int64_t{1} << 22;
int64_t cached_points = 0, cached_post_points = 0;

std::shared_ptr<const Plan> fft_plan(int64_t n) {
    {
        std::lock_guard<std::mutex> lock(plans_lock);
        auto it = plans.find(n);
        if (it != plans.end()) return it->second;
    }
    auto plan = make_plan(n);  // outside the lock (Bluestein plans fetch their inner plan)
    if (n > kCachePoints) return plan;
    std::lock_guard<std::mutex> lock(plans_lock);
    if (plans.size() > 64 || cached_points + n > kCachePoints) {
        plans.clear();
        cached_points = 0;
    }
    auto placed = plans.emplace(n, plan);
    if (placed.second) cached_points += n;
    return placed.first->second;
}

// per-thread scratch, kept between calls up to kKeepScratch doubles; large ones in huge pages
// (the four-step passes touch a page per row)
constexpr size_t kKeepScratch = size_t{1} << 23;

struct Pool {
    double* data = nullptr;
    size_t size = 0;
    Pool() = default;
    Pool(const Pool&) = delete;
    Pool& operator=(const Pool&) = delete;
    ~Pool() { reset(); }
    void reset() {
        std::free(data);
        data = nullptr;
        size = 0;
    }
    void reserve(size_t doubles) {
        if (doubles <= size) return;
        reset();
        constexpr size_t huge = size_t{2} << 20;
        const size_t bytes = (doubles * sizeof(double) + huge - 1) / huge * huge;
        data = static_cast<double*>(std::aligned_alloc(bytes >= 2 * huge ? huge : 64, bytes));
        if (!data) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
        if (bytes >= 2 * huge) madvise(data, bytes, MADV_HUGEPAGE);  // advice only
#endif
        size = bytes / sizeof(double);
    }
};

// real input of even length n: z[j] = x[2j] + i x[2j+1] goes through one transform of n / 2, and
// X[k] = E[k] + w_n^k O[k], X[k + n/2] = E[k] - w_n^k O[k] with E, O the spectra of the even and
// odd samples: E[k] = (Z[k] + conj Z[-k]) / 2, O[k] = (Z[k] - conj Z[-k]) / 2i
struct RealPost {
    std::vector<double> wr, wi;  // w_n^k, k < n / 2
};

std::unordered_map<int64_t, std::shared_ptr<const RealPost>> real_posts;

std::shared_ptr<const RealPost> real_post(int64_t n) {
    {
        std::lock_guard<std::mutex> lock(plans_lock);
        auto it = real_posts.find(n);
        if (it != real_posts.end()) return it->second;
    }
    auto post = std::make_shared<RealPost>();
    const int64_t h = n / 2;
    post->wr.resize(h);
    post->wi.resize(h);
    for (int64_t k = 0; k < h; ++k) {
        const cd w = unit_root(k, n);
        post->wr[k] = w.real();
        post->wi[k] = w.imag();
    }
    if (n > kCachePoints) return post;
    std::lock_guard<std::mutex> lock(plans_lock);
    if (real_posts.size() > 64 || cached_post_points + n > kCachePoints) {
        real_posts.clear();
        cached_post_points = 0;
    }
    auto placed = real_posts.emplace(n, post);
    if (placed.second) cached_post_points += n;
    return placed.first->second;
}

// the spectrum of a real signal of length 2h from Z (re / im, length h), times (scale, iscale)
template <class T>
void real_spectrum(const double* RESTRICT re, const double* RESTRICT im, int64_t h, const RealPost& post,
                   double scale, double iscale, T* RESTRICT o) {
    const double* RESTRICT wr = post.wr.data();
    const double* RESTRICT wi = post.wi.data();
    // k = 0: Z[-0] = Z[0]
    o[0] = static_cast<T>((re[0] + im[0]) * scale);
    o[1] = static_cast<T>(0.0);
    o[2 * h] = static_cast<T>((re[0] - im[0]) * scale);
    o[2 * h + 1] = static_cast<T>(0.0);
    for (int64_t k = 1; k < h; ++k) {
        const double ar = re[k], ai = im[k], br = re[h - k], bi = im[h - k];
        const double er = 0.5 * (ar + br), ei = 0.5 * (ai - bi);
        const double od_r = 0.5 * (ai + bi), od_i = -0.5 * (ar - br);
        const double tr = od_r * wr[k] - od_i * wi[k], ti = od_r * wi[k] + od_i * wr[k];
        o[2 * k] = static_cast<T>((er + tr) * scale);
        o[2 * k + 1] = static_cast<T>((ei + ti) * iscale);
        o[2 * (k + h)] = static_cast<T>((er - tr) * scale);
        o[2 * (k + h) + 1] = static_cast<T>((ei - ti) * iscale);
    }
}

// two real rows a, b as one transform of z = a + i b: A[k] = (Z[k] + conj Z[-k]) / 2,
// B[k] = (Z[k] - conj Z[-k]) / 2i; both times (scale, iscale)
template <class T>
void pair_spectra(const double* RESTRICT re, const double* RESTRICT im, int64_t n, double scale, double iscale,
                  T* RESTRICT oa, T* RESTRICT ob) {
    oa[0] = static_cast<T>(re[0] * scale);
    oa[1] = static_cast<T>(0.0);
    ob[0] = static_cast<T>(im[0] * scale);
    ob[1] = static_cast<T>(0.0);
    for (int64_t k = 1; k < n; ++k) {
        const double ar = re[k], ai = im[k], br = re[n - k], bi = im[n - k];
        oa[2 * k] = static_cast<T>(0.5 * (ar + br) * scale);
        oa[2 * k + 1] = static_cast<T>(0.5 * (ai - bi) * iscale);
        ob[2 * k] = static_cast<T>(0.5 * (ai + bi) * scale);
        ob[2 * k + 1] = static_cast<T>(-0.5 * (ar - br) * iscale);
    }
}

}  // namespace

namespace builtin {

void run_fft(const ec::Inputs& in, const ec::Params& params, ec_result* r) {
    const ec_buffer& x = in.get("signal", 0);
    ec::require_dtype(x, "fft input 'signal'", {EC_FLOAT32, EC_FLOAT64, EC_COMPLEX64, EC_COMPLEX128});
    ec::require_ndim(x, "fft input 'signal'", 1, 2);
    bool inverse = params.boolean("inverse", false);
    int64_t rows = x.ndim == 2 ? x.shape[0] : 1, n = x.shape[x.ndim - 1];
    if (n > (int64_t{1} << 28)) throw invalid("fft input 'signal' is too long");
    bool single = x.dtype == EC_FLOAT32 || x.dtype == EC_COMPLEX64;
    int32_t out_dtype = single ? EC_COMPLEX64 : EC_COMPLEX128;
    void* out = x.ndim == 2 ? ec::output<char>(r, "spectrum", out_dtype, {rows, n})
                            : ec::output<char>(r, "spectrum", out_dtype, {n});
    if (n == 0 || rows == 0) return;
    const bool real = x.dtype == EC_FLOAT32 || x.dtype == EC_FLOAT64;
    const bool packed = real && n % 2 == 0;  // one transform of n / 2 (see RealPost)
    const int64_t len = packed ? n / 2 : n;
    auto plan = fft_plan(len);
    auto post = packed ? real_post(n) : nullptr;
    thread_local Pool pool;
    const size_t need = 2 * static_cast<size_t>(len) + 2 * kPad + plan->scratch;
    pool.reserve(need);
    struct Release {  // a huge pool is not kept for the next call
        ~Release() {
            if (pool.size > kKeepScratch) pool.reset();
        }
    } release;
    double* RESTRICT re = pool.data;
    double* RESTRICT im = re + len + kPad;
    double* buf = im + len + kPad;
    // the inverse is conj(fft(conj(x))) / n; for real x, conj(fft(x)) / n
    const double sign = inverse ? -1.0 : 1.0;
    const double scale = inverse ? 1.0 / static_cast<double>(n) : 1.0;
    const double iscale = sign * scale;
    const bool paired = real && !packed;  // odd n: two rows a transform (see pair_spectra)
    for (int64_t row = 0; row < rows; ++row) {
        if (ec::cancelled(r)) throw Error(EC_CANCELLED, "cancelled");
        const int64_t base = row * n;
        if (paired && row + 1 < rows) {
            if (ec::cancelled(r)) throw Error(EC_CANCELLED, "cancelled");  // (the second row's check)
            if (x.dtype == EC_FLOAT32) {
                const float* RESTRICT p = static_cast<const float*>(x.data) + base;
                for (int64_t i = 0; i < n; ++i) { re[i] = p[i]; im[i] = p[n + i]; }
            } else {
                const double* RESTRICT p = static_cast<const double*>(x.data) + base;
                for (int64_t i = 0; i < n; ++i) { re[i] = p[i]; im[i] = p[n + i]; }
            }
            const Spectrum z = plan->transform(re, im, buf);
            if (single) {
                float* o = static_cast<float*>(out) + 2 * base;
                pair_spectra(z.re, z.im, n, scale, iscale, o, o + 2 * n);
            } else {
                double* o = static_cast<double*>(out) + 2 * base;
                pair_spectra(z.re, z.im, n, scale, iscale, o, o + 2 * n);
            }
            ++row;
            continue;
        }
        Spectrum z;
        if (plan->kind == Plan::kFourStep) {  // its first pass reads the input itself
            Source src;
            src.single = single;
            src.pairs = packed || !real;
            src.sign = real ? 1.0 : sign;
            src.data = static_cast<const char*>(x.data) + base * (real ? 1 : 2) * (single ? 4 : 8);
            z = plan->transform(src, re, im, buf);
        } else {
            switch (x.dtype) {
                case EC_FLOAT32: {
                    const float* RESTRICT p = static_cast<const float*>(x.data) + base;
                    if (packed)
                        for (int64_t i = 0; i < len; ++i) { re[i] = p[2 * i]; im[i] = p[2 * i + 1]; }
                    else
                        for (int64_t i = 0; i < n; ++i) { re[i] = p[i]; im[i] = 0.0; }
                    break;
                }
                case EC_FLOAT64: {
                    const double* RESTRICT p = static_cast<const double*>(x.data) + base;
                    if (packed)
                        for (int64_t i = 0; i < len; ++i) { re[i] = p[2 * i]; im[i] = p[2 * i + 1]; }
                    else
                        for (int64_t i = 0; i < n; ++i) { re[i] = p[i]; im[i] = 0.0; }
                    break;
                }
                case EC_COMPLEX64: {
                    const float* RESTRICT p = static_cast<const float*>(x.data) + 2 * base;
                    for (int64_t i = 0; i < n; ++i) { re[i] = p[2 * i]; im[i] = sign * p[2 * i + 1]; }
                    break;
                }
                default: {
                    const double* RESTRICT p = static_cast<const double*>(x.data) + 2 * base;
                    for (int64_t i = 0; i < n; ++i) { re[i] = p[2 * i]; im[i] = sign * p[2 * i + 1]; }
                }
            }
            z = plan->transform(re, im, buf);
        }
        const double* RESTRICT zr = z.re;
        const double* RESTRICT zi = z.im;
        if (packed) {
            if (single) real_spectrum(zr, zi, len, *post, scale, iscale, static_cast<float*>(out) + 2 * base);
            else real_spectrum(zr, zi, len, *post, scale, iscale, static_cast<double*>(out) + 2 * base);
        } else if (single) {
            float* RESTRICT o = static_cast<float*>(out) + 2 * base;
            for (int64_t i = 0; i < n; ++i) {
                o[2 * i] = static_cast<float>(zr[i] * scale);
                o[2 * i + 1] = static_cast<float>(zi[i] * iscale);
            }
        } else {
            double* RESTRICT o = static_cast<double*>(out) + 2 * base;
            for (int64_t i = 0; i < n; ++i) {
                o[2 * i] = zr[i] * scale;
                o[2 * i + 1] = zi[i] * iscale;
            }
        }
    }
}

}  // namespace builtin
