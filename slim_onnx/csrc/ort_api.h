// The onnxruntime C API, from headers fetched at build time (see cmake/OrtHeaders.cmake).
#pragma once

#include <onnxruntime_c_api.h>

#if defined(_WIN32)
#define SLIM_EXPORT __declspec(dllexport)
#else
#define SLIM_EXPORT __attribute__((visibility("default")))
#endif
