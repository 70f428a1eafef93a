// A plugin built for ABI version 1 (compile with -DEC_ABI_TARGET=1): no `cancelled` field.
#include <edgecompute/plugin.hpp>

static_assert(EC_ABI_TARGET == 1, "build this test plugin with -DEC_ABI_TARGET=1");

static const ec_algorithm_info algorithms[] = {{"double", "x * 2 for float64 x", 1.0, 0.0, 1}};
static const ec_plugin_info info = {EC_ABI_TARGET, "oldabi", "1.0", 1, algorithms};

extern "C" EC_EXPORT const ec_plugin_info* ec_info(void) { return &info; }

extern "C" EC_EXPORT int32_t ec_execute(const char*, const ec_buffer* inputs, int32_t n_inputs, const char*,
                                        ec_result* result) {
    return ec::guard(result, [&] {
        if (n_inputs != 1) throw ec::invalid("double takes one input");
        ec::require_dtype(inputs[0], "input", {EC_FLOAT64});
        int64_t n = ec::element_count(inputs[0]);
        double* out = ec::output<double>(result, "double", EC_FLOAT64, {n});
        const double* x = static_cast<const double*>(inputs[0].data);
        for (int64_t i = 0; i < n; ++i) out[i] = 2 * x[i];
    });
}

EC_DEFINE_RELEASE()
