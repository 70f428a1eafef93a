// Crashes while it is being loaded: ec_info, which the host calls to learn the algorithms, aborts.
// In ``process`` isolation this takes down the worker process that loads it; the executor must
// list it as one failed plugin and go on serving the others.
#include <cstdlib>

#include <edgecompute/plugin.h>

extern "C" EC_EXPORT const ec_plugin_info* ec_info(void) {
    std::abort();
}

extern "C" EC_EXPORT int32_t ec_execute(const char*, const ec_buffer*, int32_t, const char*, ec_result*) {
    return EC_INTERNAL_ERROR;
}

extern "C" EC_EXPORT void ec_release(void*) {}
