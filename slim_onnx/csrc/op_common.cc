// Definitions of the helpers every custom op of the library uses (op_common.h).
#include "op_common.h"

#include <algorithm>

namespace slim {

const OrtApi* g_api = nullptr;

void ThrowOnError(OrtStatus* status) {
  if (status == nullptr) return;
  std::string msg = g_api->GetErrorMessage(status);
  g_api->ReleaseStatus(status);
  throw OpError(msg);
}

TensorView View(const OrtValue* value) {
  TensorView v;
  if (value == nullptr) return v;
  v.present = true;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  ThrowOnError(g_api->GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatus* st = g_api->GetTensorElementType(info, &v.type);
  if (st == nullptr) st = g_api->GetDimensionsCount(info, &rank);
  if (st == nullptr) {
    v.shape.resize(rank);
    st = g_api->GetDimensions(info, v.shape.data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  ThrowOnError(st);
  void* data = nullptr;
  ThrowOnError(g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  v.data = data;
  return v;
}

void ReadInputs(OrtKernelContext* ctx, TensorView* in, size_t n) {
  size_t count = 0;
  ThrowOnError(g_api->KernelContext_GetInputCount(ctx, &count));
  for (size_t i = 0; i < std::min(count, n); ++i) {
    const OrtValue* v = nullptr;
    ThrowOnError(g_api->KernelContext_GetInput(ctx, i, &v));
    in[i] = View(v);
  }
}

std::string ShapeString(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

const char* TypeName(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED: return "absent";
    default: return "another type";
  }
}

std::string NodeName(const OrtKernelInfo* info) {
  size_t size = 0;
  OrtStatus* st = g_api->KernelInfo_GetNodeName(info, nullptr, &size);
  if (st != nullptr) {
    g_api->ReleaseStatus(st);
    return "?";
  }
  std::string name(size, '\0');
  st = g_api->KernelInfo_GetNodeName(info, &name[0], &size);
  if (st != nullptr) {
    g_api->ReleaseStatus(st);
    return "?";
  }
  name.resize(size > 0 ? size - 1 : 0);
  return name;
}

OrtStatus* ToStatus(const char* op, const std::string& node, const std::exception& e) {
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string(op) + " node '" + node + "': " + e.what()).c_str());
}

}  // namespace slim
