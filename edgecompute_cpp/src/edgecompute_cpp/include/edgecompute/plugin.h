/* edgecompute C++ plugin ABI.
 *
 * A plugin is a shared library that exports three C functions:
 *
 *   const ec_plugin_info* ec_info(void);
 *   int32_t ec_execute(const char* algorithm, const ec_buffer* inputs, int32_t n_inputs,
 *                      const char* params_json, ec_result* result);
 *   void ec_release(void* owner);
 *
 * Inputs are C-contiguous n-d buffers that the host owns and that stay valid for the call only.
 * Outputs are buffers the plugin allocates and owns: it stores them in result->outputs and one
 * opaque `owner` pointer in result->owner; the host calls ec_release(owner) once it no longer
 * uses any of them (when the last numpy array over them is collected).
 *
 * Versioning. EC_ABI_VERSION is the version this header describes. A plugin reports the version
 * it was built for in ec_info()->abi_version. Structures only ever grow at their end, so a
 * host of version N loads plugins built for any version 1..N; a version it does not know (newer,
 * or 0) is refused. Build for an older version with -DEC_ABI_TARGET=<n>.
 *
 *   version 1: the functions and structures below.
 *   version 2: ec_result gains `cancelled`, a flag the host sets to non-zero when the task is
 *              cancelled; long-running plugins may poll it and stop early.
 */
#ifndef EDGECOMPUTE_PLUGIN_H
#define EDGECOMPUTE_PLUGIN_H

#include <stdint.h>

#define EC_ABI_VERSION 2
#ifndef EC_ABI_TARGET
#define EC_ABI_TARGET EC_ABI_VERSION
#endif

#define EC_MAX_DIMS 8
#define EC_MAX_OUTPUTS 8
#define EC_ERROR_MESSAGE_SIZE 1024

#ifdef __cplusplus
extern "C" {
#endif

/* Element types (values are part of the ABI; never renumbered). */
typedef enum ec_dtype {
    EC_BOOL = 1,
    EC_UINT8 = 2,
    EC_INT8 = 3,
    EC_UINT16 = 4,
    EC_INT16 = 5,
    EC_UINT32 = 6,
    EC_INT32 = 7,
    EC_UINT64 = 8,
    EC_INT64 = 9,
    EC_FLOAT32 = 10,
    EC_FLOAT64 = 11,
    EC_COMPLEX64 = 12,
    EC_COMPLEX128 = 13
} ec_dtype;

/* Status codes returned by ec_execute (and stored in result->error_code). */
typedef enum ec_status {
    EC_OK = 0,
    EC_INVALID_INPUT = 1,       /* the inputs or params are wrong: the caller's mistake */
    EC_UNKNOWN_ALGORITHM = 2,
    EC_INTERNAL_ERROR = 3,      /* the plugin failed */
    EC_OUT_OF_MEMORY = 4,
    EC_CANCELLED = 5            /* stopped early because result->cancelled was set (ABI >= 2) */
} ec_status;

/* One C-contiguous n-d array. */
typedef struct ec_buffer {
    const char* name;               /* the input's or output's name; may be NULL */
    int32_t dtype;                  /* an ec_dtype */
    int32_t ndim;                   /* 0..EC_MAX_DIMS */
    int64_t shape[EC_MAX_DIMS];
    void* data;
} ec_buffer;

typedef struct ec_algorithm_info {
    const char* name;               /* [A-Za-z0-9_.-]+, unique in the plugin */
    const char* description;
    double cpu;                     /* default resources of one call: cores ... */
    double memory_mb;               /* ... and host memory */
    int32_t thread_safe;            /* non-zero: calls may run concurrently in one process */
} ec_algorithm_info;

typedef struct ec_plugin_info {
    uint32_t abi_version;           /* set to EC_ABI_TARGET */
    const char* name;               /* the plugin's name, [A-Za-z0-9_-]+ */
    const char* version;
    int32_t n_algorithms;
    const ec_algorithm_info* algorithms;
} ec_plugin_info;

typedef struct ec_result {
    int32_t n_outputs;                       /* written by the plugin */
    ec_buffer outputs[EC_MAX_OUTPUTS];       /* written by the plugin; name may be NULL */
    void* owner;                             /* passed to ec_release; may be NULL if n_outputs == 0 */
    int32_t error_code;                      /* an ec_status */
    char error_message[EC_ERROR_MESSAGE_SIZE];
#if EC_ABI_TARGET >= 2
    const volatile int32_t* cancelled;       /* set by the host; never NULL for ABI >= 2 */
#endif
} ec_result;

#if defined(_WIN32)
#define EC_EXPORT __declspec(dllexport)
#else
#define EC_EXPORT __attribute__((visibility("default")))
#endif

EC_EXPORT const ec_plugin_info* ec_info(void);
EC_EXPORT int32_t ec_execute(const char* algorithm, const ec_buffer* inputs, int32_t n_inputs,
                             const char* params_json, ec_result* result);
EC_EXPORT void ec_release(void* owner);

#ifdef __cplusplus
}
#endif

#endif /* EDGECOMPUTE_PLUGIN_H */
