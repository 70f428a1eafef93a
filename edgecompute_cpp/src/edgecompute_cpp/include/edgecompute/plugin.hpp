// Optional C++17 helpers for writing edgecompute plugins on top of plugin.h:
//   ec::Params   - the call's JSON params (a small, dependency-free JSON reader)
//   ec::Inputs   - find inputs by name or position, check dtype and rank
//   ec::output<T>(result, name, dtype, shape) - allocate an output the plugin owns (large ones
//                                               come from a cache of mapped blocks, see below)
//   ec::guard(result, fn) - run fn, turning ec::Error / std::bad_alloc / std::exception into codes
//   EC_DEFINE_RELEASE() - defines ec_release() for outputs allocated with ec::output
#ifndef EDGECOMPUTE_PLUGIN_HPP
#define EDGECOMPUTE_PLUGIN_HPP

#include "plugin.h"

#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#endif

namespace ec {

struct Error : std::runtime_error {
    int32_t code;
    Error(int32_t code_, const std::string& message) : std::runtime_error(message), code(code_) {}
};

inline Error invalid(const std::string& message) { return Error(EC_INVALID_INPUT, message); }

inline const char* dtype_name(int32_t dtype) {
    static const char* names[] = {"?", "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32",
                                  "uint64", "int64", "float32", "float64", "complex64", "complex128"};
    return dtype >= 1 && dtype <= 13 ? names[dtype] : "?";
}

inline size_t dtype_size(int32_t dtype) {
    switch (dtype) {
        case EC_BOOL: case EC_UINT8: case EC_INT8: return 1;
        case EC_UINT16: case EC_INT16: return 2;
        case EC_UINT32: case EC_INT32: case EC_FLOAT32: return 4;
        case EC_UINT64: case EC_INT64: case EC_FLOAT64: case EC_COMPLEX64: return 8;
        case EC_COMPLEX128: return 16;
        default: return 0;
    }
}

inline int64_t element_count(const ec_buffer& b) {
    int64_t n = 1;
    for (int i = 0; i < b.ndim; ++i) n *= b.shape[i];
    return n;
}

inline std::string shape_string(const ec_buffer& b) {
    std::string s = "(";
    for (int i = 0; i < b.ndim; ++i) {
        if (i) s += ", ";
        s += std::to_string(b.shape[i]);
    }
    if (b.ndim == 1) s += ",";
    return s + ")";
}

// ---- JSON params --------------------------------------------------------------------------

struct Value {
    enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
    bool boolean = false;
    double number = 0;
    std::string string;
    std::vector<Value> items;
    std::vector<std::pair<std::string, Value>> members;

    const Value* get(const std::string& key) const {
        for (const auto& m : members)
            if (m.first == key) return &m.second;
        return nullptr;
    }
};

class JsonReader {
  public:
    explicit JsonReader(const char* text) : p_(text ? text : "") {}
    Value parse() {
        Value v = value();
        space();
        if (*p_) fail("trailing characters");
        return v;
    }

  private:
    const char* p_;
    int depth_ = 0;  // nesting: value() recurses, so a deeply nested request would exhaust the stack
    static constexpr int kMaxDepth = 64;
    [[noreturn]] void fail(const char* what) { throw invalid(std::string("bad params JSON: ") + what); }
    struct Nest {
        int& depth;
        explicit Nest(JsonReader& r) : depth(r.depth_) {
            if (++depth > kMaxDepth) { --depth; r.fail("nested too deeply"); }
        }
        ~Nest() { --depth; }
    };
    void space() { while (*p_ && std::isspace(static_cast<unsigned char>(*p_))) ++p_; }
    bool take(const char* word) {
        size_t n = std::strlen(word);
        if (std::strncmp(p_, word, n) == 0) { p_ += n; return true; }
        return false;
    }
    Value value() {
        Nest nest(*this);
        space();
        Value v;
        if (*p_ == '{') {
            ++p_; v.kind = Value::Object; space();
            if (*p_ == '}') { ++p_; return v; }
            for (;;) {
                space();
                if (*p_ != '"') fail("expected a key");
                std::string key = str();
                space();
                if (*p_++ != ':') fail("expected ':'");
                v.members.emplace_back(key, value());
                space();
                if (*p_ == ',') { ++p_; continue; }
                if (*p_ == '}') { ++p_; return v; }
                fail("expected ',' or '}'");
            }
        }
        if (*p_ == '[') {
            ++p_; v.kind = Value::Array; space();
            if (*p_ == ']') { ++p_; return v; }
            for (;;) {
                v.items.push_back(value());
                space();
                if (*p_ == ',') { ++p_; continue; }
                if (*p_ == ']') { ++p_; return v; }
                fail("expected ',' or ']'");
            }
        }
        if (*p_ == '"') { v.kind = Value::String; v.string = str(); return v; }
        if (take("true")) { v.kind = Value::Bool; v.boolean = true; return v; }
        if (take("false")) { v.kind = Value::Bool; return v; }
        if (take("null")) return v;
        if (take("NaN")) { v.kind = Value::Number; v.number = NAN; return v; }
        char* end = nullptr;
        v.number = std::strtod(p_, &end);
        if (end == p_) fail("unexpected character");
        p_ = end; v.kind = Value::Number;
        return v;
    }
    std::string str() {
        std::string s;
        ++p_;
        while (*p_ && *p_ != '"') {
            if (*p_ == '\\') {
                ++p_;
                switch (*p_) {
                    case 'n': s += '\n'; break;
                    case 't': s += '\t'; break;
                    case 'r': s += '\r'; break;
                    case 'b': s += '\b'; break;
                    case 'f': s += '\f'; break;
                    case 'u': {  // keep ASCII, replace the rest
                        unsigned code = 0;
                        int i = 1;  // never past the end of the text: "\u12" then the end is short
                        for (; i <= 4 && std::isxdigit(static_cast<unsigned char>(p_[i])); ++i)
                            code = code * 16 + (std::isdigit(static_cast<unsigned char>(p_[i])) ? p_[i] - '0' : (std::tolower(p_[i]) - 'a' + 10));
                        if (i <= 4) fail("bad \\u escape");
                        s += code < 128 ? static_cast<char>(code) : '?';
                        p_ += 4;
                        break;
                    }
                    case '\0': fail("unterminated string");
                    default: s += *p_;
                }
                ++p_;
            } else {
                s += *p_++;
            }
        }
        if (*p_ != '"') fail("unterminated string");
        ++p_;
        return s;
    }
};

class Params {
  public:
    explicit Params(const char* json) : root_(JsonReader(json && *json ? json : "{}").parse()) {
        if (root_.kind != Value::Object) throw invalid("params must be a JSON object");
    }
    bool has(const std::string& key) const { return root_.get(key) != nullptr; }
    const Value* get(const std::string& key) const { return root_.get(key); }
    double number(const std::string& key, double fallback) const {
        const Value* v = root_.get(key);
        if (!v || v->kind == Value::Null) return fallback;
        if (v->kind != Value::Number) throw invalid("param '" + key + "' must be a number");
        return v->number;
    }
    int64_t integer(const std::string& key, int64_t fallback) const {
        double d = number(key, static_cast<double>(fallback));
        if (d != static_cast<double>(static_cast<int64_t>(d))) throw invalid("param '" + key + "' must be an integer");
        return static_cast<int64_t>(d);
    }
    bool boolean(const std::string& key, bool fallback) const {
        const Value* v = root_.get(key);
        if (!v || v->kind == Value::Null) return fallback;
        if (v->kind != Value::Bool) throw invalid("param '" + key + "' must be true or false");
        return v->boolean;
    }
    std::string string(const std::string& key, const std::string& fallback) const {
        const Value* v = root_.get(key);
        if (!v || v->kind == Value::Null) return fallback;
        if (v->kind != Value::String) throw invalid("param '" + key + "' must be a string");
        return v->string;
    }
    // a number or a list of numbers
    std::vector<double> numbers(const std::string& key, std::vector<double> fallback) const {
        const Value* v = root_.get(key);
        if (!v || v->kind == Value::Null) return fallback;
        if (v->kind == Value::Number) return {v->number};
        if (v->kind != Value::Array) throw invalid("param '" + key + "' must be a number or a list of numbers");
        std::vector<double> out;
        for (const auto& item : v->items) {
            if (item.kind != Value::Number) throw invalid("param '" + key + "' must hold numbers only");
            out.push_back(item.number);
        }
        return out;
    }

  private:
    Value root_;
};

// ---- inputs ---------------------------------------------------------------------------------

class Inputs {
  public:
    Inputs(const ec_buffer* buffers, int32_t n) : b_(buffers), n_(n) {}
    int32_t size() const { return n_; }
    const ec_buffer& operator[](int32_t i) const { return b_[i]; }
    // the input called `name`, else the one at `position`; throws if there is neither
    const ec_buffer& get(const char* name, int32_t position) const {
        for (int32_t i = 0; i < n_; ++i)
            if (b_[i].name && std::strcmp(b_[i].name, name) == 0) return b_[i];
        if (position < n_) return b_[position];
        throw invalid(std::string("missing input '") + name + "'");
    }

  private:
    const ec_buffer* b_;
    int32_t n_;
};

inline void require_dtype(const ec_buffer& b, const char* what, std::initializer_list<int32_t> allowed) {
    for (int32_t d : allowed)
        if (b.dtype == d) return;
    std::string names;
    for (int32_t d : allowed) names += (names.empty() ? "" : ", ") + std::string(dtype_name(d));
    throw invalid(std::string(what) + " must have dtype " + names + ", not " + dtype_name(b.dtype));
}

inline void require_ndim(const ec_buffer& b, const char* what, int lo, int hi) {
    if (b.ndim < lo || b.ndim > hi)
        throw invalid(std::string(what) + " must have " + std::to_string(lo) +
                      (lo == hi ? "" : "-" + std::to_string(hi)) + " dimensions, got shape " + shape_string(b));
}

// ---- outputs --------------------------------------------------------------------------------

// Large outputs are the norm (an image in, an image out), and where they come from matters:
// glibc gives a thread's multi-megabyte block back to the system when it is freed, so the next
// call faults in every page again (~1,600 faults and +100% time for an 8 MB image, and worse
// on two threads, which then contend in the kernel). Blocks of EC_LARGE_OUTPUT bytes or more
// are therefore mapped here, backed by transparent huge pages where the system allows, and
// kept for reuse once released: up to EC_OUTPUT_CACHE_BYTES per plugin (define either before
// including this header to change it).
#ifndef EC_LARGE_OUTPUT
#define EC_LARGE_OUTPUT (256u << 10)
#endif
#ifndef EC_OUTPUT_CACHE_BYTES
#define EC_OUTPUT_CACHE_BYTES (64u << 20)
#endif

namespace detail {

#if defined(MAP_ANONYMOUS)
constexpr size_t kHugePage = size_t{2} << 20;

struct BlockCache {
    std::mutex mutex;
    std::vector<std::pair<void*, size_t>> blocks;  // released blocks, oldest first
    size_t bytes = 0;
};

// never destroyed: outputs may be released while the process exits
inline BlockCache& block_cache() {
    static BlockCache* cache = new BlockCache();
    return *cache;
}

// the size a block of `bytes` is mapped with: whole huge pages from 4 MiB up, else 64 KiB steps
inline size_t block_capacity(size_t bytes) {
    size_t step = bytes >= 2 * kHugePage ? kHugePage : size_t{64} << 10;
    return (bytes + step - 1) / step * step;
}

inline void* map_block(size_t capacity) {
    {
        BlockCache& cache = block_cache();
        std::lock_guard<std::mutex> lock(cache.mutex);
        for (size_t i = cache.blocks.size(); i-- > 0;) {  // the most recently released first
            if (cache.blocks[i].second == capacity) {
                void* p = cache.blocks[i].first;
                cache.blocks.erase(cache.blocks.begin() + static_cast<std::ptrdiff_t>(i));
                cache.bytes -= capacity;
                return p;
            }
        }
    }
    bool huge = capacity % kHugePage == 0;
    size_t extra = huge ? kHugePage : 0;  // room to align the start to a huge page
    void* raw = mmap(nullptr, capacity + extra, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) throw std::bad_alloc();
    char* start = static_cast<char*>(raw);
    if (huge) {
        char* aligned = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(start) + kHugePage - 1) / kHugePage * kHugePage);
        if (aligned > start) munmap(start, static_cast<size_t>(aligned - start));
        char* end = aligned + capacity;
        if (start + capacity + extra > end) munmap(end, static_cast<size_t>(start + capacity + extra - end));
        start = aligned;
#ifdef MADV_HUGEPAGE
        madvise(start, capacity, MADV_HUGEPAGE);  // advice only: fine if the system says no
#endif
    }
    return start;
}

inline void unmap_block(void* p, size_t capacity) {
    std::vector<std::pair<void*, size_t>> evicted;
    {
        BlockCache& cache = block_cache();
        std::lock_guard<std::mutex> lock(cache.mutex);
        try {
            cache.blocks.emplace_back(p, capacity);
            cache.bytes += capacity;
        } catch (const std::bad_alloc&) {
            evicted.emplace_back(p, capacity);
        }
        while (cache.bytes > EC_OUTPUT_CACHE_BYTES && !cache.blocks.empty()) {
            evicted.push_back(cache.blocks.front());
            cache.bytes -= cache.blocks.front().second;
            cache.blocks.erase(cache.blocks.begin());
        }
    }
    for (auto& [block, size] : evicted) munmap(block, size);  // outside the lock: it can be slow
}
#endif

}  // namespace detail

// Owns a call's outputs until the host releases them. A plugin may push blocks of its own
// (from malloc or aligned_alloc) onto `blocks`; they are freed with std::free.
struct Owner {
    std::vector<void*> blocks;
    std::vector<std::pair<void*, size_t>> mapped;  // from detail::map_block, with their capacity
    virtual ~Owner() {
        for (void* b : blocks) std::free(b);
#if defined(MAP_ANONYMOUS)
        for (auto& [b, capacity] : mapped) detail::unmap_block(b, capacity);
#endif
    }
};

template <class T>
T* output(ec_result* r, const char* name, int32_t dtype, std::initializer_list<int64_t> shape) {
    if (r->n_outputs >= EC_MAX_OUTPUTS) throw Error(EC_INTERNAL_ERROR, "too many outputs");
    if (shape.size() > EC_MAX_DIMS) throw Error(EC_INTERNAL_ERROR, "too many dimensions");
    if (!r->owner) r->owner = new Owner();
    Owner* owner = static_cast<Owner*>(r->owner);
    // a shape from a request's params must not wrap around into a small block that the plugin
    // then writes past: negative extents and products beyond PTRDIFF_MAX are refused
    size_t count = 1;
    for (int64_t s : shape) {
        if (s < 0) throw Error(EC_INVALID_INPUT, "an output dimension is negative");
        if (s != 0 && count > static_cast<size_t>(PTRDIFF_MAX) / static_cast<size_t>(s))
            throw Error(EC_OUT_OF_MEMORY, "the output is too large");
        count *= static_cast<size_t>(s);
    }
    const size_t item = dtype_size(dtype);
    if (item == 0 || count > (static_cast<size_t>(PTRDIFF_MAX) - 4096) / item)
        throw Error(item == 0 ? EC_INTERNAL_ERROR : EC_OUT_OF_MEMORY, item == 0 ? "unknown output dtype" : "the output is too large");
    size_t bytes = count * item;
    size_t padded = ((bytes ? bytes : 1) + 63) / 64 * 64;
    void* data;
#if defined(MAP_ANONYMOUS)
    if (padded >= EC_LARGE_OUTPUT) {
        size_t capacity = detail::block_capacity(padded);
        owner->mapped.reserve(owner->mapped.size() + 1);  // so that push_back cannot throw and leak
        data = detail::map_block(capacity);
        owner->mapped.emplace_back(data, capacity);
    } else
#endif
    {
        owner->blocks.reserve(owner->blocks.size() + 1);
        data = std::aligned_alloc(64, padded);
        if (!data) throw std::bad_alloc();
        owner->blocks.push_back(data);
    }
    ec_buffer& out = r->outputs[r->n_outputs++];
    out.name = name;
    out.dtype = dtype;
    out.ndim = static_cast<int32_t>(shape.size());
    int i = 0;
    for (int64_t s : shape) out.shape[i++] = s;
    out.data = data;
    return static_cast<T*>(data);
}

inline bool cancelled(const ec_result* r) {
#if EC_ABI_TARGET >= 2
    return r->cancelled && *r->cancelled;
#else
    (void)r;
    return false;
#endif
}

inline void set_error(ec_result* r, int32_t code, const char* message) {
    r->error_code = code;
    std::snprintf(r->error_message, EC_ERROR_MESSAGE_SIZE, "%s", message);
}

template <class F>
int32_t guard(ec_result* r, F&& fn) {
    r->n_outputs = 0;
    r->owner = nullptr;
    r->error_code = EC_OK;
    r->error_message[0] = '\0';
    try {
        fn();
        return EC_OK;
    } catch (const Error& e) {
        set_error(r, e.code, e.what());
    } catch (const std::bad_alloc&) {
        set_error(r, EC_OUT_OF_MEMORY, "out of memory");
    } catch (const std::exception& e) {
        set_error(r, EC_INTERNAL_ERROR, e.what());
    } catch (...) {
        set_error(r, EC_INTERNAL_ERROR, "unknown C++ exception");
    }
    delete static_cast<Owner*>(r->owner);
    r->owner = nullptr;
    r->n_outputs = 0;
    return r->error_code;
}

}  // namespace ec

#define EC_DEFINE_RELEASE() \
    extern "C" EC_EXPORT void ec_release(void* owner) { delete static_cast<ec::Owner*>(owner); }

#endif  // EDGECOMPUTE_PLUGIN_HPP
