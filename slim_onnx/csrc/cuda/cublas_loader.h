// cuBLAS GEMMs for the library path of the CUDA op, with cuBLAS loaded at run time
// (cublas_loader.cc). No CUDA header is needed to include this file.
#pragma once

#include <cstddef>

namespace slim::cuda {

// Loads cuBLAS (once per process) and makes the handle for `device`, which must be the current
// device. False when cuBLAS cannot be loaded or the handle cannot be made: the caller then keeps to
// its own kernels.
bool PrepareCublas(int device);

// C = A^T @ B (+ C when `accumulate`) in cuBLAS's column-major terms: A is k x m (lda), B is k x n
// (ldb), C is m x n (ldc); A and B float16, C float16 or float32; float32 accumulation. With
// row-major matrices this is Y[n rows, m cols] = X[n, k] @ W^T where W is stored [m][k]: see the
// callers. Queued on `stream` with `workspace` as cuBLAS's scratch. Throws std::runtime_error.
struct GemmCall {
  int device = 0;
  void* stream = nullptr;
  int m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int lda = 0;
  const void* b = nullptr;
  int ldb = 0;
  void* c = nullptr;
  int ldc = 0;
  bool c_half = true, accumulate = false;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};
void CublasGemm(const GemmCall& call);

}  // namespace slim::cuda
