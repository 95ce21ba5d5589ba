// The library's entry point: RegisterCustomOps puts the "slim_onnx" domain (SlimMatMul on the CPU and,
// when built with CUDA, on the CUDA execution provider; GroupQueryAttention on the CPU) into a
// session's options. Also the kernel-name query the tests use.
#include <cstdio>
#include <mutex>
#include <string>
#include <vector>

#include "op_common.h"
#include "slim_kernels.h"
#include "slim_matmul.h"

extern "C" SLIM_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  using namespace slim;
  const OrtApi* api = base->GetApi(kOrtApiVersion);
  if (api == nullptr) {
    // Older than 1.20: report through the oldest API table, which every runtime has.
    const OrtApi* v1 = base->GetApi(1);
    return v1->CreateStatus(ORT_FAIL, (std::string("slim_onnx needs onnxruntime >= 1.20, this is ") +
                                       base->GetVersionString()).c_str());
  }
  g_api = api;
  g_api24 = base->GetApi(24);
  // onnxruntime before 1.24 dereferences absent optional inputs (an empty name between present ones)
  // when it builds the shape-inference context of a custom op, and crashes: infer shapes only on 1.24+.
  int major = 0, minor = 0;
  const bool shape_inference = std::sscanf(base->GetVersionString(), "%d.%d", &major, &minor) == 2 &&
                               (major > 1 || (major == 1 && minor >= 24));
  std::vector<OrtCustomOp*> ops = SlimMatMulCpuOps();
#ifdef SLIM_ONNX_HAVE_CUDA
  for (OrtCustomOp* op : SlimMatMulCudaOps()) ops.push_back(op);
#endif
  static OrtCustomOpDomain* domain = nullptr;  // lives as long as the process: sessions keep pointers to it
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  if (domain == nullptr) {
    const auto infer = [](const OrtCustomOp*, OrtShapeInferContext* ctx) -> OrtStatus* {
      try {  // an exception must not cross onnxruntime's C boundary
        return InferOutputShape(ctx);
      } catch (const std::exception& e) {
        return g_api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string("SlimMatMul shape inference: ") + e.what()).c_str());
      } catch (...) {
        return UnknownErrorStatus("SlimMatMul shape inference");
      }
    };
    for (OrtCustomOp* op : ops) op->InferOutputShapeFn = shape_inference ? +infer : nullptr;
    OrtCustomOpDomain* d = nullptr;
    if (OrtStatus* st = api->CreateCustomOpDomain("slim_onnx", &d)) return st;
    for (OrtCustomOp* op : ops)
      if (OrtStatus* st = api->CustomOpDomain_Add(d, op)) return st;
    if (OrtStatus* st = api->CustomOpDomain_Add(d, AttentionCpuOp())) return st;
    domain = d;
  }
  return api->AddCustomOpDomain(options, domain);
}

// For tests and diagnostics: which kernel table the CPU op runs ("avx2" or "scalar").
extern "C" SLIM_EXPORT const char* SlimOnnxKernelName() { return slim::SelectKernels().name; }
