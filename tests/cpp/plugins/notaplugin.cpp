// A shared library without the plugin entry points.
extern "C" __attribute__((visibility("default"))) int something_else(void) { return 1; }
