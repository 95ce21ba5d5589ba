// Entry points for tests and benchmarks that drive the CUDA kernels without onnxruntime-gpu (from
// torch, through ctypes). Inputs are host pointers in the op's input order (W, W_scales, bias, L,
// L_scales, R, R_scales; null = absent) with the shapes docs/op-spec.md gives for the attributes
// {K, N, group_size, sparse, rank, adapter_format (0 none, 1 float16, 2 int4), adapter_group_size}.
// Errors return null / nonzero and write a message to `error`.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <vector>

#include "../slim_matmul.h"
#include "slim_cuda.h"

namespace {
void CopyError(const std::exception& e, char* error, size_t size) {
  if (error != nullptr && size > 0) std::snprintf(error, size, "%s", e.what());
}
}  // namespace

namespace slim {
namespace {
// The attributes and weight-input views the entry points' arrays describe (see above); the shapes
// follow from the attributes, and Prepare validates the rest as for a model's node.
Attributes HostInputs(const int64_t* attrs, const void* const* inputs, TensorView (&in)[kNumInputs]) {
  Attributes a;
  a.K = attrs[0], a.N = attrs[1], a.group_size = attrs[2], a.sparse = attrs[3], a.rank = attrs[4];
  a.adapter = attrs[5] == 2 ? AdapterFormat::kInt4 : attrs[5] == 1 ? AdapterFormat::kFloat16 : AdapterFormat::kNone;
  a.adapter_group_size = attrs[6];
  ValidateAttributes(a);
  const int64_t Kb = CeilDiv(a.K, kBlockK), rb = CeilDiv(a.rank, kBlockK);
  const auto u8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, f16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  auto view = [&](Input i, ONNXTensorElementDataType type, std::vector<int64_t> shape) {
    TensorView v;
    v.present = inputs[i - 1] != nullptr;
    v.type = type;
    v.shape = std::move(shape);
    v.data = inputs[i - 1];
    return v;
  };
  in[kW] = view(kW, u8, {CeilDiv(a.N, kTileN), Kb, a.sparse ? kSparseBlockBytes : kDenseBlockBytes});
  in[kWScales] = view(kWScales, f16, {CeilDiv(a.K, a.group_size), a.N});
  in[kBias] = view(kBias, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {a.N});
  if (a.adapter == AdapterFormat::kInt4) {
    in[kL] = view(kL, u8, {CeilDiv(a.rank, kTileN), Kb, kDenseBlockBytes});
    in[kLScales] = view(kLScales, f16, {CeilDiv(a.K, a.adapter_group_size), a.rank});
    in[kR] = view(kR, u8, {CeilDiv(a.N, kTileN), rb, kDenseBlockBytes});
    in[kRScales] = view(kRScales, f16, {CeilDiv(a.rank, a.adapter_group_size), a.N});
  } else if (a.adapter == AdapterFormat::kFloat16) {
    in[kL] = view(kL, f16, {a.K, a.rank});
    in[kR] = view(kR, f16, {a.rank, a.N});
  }
  return a;
}

cuda::Path PathFrom(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument("path must be 0 (auto), 1 (kernels) or 2 (library)");
  return static_cast<cuda::Path>(code);
}
}  // namespace
}  // namespace slim

extern "C" SLIM_EXPORT void* SlimOnnxCudaCreate(const int64_t* attrs, const void* const* inputs, int device,
                                                char* error, size_t error_size) {
  using namespace slim;
  try {
    TensorView in[kNumInputs];
    const Attributes a = HostInputs(attrs, inputs, in);
    return UploadCudaWeights(a, in, cuda::CudaMallocAllocator(), device);
  } catch (const std::exception& e) {
    CopyError(e, error, error_size);
    return nullptr;
  }
}

// `path`: 0 automatic, 1 the fused kernels, 2 the library path (slim::cuda::Path). Returns
// SIZE_MAX (with a message in `error`) when the path cannot run.
extern "C" SLIM_EXPORT size_t SlimOnnxCudaScratchBytes(void* weights, int64_t M, int half, int path, char* error,
                                                      size_t error_size) {
  try {
    return slim::cuda::ScratchBytes(static_cast<slim::cuda::DeviceWeights*>(weights), M, half != 0,
                                    slim::PathFrom(path));
  } catch (const std::exception& e) {
    CopyError(e, error, error_size);
    return SIZE_MAX;
  }
}

extern "C" SLIM_EXPORT int SlimOnnxCudaRun(void* weights, const void* A, int half, int64_t M, void* Y, void* scratch,
                                          void* stream, int path, char* error, size_t error_size) {
  try {
    slim::cuda::RunSlimMatMul(static_cast<slim::cuda::DeviceWeights*>(weights), A, half != 0, M, Y, scratch, stream,
                              slim::PathFrom(path));
    return 0;
  } catch (const std::exception& e) {
    CopyError(e, error, error_size);
    return 1;
  }
}

// The fragment-order re-layout of the main weight W (same attrs and inputs as SlimOnnxCudaCreate),
// for CPU-side tests of the layout. Called with null outputs it only writes the word counts
// {frag, meta, scales}. Returns 0, or 1 with a message in `error`.
extern "C" SLIM_EXPORT int SlimOnnxCudaFragments(const int64_t* attrs, const void* const* inputs, int64_t* counts,
                                                uint32_t* frag, uint32_t* meta, uint32_t* scales,
                                                char* error, size_t error_size) {
  using namespace slim;
  try {
    TensorView in[kNumInputs];
    const Attributes a = HostInputs(attrs, inputs, in);
    const std::unique_ptr<Prepared> p = Prepare(a, in);
    const cuda::FragMatrix f = cuda::FragFromPacked(p->w.m, static_cast<const uint16_t*>(in[kWScales].data), a.group_size);
    counts[0] = int64_t(f.frag.size()), counts[1] = int64_t(f.meta.size()), counts[2] = int64_t(f.scales.size());
    if (frag != nullptr) std::copy(f.frag.begin(), f.frag.end(), frag);
    if (meta != nullptr) std::copy(f.meta.begin(), f.meta.end(), meta);
    if (scales != nullptr) std::copy(f.scales.begin(), f.scales.end(), scales);
    return 0;
  } catch (const std::exception& e) {
    CopyError(e, error, error_size);
    return 1;
  }
}

extern "C" SLIM_EXPORT void SlimOnnxCudaDestroy(void* weights) {
  slim::cuda::FreeWeights(static_cast<slim::cuda::DeviceWeights*>(weights));
}
