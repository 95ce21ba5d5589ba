// cuBLAS, loaded at run time for the library-GEMM path of slim_cuda_kernels.cu.
//
// Nothing links against cuBLAS, so the library still loads (and runs its CPU op and the CUDA kernels
// of its own) on a machine without it. Every process that runs our CUDA op has cuBLAS mapped already:
// onnxruntime's CUDA provider and torch both link it, so dlopen by soname finds that copy. The
// declarations below follow cublas_api.h (the toolkit this builds with has no cuBLAS headers); the
// enum values are part of cuBLAS's stable ABI.
#include "cublas_loader.h"

#include <dlfcn.h>

#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

namespace slim::cuda {
namespace {

using Handle = void*;
using Status = int;
constexpr int kOpN = 0, kOpT = 1;            // cublasOperation_t
constexpr int kR32F = 0, kR16F = 2;          // cudaDataType_t
constexpr int kCompute32F = 68;              // cublasComputeType_t CUBLAS_COMPUTE_32F
constexpr int kGemmDefault = -1;             // cublasGemmAlgo_t CUBLAS_GEMM_DEFAULT

struct Cublas {
  Status (*create)(Handle*) = nullptr;
  Status (*set_stream)(Handle, void*) = nullptr;
  Status (*set_workspace)(Handle, void*, size_t) = nullptr;
  Status (*gemm_ex)(Handle, int, int, int, int, int, const void*, const void*, int, int, const void*, int, int,
                    const void*, void*, int, int, int, int) = nullptr;
  // One handle per device, made at weight upload (never during a CUDA graph capture). Calls hold the
  // mutex from setting the stream and workspace until the GEMM is queued, so sessions on other streams
  // may share a handle; each call brings its own workspace, so queued GEMMs never share one.
  std::mutex mutex;
  std::map<int, Handle> handles;
};

Cublas* Load() {
  static Cublas* const lib = []() -> Cublas* {
    void* so = nullptr;
    for (const char* name : {"libcublas.so.13", "libcublas.so.12"})
      if ((so = dlopen(name, RTLD_NOW | RTLD_LOCAL)) != nullptr) break;
    if (so == nullptr) return nullptr;
    auto* c = new Cublas;
    c->create = reinterpret_cast<decltype(c->create)>(dlsym(so, "cublasCreate_v2"));
    c->set_stream = reinterpret_cast<decltype(c->set_stream)>(dlsym(so, "cublasSetStream_v2"));
    c->set_workspace = reinterpret_cast<decltype(c->set_workspace)>(dlsym(so, "cublasSetWorkspace_v2"));
    c->gemm_ex = reinterpret_cast<decltype(c->gemm_ex)>(dlsym(so, "cublasGemmEx"));
    if (!c->create || !c->set_stream || !c->set_workspace || !c->gemm_ex) {
      delete c;
      return nullptr;
    }
    return c;
  }();
  return lib;
}

void Check(Status s, const char* what) {
  if (s != 0) throw std::runtime_error(std::string("cuBLAS ") + what + " failed with status " + std::to_string(s));
}

}  // namespace

bool PrepareCublas(int device) {
  Cublas* c = Load();
  if (c == nullptr) return false;
  std::lock_guard<std::mutex> lock(c->mutex);
  if (c->handles.count(device)) return true;
  Handle h = nullptr;
  if (c->create(&h) != 0) return false;  // the caller's current device is `device`
  c->handles[device] = h;
  return true;
}

void CublasGemm(const GemmCall& g) {
  Cublas* c = Load();
  if (c == nullptr) throw std::runtime_error("cuBLAS is not loaded");
  const float alpha = 1.f, beta = g.accumulate ? 1.f : 0.f;
  std::lock_guard<std::mutex> lock(c->mutex);
  const auto it = c->handles.find(g.device);
  if (it == c->handles.end()) throw std::runtime_error("no cuBLAS handle for this device");
  Check(c->set_stream(it->second, g.stream), "SetStream");
  Check(c->set_workspace(it->second, g.workspace, g.workspace_bytes), "SetWorkspace");
  Check(c->gemm_ex(it->second, kOpT, kOpN, g.m, g.n, g.k, &alpha, g.a, kR16F, g.lda, g.b, kR16F, g.ldb, &beta, g.c,
                   g.c_half ? kR16F : kR32F, g.ldc, kCompute32F, kGemmDefault),
        "GemmEx");
}

}  // namespace slim::cuda
