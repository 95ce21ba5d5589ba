// What the library's custom ops share: the onnxruntime API table, errors, tensor views, and the
// registration of each op (defined in its own file, collected by RegisterCustomOps).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "ort_api.h"

namespace slim {

// The oldest onnxruntime this library loads in is 1.20 (C API version 20): the ops are stamped with it
// and only API functions of that version or older are used.
constexpr uint32_t kOrtApiVersion = 20;

extern const OrtApi* g_api;  // set by RegisterCustomOps

struct OpError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void ThrowOnError(OrtStatus* status);

struct TensorView {
  bool present = false;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

TensorView View(const OrtValue* value);  // an absent input (nullptr) gives present = false
std::string ShapeString(const std::vector<int64_t>& s);
const char* TypeName(ONNXTensorElementDataType t);
std::string NodeName(const OrtKernelInfo* info);
OrtStatus* ToStatus(const char* op, const std::string& node, const std::exception& e);  // "<op> node '<node>': <what>"

// The CPU GroupQueryAttention op (attention_op.cc).
OrtCustomOp* AttentionCpuOp();

}  // namespace slim
