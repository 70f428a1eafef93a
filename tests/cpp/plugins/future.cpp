// A plugin that claims a future ABI version: the host must refuse it.
#include <edgecompute/plugin.h>

static const ec_algorithm_info algorithms[] = {{"nothing", "", 1.0, 0.0, 1}};
static const ec_plugin_info info = {99, "future", "9.9", 1, algorithms};

extern "C" EC_EXPORT const ec_plugin_info* ec_info(void) { return &info; }
extern "C" EC_EXPORT int32_t ec_execute(const char*, const ec_buffer*, int32_t, const char*, ec_result*) { return 3; }
extern "C" EC_EXPORT void ec_release(void*) {}
