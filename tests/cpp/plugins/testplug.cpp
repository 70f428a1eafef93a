// A plugin for edgecompute-cpp's tests: it crashes on request, spins, fails, and counts the
// output blocks the host has not released yet.
#include <edgecompute/plugin.hpp>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

std::atomic<int64_t> live{0};

struct CountedOwner : ec::Owner {
    CountedOwner() { ++live; }
    ~CountedOwner() { --live; }
};

const ec_algorithm_info algorithms[] = {
    {"echo", "copy the first input", 0.5, 1.0, 1},
    {"segfault", "dereference a null pointer", 0.1, 0.0, 1},
    {"abort", "call abort()", 0.1, 0.0, 1},
    {"spin", "busy-wait params.ms milliseconds without the GIL; stops early when cancelled; "
             "segfaults if params.crash", 0.1, 0.0, 1},
    {"fail", "report an internal error", 0.1, 0.0, 1},
    {"live", "how many outputs the host still holds", 0.1, 0.0, 0},
};

const ec_plugin_info info = {EC_ABI_TARGET, "testplug", "0.3.0", 6, algorithms};

}  // namespace

extern "C" EC_EXPORT const ec_plugin_info* ec_info(void) { return &info; }

extern "C" EC_EXPORT int32_t ec_execute(const char* algorithm, const ec_buffer* inputs, int32_t n_inputs,
                                        const char* params_json, ec_result* result) {
    return ec::guard(result, [&] {
        ec::Params params(params_json);
        std::string name = algorithm;
        if (name == "echo") {
            if (n_inputs < 1) throw ec::invalid("echo needs an input");
            const ec_buffer& in = inputs[0];
            result->owner = new CountedOwner();
            size_t bytes = static_cast<size_t>(ec::element_count(in)) * ec::dtype_size(in.dtype);
            void* data = std::aligned_alloc(64, (bytes + 64) / 64 * 64);
            static_cast<ec::Owner*>(result->owner)->blocks.push_back(data);
            std::memcpy(data, in.data, bytes);
            ec_buffer& out = result->outputs[result->n_outputs++];
            out = in;
            out.name = "echo";
            out.data = data;
        } else if (name == "segfault") {
            volatile int* p = nullptr;
            *p = 42;
        } else if (name == "abort") {
            std::abort();
        } else if (name == "spin") {
            if (params.number("crash", 0) != 0) {
                volatile int* p = nullptr;
                *p = 42;
            }
            auto stop = std::chrono::steady_clock::now() + std::chrono::microseconds(static_cast<int64_t>(params.number("ms", 10) * 1000));
            while (std::chrono::steady_clock::now() < stop) {
                if (ec::cancelled(result)) throw ec::Error(EC_CANCELLED, "spin was cancelled");
            }
        } else if (name == "fail") {
            throw ec::Error(EC_INTERNAL_ERROR, "the test plugin failed on purpose");
        } else if (name == "live") {
            *ec::output<int64_t>(result, "live", EC_INT64, {}) = live.load();
        } else {
            throw ec::Error(EC_UNKNOWN_ALGORITHM, "unknown algorithm " + name);
        }
    });
}

EC_DEFINE_RELEASE()
