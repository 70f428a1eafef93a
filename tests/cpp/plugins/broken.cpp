// Does not compile: build_plugin must turn this into a CompileError carrying the message.
#include <edgecompute/plugin.h>

extern "C" EC_EXPORT const ec_plugin_info* ec_info(void) { return undeclared_identifier_here; }
