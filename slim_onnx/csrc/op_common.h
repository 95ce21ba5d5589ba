// What the library's custom ops share: the onnxruntime API table, errors, tensor views, and the
// registration of each op (defined in its own file, collected by RegisterCustomOps).
#pragma once

#include <cstdint>
#include <exception>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "ort_api.h"

namespace slim {

// The oldest onnxruntime this library loads in is 1.20 (C API version 20): the ops are stamped with it
// and only API functions of that version or older are used.
constexpr uint32_t kOrtApiVersion = 20;

extern const OrtApi* g_api;  // set by RegisterCustomOps
// The same table where the runtime has version 24 (onnxruntime >= 1.24: kernels read the session's
// config entries), else nullptr; set by RegisterCustomOps. Only its version-24 entries are used.
extern const OrtApi* g_api24;
// A session config entry seen from a kernel at creation; `fallback` on onnxruntime < 1.24.
std::string SessionConfigEntry(const OrtKernelInfo* info, const char* key, const std::string& fallback);

struct OpError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void ThrowOnError(OrtStatus* status);

// Sizes computed from a model's attributes and shapes are checked before use: a product that does
// not fit in int64 (or a negative factor) is a malformed model, not something to wrap around.
int64_t CheckedMul(int64_t a, int64_t b, const char* what);
int64_t CheckedAdd(int64_t a, int64_t b, const char* what);
int64_t CheckedNumel(const std::vector<int64_t>& shape, const char* what);  // 0 when any dimension is 0

struct TensorView {
  bool present = false;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  int64_t numel() const { return CheckedNumel(shape, "a tensor's element count"); }
};

// Attributes, read with their declared type checked: an attribute present with another type (a
// string given as an int, an int given as a float, ...) is an error, never silently the default.
// `fallback` is returned when the attribute is absent; without one, absence is an error.
int64_t IntAttribute(const OrtKernelInfo* info, const char* name, std::optional<int64_t> fallback = std::nullopt);
float FloatAttribute(const OrtKernelInfo* info, const char* name, std::optional<float> fallback = std::nullopt);
std::string StringAttribute(const OrtKernelInfo* info, const char* name, std::optional<std::string> fallback = std::nullopt);

TensorView View(const OrtValue* value);  // an absent input (nullptr) gives present = false
void ReadInputs(OrtKernelContext* ctx, TensorView* in, size_t n);  // views of the first n inputs
std::string ShapeString(const std::vector<int64_t>& s);
const char* TypeName(ONNXTensorElementDataType t);
std::string NodeName(const OrtKernelInfo* info);
OrtStatus* ToStatus(const char* op, const std::string& node, const std::exception& e);  // "<op> node '<node>': <what>"
OrtStatus* UnknownErrorStatus(const char* op);  // for an exception that is not a std::exception

// Fills the kernel life cycle of `op` for Kernel: constructed from (info, node name), with
// Compute(ctx) and a static kOpName; exceptions become statuses that name the op and the node.
template <typename Kernel>
void SetKernelLifecycle(OrtCustomOp& op) {
  op.CreateKernel = [](const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*) -> void* { return nullptr; };
  op.KernelCompute = [](void*, OrtKernelContext*) {};
  op.CreateKernelV2 = [](const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** out) -> OrtStatus* {
    std::string node = "?";
    try {
      node = NodeName(info);
      *out = new Kernel(info, node);
      return nullptr;
    } catch (const std::exception& e) {
      return ToStatus(Kernel::kOpName, node, e);
    } catch (...) {
      return UnknownErrorStatus(Kernel::kOpName);
    }
  };
  op.KernelComputeV2 = [](void* k, OrtKernelContext* ctx) -> OrtStatus* {
    auto* kernel = static_cast<Kernel*>(k);
    try {
      kernel->Compute(ctx);
      return nullptr;
    } catch (const std::exception& e) {
      return ToStatus(Kernel::kOpName, kernel->node, e);
    } catch (...) {
      return UnknownErrorStatus(Kernel::kOpName);
    }
  };
  op.KernelDestroy = [](void* k) { delete static_cast<Kernel*>(k); };
}

// Runs fn(i) for i in [0, tasks) on onnxruntime's intra-op thread pool (inline for one task). An
// exception must not unwind through the pool: the first one a task throws is kept and rethrown here,
// once every task has returned.
template <typename Fn>
void ParallelFor(OrtKernelContext* ctx, int64_t tasks, Fn fn) {
  if (tasks <= 1) {
    for (int64_t i = 0; i < tasks; ++i) fn(i);
    return;
  }
  struct Job {
    Fn* fn = nullptr;
    std::mutex mutex;
    std::exception_ptr error;
  } job;
  job.fn = &fn;
  auto run = [](void* data, size_t i) {
    Job* j = static_cast<Job*>(data);
    try {
      (*j->fn)(int64_t(i));
    } catch (...) {
      std::lock_guard<std::mutex> lock(j->mutex);
      if (!j->error) j->error = std::current_exception();
    }
  };
  ThrowOnError(g_api->KernelContext_ParallelFor(ctx, run, size_t(tasks), 0, &job));
  if (job.error) std::rethrow_exception(job.error);
}

// The CPU GroupQueryAttention op (attention_op.cc).
OrtCustomOp* AttentionCpuOp();

}  // namespace slim
