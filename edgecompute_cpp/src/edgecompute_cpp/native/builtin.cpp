// The bundled edgecompute-cpp plugin: its table, and its image, signal and linear-algebra
// algorithms in C++17 (the FFT lives in fft.cpp). Every algorithm runs on one thread per call (the
// scheduler runs calls side by side); loops are written so that the compiler vectorises them
// (contiguous inner loops, __restrict, no aliasing).
#include "algorithms.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#define RESTRICT __restrict__

namespace {

using ec::Error;
using ec::invalid;

#if defined(__GNUC__) && !defined(__clang__)
// the widest vector of the target, for the loops written with GCC's vector extensions (the
// grayscale and resize fast paths; other compilers take their plain loops)
#if defined(__AVX512F__)
constexpr int kSimdBytes = 64;
#elif defined(__AVX__)
constexpr int kSimdBytes = 32;
#else
constexpr int kSimdBytes = 16;
#endif
typedef float FloatVec __attribute__((vector_size(kSimdBytes)));
typedef int32_t IntVec __attribute__((vector_size(kSimdBytes)));
#endif

// scipy.ndimage's 'reflect' (= OpenCV BORDER_REFLECT): d c b a | a b c d | d c b a, repeated
inline int64_t reflect(int64_t i, int64_t n) {
    if (i >= 0 && i < n) return i;
    int64_t period = 2 * n;
    i %= period;
    if (i < 0) i += period;
    return i < n ? i : period - 1 - i;
}

// ================================ grayscale ===================================================

// The channel count is a template parameter: with a constant stride of 3 or 4 the compiler
// deinterleaves whole vectors of pixels with shuffles instead of gathering one pixel at a time.
template <class T, int C>
void grayscale(const T* RESTRICT in, T* RESTRICT out, int64_t pixels, float w0, float wg, float w2) {
    for (int64_t i = 0; i < pixels; ++i) {
        const T* RESTRICT p = in + i * C;
        float v = w0 * static_cast<float>(p[0]) + wg * static_cast<float>(p[1]) + w2 * static_cast<float>(p[2]);
        if constexpr (std::is_same_v<T, uint8_t>) {
            out[i] = static_cast<uint8_t>(std::min(255.0f, v + 0.5f));
        } else {
            out[i] = static_cast<T>(v);
        }
    }
}

#if defined(__GNUC__) && !defined(__clang__)
// float RGB: W pixels (3 vectors) at a time, each channel gathered by two blends and one
// shuffle; the same arithmetic as the scalar loop, lane by lane. Images too large for the caches
// send the output out with non-temporal stores where the target has them (no read for
// ownership, the input is not evicted): 0.8 -> 0.6 ms for 1920x1080.
#if defined(__AVX512F__)
constexpr bool kGrayStream = true;
inline void gray_stream(float* p, FloatVec v) { __builtin_ia32_movntps512(p, v); }
#elif defined(__AVX__)
constexpr bool kGrayStream = true;
inline void gray_stream(float* p, FloatVec v) { __builtin_ia32_movntps256(p, v); }
#else
constexpr bool kGrayStream = false;
inline void gray_stream(float* p, FloatVec v) { std::memcpy(p, &v, sizeof(v)); }
#endif
constexpr int64_t kGrayStreamBytes = int64_t{16} << 20;  // input + output at least this: stream

void grayscale_rgb_f32(const float* RESTRICT in, float* RESTRICT out, int64_t pixels, float w0, float wg, float w2) {
    constexpr int W = kSimdBytes / static_cast<int>(sizeof(float));
    static_assert(W % 3 != 0, "each lane must hold every channel in exactly one of the 3 vectors");
    // W pixels are 3 W elements in 3 vectors; lane l of vector s holds element e = W s + l, the
    // channel e % 3 of pixel e / 3. For each channel, blending the 3 vectors lane by lane (lane l
    // from the one vector whose element there has that channel) gathers all W values of it, and
    // one single-vector shuffle puts them in pixel order: pixel j's value is at lane (3 j + c) % W.
    IntVec from_a[3], from_b[3], order[3];
    for (int c = 0; c < 3; ++c) {
        for (int l = 0; l < W; ++l) {
            int s = 0;
            while ((W * s + l) % 3 != c) ++s;
            from_a[c][l] = s == 0 ? -1 : 0;
            from_b[c][l] = s == 1 ? -1 : 0;
            order[c][l] = (3 * l + c) % W;
        }
    }
    const bool stream = kGrayStream && pixels * 16 >= kGrayStreamBytes;
    int64_t i = 0;
    if (stream) {  // scalar pixels up to an aligned output address
        const auto misaligned = reinterpret_cast<uintptr_t>(out) % kSimdBytes;
        if (misaligned % sizeof(float) == 0) {
            i = std::min(pixels, static_cast<int64_t>((kSimdBytes - misaligned) % kSimdBytes / sizeof(float)));
            grayscale<float, 3>(in, out, i, w0, wg, w2);
        }
    }
    for (; i + W <= pixels; i += W) {
        FloatVec a, b, c;
        std::memcpy(&a, in + 3 * i, sizeof(FloatVec));
        std::memcpy(&b, in + 3 * i + W, sizeof(FloatVec));
        std::memcpy(&c, in + 3 * i + 2 * W, sizeof(FloatVec));
#if defined(__AVX__)  // (a vector register holds a whole vector)
        // keep the three in registers: else GCC folds a load into every blend, 9 loads, not 3
        __asm__("" : "+v"(a), "+v"(b), "+v"(c));
#endif
        const FloatVec p0 = __builtin_shuffle(from_a[0] ? a : from_b[0] ? b : c, order[0]);
        const FloatVec p1 = __builtin_shuffle(from_a[1] ? a : from_b[1] ? b : c, order[1]);
        const FloatVec p2 = __builtin_shuffle(from_a[2] ? a : from_b[2] ? b : c, order[2]);
        const FloatVec v = w0 * p0 + wg * p1 + w2 * p2;
        if (stream && reinterpret_cast<uintptr_t>(out + i) % kSimdBytes == 0) gray_stream(out + i, v);
        else std::memcpy(out + i, &v, sizeof(FloatVec));
    }
#if defined(__SSE__)
    if (stream) __builtin_ia32_sfence();  // order the streamed stores before the result is handed on
#endif
    grayscale<float, 3>(in + 3 * i, out + i, pixels - i, w0, wg, w2);
}
#endif

template <class T>
void grayscale(const T* RESTRICT in, T* RESTRICT out, int64_t pixels, int64_t channels, bool bgr) {
    const float wr = 0.299f, wg = 0.587f, wb = 0.114f;
    const float w0 = bgr ? wb : wr, w2 = bgr ? wr : wb;
#if defined(__GNUC__) && !defined(__clang__)
    if constexpr (std::is_same_v<T, float>) {
        if (channels == 3) return grayscale_rgb_f32(in, out, pixels, w0, wg, w2);
    }
#endif
    if (channels == 3) grayscale<T, 3>(in, out, pixels, w0, wg, w2);
    else grayscale<T, 4>(in, out, pixels, w0, wg, w2);
}

void run_grayscale(const ec::Inputs& in, const ec::Params& params, ec_result* r) {
    const ec_buffer& img = in.get("image", 0);
    ec::require_dtype(img, "grayscale input 'image'", {EC_UINT8, EC_FLOAT32, EC_FLOAT64});
    if (img.ndim != 3 || (img.shape[2] != 3 && img.shape[2] != 4))
        throw invalid("grayscale input 'image' must have shape (height, width, 3 or 4), got " + ec::shape_string(img));
    std::string order = params.string("order", "rgb");
    if (order != "rgb" && order != "bgr") throw invalid("param 'order' must be 'rgb' or 'bgr', not '" + order + "'");
    int64_t h = img.shape[0], w = img.shape[1], c = img.shape[2];
    bool bgr = order == "bgr";
    switch (img.dtype) {
        case EC_UINT8:
            grayscale(static_cast<const uint8_t*>(img.data), ec::output<uint8_t>(r, "gray", EC_UINT8, {h, w}), h * w, c, bgr);
            break;
        case EC_FLOAT32:
            grayscale(static_cast<const float*>(img.data), ec::output<float>(r, "gray", EC_FLOAT32, {h, w}), h * w, c, bgr);
            break;
        default:
            grayscale(static_cast<const double*>(img.data), ec::output<double>(r, "gray", EC_FLOAT64, {h, w}), h * w, c, bgr);
    }
}

// ================================ gaussian blur ===============================================

std::vector<double> gaussian_kernel(double sigma, double truncate) {
    int64_t radius = static_cast<int64_t>(truncate * sigma + 0.5);
    std::vector<double> k(2 * radius + 1);
    if (sigma <= 1e-15) {  // scipy leaves such axes alone
        k.assign(1, 1.0);
        return k;
    }
    double sum = 0;
    for (int64_t i = -radius; i <= radius; ++i) {
        double v = std::exp(-0.5 * static_cast<double>(i * i) / (sigma * sigma));
        k[i + radius] = v;
        sum += v;
    }
    for (double& v : k) v /= sum;
    return k;
}

// rows of `rowlen` elements (width * channels), pixels of `ch` elements
template <class T>
void gaussian_blur(const T* RESTRICT in, T* RESTRICT out, int64_t h, int64_t w, int64_t ch,
                   const std::vector<double>& ky64, const std::vector<double>& kx64, const ec_result* r) {
    const int64_t ry = static_cast<int64_t>(ky64.size() / 2), rx = static_cast<int64_t>(kx64.size() / 2);
    std::vector<T> ky(ky64.begin(), ky64.end()), kx(kx64.begin(), kx64.end());
    const int64_t rowlen = w * ch;
    std::vector<T> padded(static_cast<size_t>((w + 2 * rx) * ch));
    T* RESTRICT pad = padded.data();
    T* RESTRICT acc = pad + rx * ch;
    std::vector<int64_t> left(rx), right(rx);
    for (int64_t i = 0; i < rx; ++i) {
        left[i] = reflect(-1 - i, w);
        right[i] = reflect(w + i, w);
    }
    for (int64_t y = 0; y < h; ++y) {
        if ((y & 63) == 0 && ec::cancelled(r)) throw Error(EC_CANCELLED, "cancelled");
        // vertical pass into the middle of the padded row (the kernel is symmetric)
        const T* RESTRICT centre = in + y * rowlen;
        const T wc = ky[ry];
        for (int64_t j = 0; j < rowlen; ++j) acc[j] = wc * centre[j];
        for (int64_t k = 1; k <= ry; ++k) {
            const T* RESTRICT a = in + reflect(y - k, h) * rowlen;
            const T* RESTRICT b = in + reflect(y + k, h) * rowlen;
            const T wk = ky[ry + k];
            for (int64_t j = 0; j < rowlen; ++j) acc[j] += wk * (a[j] + b[j]);
        }
        // reflect borders
        for (int64_t i = 0; i < rx; ++i)
            for (int64_t c = 0; c < ch; ++c) {
                pad[(rx - 1 - i) * ch + c] = acc[left[i] * ch + c];
                pad[(rx + w + i) * ch + c] = acc[right[i] * ch + c];
            }
        // horizontal pass
        T* RESTRICT o = out + y * rowlen;
        const T xc = kx[rx];
        for (int64_t j = 0; j < rowlen; ++j) o[j] = xc * acc[j];
        for (int64_t k = 1; k <= rx; ++k) {
            const T* RESTRICT a = pad + (rx - k) * ch;
            const T* RESTRICT b = pad + (rx + k) * ch;
            const T wk = kx[rx + k];
            for (int64_t j = 0; j < rowlen; ++j) o[j] += wk * (a[j] + b[j]);
        }
    }
}

void run_gaussian_blur(const ec::Inputs& in, const ec::Params& params, ec_result* r) {
    const ec_buffer& img = in.get("image", 0);
    ec::require_dtype(img, "gaussian_blur input 'image'", {EC_FLOAT32, EC_FLOAT64});
    ec::require_ndim(img, "gaussian_blur input 'image'", 2, 3);
    std::vector<double> sigma = params.numbers("sigma", {1.0});
    if (sigma.size() != 1 && sigma.size() != 2) throw invalid("param 'sigma' must be a number or [sigma_y, sigma_x]");
    double sy = sigma[0], sx = sigma.size() == 2 ? sigma[1] : sigma[0];
    double truncate = params.number("truncate", 4.0);
    if (!(sy >= 0) || !(sx >= 0) || !std::isfinite(sy) || !std::isfinite(sx) || sy > 1000 || sx > 1000)
        throw invalid("param 'sigma' must be between 0 and 1000");
    if (!(truncate > 0) || truncate > 100) throw invalid("param 'truncate' must be between 0 and 100");
    int64_t h = img.shape[0], w = img.shape[1], ch = img.ndim == 3 ? img.shape[2] : 1;
    auto ky = gaussian_kernel(sy, truncate), kx = gaussian_kernel(sx, truncate);
    if (img.dtype == EC_FLOAT32) {
        float* out = img.ndim == 3 ? ec::output<float>(r, "image", EC_FLOAT32, {h, w, ch})
                                   : ec::output<float>(r, "image", EC_FLOAT32, {h, w});
        if (h * w * ch > 0) gaussian_blur(static_cast<const float*>(img.data), out, h, w, ch, ky, kx, r);
    } else {
        double* out = img.ndim == 3 ? ec::output<double>(r, "image", EC_FLOAT64, {h, w, ch})
                                    : ec::output<double>(r, "image", EC_FLOAT64, {h, w});
        if (h * w * ch > 0) gaussian_blur(static_cast<const double*>(img.data), out, h, w, ch, ky, kx, r);
    }
}

// ================================ sobel =======================================================

template <class T>
void sobel(const T* RESTRICT in, T* RESTRICT gx, T* RESTRICT gy, T* RESTRICT mag, int64_t h, int64_t w) {
    std::vector<T> sbuf(w + 2), dbuf(w + 2), rowx(w), rowy(w);
    T* RESTRICT s = sbuf.data() + 1;  // vertical smoothing [1, 2, 1]
    T* RESTRICT d = dbuf.data() + 1;  // vertical difference [-1, 0, 1]
    for (int64_t y = 0; y < h; ++y) {
        const T* RESTRICT a = in + reflect(y - 1, h) * w;
        const T* RESTRICT b = in + y * w;
        const T* RESTRICT c = in + reflect(y + 1, h) * w;
        for (int64_t x = 0; x < w; ++x) {
            s[x] = a[x] + 2 * b[x] + c[x];
            d[x] = c[x] - a[x];
        }
        s[-1] = s[reflect(-1, w)]; s[w] = s[reflect(w, w)];
        d[-1] = d[reflect(-1, w)]; d[w] = d[reflect(w, w)];
        T* RESTRICT ox = gx ? gx + y * w : rowx.data();
        T* RESTRICT oy = gy ? gy + y * w : rowy.data();
        for (int64_t x = 0; x < w; ++x) {
            ox[x] = s[x + 1] - s[x - 1];
            oy[x] = d[x - 1] + 2 * d[x] + d[x + 1];
        }
        if (mag) {
            T* RESTRICT m = mag + y * w;
            for (int64_t x = 0; x < w; ++x) m[x] = std::sqrt(ox[x] * ox[x] + oy[x] * oy[x]);
        }
    }
}

void run_sobel(const ec::Inputs& in, const ec::Params& params, ec_result* r) {
    const ec_buffer& img = in.get("image", 0);
    ec::require_dtype(img, "sobel input 'image'", {EC_FLOAT32, EC_FLOAT64});
    ec::require_ndim(img, "sobel input 'image'", 2, 2);
    std::string mode = params.string("output", "magnitude");
    if (mode != "magnitude" && mode != "gradients" && mode != "all")
        throw invalid("param 'output' must be 'magnitude', 'gradients' or 'all', not '" + mode + "'");
    int64_t h = img.shape[0], w = img.shape[1];
    bool want_g = mode != "magnitude", want_m = mode != "gradients";
    auto go = [&](auto tag, int32_t dtype) {
        using T = decltype(tag);
        T* mag = want_m ? ec::output<T>(r, "magnitude", dtype, {h, w}) : nullptr;
        T* gx = want_g ? ec::output<T>(r, "gx", dtype, {h, w}) : nullptr;
        T* gy = want_g ? ec::output<T>(r, "gy", dtype, {h, w}) : nullptr;
        if (h * w > 0) sobel(static_cast<const T*>(img.data), gx, gy, mag, h, w);
    };
    if (img.dtype == EC_FLOAT32) go(float{}, EC_FLOAT32); else go(double{}, EC_FLOAT64);
}

// ================================ bilinear resize =============================================

struct Taps {
    std::vector<int64_t> i0, i1;
    std::vector<float> f;
};

// OpenCV INTER_LINEAR geometry: pixel centres, coordinates clamped to the edge
Taps linear_taps(int64_t src, int64_t dst) {
    Taps t;
    t.i0.resize(dst); t.i1.resize(dst); t.f.resize(dst);
    double scale = static_cast<double>(src) / static_cast<double>(dst);
    for (int64_t i = 0; i < dst; ++i) {
        double x = (static_cast<double>(i) + 0.5) * scale - 0.5;
        x = std::min(std::max(x, 0.0), static_cast<double>(src - 1));
        int64_t x0 = static_cast<int64_t>(std::floor(x));
        t.i0[i] = x0;
        t.i1[i] = std::min(x0 + 1, src - 1);
        t.f[i] = static_cast<float>(x - static_cast<double>(x0));
    }
    return t;
}

// Two orders, chosen per call (see resize): horizontal-first (as OpenCV does it) resizes every
// source row that an output row needs once into a float row, keeps the last two such rows, and
// makes each output row a contiguous (vectorised) blend of two of them; vertical-first blends two
// source rows at full width and resizes that one row. The horizontal pass works on elements
// (pixel x channel; 64-bit indices: a row may hold more than 2^31 elements): output element
// e = a + f (b - a) with a = row[i0[e]], b = row[i1[e]]. Where GCC's
// vector extensions are there, W consecutive output elements whose sources all lie within 2 W
// consecutive row elements (any upscale, downscales to about 1/2) come from two loads and two
// two-vector shuffles (vpermt2ps with AVX-512), those within 4 W (downscales to about 1/4) from
// four loads, four shuffles and two selects; other blocks, and the tail, take a scalar loop.
#if defined(__GNUC__) && !defined(__clang__)
#define EC_RESIZE_SHUFFLE 1
constexpr int64_t kResizeW = kSimdBytes / static_cast<int>(sizeof(float));
#endif

struct HorizontalPlan {
    int64_t n = 0;                 // output elements: ow * ch
    std::vector<int64_t> i0, i1;   // source elements
    std::vector<float> f;
#ifdef EC_RESIZE_SHUFFLE
    std::vector<int64_t> base;     // per block of W elements: first source element loaded, -1: scalar
    std::vector<uint8_t> wide;     // per block: 4 W elements loaded, not 2 W
    std::vector<int32_t> m0, m1;   // per block: shuffle indices (into the 2 W or 4 W loaded) of a and b
#endif
};

HorizontalPlan horizontal_plan(const Taps& tx, int64_t ch, int64_t rowlen) {
    HorizontalPlan p;
    const int64_t ow = static_cast<int64_t>(tx.i0.size());
    p.n = ow * ch;
    p.i0.resize(p.n); p.i1.resize(p.n); p.f.resize(p.n);
    for (int64_t x = 0; x < ow; ++x) {
        for (int64_t c = 0; c < ch; ++c) {
            p.i0[x * ch + c] = tx.i0[x] * ch + c;
            p.i1[x * ch + c] = tx.i1[x] * ch + c;
            p.f[x * ch + c] = tx.f[x];
        }
    }
#ifdef EC_RESIZE_SHUFFLE
    constexpr int64_t W = kResizeW;
    const int64_t blocks = p.n / W;
    p.base.assign(blocks, -1); p.wide.assign(blocks, 0); p.m0.resize(blocks * W); p.m1.resize(blocks * W);
    for (int64_t b = 0; b < blocks; ++b) {
        int64_t lo = p.i0[b * W], hi = p.i1[b * W];
        for (int64_t j = 0; j < W; ++j) {
            lo = std::min(lo, p.i0[b * W + j]);
            hi = std::max(hi, p.i1[b * W + j]);
        }
        const bool wide = hi - lo >= 2 * W;
        // does not fit, or would read past the row
        if (hi - lo >= 4 * W || lo + (wide ? 4 : 2) * W > rowlen) continue;
        p.base[b] = lo;
        p.wide[b] = wide;
        for (int64_t j = 0; j < W; ++j) {
            p.m0[b * W + j] = static_cast<int32_t>(p.i0[b * W + j] - lo);  // < 4 W
            p.m1[b * W + j] = static_cast<int32_t>(p.i1[b * W + j] - lo);
        }
    }
#else
    (void)rowlen;
#endif
    return p;
}

void horizontal(const float* RESTRICT row, const HorizontalPlan& p, float* RESTRICT out) {
    const int64_t* RESTRICT i0 = p.i0.data();
    const int64_t* RESTRICT i1 = p.i1.data();
    const float* RESTRICT f = p.f.data();
    int64_t e = 0;
#ifdef EC_RESIZE_SHUFFLE
    constexpr int64_t W = kResizeW;
    const int64_t blocks = p.n / W;
    // (locals: the vector stores below may alias anything, members would be reloaded each time)
    const int64_t* RESTRICT bases = p.base.data();
    const uint8_t* RESTRICT wides = p.wide.data();
    const int32_t* RESTRICT s0 = p.m0.data();
    const int32_t* RESTRICT s1 = p.m1.data();
    for (int64_t b = 0; b < blocks; ++b, e += W) {
        const int64_t base = bases[b];
        if (base < 0) {
            for (int64_t j = e; j < e + W; ++j) out[j] = row[i0[j]] + f[j] * (row[i1[j]] - row[i0[j]]);
            continue;
        }
        FloatVec v0, v1, fv, a, bv;
        IntVec m0, m1;
        std::memcpy(&v0, row + base, sizeof(FloatVec));
        std::memcpy(&v1, row + base + W, sizeof(FloatVec));
        std::memcpy(&m0, s0 + e, sizeof(IntVec));
        std::memcpy(&m1, s1 + e, sizeof(IntVec));
        std::memcpy(&fv, f + e, sizeof(FloatVec));
#if defined(__AVX__)  // (a vector register holds a whole vector)
        __asm__("" : "+v"(v0), "+v"(v1));  // load each once: else GCC folds a load into both shuffles
#endif
        if (wides[b]) {  // indices are taken modulo 2 W by each shuffle, then the right half picked
            FloatVec v2, v3;
            std::memcpy(&v2, row + base + 2 * W, sizeof(FloatVec));
            std::memcpy(&v3, row + base + 3 * W, sizeof(FloatVec));
#if defined(__AVX__)  // (a vector register holds a whole vector)
            __asm__("" : "+v"(v2), "+v"(v3));
#endif
            constexpr int32_t half = 2 * W;
            a = m0 < half ? __builtin_shuffle(v0, v1, m0) : __builtin_shuffle(v2, v3, m0);
            bv = m1 < half ? __builtin_shuffle(v0, v1, m1) : __builtin_shuffle(v2, v3, m1);
        } else {
            a = __builtin_shuffle(v0, v1, m0);
            bv = __builtin_shuffle(v0, v1, m1);
        }
        const FloatVec o = a + fv * (bv - a);
        std::memcpy(out + e, &o, sizeof(FloatVec));
    }
#endif
    for (; e < p.n; ++e) out[e] = row[i0[e]] + f[e] * (row[i1[e]] - row[i0[e]]);
}

// uint8 results: round half up, clamped
inline uint8_t to_uint8(float v) { return static_cast<uint8_t>(std::min(255.0f, std::max(0.0f, v + 0.5f))); }

// Source rows longer than this (elements) are neither converted to float nor blended whole (that
// scratch would be 4 bytes per element of the row): resize_direct reads them in place.
// _checks.py (_RESIZE_ROW_SCRATCH) counts the same bound.
constexpr int64_t kMaxRowScratch = int64_t{1} << 24;

// each output element straight from the two source rows, with the vertical-first arithmetic
// (blend the rows, then the columns): no scratch beyond the plan
template <class T>
void resize_direct(const T* RESTRICT in, T* RESTRICT out, const Taps& ty, const HorizontalPlan& p, int64_t rowlen,
                   int64_t oh, ec_result* r) {
    const int64_t* RESTRICT i0 = p.i0.data();
    const int64_t* RESTRICT i1 = p.i1.data();
    const float* RESTRICT f = p.f.data();
    for (int64_t y = 0; y < oh; ++y) {
        if (ec::cancelled(r)) throw Error(EC_CANCELLED, "cancelled");  // rows are long here
        const float fy = ty.f[y], gy = 1.0f - fy;
        const T* RESTRICT a = in + ty.i0[y] * rowlen;
        const T* RESTRICT b = in + ty.i1[y] * rowlen;
        T* RESTRICT o = out + y * p.n;
        for (int64_t e = 0; e < p.n; ++e) {
            float va = static_cast<float>(a[i0[e]]), vb = static_cast<float>(a[i1[e]]);
            if (fy != 0.0f) {
                va = gy * va + fy * static_cast<float>(b[i0[e]]);
                vb = gy * vb + fy * static_cast<float>(b[i1[e]]);
            }
            const float v = va + f[e] * (vb - va);
            if constexpr (std::is_same_v<T, uint8_t>) o[e] = to_uint8(v); else o[e] = v;
        }
    }
}

template <class T>
void resize(const T* RESTRICT in, T* RESTRICT out, int64_t h, int64_t w, int64_t ch, int64_t oh, int64_t ow,
            ec_result* r) {
    const Taps ty = linear_taps(h, oh), tx = linear_taps(w, ow);
    const int64_t rowlen = w * ch, orowlen = ow * ch;
    const HorizontalPlan plan = horizontal_plan(tx, ch, rowlen);
    if (rowlen > kMaxRowScratch) return resize_direct(in, out, ty, plan, rowlen, oh, r);
    // Horizontal-first resizes each source row it needs once (`needed` of them); vertical-first
    // blends two source rows at full width and resizes that one row, once per output row. The
    // first wins when output rows share source rows (upscales, mild downscales), the second when
    // they do not (downscales by 2 or more); rough costs per element decide.
    int64_t needed = 0, highest = -1;  // source rows only grow with y
    for (int64_t y = 0; y < oh; ++y) {
        for (int64_t s : {ty.i0[y], ty.f[y] == 0.0f ? ty.i0[y] : ty.i1[y]}) {
            if (s > highest) ++needed;
            highest = std::max(highest, s);
        }
    }
    int64_t vector_elements = 0;
    int64_t wide_elements = 0;
#ifdef EC_RESIZE_SHUFFLE
    for (size_t b = 0; b < plan.base.size(); ++b) {
        vector_elements += plan.base[b] >= 0 ? kResizeW : 0;
        wide_elements += plan.base[b] >= 0 && plan.wide[b] ? kResizeW : 0;
    }
#endif
    const double hcost = 2.0 * static_cast<double>(vector_elements) + 2.0 * static_cast<double>(wide_elements) +
                         8.0 * static_cast<double>(orowlen - vector_elements);
    const double horizontal_first = static_cast<double>(needed) * hcost + static_cast<double>(oh * orowlen);
    const double vertical_first = static_cast<double>(oh) * (static_cast<double>(rowlen) + hcost);
    const bool hfirst = horizontal_first <= vertical_first;

    std::vector<float> converted(std::is_same_v<T, float> ? 0 : static_cast<size_t>(rowlen));
    auto as_float = [&](const T* src) -> const float* {
        if constexpr (std::is_same_v<T, float>) {
            return src;
        } else {
            float* RESTRICT c = converted.data();
            for (int64_t j = 0; j < rowlen; ++j) c[j] = static_cast<float>(src[j]);
            return c;
        }
    };
    if (!hfirst) {
        std::vector<float> blended(static_cast<size_t>(rowlen)), resized(static_cast<size_t>(orowlen));
        for (int64_t y = 0; y < oh; ++y) {
            if ((y & 63) == 0 && ec::cancelled(r)) throw Error(EC_CANCELLED, "cancelled");
            const float fy = ty.f[y], gy = 1.0f - fy;
            const T* RESTRICT a = in + ty.i0[y] * rowlen;
            const T* RESTRICT b = in + ty.i1[y] * rowlen;
            const float* row;
            if (fy == 0.0f) {
                row = as_float(a);
            } else {
                float* RESTRICT v = blended.data();
                for (int64_t j = 0; j < rowlen; ++j) v[j] = gy * static_cast<float>(a[j]) + fy * static_cast<float>(b[j]);
                row = v;
            }
            T* RESTRICT o = out + y * orowlen;
            if constexpr (std::is_same_v<T, uint8_t>) {
                float* RESTRICT z = resized.data();
                horizontal(row, plan, z);
                for (int64_t j = 0; j < orowlen; ++j) o[j] = to_uint8(z[j]);
            } else {
                horizontal(row, plan, o);
            }
        }
        return;
    }

    std::vector<float> rows(static_cast<size_t>(2 * orowlen));
    int64_t held[2] = {-1, -1};  // the source row in each of the two row buffers
    // the horizontally resized source row `y`, kept in a buffer other than the one holding `keep`
    auto source_row = [&](int64_t y, int64_t keep) -> const float* {
        for (int s = 0; s < 2; ++s)
            if (held[s] == y) return rows.data() + s * orowlen;
        const int s = held[0] == keep ? 1 : 0;
        horizontal(as_float(in + y * rowlen), plan, rows.data() + s * orowlen);
        held[s] = y;
        return rows.data() + s * orowlen;
    };
    for (int64_t y = 0; y < oh; ++y) {
        if ((y & 63) == 0 && ec::cancelled(r)) throw Error(EC_CANCELLED, "cancelled");
        const float fy = ty.f[y], gy = 1.0f - fy;
        const float* RESTRICT a = source_row(ty.i0[y], ty.i1[y]);
        T* RESTRICT o = out + y * orowlen;
        if (fy == 0.0f) {
            if constexpr (std::is_same_v<T, uint8_t>) {
                for (int64_t j = 0; j < orowlen; ++j) o[j] = to_uint8(a[j]);
            } else {
                std::copy_n(a, orowlen, o);
            }
            continue;
        }
        const float* RESTRICT b = source_row(ty.i1[y], ty.i0[y]);
        if constexpr (std::is_same_v<T, uint8_t>) {
            for (int64_t j = 0; j < orowlen; ++j) o[j] = to_uint8(gy * a[j] + fy * b[j]);
        } else {
            for (int64_t j = 0; j < orowlen; ++j) o[j] = gy * a[j] + fy * b[j];
        }
    }
}

void run_resize(const ec::Inputs& in, const ec::Params& params, ec_result* r) {
    const ec_buffer& img = in.get("image", 0);
    ec::require_dtype(img, "resize input 'image'", {EC_UINT8, EC_FLOAT32});
    ec::require_ndim(img, "resize input 'image'", 2, 3);
    if (!params.has("width") || !params.has("height")) throw invalid("resize needs params 'width' and 'height'");
    int64_t ow = params.integer("width", 0), oh = params.integer("height", 0);
    if (ow < 1 || oh < 1 || ow > (1 << 20) || oh > (1 << 20)) throw invalid("params 'width' and 'height' must be between 1 and 1048576");
    int64_t h = img.shape[0], w = img.shape[1], ch = img.ndim == 3 ? img.shape[2] : 1;
    if (h < 1 || w < 1) throw invalid("resize input 'image' is empty: shape " + ec::shape_string(img));
    auto go = [&](auto tag, int32_t dtype) {
        using T = decltype(tag);
        T* out = img.ndim == 3 ? ec::output<T>(r, "image", dtype, {oh, ow, ch}) : ec::output<T>(r, "image", dtype, {oh, ow});
        resize(static_cast<const T*>(img.data), out, h, w, ch, oh, ow, r);
    };
    if (img.dtype == EC_FLOAT32) go(float{}, EC_FLOAT32); else go(uint8_t{}, EC_UINT8);
}

// ================================ FIR filter ==================================================

// Register blocking: a block of kFirAcc vectors of consecutive outputs lives in registers while
// the taps run past it (one broadcast tap, kFirAcc unaligned loads and multiply-adds per tap), so
// the inner loop neither loads nor stores outputs. Blocks whose input window runs off either end
// of the signal (the first k - 1 outputs, the tail, `full` mode) take the direct loop.
// 256-bit vectors measured a little faster than 512-bit ones (fewer loads crossing cache lines);
// with AVX-512's 32 registers, 16 accumulators fit beside the broadcast tap and a load, else 8
constexpr int kFirVectorBytes = 32;
#if defined(__AVX512F__)
constexpr int kFirAcc = 16;
#else
constexpr int kFirAcc = 8;
#endif

template <class T>
struct FirVec {
    static constexpr int W = kFirVectorBytes / sizeof(T);
    static constexpr int64_t B = kFirAcc * W;  // outputs per block
    typedef T vec __attribute__((vector_size(kFirVectorBytes)));
};

// y[0, B) = sum_t h[t] xp[i - t]; reads xp[-(k - 1), B)
template <class T>
inline void fir_block(const T* RESTRICT xp, const T* RESTRICT h, int64_t k, T* RESTRICT y) {
    using V = FirVec<T>;
    using vec = typename V::vec;
    constexpr int W = V::W;
    vec acc[kFirAcc];
    for (int a = 0; a < kFirAcc; ++a) acc[a] = vec{};
    for (int64_t t = 0; t < k; ++t) {
        const T ht = h[t];
        const T* RESTRICT p = xp - t;
#pragma GCC unroll 16
        for (int a = 0; a < kFirAcc; ++a) {
            vec v;
            std::memcpy(&v, p + a * W, sizeof(vec));
            acc[a] += ht * v;
        }
    }
    for (int a = 0; a < kFirAcc; ++a) std::memcpy(y + a * W, &acc[a], sizeof(vec));
}

// y[n] = sum_k h[k] x[n - k] with x = 0 outside [0, n); `full` gives n + k - 1 outputs
template <class T>
void fir(const T* RESTRICT x, int64_t n, const std::vector<T>& taps, T* RESTRICT y, int64_t ny) {
    constexpr int64_t B = FirVec<T>::B;
    const int64_t k = static_cast<int64_t>(taps.size());
    for (int64_t i0 = 0; i0 < ny; i0 += B) {
        if (i0 >= k - 1 && i0 + B <= n) {  // the whole input window lies inside the signal
            fir_block(x + i0, taps.data(), k, y + i0);
            continue;
        }
        // a block at either end (or all of them when k > n): only the products of samples that
        // exist, tap by tap, so the work stays n k however long the taps are
        const int64_t stop = std::min(ny, i0 + B);
        for (int64_t i = i0; i < stop; ++i) y[i] = 0;
        for (int64_t t = std::max<int64_t>(0, i0 - n + 1); t < std::min(k, stop); ++t) {
            const T ht = taps[t];
            const int64_t lo = std::max(i0, t), hi = std::min(stop, n + t);  // 0 <= i - t < n
            for (int64_t i = lo; i < hi; ++i) y[i] += ht * x[i - t];
        }
    }
}

void run_fir(const ec::Inputs& in, const ec::Params& params, ec_result* r) {
    const ec_buffer& x = in.get("signal", 0);
    const ec_buffer& h = in.get("taps", 1);
    ec::require_dtype(x, "fir_filter input 'signal'", {EC_FLOAT32, EC_FLOAT64});
    ec::require_dtype(h, "fir_filter input 'taps'", {EC_FLOAT32, EC_FLOAT64});
    ec::require_ndim(x, "fir_filter input 'signal'", 1, 2);
    ec::require_ndim(h, "fir_filter input 'taps'", 1, 1);
    if (h.shape[0] < 1) throw invalid("fir_filter input 'taps' is empty");
    std::string mode = params.string("mode", "causal");
    if (mode != "causal" && mode != "full") throw invalid("param 'mode' must be 'causal' or 'full', not '" + mode + "'");
    int64_t rows = x.ndim == 2 ? x.shape[0] : 1, n = x.shape[x.ndim - 1], k = h.shape[0];
    int64_t ny = mode == "full" ? (n ? n + k - 1 : 0) : n;
    auto go = [&](auto tag, int32_t dtype) {
        using T = decltype(tag);
        std::vector<T> taps(k);
        for (int64_t i = 0; i < k; ++i)
            taps[i] = h.dtype == EC_FLOAT32 ? static_cast<T>(static_cast<const float*>(h.data)[i])
                                            : static_cast<T>(static_cast<const double*>(h.data)[i]);
        T* y = x.ndim == 2 ? ec::output<T>(r, "signal", dtype, {rows, ny}) : ec::output<T>(r, "signal", dtype, {ny});
        for (int64_t row = 0; row < rows; ++row) {
            if (ec::cancelled(r)) throw Error(EC_CANCELLED, "cancelled");
            fir(static_cast<const T*>(x.data) + row * n, n, taps, y + row * ny, ny);
        }
    };
    if (x.dtype == EC_FLOAT32) go(float{}, EC_FLOAT32); else go(double{}, EC_FLOAT64);
}

// ================================ blocked matrix multiply =====================================

// C (m x n) = A (m x k) @ B (k x n), row-major. Goto-style blocking: a KC x NC panel of B is
// packed into NR-wide column strips (contiguous, stays in L2), an MR x KC sliver of A into MR-wide
// rows, and an MR x NR tile of C lives in vector registers (GCC/Clang vector extensions) for the
// whole KC loop. Edges fall back to a scalar loop.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;  // 32 vector registers: a 6 x 2-vector tile fits easily
#else
constexpr int kVectorBytes = 32;  // AVX2 / NEON-pairs: 12 accumulators + 2 loads + 1 broadcast <= 16
#endif

template <class T>
struct Kernel {
    static constexpr int W = kVectorBytes / sizeof(T);  // lanes of one vector
    typedef T vec __attribute__((vector_size(kVectorBytes)));
    static constexpr int MR = 6, NR = 2 * W;
};

template <class T>
void matmul_tile(const T* RESTRICT ap, const T* RESTRICT bp, int64_t kc, T* RESTRICT c, int64_t ldc) {
    using K = Kernel<T>;
    using vec = typename K::vec;
    constexpr int W = K::W, MR = K::MR;
    vec acc[MR][2];
    for (int r = 0; r < MR; ++r) {
        std::memcpy(&acc[r][0], c + r * ldc, sizeof(vec));
        std::memcpy(&acc[r][1], c + r * ldc + W, sizeof(vec));
    }
    for (int64_t p = 0; p < kc; ++p) {
        vec b0, b1;
        std::memcpy(&b0, bp + p * 2 * W, sizeof(vec));
        std::memcpy(&b1, bp + p * 2 * W + W, sizeof(vec));
        for (int r = 0; r < MR; ++r) {
            const T a = ap[p * MR + r];
            acc[r][0] += a * b0;
            acc[r][1] += a * b1;
        }
    }
    for (int r = 0; r < MR; ++r) {
        std::memcpy(c + r * ldc, &acc[r][0], sizeof(vec));
        std::memcpy(c + r * ldc + W, &acc[r][1], sizeof(vec));
    }
}

template <class T>
void matmul(const T* RESTRICT a, const T* RESTRICT b, T* RESTRICT c, int64_t m, int64_t k, int64_t n) {
    using K = Kernel<T>;
    constexpr int64_t MR = K::MR, NR = K::NR, KC = 256, NC = 2048;
    std::fill(c, c + m * n, T(0));
    std::vector<T> bpack(static_cast<size_t>(KC * NC)), apack(static_cast<size_t>(MR * KC));
    for (int64_t j0 = 0; j0 < n; j0 += NC) {
        const int64_t nc = std::min(NC, n - j0);
        const int64_t nfull = nc / NR * NR;  // columns covered by whole strips
        for (int64_t p0 = 0; p0 < k; p0 += KC) {
            const int64_t kc = std::min(KC, k - p0);
            // pack B[p0:p0+kc, j0:j0+nfull] as strips of NR columns
            for (int64_t s = 0; s < nfull; s += NR)
                for (int64_t p = 0; p < kc; ++p)
                    std::copy_n(b + (p0 + p) * n + j0 + s, NR, bpack.data() + s * kc + p * NR);
            int64_t i = 0;
            for (; i + MR <= m; i += MR) {
                for (int64_t p = 0; p < kc; ++p)
                    for (int64_t r = 0; r < MR; ++r) apack[p * MR + r] = a[(i + r) * k + p0 + p];
                for (int64_t s = 0; s < nfull; s += NR)
                    matmul_tile<T>(apack.data(), bpack.data() + s * kc, kc, c + i * n + j0 + s, n);
            }
            // leftover rows (all columns) and leftover columns (the full-row part): scalar
            for (int64_t ii = 0; ii < m; ++ii) {
                const int64_t jstart = ii < i ? nfull : 0;
                if (jstart >= nc) continue;
                T* RESTRICT crow = c + ii * n + j0;
                for (int64_t p = p0; p < p0 + kc; ++p) {
                    const T av = a[ii * k + p];
                    const T* RESTRICT brow = b + p * n + j0;
                    for (int64_t j = jstart; j < nc; ++j) crow[j] += av * brow[j];
                }
            }
        }
    }
}

void run_matmul(const ec::Inputs& in, const ec::Params&, ec_result* r) {
    const ec_buffer& a = in.get("a", 0);
    const ec_buffer& b = in.get("b", 1);
    ec::require_dtype(a, "matmul input 'a'", {EC_FLOAT32, EC_FLOAT64});
    ec::require_dtype(b, "matmul input 'b'", {EC_FLOAT32, EC_FLOAT64});
    ec::require_ndim(a, "matmul input 'a'", 2, 2);
    ec::require_ndim(b, "matmul input 'b'", 2, 2);
    if (a.dtype != b.dtype)
        throw invalid(std::string("matmul inputs must have the same dtype, got ") + ec::dtype_name(a.dtype) + " and " + ec::dtype_name(b.dtype));
    if (a.shape[1] != b.shape[0])
        throw invalid("matmul shapes do not match: " + ec::shape_string(a) + " @ " + ec::shape_string(b));
    int64_t m = a.shape[0], k = a.shape[1], n = b.shape[1];
    if (a.dtype == EC_FLOAT32)
        matmul(static_cast<const float*>(a.data), static_cast<const float*>(b.data), ec::output<float>(r, "c", EC_FLOAT32, {m, n}), m, k, n);
    else
        matmul(static_cast<const double*>(a.data), static_cast<const double*>(b.data), ec::output<double>(r, "c", EC_FLOAT64, {m, n}), m, k, n);
}

// ================================ sum (a trivial algorithm, for overhead measurements) =======

template <class T>
double total(const void* p, int64_t n) {
    // eight independent partial sums: the loop vectorises without -ffast-math
    const T* RESTRICT v = static_cast<const T*>(p);
    double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; ++k) part[k] += static_cast<double>(v[i + k]);
    double s = 0;
    for (; i < n; ++i) s += static_cast<double>(v[i]);
    for (int k = 0; k < 8; ++k) s += part[k];
    return s;
}

void run_sum(const ec::Inputs& in, const ec::Params&, ec_result* r) {
    if (in.size() < 1) throw invalid("sum needs one input");
    const ec_buffer& x = in[0];
    int64_t n = ec::element_count(x);
    double s;
    switch (x.dtype) {
        case EC_FLOAT32: s = total<float>(x.data, n); break;
        case EC_FLOAT64: s = total<double>(x.data, n); break;
        case EC_INT32: s = total<int32_t>(x.data, n); break;
        case EC_INT64: s = total<int64_t>(x.data, n); break;
        case EC_UINT8: s = total<uint8_t>(x.data, n); break;
        default: throw invalid(std::string("sum does not support dtype ") + ec::dtype_name(x.dtype));
    }
    *ec::output<double>(r, "sum", EC_FLOAT64, {}) = s;
}

// ================================ the plugin table ============================================

using Runner = void (*)(const ec::Inputs&, const ec::Params&, ec_result*);

struct Entry {
    ec_algorithm_info info;
    Runner run;
};

const Entry entries[] = {
    {{"grayscale", "RGB(A)/BGR(A) image (h, w, 3|4) uint8/float to luma (h, w): 0.299 R + 0.587 G + 0.114 B; params: order", 1.0, 0.0, 1}, run_grayscale},
    {{"gaussian_blur", "Separable gaussian blur of a (h, w[, c]) float image, reflect border (= scipy.ndimage.gaussian_filter); params: sigma, truncate", 1.0, 0.0, 1}, run_gaussian_blur},
    {{"sobel", "Sobel edges of a (h, w) float image, reflect border (= scipy.ndimage.sobel); params: output = magnitude|gradients|all", 1.0, 0.0, 1}, run_sobel},
    {{"resize", "Bilinear resize of a (h, w[, c]) uint8/float32 image (= OpenCV INTER_LINEAR); params: width, height", 1.0, 0.0, 1}, run_resize},
    {{"fir_filter", "FIR filter of a (n,) or (rows, n) signal with taps (= scipy.signal.lfilter(taps, 1, x)); params: mode = causal|full", 1.0, 0.0, 1}, run_fir},
    {{"fft", "Discrete Fourier transform along the last axis, any length (mixed-radix Stockham, Bluestein for large prime factors; = numpy.fft.fft); params: inverse", 1.0, 0.0, 1}, builtin::run_fft},
    {{"matmul", "Blocked matrix multiply of float32/float64 matrices a (m, k) @ b (k, n)", 1.0, 0.0, 1}, run_matmul},
    {{"sum", "Sum of all elements as a float64 scalar (a trivial call, for overhead measurements)", 0.1, 0.0, 1}, run_sum},
};

constexpr int32_t n_entries = sizeof(entries) / sizeof(entries[0]);

ec_algorithm_info infos[n_entries];

const ec_plugin_info* build_info() {
    static ec_plugin_info info;
    for (int32_t i = 0; i < n_entries; ++i) infos[i] = entries[i].info;
    info.abi_version = EC_ABI_TARGET;
    info.name = "builtin";
    info.version = "1.0.0";
    info.n_algorithms = n_entries;
    info.algorithms = infos;
    return &info;
}

}  // namespace

extern "C" EC_EXPORT const ec_plugin_info* ec_info(void) {
    static const ec_plugin_info* info = build_info();
    return info;
}

extern "C" EC_EXPORT int32_t ec_execute(const char* algorithm, const ec_buffer* inputs, int32_t n_inputs,
                                        const char* params_json, ec_result* result) {
    return ec::guard(result, [&] {
        for (const Entry& e : entries) {
            if (std::strcmp(e.info.name, algorithm) == 0) {
                ec::Params params(params_json);
                e.run(ec::Inputs(inputs, n_inputs), params, result);
                return;
            }
        }
        throw Error(EC_UNKNOWN_ALGORITHM, std::string("builtin has no algorithm '") + algorithm + "'");
    });
}

EC_DEFINE_RELEASE()
