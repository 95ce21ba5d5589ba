// Definitions of the helpers every custom op of the library uses (op_common.h).
#include "op_common.h"

#include <algorithm>

namespace slim {

const OrtApi* g_api = nullptr;
const OrtApi* g_api24 = nullptr;

std::string SessionConfigEntry(const OrtKernelInfo* info, const char* key, const std::string& fallback) {
  if (g_api24 == nullptr) return fallback;
  OrtKeyValuePairs* entries = nullptr;
  ThrowOnError(g_api24->KernelInfo_GetConfigEntries(info, &entries));
  const char* value = g_api24->GetKeyValue(entries, key);
  std::string out = value != nullptr ? value : fallback;
  g_api24->ReleaseKeyValuePairs(entries);
  return out;
}

void ThrowOnError(OrtStatus* status) {
  if (status == nullptr) return;
  std::string msg = g_api->GetErrorMessage(status);
  g_api->ReleaseStatus(status);
  throw OpError(msg);
}

namespace {

[[noreturn]] void SizeError(const char* what, int64_t a, int64_t b, const char* op) {
  throw OpError(std::string(what) + " = " + std::to_string(a) + op + std::to_string(b) +
                (a < 0 || b < 0 ? " has a negative operand" : " does not fit in 64 bits"));
}

}  // namespace

int64_t CheckedMul(int64_t a, int64_t b, const char* what) {
  int64_t out = 0;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &out)) SizeError(what, a, b, " * ");
  return out;
}

int64_t CheckedAdd(int64_t a, int64_t b, const char* what) {
  int64_t out = 0;
  if (a < 0 || b < 0 || __builtin_add_overflow(a, b, &out)) SizeError(what, a, b, " + ");
  return out;
}

int64_t CheckedNumel(const std::vector<int64_t>& shape, const char* what) {
  for (int64_t d : shape)
    if (d == 0) return 0;
  int64_t n = 1;
  for (int64_t d : shape) n = CheckedMul(n, d, what);
  return n;
}

namespace {

bool Succeeded(OrtStatus* status) {
  if (status == nullptr) return true;
  g_api->ReleaseStatus(status);
  return false;
}

// The type an attribute has among those the C API can read, or nullptr (absent, or another type).
const char* AttributeKind(const OrtKernelInfo* info, const char* name) {
  int64_t i = 0;
  float f = 0.f;
  size_t size = 0;
  if (Succeeded(g_api->KernelInfoGetAttribute_int64(info, name, &i))) return "an int";
  if (Succeeded(g_api->KernelInfoGetAttribute_float(info, name, &f))) return "a float";
  if (Succeeded(g_api->KernelInfoGetAttribute_string(info, name, nullptr, &size))) return "a string";
  // The array readers succeed, with no element, for a present attribute of any list type (or a
  // tensor, a graph, ...): only a non-empty answer tells the type.
  size_t ints = 0, floats = 0;
  const bool listed = Succeeded(g_api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &ints)) &&
                      Succeeded(g_api->KernelInfoGetAttributeArray_float(info, name, nullptr, &floats));
  if (ints > 0) return "a list of ints";
  if (floats > 0) return "a list of floats";
  OrtAllocator* allocator = nullptr;
  OrtValue* tensor = nullptr;
  if (Succeeded(g_api->GetAllocatorWithDefaultOptions(&allocator)) &&
      Succeeded(g_api->KernelInfoGetAttribute_tensor(info, name, allocator, &tensor))) {
    g_api->ReleaseValue(tensor);
    return "a tensor";
  }
  if (listed) return "a list or another type";
  return nullptr;
}

// The error for an attribute that could not be read as `expected`: absent (and required) or of
// another type.
template <typename T>
T MissingOrMistyped(const OrtKernelInfo* info, const char* name, const char* expected, const std::optional<T>& fallback) {
  if (const char* kind = AttributeKind(info, name))
    throw OpError(std::string("attribute '") + name + "' must be " + expected + ", got " + kind);
  if (!fallback) throw OpError(std::string("missing required attribute '") + name + "' (" + expected + ")");
  return *fallback;
}

}  // namespace

int64_t IntAttribute(const OrtKernelInfo* info, const char* name, std::optional<int64_t> fallback) {
  int64_t v = 0;
  if (Succeeded(g_api->KernelInfoGetAttribute_int64(info, name, &v))) return v;
  return MissingOrMistyped(info, name, "an int", fallback);
}

float FloatAttribute(const OrtKernelInfo* info, const char* name, std::optional<float> fallback) {
  float v = 0.f;
  if (Succeeded(g_api->KernelInfoGetAttribute_float(info, name, &v))) return v;
  return MissingOrMistyped(info, name, "a float", fallback);
}

std::string StringAttribute(const OrtKernelInfo* info, const char* name, std::optional<std::string> fallback) {
  size_t size = 0;
  if (!Succeeded(g_api->KernelInfoGetAttribute_string(info, name, nullptr, &size)))
    return MissingOrMistyped(info, name, "a string", fallback);
  std::string s(size, '\0');
  ThrowOnError(g_api->KernelInfoGetAttribute_string(info, name, s.data(), &size));
  s.resize(size > 0 ? size - 1 : 0);  // the size counts the terminating NUL
  return s;
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
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
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
  try {
    return g_api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string(op) + " node '" + node + "': " + e.what()).c_str());
  } catch (...) {  // out of memory for the message itself: the bare one, still no exception to onnxruntime
    return g_api->CreateStatus(ORT_FAIL, e.what());
  }
}

OrtStatus* UnknownErrorStatus(const char* op) { return g_api->CreateStatus(ORT_FAIL, op); }

}  // namespace slim
