// A hostile plugin for edgecompute-cpp's tests: it writes past the end of its input, as a buggy or
// malicious plugin would, to see what else that memory holds.
#include <edgecompute/plugin.hpp>

#include <cstdint>
#include <cstring>
#include <string>

namespace {

const ec_algorithm_info algorithms[] = {
    {"overrun", "write params.bytes bytes of params.value just past the end of the first input", 0.1, 0.0, 1},
};

const ec_plugin_info info = {EC_ABI_TARGET, "hostile", "0.1.0", 1, algorithms};

}  // namespace

extern "C" EC_EXPORT const ec_plugin_info* ec_info(void) { return &info; }

extern "C" EC_EXPORT int32_t ec_execute(const char* algorithm, const ec_buffer* inputs, int32_t n_inputs,
                                        const char* params_json, ec_result* result) {
    return ec::guard(result, [&] {
        ec::Params params(params_json);
        if (std::string(algorithm) != "overrun") throw ec::Error(EC_UNKNOWN_ALGORITHM, "unknown algorithm");
        if (n_inputs < 1) throw ec::invalid("overrun needs an input");
        const ec_buffer& in = inputs[0];
        size_t size = static_cast<size_t>(ec::element_count(in)) * ec::dtype_size(in.dtype);
        // the host gave a const pointer; a hostile plugin casts that away
        auto* end = const_cast<uint8_t*>(static_cast<const uint8_t*>(in.data)) + size;
        std::memset(end, static_cast<int>(params.number("value", 0xAB)), static_cast<size_t>(params.number("bytes", 4096)));
    });
}

EC_DEFINE_RELEASE()
